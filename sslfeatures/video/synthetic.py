"""Clips with exact ground-truth masks, composited from real photos.

Objects (a texture and a binary mask, e.g. a silhouette cut out of a photo) move over a
real background that the camera pans across, change scale, and pass behind an occluding
bar; the label maps are exactly the pixels where each object is visible. Useful to measure
J&F without a labelled video data set:

>>> frames, labels = composite_clip(background, [Sprite(cat_rgb, horse_mask, (0.25, 0.5), (0.7, 0.55))])
>>> frames.shape, labels.shape        # (T, H, W, 3) uint8, (T, H, W) uint8 with ids 1..K
"""
from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Sequence

import numpy as np
from PIL import Image


@dataclass
class Sprite:
    """An object of a synthetic clip.

    ``image``: ``(h, w, 3) uint8`` texture; ``mask``: ``(h, w)`` bool, True on the object.
    ``start``/``end``: (x, y) of its centre in the first/last frame as fractions of the
    frame's width/height (linear path); ``scale``: its height as a fraction of the frame's
    height in the first and last frame.
    """

    image: np.ndarray
    mask: np.ndarray
    start: tuple[float, float]
    end: tuple[float, float]
    scale: tuple[float, float] = (0.5, 0.5)

    def __post_init__(self) -> None:
        self.image = np.asarray(self.image)
        self.mask = np.asarray(self.mask, bool)
        if self.image.ndim != 3 or self.image.shape[2] != 3 or self.image.dtype != np.uint8:
            raise ValueError(f"Sprite.image must be (h, w, 3) uint8, got {self.image.shape} {self.image.dtype}")
        if self.mask.shape != self.image.shape[:2]:
            raise ValueError(f"Sprite.mask {self.mask.shape} must match the image {self.image.shape[:2]}")
        if not self.mask.any():
            raise ValueError("Sprite.mask is empty")
        if min(self.scale) <= 0:
            raise ValueError(f"Sprite.scale must be > 0, got {self.scale}")


def cutout(image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Crop ``image`` and ``mask`` to the mask's bounding box (resizing the mask to the
    image first, nearest-neighbour, when their sizes differ)."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.stack([image] * 3, -1)
    image = np.ascontiguousarray(image[..., :3]).astype(np.uint8)
    mask = np.asarray(mask, bool)
    if mask.shape != image.shape[:2]:
        mask = np.asarray(Image.fromarray(mask).resize((image.shape[1], image.shape[0]), Image.NEAREST))
    ys, xs = np.nonzero(mask)
    if not len(ys):
        raise ValueError("cutout: the mask is empty")
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    return image[y0:y1, x0:x1].copy(), mask[y0:y1, x0:x1].copy()


def _resize(img: np.ndarray, size: tuple[int, int], nearest: bool = False) -> np.ndarray:
    h, w = size
    mode = Image.NEAREST if nearest else Image.BILINEAR
    src = Image.fromarray(img.astype(np.uint8) * 255 if img.dtype == bool else img)
    out = np.asarray(src.resize((w, h), mode, reducing_gap=None))
    return out > 127 if img.dtype == bool else out


def _paste(canvas: np.ndarray, labels: np.ndarray, tex: np.ndarray, mask: np.ndarray, cx: float, cy: float,
           label: int) -> None:
    H, W = labels.shape
    h, w = mask.shape
    y0, x0 = int(round(cy - h / 2)), int(round(cx - w / 2))
    ys, ye = max(0, y0), min(H, y0 + h)
    xs, xe = max(0, x0), min(W, x0 + w)
    if ys >= ye or xs >= xe:
        return
    m = mask[ys - y0: ye - y0, xs - x0: xe - x0]
    canvas[ys:ye, xs:xe][m] = tex[ys - y0: ye - y0, xs - x0: xe - x0][m]
    labels[ys:ye, xs:xe][m] = label


def composite_clip(background: np.ndarray, sprites: Sequence[Sprite], n_frames: int = 24,
                   size: tuple[int, int] = (240, 320), pan: float = 0.15, occluder: np.ndarray | None = None,
                   occluder_width: float = 0.12) -> tuple[np.ndarray, np.ndarray]:
    """Render a clip and its exact label maps.

    Args:
        background: ``(H, W, 3)`` uint8 photo; it is scaled to cover the frame enlarged by
            ``1 + pan`` and the camera pans linearly across the extra margin.
        sprites: the objects, drawn in order (later ones in front); object ``k`` (from 0)
            gets label ``k + 1``.
        n_frames: clip length (>= 2).
        size: (height, width) of the frames.
        occluder: optional ``(h, w, 3)`` texture for a full-height bar, ``occluder_width``
            of the frame wide, crossing the frame from right to left in front of everything
            (it hides the objects: their labels are 0 there).

    Returns:
        ``(frames, labels)``: ``(T, H, W, 3) uint8`` and ``(T, H, W) uint8``.
    """
    if n_frames < 2:
        raise ValueError(f"n_frames must be >= 2, got {n_frames}")
    if len(sprites) > 254:
        raise ValueError("at most 254 sprites (labels are uint8)")
    H, W = size
    bg = np.asarray(background)
    if bg.ndim == 2:
        bg = np.stack([bg] * 3, -1)
    bg = bg[..., :3].astype(np.uint8)
    cover = max((1 + pan) * H / bg.shape[0], (1 + pan) * W / bg.shape[1])
    bg = _resize(bg, (int(np.ceil(bg.shape[0] * cover)), int(np.ceil(bg.shape[1] * cover))))
    occ = None
    if occluder is not None:
        occ = np.asarray(occluder)
        occ = np.stack([occ] * 3, -1) if occ.ndim == 2 else occ[..., :3]
        occ = _resize(occ.astype(np.uint8), (H, max(1, int(round(occluder_width * W)))))
    frames = np.zeros((n_frames, H, W, 3), np.uint8)
    labels = np.zeros((n_frames, H, W), np.uint8)
    for t in range(n_frames):
        a = t / (n_frames - 1)
        oy = int(round(a * (bg.shape[0] - H)))
        ox = int(round(a * (bg.shape[1] - W)))
        frame = bg[oy: oy + H, ox: ox + W].copy()
        lab = labels[t]
        for k, sp in enumerate(sprites):
            s = sp.scale[0] + a * (sp.scale[1] - sp.scale[0])
            h = max(2, int(round(s * H)))
            w = max(2, int(round(h * sp.mask.shape[1] / sp.mask.shape[0])))
            tex, m = _resize(sp.image, (h, w)), _resize(sp.mask, (h, w), nearest=True)
            cx = (sp.start[0] + a * (sp.end[0] - sp.start[0])) * W
            cy = (sp.start[1] + a * (sp.end[1] - sp.start[1])) * H
            _paste(frame, lab, tex, m, cx, cy, k + 1)
        if occ is not None:
            cx = (1.1 - 1.2 * a) * W
            _paste(frame, lab, occ, np.ones(occ.shape[:2], bool), cx, H / 2, 0)
        frames[t] = frame
    return frames, labels


__all__ = ["Sprite", "composite_clip", "cutout"]
