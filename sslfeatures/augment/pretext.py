"""Helpers shared by the classic pretext tasks: colour spaces, ab quantisation, tiles,
permutations, rotations, the chromatic-aberration guard and k-means.

Everything here is batched tensor code that runs on the training device (no PIL, no
per-image Python loop) and draws its randomness from torch's global RNG, which the
engine seeds per step, so runs stay reproducible and resumable.

Colour conventions: RGB is sRGB in [0, 1]; Lab is CIE L*a*b* under D65 with L in
[0, 100] and a, b roughly in [-110, 110]; tensors keep their channels in dimension -3,
so ``(3, H, W)`` and ``(B, 3, H, W)`` both work.
"""
from __future__ import annotations

import itertools
import json
import math
import os
from functools import lru_cache
from pathlib import Path
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from . import ops
from .views import ViewSpec

# ---------------------------------------------------------------------------------------
# sRGB <-> CIE Lab (D65)
# ---------------------------------------------------------------------------------------
_RGB_TO_XYZ = ((0.412453, 0.357580, 0.180423),
               (0.212671, 0.715160, 0.072169),
               (0.019334, 0.119193, 0.950227))
_WHITE_D65 = (0.95047, 1.0, 1.08883)
_EPS = (6 / 29) ** 3
_KAPPA = 3 * (6 / 29) ** 2


def _mix(x: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """Apply a 3x3 matrix to the channel dimension (-3) of ``x``."""
    return torch.einsum("ij,...jhw->...ihw", matrix.to(x.device, x.dtype), x)


def _check_channels(x: torch.Tensor, what: str) -> None:
    if x.ndim < 3 or x.shape[-3] != 3:
        raise ValueError(f"{what} expects (..., 3, H, W) tensors, got shape {tuple(x.shape)}")


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """sRGB in [0, 1] -> CIE Lab (D65): L in [0, 100], a/b in about [-110, 110].

    Matches :func:`skimage.color.rgb2lab` to float32 precision; float64 input stays float64.
    """
    _check_channels(rgb, "rgb_to_lab")
    x = (rgb if rgb.dtype in (torch.float32, torch.float64) else rgb.float()).clamp(0, 1)
    lin = torch.where(x > 0.04045, ((x + 0.055) / 1.055).pow(2.4), x / 12.92)
    xyz = _mix(lin, torch.tensor(_RGB_TO_XYZ)) / lin.new_tensor(_WHITE_D65).view(3, 1, 1)
    f = torch.where(xyz > _EPS, xyz.clamp(min=_EPS).pow(1 / 3), xyz / _KAPPA + 4 / 29)
    fx, fy, fz = f.unbind(-3)
    return torch.stack([116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)], -3)


def lab_to_rgb(lab: torch.Tensor, clamp: bool = True) -> torch.Tensor:
    """CIE Lab (D65) -> sRGB in [0, 1] (out-of-gamut colours clipped when ``clamp``)."""
    _check_channels(lab, "lab_to_rgb")
    lab = lab if lab.dtype in (torch.float32, torch.float64) else lab.float()
    L, a, b = lab.unbind(-3)
    fy = (L + 16) / 116
    f = torch.stack([fy + a / 500, fy, fy - b / 200], -3)
    xyz = torch.where(f > 6 / 29, f.pow(3), _KAPPA * (f - 4 / 29))
    xyz = xyz * lab.new_tensor(_WHITE_D65).view(3, 1, 1)
    lin = _mix(xyz, torch.linalg.inv(torch.tensor(_RGB_TO_XYZ, dtype=torch.float64)))
    rgb = torch.where(lin > 0.0031308, 1.055 * lin.clamp(min=0.0031308).pow(1 / 2.4) - 0.055, 12.92 * lin)
    return rgb.clamp(0, 1) if clamp else rgb


def denormalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Undo :func:`sslfeatures.augment.ops.normalize`: back to RGB in [0, 1] (clamped)."""
    m = x.new_tensor(tuple(mean)).view(-1, 1, 1)
    s = x.new_tensor(tuple(std)).view(-1, 1, 1)
    return (x * s + m).clamp(0, 1)


def lab_network_input(lab: torch.Tensor, channels: str) -> torch.Tensor:
    """Select and scale Lab channels for a network: L -> L/50 - 1, a/b -> a/110, b/110.

    ``channels`` is ``"L"``, ``"ab"`` or ``"Lab"``.
    """
    parts = {"L": lab[..., 0:1, :, :] / 50.0 - 1.0, "ab": lab[..., 1:3, :, :] / 110.0}
    if channels == "Lab":
        return torch.cat([parts["L"], parts["ab"]], -3)
    if channels not in parts:
        raise ValueError(f"channels must be 'L', 'ab' or 'Lab', got {channels!r}")
    return parts[channels]


# ---------------------------------------------------------------------------------------
# ab quantisation (Zhang et al. 2016)
# ---------------------------------------------------------------------------------------
def _rgb_cube_surface(n: int) -> torch.Tensor:
    """Points on the six faces of the RGB cube, (6 n^2, 3, 1, 1): the ab projection of
    the full cube equals the projection of its surface."""
    v = torch.linspace(0, 1, n, dtype=torch.float64)
    u, w = torch.meshgrid(v, v, indexing="ij")
    faces = []
    for axis in range(3):
        others = [i for i in range(3) if i != axis]
        for value in (0.0, 1.0):
            f = torch.empty(n * n, 3, dtype=torch.float64)
            f[:, axis] = value
            f[:, others[0]], f[:, others[1]] = u.reshape(-1), w.reshape(-1)
            faces.append(f)
    return torch.cat(faces).view(-1, 3, 1, 1)


@lru_cache(maxsize=8)
def _gamut_bins_cached(grid: float, samples: int) -> torch.Tensor:
    ab = rgb_to_lab(_rgb_cube_surface(samples))[:, 1:, 0, 0]  # float64
    cell = torch.floor(ab / grid).long() + 1000  # non-negative cell indices
    keys = torch.unique(cell[:, 0] * 4096 + cell[:, 1])  # 1-D unique: much faster than dim=0
    corners = torch.unique(torch.cat([keys + da * 4096 + db for da in (0, 1) for db in (0, 1)]))  # sorted
    pts = torch.stack([corners // 4096 - 1000, corners % 4096 - 1000], 1)
    return (pts.double() * grid).float().contiguous()  # sorted by a, then b


def ab_gamut_bins(grid: float = 10.0, samples: int = 256) -> torch.Tensor:
    """The quantised ab colours of Zhang et al.: grid points (spacing ``grid``) of the sRGB
    ab gamut, ``(Q, 2)`` float32, sorted by a then b.

    Computed, not downloaded: the surface of the RGB cube is sampled (``samples`` points
    per edge), projected to ab, and every grid point that is a corner of a grid cell the
    gamut reaches is kept, so every in-gamut ab colour is a convex combination of kept
    bins. With ``grid=10`` this gives Q = 309 bins under D65 (Zhang et al. report 313 for
    their own gamut computation, whose exact rule is not published).
    """
    if grid <= 0:
        raise ValueError(f"grid must be > 0, got {grid}")
    return _gamut_bins_cached(float(grid), int(samples)).clone()


def hard_ab_bins(ab: torch.Tensor, bins: torch.Tensor) -> torch.Tensor:
    """Index of the nearest bin for each pixel: ``ab`` (B, 2, H, W) -> (B, H, W) long."""
    flat = ab.float().permute(0, 2, 3, 1).reshape(-1, 2)
    idx = torch.cdist(flat, bins.to(flat)).argmin(1)
    return idx.view(ab.shape[0], ab.shape[2], ab.shape[3])


def soft_encode_ab(ab: torch.Tensor, bins: torch.Tensor, neighbours: int = 5, sigma: float = 5.0) -> torch.Tensor:
    """Zhang et al.'s soft encoding: each pixel's target distribution over the ``Q`` bins
    puts Gaussian weights (``sigma``) on its ``neighbours`` nearest bins.

    ``ab`` (B, 2, H, W) -> (B, Q, H, W), summing to 1 over Q.
    """
    b, _, h, w = ab.shape
    flat = ab.float().permute(0, 2, 3, 1).reshape(-1, 2)
    d = torch.cdist(flat, bins.to(flat))
    k = min(neighbours, bins.shape[0])
    dist, idx = d.topk(k, dim=1, largest=False)
    wts = torch.softmax(-dist.pow(2) / (2 * sigma ** 2), dim=1)
    out = torch.zeros(flat.shape[0], bins.shape[0], device=ab.device, dtype=torch.float32)
    out.scatter_(1, idx, wts)
    return out.view(b, h, w, -1).permute(0, 3, 1, 2)


def smooth_prior(prior: torch.Tensor, bins: torch.Tensor, sigma: float = 5.0) -> torch.Tensor:
    """The empirical bin distribution smoothed by a Gaussian kernel (``sigma``, ab units)."""
    d2 = torch.cdist(bins.float(), bins.float()).pow(2)
    kernel = torch.exp(-d2 / (2 * sigma ** 2))
    kernel = kernel / kernel.sum(0, keepdim=True)
    p = kernel @ prior.float()
    return p / p.sum().clamp(min=1e-12)


def rebalance_weights(prior: torch.Tensor, bins: torch.Tensor, lam: float = 0.5, sigma: float = 5.0) -> torch.Tensor:
    """Zhang et al.'s class-rebalancing weights ``w ∝ ((1 - lam) p~ + lam / Q)^-1``,
    normalised so that ``E_p~[w] = 1`` (``p~``: the prior smoothed with ``sigma``)."""
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"rebalancing lambda must be in [0, 1], got {lam}")
    p = smooth_prior(prior, bins, sigma)
    w = 1.0 / ((1 - lam) * p + lam / p.numel())
    return w / (p * w).sum()


def annealed_mean(logits: torch.Tensor, bins: torch.Tensor, temperature: float = 0.38) -> torch.Tensor:
    """Zhang et al.'s decoding: the mean of the temperature-sharpened distribution.

    ``logits`` (B, Q, H, W) -> ab (B, 2, H, W). ``temperature=1`` is the mean, ``-> 0`` the mode.
    """
    p = torch.softmax(logits.float() / temperature, dim=1)
    return torch.einsum("bqhw,qc->bchw", p, bins.to(p))


def quantize_uniform(x: torch.Tensor, lo: float, hi: float, num_bins: int) -> torch.Tensor:
    """Index of ``x``'s uniform bin in ``[lo, hi]`` (``num_bins`` bins), long."""
    idx = ((x.float() - lo) / (hi - lo) * num_bins).floor().long()
    return idx.clamp(0, num_bins - 1)


# ---------------------------------------------------------------------------------------
# tiles and patches
# ---------------------------------------------------------------------------------------
def crop_tiles(x: torch.Tensor, tops: torch.Tensor, lefts: torch.Tensor, size: int) -> torch.Tensor:
    """Integer crops of ``size`` x ``size`` pixels at per-sample, per-tile positions.

    ``x`` (B, C, H, W); ``tops``/``lefts`` (B, T) long -> (B, T, C, size, size). One
    gather for the whole batch; positions must keep the tile inside the image.
    """
    b, c, h, w = x.shape
    if tops.shape != lefts.shape or tops.shape[0] != b:
        raise ValueError(f"tops/lefts must both be (B={b}, T), got {tuple(tops.shape)} and {tuple(lefts.shape)}")
    if int(tops.min()) < 0 or int(lefts.min()) < 0 or int(tops.max()) + size > h or int(lefts.max()) + size > w:
        raise ValueError(f"a {size}px tile falls outside the {h}x{w} image")
    t = tops.shape[1]
    r = torch.arange(size, device=x.device)
    rows = (tops.to(x.device)[..., None] + r).view(b, t, size, 1)
    cols = (lefts.to(x.device)[..., None] + r).view(b, t, 1, size)
    flat = (rows * w + cols).view(b, 1, t * size * size).expand(b, c, -1)
    out = torch.gather(x.reshape(b, c, h * w), 2, flat)
    return out.view(b, c, t, size, size).transpose(1, 2)


def grid_positions(batch: int, image_size: int, grid: int, cell: int, tile: int, jitter: int | None = None,
                   device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-left corners ``(B, grid*grid)`` of tiles on a ``grid`` x ``grid`` layout.

    The grid (``grid * cell`` pixels a side) is placed at a random offset inside the
    image; each ``tile`` sits inside its ``cell`` at a random offset, limited to
    ``jitter`` pixels either side of the cell's centre when given (Doersch et al.) and
    anywhere in the cell otherwise (Noroozi & Favaro). Row-major tile order.
    """
    span = grid * cell
    if tile > cell:
        raise ValueError(f"tile ({tile}px) larger than its cell ({cell}px)")
    if span > image_size:
        raise ValueError(f"a {grid}x{grid} grid of {cell}px cells needs {span}px; the image has {image_size}px")
    slack = image_size - span
    oy = torch.randint(0, slack + 1, (batch, 1))
    ox = torch.randint(0, slack + 1, (batch, 1))
    room = cell - tile
    if jitter is None:
        dy = torch.randint(0, room + 1, (batch, grid * grid))
        dx = torch.randint(0, room + 1, (batch, grid * grid))
    else:
        j = min(int(jitter), room // 2)
        dy = room // 2 + torch.randint(-j, j + 1, (batch, grid * grid))
        dx = room // 2 + torch.randint(-j, j + 1, (batch, grid * grid))
    iy, ix = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    tops = oy + iy.reshape(1, -1) * cell + dy
    lefts = ox + ix.reshape(1, -1) * cell + dx
    return tops.to(device), lefts.to(device)


def resize_tiles_for_trunk(x: torch.Tensor, size: int | None = None, patch: int | None = None) -> torch.Tensor:
    """Resize square tiles (N, C, s, s) to ``size`` (when given) and, for a ViT with
    ``patch``-pixel patches, to the nearest multiple of ``patch`` (a ViT needs whole patches)."""
    target = size or x.shape[-1]
    if patch:
        target = max(patch, int(round(target / patch)) * patch)
    if target != x.shape[-1] or target != x.shape[-2]:
        x = F.interpolate(x, size=(target, target), mode="bilinear", align_corners=False)
    return x


def normalize_tiles(tiles: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Per-tile, per-channel mean/std normalisation (B, T, C, h, w) (Noroozi & Favaro),
    so that tiles cannot be matched by their brightness or contrast."""
    mean = tiles.mean(dim=(-2, -1), keepdim=True)
    std = tiles.std(dim=(-2, -1), keepdim=True)
    return (tiles - mean) / (std + eps)


def permute_tiles(tiles: torch.Tensor, perms: torch.Tensor) -> torch.Tensor:
    """Shuffle tiles: ``out[b, i] = tiles[b, perms[b, i]]``; ``tiles`` (B, T, ...), ``perms`` (B, T)."""
    idx = perms.to(tiles.device).long().view(*perms.shape, *([1] * (tiles.ndim - 2))).expand_as(tiles)
    return torch.gather(tiles, 1, idx)


def inverse_permutation(perms: torch.Tensor) -> torch.Tensor:
    """The inverse of each row of ``perms`` (B, T): ``permute_tiles(permute_tiles(x, p), inv(p)) == x``."""
    return torch.argsort(perms, dim=-1)


def maximal_hamming_permutations(n: int, num_tiles: int = 9, seed: int = 0) -> np.ndarray:
    """Noroozi & Favaro's Algorithm 1: a set of ``n`` permutations of ``num_tiles`` with
    maximal Hamming distance, chosen greedily.

    Start from a random permutation (drawn with ``seed``); then repeatedly add the
    candidate whose summed Hamming distance to the chosen set is largest (ties go to the
    first in lexicographic order). Deterministic for a given ``(n, num_tiles, seed)``.
    Returns ``(n, num_tiles)`` int64.
    """
    if num_tiles > 10:
        raise ValueError("maximal_hamming_permutations enumerates all permutations; num_tiles must be <= 10")
    total = math.factorial(num_tiles)
    if not 1 <= n <= total:
        raise ValueError(f"n must be in [1, {total}] for {num_tiles} tiles, got {n}")
    cands = np.array(list(itertools.permutations(range(num_tiles))), dtype=np.int8)
    cols = np.ascontiguousarray(cands.T)
    rng = np.random.default_rng(seed)
    alive = np.ones(total, dtype=bool)
    dist_sum = np.zeros(total, dtype=np.int64)
    chosen = [int(rng.integers(total))]
    for _ in range(n - 1):
        last = cands[chosen[-1]]
        alive[chosen[-1]] = False
        for j in range(num_tiles):  # column by column: ~50x faster than a (N, 9) reduction
            dist_sum += cols[j] != last[j]
        score = np.where(alive, dist_sum, -1)
        chosen.append(int(score.argmax()))
    return cands[chosen].astype(np.int64)


def save_permutations(path: str | os.PathLike, perms: np.ndarray, seed: int) -> Path:
    """Write a permutation set as JSON (with how it was made and its Hamming distances)."""
    perms = np.asarray(perms, dtype=np.int64)
    d = (perms[:, None, :] != perms[None, :, :]).sum(-1)
    off = d[~np.eye(len(perms), dtype=bool)] if len(perms) > 1 else np.zeros(1)
    doc = {"algorithm": "Noroozi & Favaro 2016, Algorithm 1 (greedy, maximal summed Hamming distance)",
           "seed": int(seed), "num_tiles": int(perms.shape[1]), "count": int(len(perms)),
           "min_hamming": int(off.min()), "mean_hamming": round(float(off.mean()), 4),
           "permutations": perms.tolist()}
    path = Path(path)
    path.write_text(json.dumps(doc, separators=(",", ":")) + "\n")
    return path


def load_permutations(path: str | os.PathLike) -> np.ndarray:
    """Read a permutation set written by :func:`save_permutations`, checking it."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read permutation set {path}: {e}") from None
    perms = np.asarray(doc.get("permutations") if isinstance(doc, dict) else doc, dtype=np.int64)
    if perms.ndim != 2 or len(perms) == 0:
        raise ValueError(f"{path}: expected a non-empty list of permutations")
    ref = np.arange(perms.shape[1])
    if not (np.sort(perms, axis=1) == ref).all():
        raise ValueError(f"{path}: every row must be a permutation of 0..{perms.shape[1] - 1}")
    if len(np.unique(perms, axis=0)) != len(perms):
        raise ValueError(f"{path}: the permutations are not distinct")
    return perms


# ---------------------------------------------------------------------------------------
# rotations, chromatic aberration, k-means
# ---------------------------------------------------------------------------------------
def four_rotations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RotNet's input: every image at 0, 90, 180 and 270 degrees (counter-clockwise).

    ``x`` (B, C, H, W) with H == W -> ``(images (4B, C, H, W), labels (4B,))`` where
    label ``k`` means a rotation by ``k * 90`` degrees; rotation-major order.
    """
    if x.shape[-1] != x.shape[-2]:
        raise ValueError(f"rotation prediction needs square images, got {tuple(x.shape[-2:])}")
    imgs = torch.cat([torch.rot90(x, k, dims=(-2, -1)) for k in range(4)])
    labels = torch.arange(4, device=x.device).repeat_interleave(x.shape[0])
    return imgs, labels


_GREEN_MAGENTA = (-1.0, 2.0, -1.0)


def project_out_green_magenta(rgb: torch.Tensor) -> torch.Tensor:
    """Doersch et al.'s "projection": remove each pixel's component along the
    green-magenta axis ``a = (-1, 2, -1)`` (``B = I - a^T a / (a a^T)``), so that chromatic
    aberration cannot reveal where a patch was in the lens field. Grays are unchanged."""
    a = torch.tensor(_GREEN_MAGENTA)
    proj = torch.eye(3) - torch.outer(a, a) / a.dot(a)
    return _mix(rgb, proj)


def color_drop(x: torch.Tensor, noise_frac: float = 0.01) -> torch.Tensor:
    """Doersch et al.'s "color dropping": per sample keep one random channel and replace
    the other two with Gaussian noise of ``noise_frac`` times the kept channel's std."""
    b = x.shape[0]
    keep = torch.randint(0, 3, (b,)).to(x.device)
    mask = F.one_hot(keep, 3).to(x.dtype).view(b, 3, *([1] * (x.ndim - 2)))
    kept = (x * mask).sum(1, keepdim=True)
    std = kept.flatten(1).std(1).view(b, *([1] * (x.ndim - 1)))
    noise = torch.randn(x.shape).to(x.device, x.dtype) * std * noise_frac
    return x * mask + noise * (1 - mask)


def kmeans(x: torch.Tensor, k: int, iters: int = 20, seed: int = 0) -> torch.Tensor:
    """Lloyd's k-means with k-means++ seeding (seeded, independent of the global RNG).

    ``x`` (N, D) -> centroids (k, D) float32. Empty clusters are re-seeded at the point
    farthest from its centroid.
    """
    x = x.float()
    n = x.shape[0]
    if n < k:
        raise ValueError(f"k-means needs at least k={k} points, got {n}")
    g = torch.Generator().manual_seed(int(seed))
    cent = x[torch.randint(0, n, (1,), generator=g).item()].unsqueeze(0)
    for _ in range(1, k):
        d2 = torch.cdist(x, cent).pow(2).min(1).values
        probs = (d2 / d2.sum()).cpu() if float(d2.sum()) > 0 else torch.full((n,), 1.0 / n)
        cent = torch.cat([cent, x[torch.multinomial(probs, 1, generator=g).item()].unsqueeze(0)])
    for _ in range(iters):
        d = torch.cdist(x, cent)
        assign = d.argmin(1)
        sums = torch.zeros_like(cent).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).to(x.dtype).unsqueeze(1)
        new = sums / counts.clamp(min=1)
        empty = counts.squeeze(1) == 0
        if empty.any():
            far = d.gather(1, assign[:, None]).squeeze(1).argsort(descending=True)
            new[empty] = x[far[: int(empty.sum())]]
        if torch.allclose(new, cent):
            cent = new
            break
        cent = new
    return cent


# ---------------------------------------------------------------------------------------
# clips
# ---------------------------------------------------------------------------------------
class ClipViews:
    """Views of video clips: one random resized crop and flip per clip, the same for all
    its frames (so frames stay aligned), from a :class:`~sslfeatures.augment.ViewSpec`.

    Called as ``views(batch, image_size)`` with a ``uint8`` batch ``(B, T, 3, H, W)``;
    returns ``T`` float tensors ``(B, 3, S, S)`` in [0, 1] (not normalised: colour is the
    training signal of the video methods, which convert to Lab themselves). Colour
    augmentations would change that signal and are refused.
    """

    def __init__(self, spec: ViewSpec, mean: Sequence[float], std: Sequence[float]):
        colour = {"jitter_p": spec.jitter_p if any(spec.jitter) else 0.0, "gray_p": spec.gray_p,
                  "blur_p": spec.blur_p, "solarize_p": spec.solarize_p}
        used = [k for k, v in colour.items() if v > 0]
        if used:
            raise ValueError(f"video clip views take crops and flips only; set {', '.join(f'{k}=0' for k in used)}")
        self.spec, self.mean, self.std = spec, tuple(mean), tuple(std)
        self.specs = [spec]

    def __call__(self, batch: torch.Tensor, image_size: int) -> list[torch.Tensor]:
        if batch.ndim != 5 or batch.shape[2] != 3:
            raise ValueError(f"clip views expect (B, T, 3, H, W) batches, got {tuple(batch.shape)}")
        b, t, c, h, w = batch.shape
        x = batch.float().div_(255.0).reshape(b, t * c, h, w)
        spec = self.spec
        x = ops.random_resized_crop(x, spec.out_size(image_size), spec.scale, spec.ratio, spec.hflip)
        return list(x.view(b, t, c, x.shape[-2], x.shape[-1]).unbind(1))


__all__ = ["rgb_to_lab", "lab_to_rgb", "denormalize", "lab_network_input", "ab_gamut_bins", "hard_ab_bins",
           "soft_encode_ab", "smooth_prior", "rebalance_weights", "annealed_mean", "quantize_uniform",
           "crop_tiles", "grid_positions", "resize_tiles_for_trunk", "normalize_tiles", "permute_tiles",
           "inverse_permutation", "maximal_hamming_permutations", "save_permutations", "load_permutations",
           "four_rotations", "project_out_green_magenta", "color_drop", "kmeans", "ClipViews"]
