"""Semi-supervised video object segmentation by label propagation on frozen patch features.

The algorithm of DINO's DAVIS evaluation (Caron et al. 2021, ``eval_video_segmentation.py``,
itself after Jabri et al. 2020 / UVC): every frame is encoded once; the labels of the
current frame are a weighted average of the labels of the patches of a *context* (the
first frame with its given mask, plus the last ``n_last_frames`` frames with their
propagated soft labels). For each patch of the current frame:

1. cosine similarities to every context patch inside a ``(2r+1) x (2r+1)`` window around
   its own position (``r = size_mask_neighborhood``, in patches; 0 disables the window),
2. only the ``topk`` most similar context patches (over all context frames together) are
   kept, weighted by ``softmax(similarity / temperature)``,
3. the soft labels are upsampled bilinearly to the frame's resolution, each object's
   channel is min-max normalised (DINO's ``norm_mask``) and the arg-max gives the label.

Defaults are DINO's: ``n_last_frames=7``, ``topk=5``, ``size_mask_neighborhood=12``,
``temperature=0.1`` (``exp(sim / 0.1)`` in its code), network input with the short side at
480 pixels. Two deliberate differences: the first mask is brought to the patch grid by
area averaging (DINO uses nearest-neighbour, which can drop objects thinner than a
patch), and labels are upsampled straight to the frame's own size.

Keypoints ("tracking emerges") are propagated through the same affinities: each point is a
Gaussian heat map on the patch grid, carried along like a mask channel, and read out by a
soft arg-max around the peak.

Any :class:`~sslfeatures.Encoder` works: ViTs use their last block's patch tokens (as
DINO does); CNNs by default their deepest stage of stride <= 8 (``layer="auto"``; the
last stage of an ImageNet CNN tracks poorly), and ``output_stride=8``/``16`` runs a CNN
dilated for a finer grid with the same weights. So does any callable
``f(frames) -> features`` mapping ``(B, H, W, 3) uint8`` frames to ``(B, h, w, D)`` patch
features (e.g. an ONNX-runtime encoder with patch outputs); its ``stride`` attribute, if
any, tells the size the frames should be multiples of.
"""
from __future__ import annotations

import logging
import math
import os
import time
from collections import deque
from dataclasses import dataclass, field, fields
from pathlib import Path
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .davis import JFScores, davis_palette, evaluate_sequence, label_png_bytes, read_label_folder, to_label_map
from .io import frame_files, is_video_file, iter_frames, video_fps

log = logging.getLogger("sslfeatures.video")


# -- configuration ----------------------------------------------------------------------------------
@dataclass
class PropagationConfig:
    """Hyper-parameters of label propagation (defaults: DINO's DAVIS evaluation)."""

    n_last_frames: int = 7
    """Preceding frames kept in the context, besides the first frame."""
    topk: int = 5
    """Context patches that vote for each patch (over all context frames)."""
    size_mask_neighborhood: int = 12
    """Half-size, in patches, of the window a patch may take labels from (0: no window)."""
    temperature: float = 0.1
    """Softmax temperature on cosine similarities."""
    normalize_channels: bool = True
    """Min-max normalise each object's upsampled soft mask before the arg-max (DINO's norm_mask)."""
    resolution: int | None = 480
    """Short side of the network input in pixels (``None``: the frames' own size); both sides
    are then rounded down to a multiple of the feature stride."""
    batch_size: int = 4
    """Frames encoded per forward pass."""
    keypoint_sigma: float = 0.5
    """Std-dev, in patches, of a keypoint's initial heat map."""

    def validate(self) -> PropagationConfig:
        def _int(name: str, lo: int) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")

        _int("n_last_frames", 0)
        _int("topk", 1)
        _int("size_mask_neighborhood", 0)
        _int("batch_size", 1)
        if self.resolution is not None:
            _int("resolution", 1)
        if not (isinstance(self.temperature, (int, float)) and self.temperature > 0):
            raise ValueError(f"temperature must be > 0, got {self.temperature!r}")
        if not (isinstance(self.keypoint_sigma, (int, float)) and self.keypoint_sigma > 0):
            raise ValueError(f"keypoint_sigma must be > 0, got {self.keypoint_sigma!r}")
        return self

    @classmethod
    def from_kwargs(cls, **kw: Any) -> PropagationConfig:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(kw) - names)
        if unknown:
            raise TypeError(f"unknown propagation option(s) {unknown}; valid: {sorted(names)}")
        return cls(**kw).validate()


# -- patch features -----------------------------------------------------------------------------------
def network_size(height: int, width: int, resolution: int | None, stride: int) -> tuple[int, int]:
    """The network input size for an ``height x width`` frame: short side scaled to
    ``resolution`` (if given), both sides rounded down to a multiple of ``stride`` (>= stride)."""
    if resolution is not None:
        s = resolution / min(height, width)
        height, width = height * s, width * s
    return max(stride, int(round(height)) // stride * stride), max(stride, int(round(width)) // stride * stride)


def _resize(frames: np.ndarray, size: tuple[int, int], device: torch.device) -> torch.Tensor:
    """``(B, H, W, 3) uint8`` → ``(B, 3, h, w)`` float in 0..255 (bilinear, antialiased when shrinking)."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).to(device).permute(0, 3, 1, 2).float()
    if tuple(x.shape[-2:]) != tuple(size):
        shrink = size[0] < x.shape[-2] or size[1] < x.shape[-1]
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=shrink)
    return x.clamp_(0, 255)


class EncoderFeatures:
    """Patch features of an :class:`~sslfeatures.Encoder` for whole frames at any aspect ratio.

    ``__call__((B, 3, H, W) float in 0..255) -> (B, h, w, D)`` float32 on the encoder's
    device; frames should be at a multiple of :attr:`stride`.

    Args:
        encoder: the encoder.
        layer: which features. ``None``: the backbone's last output (``forward_features``;
            for a ViT the normalised last block, as DINO uses). An int: that entry of timm's
            ``forward_intermediates`` (a CNN stage or a ViT block; negative counts from the
            end). ``"auto"`` (default): ``None`` for ViTs; for CNNs the deepest stage whose
            stride is at most 8, since the last stage of an ImageNet CNN (stride 32, large
            receptive field) tracks poorly (see benchmarks/RESULTS.md).
        output_stride: CNNs only: rebuild the backbone with dilated convolutions (timm's
            ``output_stride``) and the same weights, for a denser grid.
    """

    def __init__(self, encoder: Any, layer: int | str | None = "auto", output_stride: int | None = None):
        from ..backbones import backbone_from_config
        from ..utils import resolve_precision

        self.encoder = encoder
        backbone = encoder.backbone
        if output_stride is not None:
            if backbone.is_vit:
                raise ValueError("output_stride applies to CNN backbones; a ViT's grid is set by its patch size")
            cfg = dict(encoder.config["backbone"])
            cfg["timm_kwargs"] = {**(cfg.get("timm_kwargs") or {}), "output_stride": int(output_stride)}
            try:
                dilated = backbone_from_config(cfg)
            except TypeError as exc:
                raise ValueError(f"{cfg['name']} does not support output_stride={output_stride} ({exc})") from None
            dilated.model.load_state_dict(backbone.model.state_dict(), strict=True)
            backbone = dilated.eval().to(encoder.device)
            for p in backbone.parameters():
                p.requires_grad_(False)
        self.backbone = backbone
        self.device = encoder.device
        self.amp = resolve_precision(encoder.precision, encoder.device)
        if isinstance(layer, str):
            if layer != "auto":
                raise ValueError(f"layer must be an int, None or 'auto', got {layer!r}")
            layer = None if backbone.is_vit else self._auto_layer()
        elif layer is not None and (isinstance(layer, bool) or not isinstance(layer, int)):
            raise ValueError(f"layer must be an int, None or 'auto', got {layer!r}")
        self.layer = layer
        self.stride = self._stride()

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.layer is None:
            return self.backbone.forward_features(x)
        return self._intermediates(x, [self.layer])[0]

    def _intermediates(self, x: torch.Tensor, indices: list[int]) -> list[torch.Tensor]:
        model = self.backbone.model
        if not hasattr(model, "forward_intermediates"):
            raise ValueError(f"{self.backbone.name} has no forward_intermediates(); use layer=None")
        try:
            return model.forward_intermediates(x, indices=indices, intermediates_only=True)
        except (AssertionError, IndexError) as exc:
            raise ValueError(f"layer {indices} is out of range for {self.backbone.name} ({exc})") from None

    def _auto_layer(self) -> int | None:
        probe = 128
        n = len(getattr(self.backbone.model, "feature_info", []) or [])
        if n == 0 or not hasattr(self.backbone.model, "forward_intermediates"):
            return None
        with torch.no_grad():
            maps = self._intermediates(torch.zeros(1, 3, probe, probe, device=self.device), list(range(n)))
        fine = [i for i, m in enumerate(maps) if m.ndim == 4 and probe / m.shape[-1] <= 8]
        return fine[-1] if fine else None

    def _stride(self) -> int:
        if self.backbone.is_vit and self.backbone.patch_size:
            return int(self.backbone.patch_size)
        probe = 128
        with torch.no_grad():
            out = self._forward(torch.zeros(1, 3, probe, probe, device=self.device))
        if out.ndim != 4:
            raise ValueError(f"cannot infer the feature stride of {self.backbone.name}: its features have "
                             f"shape {tuple(out.shape)}")
        return max(1, int(round(probe / out.shape[-1])))

    def size_for(self, height: int, width: int, resolution: int | None) -> tuple[int, int]:
        """Network input size for a frame (see :func:`network_size`)."""
        return network_size(height, width, resolution, self.stride)

    @torch.no_grad()
    def __call__(self, frames: torch.Tensor) -> torch.Tensor:
        from ..utils import autocast

        x = self.encoder._preprocess(frames)
        if not self.backbone.is_vit:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(self.device, self.amp):
            out = self._forward(x)
        out = out.float()
        if out.ndim == 4:  # (B, C, h, w): a CNN map, or ViT intermediates in NCHW
            return out.permute(0, 2, 3, 1).contiguous()
        tokens = self.backbone.tokens_from_features(out)
        h, w = x.shape[-2] // self.stride, x.shape[-1] // self.stride
        if tokens.shape[1] != h * w:
            raise ValueError(f"{self.backbone.name} gave {tokens.shape[1]} patch tokens for a {h}x{w} grid")
        return tokens.reshape(tokens.shape[0], h, w, -1)


class _TokenFeatures:
    """Adapter for an encoder whose backbone only offers ``forward_tokens`` (an
    :class:`~sslfeatures.export.OrtEncoder` exported with ``patch_tokens=True``). A graph
    with a fixed image size gets square ``image_size`` inputs (the labels are still
    upsampled to the frames' own size); a dynamic one any multiple of its stride."""

    def __init__(self, encoder: Any):
        self.encoder = encoder
        self.device = encoder.device
        side = int(encoder.image_size)
        onnx = encoder.config.get("onnx") or {}
        self.fixed = None if onnx.get("dynamic_image_size", False) else side
        with torch.no_grad():
            n = self.encoder.backbone.forward_tokens(encoder._preprocess(torch.zeros(1, 3, side, side))).shape[1]
        g = int(round(math.sqrt(n)))
        if g * g != n or side % g:
            raise ValueError(f"cannot infer the patch grid of this encoder: {n} tokens for a {side}x{side} input")
        self.stride = side // g

    def size_for(self, height: int, width: int, resolution: int | None) -> tuple[int, int]:
        return (self.fixed, self.fixed) if self.fixed else network_size(height, width, resolution, self.stride)

    @torch.no_grad()
    def __call__(self, frames: torch.Tensor) -> torch.Tensor:
        tokens = self.encoder.backbone.forward_tokens(self.encoder._preprocess(frames)).float()
        h, w = frames.shape[-2] // self.stride, frames.shape[-1] // self.stride
        if tokens.shape[1] != h * w:
            raise ValueError(f"the encoder gave {tokens.shape[1]} patch tokens for a {h}x{w} grid")
        return tokens.reshape(tokens.shape[0], h, w, -1).to(self.device)


class _CallableFeatures:
    """Adapter for a user callable ``f((B, H, W, 3) uint8) -> (B, h, w, D)``."""

    def __init__(self, fn: Callable[[np.ndarray], Any], device: torch.device):
        self.fn = fn
        self.stride = int(getattr(fn, "stride", 1))
        self.device = device

    def size_for(self, height: int, width: int, resolution: int | None) -> tuple[int, int]:
        return network_size(height, width, resolution, self.stride)

    def __call__(self, frames: torch.Tensor) -> torch.Tensor:
        arr = frames.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        out = self.fn(arr)
        out = out if isinstance(out, torch.Tensor) else torch.from_numpy(np.asarray(out))
        if out.ndim != 4 or out.shape[0] != arr.shape[0]:
            raise ValueError(f"the feature function must return (B, h, w, D) for B={arr.shape[0]} frames; "
                             f"got shape {tuple(out.shape)}")
        return out.to(self.device).float()


def _feature_source(model: Any, layer: int | str | None, output_stride: int | None
                    ) -> EncoderFeatures | _TokenFeatures | _CallableFeatures:
    if isinstance(model, (EncoderFeatures, _TokenFeatures, _CallableFeatures)):
        return model
    if hasattr(model, "backbone") and hasattr(model, "_preprocess"):
        if isinstance(model.backbone, torch.nn.Module):
            return EncoderFeatures(model, layer, output_stride)
        if hasattr(model.backbone, "forward_tokens"):
            if output_stride is not None or layer not in (None, "auto"):
                raise ValueError("layer and output_stride need a PyTorch encoder (this one runs exported)")
            return _TokenFeatures(model)
    if callable(model):
        if output_stride is not None or layer not in (None, "auto"):
            raise ValueError("layer and output_stride need an Encoder, not a feature function")
        return _CallableFeatures(model, torch.device("cpu"))
    raise TypeError(f"expected an Encoder or a callable returning patch features, got {type(model).__name__}")


# -- the propagation itself ------------------------------------------------------------------------------
def _window(q_rows: tuple[int, int], k_rows: tuple[int, int], w: int, radius: int, device: torch.device
            ) -> torch.Tensor:
    """``(Q, K)`` bool for the queries in grid rows ``q_rows`` and the keys in grid rows
    ``k_rows`` (all columns): the key lies in the (2r+1) x (2r+1) window around the query."""
    qi = torch.arange(*q_rows, device=device).repeat_interleave(w)
    ki = torch.arange(*k_rows, device=device).repeat_interleave(w)
    qj = torch.arange(w, device=device).repeat(q_rows[1] - q_rows[0])
    kj = torch.arange(w, device=device).repeat(k_rows[1] - k_rows[0])
    return ((qi[:, None] - ki[None, :]).abs() <= radius) & ((qj[:, None] - kj[None, :]).abs() <= radius)


class LabelPropagator:
    """The context queue and the affinity-weighted label transfer of DINO's evaluation.

    >>> prop = LabelPropagator(first_feats, first_labels, PropagationConfig())
    >>> soft = prop.step(next_feats)        # (C, h, w) soft labels of the next frame

    ``first_feats``: ``(h, w, D)`` patch features of the first frame; ``first_labels``:
    ``(C, h, w)`` its labels on the same grid (one-hot or soft). Every later frame must
    give features on the same grid.
    """

    def __init__(self, first_feats: torch.Tensor, first_labels: torch.Tensor, cfg: PropagationConfig | None = None,
                 max_chunk_bytes: int = 64 << 20):
        self.cfg = (cfg or PropagationConfig()).validate()
        if first_feats.ndim != 3 or first_labels.ndim != 3 or first_feats.shape[:2] != first_labels.shape[1:]:
            raise ValueError(f"first_feats (h, w, D) and first_labels (C, h, w) must share the grid; got "
                             f"{tuple(first_feats.shape)} and {tuple(first_labels.shape)}")
        self.h, self.w = int(first_feats.shape[0]), int(first_feats.shape[1])
        self.n = self.h * self.w
        self.first = (self._keys(first_feats), first_labels.reshape(first_labels.shape[0], -1).T.float())
        self.queue: deque[tuple[torch.Tensor, torch.Tensor]] = deque(maxlen=self.cfg.n_last_frames)
        self.max_chunk_bytes = max_chunk_bytes

    def _keys(self, feats: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "h") and tuple(feats.shape[:2]) != (self.h, self.w):
            raise ValueError(f"features on a {tuple(feats.shape[:2])} grid; the first frame's was {(self.h, self.w)}")
        return F.normalize(feats.reshape(-1, feats.shape[-1]).float(), dim=1)

    @torch.no_grad()
    def step(self, feats: torch.Tensor) -> torch.Tensor:
        """Soft labels ``(C, h, w)`` of the frame with patch features ``feats`` ``(h, w, D)``;
        the frame then joins the context queue."""
        cfg = self.cfg
        r = cfg.size_mask_neighborhood
        q = self._keys(feats)
        keys = torch.stack([self.first[0]] + [k for k, _ in self.queue])  # (M, N, D)
        vals = torch.stack([self.first[1]] + [v for _, v in self.queue])  # (M, N, C)
        m, h, w = keys.shape[0], self.h, self.w
        out = torch.empty(self.n, vals.shape[-1], device=q.device)
        # queries are taken a band of grid rows at a time; with the window on, only the key
        # rows within r of the band can vote, so the others are never compared
        rows_per_chunk = max(1, self.max_chunk_bytes // (4 * m * self.n * w))
        for i0 in range(0, h, rows_per_chunk):
            i1 = min(h, i0 + rows_per_chunk)
            b0, b1 = (max(0, i0 - r), min(h, i1 + r)) if r > 0 else (0, h)
            kb = keys[:, b0 * w: b1 * w].reshape(-1, keys.shape[-1])  # (M*B, D)
            vb = vals[:, b0 * w: b1 * w].reshape(-1, vals.shape[-1])  # (M*B, C)
            sim = q[i0 * w: i1 * w] @ kb.T                             # (Q, M*B)
            if r > 0:
                allowed = _window((i0, i1), (b0, b1), w, r, q.device)  # (Q, B)
                sim = sim.view(sim.shape[0], m, -1).masked_fill_(~allowed[:, None, :], float("-inf"))
                sim = sim.view(sim.shape[0], -1)
            top, idx = sim.topk(min(cfg.topk, sim.shape[1]), dim=1)
            weights = torch.softmax(top / cfg.temperature, dim=1)
            out[i0 * w: i1 * w] = torch.einsum("qk,qkc->qc", weights, vb[idx])
        self.queue.append((q, out))
        return out.T.reshape(-1, self.h, self.w)


def _labels_to_grid(labels: np.ndarray, ids: Sequence[int], grid: tuple[int, int],
                    device: torch.device) -> torch.Tensor:
    """One-hot ``(C, h, w)`` of a label map, area-averaged onto the patch grid."""
    lab = torch.from_numpy(labels.astype(np.int64)).to(device)
    onehot = torch.stack([(lab == i).float() for i in ids])[None]
    return F.interpolate(onehot, size=grid, mode="area")[0]


def _keypoint_heat(points: np.ndarray, frame_size: tuple[int, int], grid: tuple[int, int], sigma: float,
                   device: torch.device) -> torch.Tensor:
    H, W = frame_size
    h, w = grid
    gy = (torch.as_tensor(points[:, 1], dtype=torch.float32, device=device) + 0.5) * h / H - 0.5
    gx = (torch.as_tensor(points[:, 0], dtype=torch.float32, device=device) + 0.5) * w / W - 0.5
    ii = torch.arange(h, device=device, dtype=torch.float32)
    jj = torch.arange(w, device=device, dtype=torch.float32)
    d2 = (ii[None, :, None] - gy[:, None, None]) ** 2 + (jj[None, None, :] - gx[:, None, None]) ** 2
    return torch.exp(-d2 / (2 * sigma ** 2))


def _read_keypoints(heat: torch.Tensor, frame_size: tuple[int, int]) -> np.ndarray:
    """``(K, h, w)`` heat maps → ``(K, 2)`` (x, y) pixel positions: soft arg-max in the 3x3
    window around each peak."""
    K, h, w = heat.shape
    H, W = frame_size
    flat = heat.reshape(K, -1).argmax(1)
    pi, pj = flat // w, flat % w
    out = np.zeros((K, 2), np.float32)
    for k in range(K):
        i0, i1 = max(0, int(pi[k]) - 1), min(h, int(pi[k]) + 2)
        j0, j1 = max(0, int(pj[k]) - 1), min(w, int(pj[k]) + 2)
        win = heat[k, i0:i1, j0:j1].clamp(min=0)
        tot = float(win.sum())
        if tot <= 0:
            ci, cj = float(pi[k]), float(pj[k])
        else:
            ci = float((win.sum(1) * torch.arange(i0, i1, device=heat.device)).sum()) / tot
            cj = float((win.sum(0) * torch.arange(j0, j1, device=heat.device)).sum()) / tot
        out[k] = ((cj + 0.5) * W / w - 0.5, (ci + 0.5) * H / h - 0.5)
    return out


def _soft_to_labels(soft: torch.Tensor, ids: Sequence[int], frame_size: tuple[int, int], normalize: bool) -> np.ndarray:
    up = F.interpolate(soft[None], size=frame_size, mode="bilinear", align_corners=False)[0]
    if normalize:
        flat = up.reshape(up.shape[0], -1)
        lo, hi = flat.min(1).values, flat.max(1).values
        scale = torch.where(hi - lo > 0, hi - lo, torch.ones_like(hi))
        norm = (up - lo[:, None, None]) / scale[:, None, None]
        up = torch.where((hi > 0)[:, None, None], norm, up)
    lut = torch.as_tensor(list(ids), dtype=torch.uint8, device=up.device)
    return lut[up.argmax(0)].cpu().numpy()


@dataclass
class PropagatedFrame:
    """One frame of a propagation: its index, RGB frame, label map and keypoints."""

    index: int
    frame: np.ndarray
    mask: np.ndarray | None
    keypoints: np.ndarray | None


def _fit_mask(labels: np.ndarray, frame_size: tuple[int, int]) -> np.ndarray:
    if labels.shape == tuple(frame_size):
        return labels
    (mh, mw), (fh, fw) = labels.shape, frame_size
    if abs(mh / mw - fh / fw) > 0.02 * (fh / fw):
        raise ValueError(f"the first mask is {mh}x{mw} but the frames are {fh}x{fw} (another aspect ratio)")
    from PIL import Image

    return np.asarray(Image.fromarray(labels).resize((fw, fh), Image.NEAREST))


def _batched(frames: Iterable[np.ndarray], n: int) -> Iterator[list[np.ndarray]]:
    buf: list[np.ndarray] = []
    for f in frames:
        buf.append(f)
        if len(buf) == n:
            yield buf
            buf = []
    if buf:
        yield buf


def iter_propagation(model: Any, frames: Iterable[np.ndarray], first_mask: Any = None,
                     keypoints: Any = None, config: PropagationConfig | None = None,
                     layer: int | str | None = "auto", output_stride: int | None = None,
                     timing: dict[str, float] | None = None
                     ) -> Iterator[PropagatedFrame]:
    """Propagate ``first_mask`` (and/or ``keypoints``) through ``frames``, one frame at a time.

    A generator: memory stays bounded by the context queue and one batch of frames, however
    long the video. ``frames`` yields ``(H, W, 3) uint8`` RGB arrays of one size;
    ``first_mask`` is a label map of the first frame (see :func:`to_label_map`);
    ``keypoints`` a ``(K, 2)`` array of (x, y) pixel positions in the first frame;
    ``layer``/``output_stride`` choose an Encoder's features (see :class:`EncoderFeatures`).
    ``timing``, if given, accumulates ``features_s`` and ``propagation_s``.
    """
    cfg = (config or PropagationConfig()).validate()
    if first_mask is None and keypoints is None:
        raise ValueError("give first_mask and/or keypoints to propagate")
    source = _feature_source(model, layer, output_stride)
    device = source.device
    timing = timing if timing is not None else {}
    timing.setdefault("features_s", 0.0)
    timing.setdefault("propagation_s", 0.0)
    kps0 = None
    if keypoints is not None:
        kps0 = np.asarray(keypoints, dtype=np.float32).reshape(-1, 2)
        if not len(kps0):
            kps0 = None
    prop: LabelPropagator | None = None
    ids: list[int] = []
    n_mask = 0
    size: tuple[int, int] | None = None
    net: tuple[int, int] | None = None
    index = 0
    for batch in _batched(frames, cfg.batch_size):
        if size is None:
            size = batch[0].shape[:2]
            net = source.size_for(size[0], size[1], cfg.resolution)
        for f in batch:
            if f.ndim != 3 or f.shape[2] != 3 or f.dtype != np.uint8:
                raise ValueError(f"frames must be (H, W, 3) uint8 RGB; frame {index} is {f.shape} {f.dtype}")
            if f.shape[:2] != size:
                raise ValueError(f"frame sizes change within the video: {f.shape[:2]} after {size}")
        t0 = time.perf_counter()
        feats = source(_resize(np.stack(batch), net, device))
        timing["features_s"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        for b, frame in enumerate(batch):
            grid = tuple(feats.shape[1:3])
            if prop is None:
                chans = []
                mask0 = None
                if first_mask is not None:
                    mask0 = _fit_mask(to_label_map(first_mask), size)
                    ids = [int(v) for v in np.unique(mask0)]
                    n_mask = len(ids)
                    chans.append(_labels_to_grid(mask0, ids, grid, feats.device))
                if kps0 is not None:
                    chans.append(_keypoint_heat(kps0, size, grid, cfg.keypoint_sigma, feats.device))
                prop = LabelPropagator(feats[b], torch.cat(chans), cfg)
                out = PropagatedFrame(index, frame, mask0, kps0.copy() if kps0 is not None else None)
            else:
                soft = prop.step(feats[b])
                mask = _soft_to_labels(soft[:n_mask], ids, size, cfg.normalize_channels) if n_mask else None
                kps = _read_keypoints(soft[n_mask:], size) if kps0 is not None else None
                out = PropagatedFrame(index, frame, mask, kps)
            index += 1
            timing["propagation_s"] += time.perf_counter() - t0
            yield out
            t0 = time.perf_counter()
    if index == 0:
        raise ValueError("the video has no frames")


# -- overlays -----------------------------------------------------------------------------------------------
def overlay(frame: np.ndarray, labels: np.ndarray | None = None, keypoints: np.ndarray | None = None,
            alpha: float = 0.5, palette: np.ndarray | None = None) -> np.ndarray:
    """Draw a label map (tinted regions with solid outlines) and keypoints on an RGB frame."""
    pal = davis_palette() if palette is None else np.asarray(palette, np.uint8)
    out = frame.astype(np.float32)
    if labels is not None:
        fg = labels > 0
        out[fg] = (1 - alpha) * out[fg] + alpha * pal[labels[fg]]
        padded = np.pad(labels, 1, mode="edge")
        shifts = [padded[1 + dy: padded.shape[0] - 1 + dy, 1 + dx: padded.shape[1] - 1 + dx]
                  for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
        hi, lo = np.maximum.reduce(shifts), np.minimum.reduce(shifts)
        edge = hi != lo
        out[edge] = pal[hi[edge]]
    if keypoints is not None:
        H, W = frame.shape[:2]
        rad = max(2, round(min(H, W) / 80))
        yy, xx = np.mgrid[-rad: rad + 1, -rad: rad + 1]
        disk = yy ** 2 + xx ** 2 <= rad ** 2
        for k, (x, y) in enumerate(np.asarray(keypoints)):
            cx, cy = int(round(float(x))), int(round(float(y)))
            ys, xs = yy[disk] + cy, xx[disk] + cx
            ok = (ys >= 0) & (ys < H) & (xs >= 0) & (xs < W)
            out[ys[ok], xs[ok]] = _KP_COLOURS[k % len(_KP_COLOURS)]
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


_KP_COLOURS = np.array([(255, 255, 0), (0, 255, 255), (255, 0, 255), (255, 128, 0), (0, 255, 0), (255, 255, 255)],
                       np.float32)


def _shrink(img: np.ndarray, max_side: int | None) -> np.ndarray:
    if max_side is None or max(img.shape[:2]) <= max_side:
        return img
    from PIL import Image

    s = max_side / max(img.shape[:2])
    size = (max(2, round(img.shape[1] * s)), max(2, round(img.shape[0] * s)))
    return np.asarray(Image.fromarray(img).resize(size, Image.BILINEAR, reducing_gap=None))


# -- the result ------------------------------------------------------------------------------------------------
@dataclass
class PropagationResult:
    """The label maps (and keypoints) of every frame of a propagated video.

    Masks are kept as compressed palette PNGs in memory (a few KB a frame); index the
    result for ``(H, W) uint8`` label maps. ``keypoints`` is ``(T, K, 2)`` (x, y) or ``None``.
    """

    object_ids: list[int]
    frame_names: list[str]
    size: tuple[int, int]
    fps: float = 25.0
    keypoints: np.ndarray | None = None
    seconds: float = 0.0
    timing: dict[str, float] = field(default_factory=dict)
    _masks: list[bytes] = field(default_factory=list, repr=False)
    _frames: Callable[[], Iterable[np.ndarray]] | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.frame_names)

    def __getitem__(self, i: int) -> np.ndarray:
        import io

        from PIL import Image

        if not self._masks:
            raise IndexError("this propagation carried keypoints only (no masks)")
        with Image.open(io.BytesIO(self._masks[i])) as img:
            return np.asarray(img, dtype=np.uint8).copy()

    def __iter__(self) -> Iterator[np.ndarray]:
        for i in range(len(self._masks)):
            yield self[i]

    @property
    def has_masks(self) -> bool:
        return bool(self._masks)

    @property
    def frames_per_second(self) -> float:
        """Frames propagated per second of wall time (decoding and feature extraction included)."""
        return len(self) / self.seconds if self.seconds > 0 else float("nan")

    def to_array(self) -> np.ndarray:
        """All label maps as one ``(T, H, W) uint8`` array."""
        return np.stack(list(self))

    def save(self, out: str | os.PathLike, overlay_format: str | None = "gif", overlay_max_side: int | None = 480,
             alpha: float = 0.5) -> dict[str, Path]:
        """Write ``out/<frame>.png`` (DAVIS palette PNGs), ``out/keypoints.csv`` when keypoints
        were tracked, and ``out/overlay.<gif|mp4>`` (the video with the masks drawn over it,
        longer side capped to ``overlay_max_side``; ``overlay_format=None`` skips it)."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        written: dict[str, Path] = {}
        for name, data in zip(self.frame_names, self._masks):
            (out / f"{name}.png").write_bytes(data)
        if self._masks:
            written["masks"] = out
        if self.keypoints is not None:
            written["keypoints"] = _write_keypoints(out / "keypoints.csv", self.frame_names, self.keypoints)
        if overlay_format is not None:
            if self._frames is None:
                log.warning("no overlay written: the frames came from a one-shot iterator (pass a path or an array)")
            else:
                written["overlay"] = self._write_overlay(out / f"overlay.{_overlay_suffix(overlay_format)}",
                                                          overlay_max_side, alpha)
        return written

    def _write_overlay(self, path: Path, max_side: int | None, alpha: float) -> Path:
        from .io import VideoWriter

        with VideoWriter(path, fps=self.fps) as writer:
            for i, frame in enumerate(self._frames()):
                if i >= len(self):
                    break
                mask = self[i] if self._masks else None
                kps = self.keypoints[i] if self.keypoints is not None else None
                writer.write(_shrink(overlay(frame, mask, kps, alpha), max_side))
        return path

    def evaluate(self, gt: str | os.PathLike | Sequence[Any], bound_th: float = 0.008,
                 skip_first_last: bool = True) -> JFScores:
        """J&F against ground truth: a folder of DAVIS masks (matched to frames by file name,
        or by order when the names differ but the counts agree) or a sequence of label maps."""
        if not self._masks:
            raise ValueError("this propagation carried keypoints only; there are no masks to evaluate")
        if isinstance(gt, (str, os.PathLike)):
            names, files = read_label_folder(gt)
            pos = {n: i for i, n in enumerate(self.frame_names)}
            if all(n in pos for n in names):
                order = [pos[n] for n in names]
            elif len(names) == len(self):
                order = list(range(len(self)))
            else:
                raise ValueError(f"{gt} holds {len(names)} masks whose names do not match the {len(self)} "
                                 f"propagated frames (e.g. {names[:2]} vs {self.frame_names[:2]})")
            return evaluate_sequence((self[i] for i in order), files, bound_th, skip_first_last, names)
        gt = list(gt)
        if len(gt) != len(self):
            raise ValueError(f"{len(gt)} ground-truth masks for {len(self)} frames")
        return evaluate_sequence(iter(self), gt, bound_th, skip_first_last, self.frame_names)


def _overlay_suffix(fmt: str) -> str:
    fmt = fmt.lower().lstrip(".")
    if fmt not in ("gif", "mp4", "webm", "avi", "mkv", "mov"):
        raise ValueError(f"unknown overlay format {fmt!r}; use 'gif', 'mp4', 'webm', 'avi', 'mkv' or 'mov'")
    return fmt


def _write_keypoints(path: Path, names: Sequence[str], kps: np.ndarray) -> Path:
    lines = ["frame,point,x,y"]
    for name, pts in zip(names, kps):
        lines += [f"{name},{k},{x:.2f},{y:.2f}" for k, (x, y) in enumerate(pts)]
    path.write_text("\n".join(lines) + "\n")
    return path


# -- entry point ----------------------------------------------------------------------------------------------------
def _frame_source(video: Any, max_side: int | None, stride: int, max_frames: int | None
                  ) -> tuple[Callable[[], Iterable[np.ndarray]] | None, Iterable[np.ndarray], list[str] | None, float]:
    """(re-openable frame factory or None, frames, names or None, fps) for any video input."""
    import itertools

    def capped(it: Iterable[np.ndarray]) -> Iterable[np.ndarray]:
        return itertools.islice(it, max_frames) if max_frames is not None else it

    if isinstance(video, (str, os.PathLike)):
        path = Path(video)
        if not path.exists():
            raise FileNotFoundError(f"video not found: {path}")
        names = None
        if path.is_dir():
            names = [p.stem for p in frame_files(path)][::stride]
        elif not is_video_file(path):
            raise ValueError(f"{path} is not a video file or a folder of frames")

        def factory() -> Iterable[np.ndarray]:
            return capped(iter_frames(path, max_side=max_side, stride=stride))

        return factory, factory(), names, video_fps(path)
    if isinstance(video, torch.Tensor):
        video = video.detach().cpu().numpy()
    if isinstance(video, np.ndarray):
        if video.ndim != 4 or video.shape[-1] != 3:
            raise ValueError(f"an in-memory video is (T, H, W, 3) uint8; got shape {video.shape}")
        if video.dtype == np.uint8:
            arr = video
        elif np.issubdtype(video.dtype, np.floating):  # floats in [0, 1]
            arr = np.clip(video * 255 + 0.5, 0, 255).astype(np.uint8)
        else:
            raise ValueError(f"an in-memory video must be uint8 or float in [0, 1], got {video.dtype}")

        def from_array() -> Iterable[np.ndarray]:
            return capped(_fit_frames(arr[::stride], max_side))

        return from_array, from_array(), None, 25.0
    if isinstance(video, (list, tuple)):
        seq = list(video)

        def from_list() -> Iterable[np.ndarray]:
            return capped(_fit_frames(seq[::stride], max_side))

        return from_list, from_list(), None, 25.0
    if hasattr(video, "__iter__"):
        return None, capped(_fit_frames(itertools.islice(video, 0, None, stride), max_side)), None, 25.0
    raise TypeError(f"cannot read a video from {type(video).__name__}: pass a file, a folder of frames, "
                    "a (T, H, W, 3) array or an iterable of frames")


def _fit_frames(frames: Iterable[Any], max_side: int | None) -> Iterator[np.ndarray]:
    from ..data.decode import to_uint8_image
    from .io import _fit

    for f in frames:
        yield _fit(to_uint8_image(f), max_side)


def propagate_masks(model: Any, video: Any, first_mask: Any = None, *, keypoints: Any = None,
                    n_last_frames: int = 7, topk: int = 5, size_mask_neighborhood: int = 12,
                    temperature: float = 0.1, normalize_channels: bool = True, resolution: int | None = 480,
                    batch_size: int = 4, keypoint_sigma: float = 0.5, layer: int | str | None = "auto",
                    output_stride: int | None = None,
                    max_side: int | None = None, stride: int = 1, max_frames: int | None = None,
                    out: str | os.PathLike | None = None, overlay_format: str | None = "gif",
                    progress: bool = False) -> PropagationResult:
    """Propagate the first frame's mask (and/or keypoints) through a video.

    Args:
        model: an :class:`~sslfeatures.Encoder`, or a callable mapping ``(B, H, W, 3)``
            uint8 frames to ``(B, h, w, D)`` patch features.
        video: a video file (mp4/avi/webm/gif/...), a folder of frames, a ``(T, H, W, 3)``
            uint8 array, or a list/iterable of frames.
        first_mask: the first frame's objects: a DAVIS palette PNG (path or image), or any
            label map / binary mask / colour mask (see :func:`~.davis.to_label_map`).
        keypoints: ``(K, 2)`` (x, y) pixel positions in the first frame to track.
        n_last_frames, topk, size_mask_neighborhood, temperature, normalize_channels,
        resolution, batch_size, keypoint_sigma: see :class:`PropagationConfig`.
        layer: which features of an Encoder: ``"auto"`` (ViT: last block; CNN: deepest
            stage of stride <= 8), ``None`` (the last output) or a ``forward_intermediates``
            index (see :class:`EncoderFeatures`).
        output_stride: run a CNN encoder dilated to this stride (8, 16) for a finer grid.
        max_side, stride, max_frames: decoding (see :func:`~.io.iter_frames`); masks come
            out at the decoded frames' resolution.
        out: if given, masks (and the overlay) are written there as the video streams by.
        overlay_format: ``"gif"``, ``"mp4"``, ... or ``None`` for the overlay under ``out``.
        progress: show a progress bar.

    Returns:
        A :class:`PropagationResult`: index it for label maps, ``.save(dir)``,
        ``.evaluate(gt_folder)``.
    """
    cfg = PropagationConfig(n_last_frames=n_last_frames, topk=topk, size_mask_neighborhood=size_mask_neighborhood,
                            temperature=temperature, normalize_channels=normalize_channels, resolution=resolution,
                            batch_size=batch_size, keypoint_sigma=keypoint_sigma).validate()
    factory, frames, names, fps = _frame_source(video, max_side, stride, max_frames)
    writer = None
    out_dir = Path(out) if out is not None else None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    masks: list[bytes] = []
    kps: list[np.ndarray] = []
    timing: dict[str, float] = {}
    size: tuple[int, int] = (0, 0)
    ids: list[int] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(desc="propagating", unit="frame", total=len(names) if names else None)
    t0 = time.perf_counter()
    n = 0
    try:
        for pf in iter_propagation(model, frames, first_mask, keypoints, cfg, layer, output_stride, timing):
            if n == 0:
                size = pf.frame.shape[:2]
                if pf.mask is not None:
                    ids = [int(v) for v in np.unique(pf.mask)]
            name = names[n] if names is not None and n < len(names) else f"{n * stride:05d}"
            if pf.mask is not None:
                masks.append(label_png_bytes(pf.mask))
                if out_dir is not None:
                    (out_dir / f"{name}.png").write_bytes(masks[-1])
            if pf.keypoints is not None:
                kps.append(pf.keypoints)
            if out_dir is not None and overlay_format is not None:
                if writer is None:
                    from .io import VideoWriter

                    writer = VideoWriter(out_dir / f"overlay.{_overlay_suffix(overlay_format)}", fps=fps / stride)
                writer.write(_shrink(overlay(pf.frame, pf.mask, pf.keypoints), 480))
            n += 1
            if bar is not None:
                bar.update(1)
    finally:
        if writer is not None:
            writer.close()
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - t0
    frame_names = (names[:n] if names is not None and len(names) >= n
                   else [f"{i * stride:05d}" for i in range(n)])
    result = PropagationResult(object_ids=ids, frame_names=frame_names, size=tuple(size), fps=fps / stride,
                               keypoints=np.stack(kps) if kps else None, seconds=seconds, timing=timing,
                               _masks=masks, _frames=factory)
    if out_dir is not None and result.keypoints is not None:
        _write_keypoints(out_dir / "keypoints.csv", frame_names, result.keypoints)
    log.info("propagated %d frames in %.1fs (%.2f frames/s)", n, seconds, result.frames_per_second)
    return result


def propagate_keypoints(model: Any, video: Any, keypoints: Any, **opts: Any) -> np.ndarray:
    """Track ``(K, 2)`` (x, y) keypoints of the first frame through a video with the same
    affinities as :func:`propagate_masks`; returns ``(T, K, 2)`` positions."""
    res = propagate_masks(model, video, first_mask=None, keypoints=keypoints, **opts)
    assert res.keypoints is not None
    return res.keypoints


__all__ = ["EncoderFeatures", "LabelPropagator", "PropagatedFrame", "PropagationConfig", "PropagationResult",
           "iter_propagation", "network_size", "overlay", "propagate_keypoints", "propagate_masks"]
