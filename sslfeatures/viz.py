"""Visual probes of what an encoder learned: attention maps, PCA of patch features, t-SNE.

Every function returns arrays; :func:`save_png` writes them (optionally overlaid on the image).
Nearest-neighbour grids live in :func:`sslfeatures.plots.plot_neighbours`.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

__all__ = ["attention_maps", "threshold_mass", "pca_rgb", "tsne", "save_png", "plot_tsne"]


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

    enc = Encoder.from_pretrained(args.model, device=getattr(args, "device", None))
    out = Path(args.out)
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
    """Register ``sslfeatures viz attention|pca|tsne`` on an argparse sub-parser set."""
    p = sub.add_parser("viz", help="visual probes: attention maps, PCA of patch features, t-SNE")
    vsub = p.add_subparsers(dest="kind", required=True)
    for kind, help_ in (("attention", "last-block CLS-to-patch attention per head (ViT), + 60%%-mass masks"),
                        ("pca", "PCA of patch features to RGB, + foreground mask"),
                        ("tsne", "t-SNE of embeddings of a labelled folder, coloured by class")):
        q = vsub.add_parser(kind, help=help_)
        q.add_argument("--model", required=True, help="run/exported folder, .safetensors file or hub id")
        if kind == "tsne":
            q.add_argument("--data", required=True, help="labelled folder: <class>/<image>")
        else:
            q.add_argument("--image", required=True, help="an image file")
        if kind == "attention":
            q.add_argument("--mass", type=float, default=0.6, help="attention mass kept by the mask")
        q.add_argument("--out", required=True, help="output .png")
        q.add_argument("--device")
        q.set_defaults(fn=_cmd_viz)
