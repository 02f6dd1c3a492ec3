"""Visual probes of what an encoder learned: attention maps, PCA of patch features, MAE
reconstructions, t-SNE, nearest-neighbour grids, and two numbers against a known object
mask (:func:`mask_iou`, :func:`mask_precision`).

Every function returns arrays; :func:`save_png` writes them (optionally overlaid on the
image). The CLI: ``sslfeatures viz attention|pca|recon|tsne|neighbors``.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["attention_maps", "threshold_mass", "pca_rgb", "tsne", "save_png", "plot_tsne", "load_method",
           "mae_reconstruction", "reconstruction_grid", "nearest_neighbors", "neighbor_grid", "mask_iou",
           "mask_precision"]


def _grid(enc: Any, n_tokens: int) -> tuple[int, int]:
    side = int(round(math.sqrt(n_tokens)))
    if side * side != n_tokens:
        raise ValueError(f"cannot arrange {n_tokens} patch tokens in a square grid")
    return side, side


def attention_maps(enc: Any, image: Any) -> np.ndarray:
    """Last-block CLS-to-patch attention of a ViT encoder, one map per head: ``(heads, h, w)``.

    The last block's attention is recomputed from its input tokens (captured with a forward
    hook) so the softmax weights are available even when timm uses fused attention.
    Register / extra prefix tokens are dropped from the keys; each head's map sums to <= 1.
    """
    bb = enc.backbone
    model = bb.model
    if not getattr(bb, "is_vit", False) or not hasattr(model, "blocks"):
        raise ValueError(f"attention_maps needs a ViT backbone; got {bb.name!r}")
    if bb.num_prefix_tokens < 1:
        raise ValueError(f"attention_maps needs a class token; {bb.name!r} has none")
    block = model.blocks[-1]
    attn = block.attn
    n_prefix = bb.num_prefix_tokens

    def fn(x: torch.Tensor) -> torch.Tensor:
        captured: list[torch.Tensor] = []
        handle = block.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
        try:
            model.forward_features(x)
        finally:
            handle.remove()
        tok = block.norm1(captured[0])
        b, n, _ = tok.shape
        qkv = attn.qkv(tok).reshape(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
        a = ((q * attn.scale) @ k.transpose(-2, -1)).float().softmax(-1)
        return a[:, :, 0, n_prefix:]  # (B, heads, T)

    out, _, _ = enc._run(image, fn, 1, 0, False, True, None)
    h, w = _grid(enc, out.shape[-1])
    return out[0].reshape(out.shape[1], h, w)


def threshold_mass(attn: np.ndarray, mass: float = 0.6) -> np.ndarray:
    """Boolean mask keeping the smallest set of entries holding ``mass`` of each map's total.

    ``attn``: ``(h, w)`` or ``(heads, h, w)`` non-negative; thresholding is per map (DINO).
    """
    if not 0.0 < mass <= 1.0:
        raise ValueError(f"mass must be in (0, 1], got {mass}")
    a = np.asarray(attn, dtype=np.float64)
    if a.ndim not in (2, 3):
        raise ValueError(f"expected (h, w) or (heads, h, w), got shape {a.shape}")
    if (a < 0).any():
        raise ValueError("attention values must be non-negative")
    flat = a.reshape(-1, a.shape[-2] * a.shape[-1])
    masks = np.zeros_like(flat, dtype=bool)
    for i, row in enumerate(flat):
        order = np.argsort(-row, kind="stable")
        cum = np.cumsum(row[order])
        total = cum[-1]
        if total <= 0:
            continue
        k = int(np.searchsorted(cum, mass * total - 1e-12 * total)) + 1
        masks[i, order[:min(k, row.size)]] = True
    return masks.reshape(a.shape)


def pca_rgb(enc: Any, image: Any, threshold: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """PCA of patch features to RGB plus a foreground mask (the DINOv2 figure).

    The first principal component is thresholded at ``threshold`` (in units of its std) to
    separate foreground from background; its sign is chosen so the image border is mostly
    background. Components 2-4, fitted on foreground patches, are min-max scaled to RGB.
    Returns ``(rgb (h, w, 3) float32 in [0, 1], foreground (h, w) bool)``.
    """
    feats = enc.patch_features(image)[0].astype(np.float64)  # (T, D)
    h, w = _grid(enc, feats.shape[0])
    x = feats - feats.mean(0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    pc1 = x @ vt[0]
    pc1 = pc1 / (pc1.std() + 1e-12)
    grid = pc1.reshape(h, w)
    border = np.concatenate([grid[0], grid[-1], grid[:, 0], grid[:, -1]])
    if np.mean(border > threshold) > 0.5:
        pc1 = -pc1
    fg = pc1 > threshold
    if fg.sum() < 4:  # degenerate: colour everything
        fg_fit = np.ones_like(fg)
    else:
        fg_fit = fg
    xf = feats[fg_fit] - feats[fg_fit].mean(0)
    _, _, vt2 = np.linalg.svd(xf, full_matrices=False)
    comps = vt2[:3] if vt2.shape[0] >= 3 else np.vstack([vt2, np.zeros((3 - vt2.shape[0], vt2.shape[1]))])
    proj = (feats - feats[fg_fit].mean(0)) @ comps.T
    lo, hi = proj[fg_fit].min(0), proj[fg_fit].max(0)
    rgb = np.clip((proj - lo) / np.maximum(hi - lo, 1e-12), 0, 1)
    rgb[~fg] = 0.0
    return rgb.reshape(h, w, 3).astype(np.float32), fg.reshape(h, w)


def tsne(features: np.ndarray, labels: Sequence[Any] | None = None, seed: int = 0,
         perplexity: float = 30.0, max_iter: int = 1000) -> np.ndarray:
    """2-D t-SNE coordinates ``(N, 2)`` of ``features`` (``labels`` only checked for length;
    colour with :func:`plot_tsne`)."""
    from sklearn.manifold import TSNE

    f = np.asarray(features, dtype=np.float32)
    if f.ndim != 2 or len(f) < 3:
        raise ValueError(f"tsne needs (N >= 3, D) features, got shape {f.shape}")
    if labels is not None and len(labels) != len(f):
        raise ValueError(f"{len(labels)} labels for {len(f)} features")
    perp = min(perplexity, (len(f) - 1) / 3)
    return TSNE(2, perplexity=max(perp, 1.0), init="pca", random_state=seed,
                max_iter=max(int(max_iter), 250)).fit_transform(f).astype(np.float32)


def plot_tsne(coords: np.ndarray, labels: Sequence[Any] | None, path: str | os.PathLike,
              title: str = "t-SNE") -> Path:
    """Scatter plot of 2-D coordinates coloured by label."""
    from .plots import _plt

    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
    if labels is None:
        ax.scatter(coords[:, 0], coords[:, 1], s=8)
    else:
        labs = np.asarray([str(v) for v in labels])
        for u in sorted(set(labs)):
            m = labs == u
            ax.scatter(coords[m, 0], coords[m, 1], s=8, label=u)
        ax.legend(fontsize=6, markerscale=1.5)
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def load_method(run: str | os.PathLike, device: str | torch.device | None = "cpu") -> Any:
    """The full trained method of a run folder (heads and decoders included, not only the
    encoder): rebuilt from ``train_config.json`` and loaded from its latest checkpoint.
    The method's ``mean``/``std`` are attached as ``method.pixel_mean``/``pixel_std``."""
    import json

    from .engine import Pretrainer
    from .engine.checkpoint import load_checkpoint

    run = Path(run)
    cfg_path = run / "train_config.json"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{run} is not a training run folder: train_config.json is missing")
    if not (run / "checkpoints" / "latest.json").exists():
        raise FileNotFoundError(f"{run} has no checkpoint (checkpoints/latest.json): the method's heads and "
                                "decoder are only saved there")
    cfg = json.loads(cfg_path.read_text())
    name = cfg.pop("method")
    cfg.pop("paper", None)
    method = Pretrainer(name, **cfg).build()
    load_checkpoint(run / "checkpoints", method)
    method.pixel_mean, method.pixel_std = tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD))
    return method.to(device or "cpu").eval()


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _image_array(image: Any, size: int) -> np.ndarray:
    """Any image (path, PIL, array, tensor) resized (shorter side) and centre-cropped:
    ``(size, size, 3)`` uint8."""
    from .data.decode import load_pil, resize_center_crop, to_uint8_image

    pil = load_pil(image) if isinstance(image, (str, os.PathLike)) else to_uint8_image(image)
    return np.asarray(resize_center_crop(pil, size))


@torch.no_grad()
def mae_reconstruction(run_or_method: Any, image: Any, mask_ratio: float = 0.75, seed: int = 0,
                       mean: Sequence[float] | None = None, std: Sequence[float] | None = None
                       ) -> dict[str, np.ndarray | float]:
    """MAE's picture: mask ``mask_ratio`` of the patches at random (seeded), let the trained
    decoder fill them in.

    ``run_or_method``: a run folder of the ``mae`` method (or any method with MAE's
    ``encode``/``decode``) or the method object. With ``norm_pix_loss`` the decoder predicts
    each patch normalised by its own mean and variance; as in MAE's demo, the true patch's
    statistics are put back to draw it. Returns ``image``, ``masked`` (masked patches
    grey), ``reconstruction`` (every patch predicted) and ``pasted`` (visible patches
    kept, masked ones predicted): ``(S, S, 3)`` float32 in [0, 1]; ``mask`` ``(h, w)`` bool
    (True = masked); ``mse``: mean squared error on the masked patches in the normalised
    pixel space the model was trained in.
    """
    from .methods.mae import patchify, unpatchify

    method = load_method(run_or_method) if isinstance(run_or_method, (str, os.PathLike)) else run_or_method
    if not all(hasattr(method, a) for a in ("encode", "decode", "p")):
        raise ValueError(f"mae_reconstruction needs an MAE run or method, got {type(method).__name__}")
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    method.eval()
    size = int(method.backbone.config["image_size"])
    mean = tuple(mean or getattr(method, "pixel_mean", IMAGENET_MEAN))
    std = tuple(std or getattr(method, "pixel_std", IMAGENET_STD))
    arr = _image_array(image, size)
    dev = next(method.parameters()).device
    m = torch.tensor(mean, device=dev).view(1, 3, 1, 1)
    sd = torch.tensor(std, device=dev).view(1, 3, 1, 1)
    x = (torch.from_numpy(arr.copy()).permute(2, 0, 1)[None].float().to(dev) / 255 - m) / sd
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        latent, mask, restore, grid = method.encode(x, mask_ratio)
    pred = method.decode(latent, restore, grid).float()
    p = method.p
    target = patchify(x, p)
    if getattr(method.cfg, "norm_pix_loss", False):
        mu, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        pred = pred * (var + 1e-6).sqrt() + mu
    mse = float((((pred - target) ** 2).mean(-1) * mask).sum() / mask.sum().clamp(min=1))
    mk = mask.unsqueeze(-1)
    grey = torch.zeros_like(target)  # normalised 0 = the dataset mean colour
    pasted = target * (1 - mk) + pred * mk
    masked = target * (1 - mk) + grey * mk

    def to_img(t: torch.Tensor) -> np.ndarray:
        img = unpatchify(t, p) * sd + m
        return img[0].permute(1, 2, 0).clamp(0, 1).cpu().numpy().astype(np.float32)

    return {"image": arr.astype(np.float32) / 255, "masked": to_img(masked), "reconstruction": to_img(pred),
            "pasted": to_img(pasted), "mask": mask[0].reshape(grid).bool().cpu().numpy(), "mse": mse}


def reconstruction_grid(results: Sequence[dict[str, Any]], gap: int = 2) -> np.ndarray:
    """One row per :func:`mae_reconstruction` result: image | masked | pasted |
    reconstruction, as one ``(H, W, 3)`` float32 array (white gaps)."""
    rows = []
    for r in results:
        tiles = [r["image"], r["masked"], r["pasted"], r["reconstruction"]]
        h = tiles[0].shape[0]
        sep = np.ones((h, gap, 3), np.float32)
        rows.append(np.concatenate([x for t in tiles for x in (t, sep)][:-1], axis=1))
    if not rows:
        raise ValueError("no reconstructions given")
    sep = np.ones((gap, rows[0].shape[1], 3), np.float32)
    return np.concatenate([x for r in rows for x in (r, sep)][:-1], axis=0)


def nearest_neighbors(enc: Any, queries: Any, gallery: Any, k: int = 5,
                      query_indices: Sequence[int] | None = None, query_features: np.ndarray | None = None,
                      gallery_features: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` gallery images most similar (cosine of ``enc.embed``) to each query:
    ``(indices (Q, k) int64, similarities (Q, k) float32)``, best first.
    ``query_indices``: the queries are ``gallery[query_indices]`` (``queries`` is then
    ignored) and a query is never its own neighbour. Precomputed features skip embedding."""
    fg = np.asarray(gallery_features if gallery_features is not None else enc.embed(gallery), np.float32)
    if query_indices is not None:
        qi = np.asarray(query_indices, dtype=np.int64)
        fq = fg[qi]
    else:
        fq = np.asarray(query_features if query_features is not None else enc.embed(queries), np.float32)
    n_ok = len(fg) - int(query_indices is not None)
    if k < 1 or k > n_ok:
        raise ValueError(f"k must be in [1, {n_ok}], got {k}")
    fq = fq / np.maximum(np.linalg.norm(fq, axis=1, keepdims=True), 1e-12)
    fg = fg / np.maximum(np.linalg.norm(fg, axis=1, keepdims=True), 1e-12)
    sims = fq @ fg.T
    if query_indices is not None:
        sims[np.arange(len(fq)), qi] = -np.inf
    idx = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return idx.astype(np.int64), np.take_along_axis(sims, idx, 1).astype(np.float32)


def neighbor_grid(queries: Sequence[Any], gallery: Sequence[Any], indices: np.ndarray, size: int = 64,
                  query_labels: Sequence[Any] | None = None, gallery_labels: Sequence[Any] | None = None,
                  gap: int = 4) -> np.ndarray:
    """A picture: each row a query (left, after a wider gap) and its neighbours
    ``gallery[indices[q]]``; with labels, each neighbour gets a green (same label as the
    query) or red (different) frame. ``(H, W, 3)`` uint8."""
    indices = np.asarray(indices)
    if indices.ndim != 2 or len(indices) != len(queries):
        raise ValueError(f"indices must be (Q={len(queries)}, k), got shape {indices.shape}")
    b = max(1, size // 16)

    def tile(img: Any, colour: tuple[int, int, int] | None) -> np.ndarray:
        t = _image_array(img, size).copy()
        if colour is not None:
            t[:b], t[-b:], t[:, :b], t[:, -b:] = colour, colour, colour, colour
        return t

    white = lambda h, w: np.full((h, w, 3), 255, np.uint8)  # noqa: E731
    rows = []
    for q, row in enumerate(indices):
        parts = [tile(queries[q], None), white(size, 3 * gap)]
        for j in row:
            colour = None
            if query_labels is not None and gallery_labels is not None:
                colour = (40, 170, 60) if gallery_labels[int(j)] == query_labels[q] else (210, 40, 40)
            parts += [tile(gallery[int(j)], colour), white(size, gap)]
        rows.append(np.concatenate(parts[:-1], axis=1))
    out = []
    for r in rows:
        out += [r, white(gap, r.shape[1])]
    return np.concatenate(out[:-1], axis=0)


def _to_pixels(pred: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    p = np.asarray(pred, dtype=bool)
    if p.shape == tuple(shape):
        return p
    return np.asarray(Image.fromarray(p.astype(np.uint8) * 255).resize((shape[1], shape[0]), Image.NEAREST)) > 127


def mask_iou(pred: np.ndarray, target: np.ndarray) -> float:
    """Intersection over union (Jaccard) of a predicted mask (e.g. a patch grid ``(h, w)``,
    upsampled to the target's size by nearest neighbour) and a pixel mask ``(H, W)``."""
    t = np.asarray(target, dtype=bool)
    p = _to_pixels(pred, t.shape)
    union = np.logical_or(p, t).sum()
    return float(np.logical_and(p, t).sum() / union) if union else 1.0


def mask_precision(pred: np.ndarray, target: np.ndarray) -> float:
    """The fraction of the predicted foreground (upsampled as in :func:`mask_iou`) that lies
    inside the target mask (0 when nothing is predicted)."""
    t = np.asarray(target, dtype=bool)
    p = _to_pixels(pred, t.shape)
    return float(np.logical_and(p, t).sum() / p.sum()) if p.sum() else 0.0


def _to_uint8(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype == np.bool_:
        return a.astype(np.uint8) * 255
    if a.dtype == np.uint8:
        return a
    a = a.astype(np.float64)
    lo, hi = float(a.min()), float(a.max())
    if lo >= 0.0 and hi <= 1.0:
        return (a * 255).round().astype(np.uint8)
    return ((a - lo) / max(hi - lo, 1e-12) * 255).round().astype(np.uint8)


def save_png(array: np.ndarray, path: str | os.PathLike, image: Any = None, alpha: float = 0.5) -> Path:
    """Write a map ``(h, w)``, an RGB array ``(h, w, 3)`` or a stack ``(k, h, w)`` (tiled in a
    row) as PNG; with ``image`` (HWC uint8 or PIL) the map is upsampled and blended onto it."""
    from PIL import Image

    a = np.asarray(array)
    if a.ndim == 3 and a.shape[-1] not in (3,):
        a = np.concatenate(list(a), axis=1)  # tile heads side by side
    if a.ndim not in (2, 3):
        raise ValueError(f"cannot save an array of shape {a.shape} as an image")
    pic = Image.fromarray(_to_uint8(a))
    if image is not None:
        base = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image).astype(np.uint8))
        base = base.convert("RGB")
        if np.asarray(array).ndim == 3 and np.asarray(array).shape[-1] != 3:
            base = Image.fromarray(np.concatenate([np.asarray(base)] * np.asarray(array).shape[0], axis=1))
        over = pic.convert("RGB").resize(base.size, Image.NEAREST)
        pic = Image.blend(base, over, alpha)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pic.save(path)
    return path


# -- command line ------------------------------------------------------------------------------
def _load_image(path: str) -> np.ndarray:
    from PIL import Image

    if not Path(path).is_file():
        raise FileNotFoundError(f"no such image: {path}")
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _cmd_viz(args: Any) -> int:
    from PIL import Image

    from .encoder import Encoder

    out = Path(args.out)
    if args.kind == "recon":
        img = _load_image(args.image)
        method = load_method(args.run, device=getattr(args, "device", None) or "cpu")
        res = [mae_reconstruction(method, img, r, seed=args.seed) for r in args.mask_ratio]
        save_png(reconstruction_grid(res), out)
        ratios = ", ".join(f"{r:g}" for r in args.mask_ratio)
        errors = ", ".join(f"{x['mse']:.3f}" for x in res)
        print(f"wrote {out} (rows: mask ratio {ratios}; columns: image, masked, visible + predicted, "
              f"predicted; masked-patch MSE {errors})")
        return 0
    enc = Encoder.from_pretrained(args.model, device=getattr(args, "device", None))
    if args.kind == "neighbors":
        from .data import LabelledImageFolder, list_images

        root = Path(args.data)
        if not root.is_dir():
            raise FileNotFoundError(f"no such folder: {root}")
        subdirs = [d for d in root.iterdir() if d.is_dir()]
        if subdirs:
            src = LabelledImageFolder(root)
            files, labels = [Path(f) for f in src.files], [src.classes[int(i)] for i in src.labels]
        else:
            files, labels = list_images(root), None
        if len(files) < 2:
            raise ValueError(f"{root} holds {len(files)} image(s); nearest neighbours need at least 2")
        feats = enc.embed([str(f) for f in files])
        rng = np.random.default_rng(args.seed)
        q = np.sort(rng.choice(len(files), size=min(args.queries, len(files)), replace=False))
        k = min(args.k, len(files) - 1)
        idx, _ = nearest_neighbors(enc, None, None, k=k, query_indices=q, gallery_features=feats)
        grid = neighbor_grid([str(files[i]) for i in q], [str(f) for f in files], idx, size=args.size,
                             query_labels=None if labels is None else [labels[i] for i in q],
                             gallery_labels=labels)
        save_png(grid, out)
        print(f"wrote {out} ({len(q)} queries x {k} neighbours among {len(files)} images)")
        return 0
    if args.kind in ("attention", "pca"):
        img = _load_image(args.image)
        shown = np.asarray(Image.fromarray(img).resize((enc.image_size, enc.image_size)))
        if args.kind == "attention":
            maps = attention_maps(enc, img)
            masks = threshold_mass(maps, args.mass)
            save_png(maps / maps.max(axis=(1, 2), keepdims=True), out, image=shown)
            save_png(masks, out.with_name(out.stem + "_mask.png"), image=shown)
            print(f"wrote {out} ({maps.shape[0]} heads, {maps.shape[1]}x{maps.shape[2]} patches)")
        else:
            rgb, fg = pca_rgb(enc, img)
            save_png(rgb, out)
            save_png(fg, out.with_name(out.stem + "_foreground.png"), image=shown)
            print(f"wrote {out} (foreground {fg.mean():.0%} of patches)")
    else:
        feats, labels, classes = enc.embed_labelled(args.data)
        coords = tsne(feats, labels)
        plot_tsne(coords, [classes[i] for i in labels], out)
        print(f"wrote {out} ({len(feats)} images, {len(classes)} classes)")
    return 0


def add_viz_commands(sub: Any) -> None:
    """Register ``sslfeatures viz attention|pca|recon|tsne|neighbors`` on an argparse sub-parser set."""
    p = sub.add_parser("viz", help="visual probes: attention maps, PCA of patch features, MAE reconstructions, "
                                   "t-SNE, nearest neighbours")
    vsub = p.add_subparsers(dest="kind", required=True)
    for kind, help_ in (("attention", "last-block CLS-to-patch attention per head (ViT), + 60%%-mass masks"),
                        ("pca", "PCA of patch features to RGB, + foreground mask"),
                        ("recon", "MAE reconstructions of an image at given mask ratios (an mae run folder)"),
                        ("tsne", "t-SNE of embeddings of a labelled folder, coloured by class"),
                        ("neighbors", "nearest-neighbour grid: random queries of a folder and their neighbours")):
        q = vsub.add_parser(kind, help=help_)
        if kind == "recon":
            q.add_argument("--run", required=True,
                           help="run folder of the mae method (train_config.json + checkpoints/)")
            q.add_argument("--mask-ratio", type=float, nargs="+", default=[0.5, 0.75, 0.9],
                           help="one picture row per mask ratio")
        else:
            q.add_argument("--model", required=True, help="run/exported folder, .safetensors file or hub id")
        if kind == "tsne":
            q.add_argument("--data", required=True, help="labelled folder: <class>/<image>")
        elif kind == "neighbors":
            q.add_argument("--data", required=True, help="image folder (labelled <class>/<image> folders get "
                                                         "green/red frames: same/different class)")
            q.add_argument("--queries", type=int, default=6, help="number of random query images")
            q.add_argument("--k", type=int, default=5, help="neighbours per query")
            q.add_argument("--size", type=int, default=64, help="tile size in pixels")
        else:
            q.add_argument("--image", required=True, help="an image file")
        if kind in ("recon", "neighbors"):
            q.add_argument("--seed", type=int, default=0)
        if kind == "attention":
            q.add_argument("--mass", type=float, default=0.6, help="attention mass kept by the mask")
        q.add_argument("--out", required=True, help="output .png")
        q.add_argument("--device")
        q.set_defaults(fn=_cmd_viz)
