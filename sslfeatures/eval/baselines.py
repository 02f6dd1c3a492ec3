"""Baselines every result is compared with: raw pixels (and random init, via Encoder)."""
from __future__ import annotations

import os

from ..data import BadFileReport, LabelledImageFolder, load_into_memory


def raw_pixel_features(folder: str | os.PathLike, size: int | None = None, gray: bool = True,
                       report: BadFileReport | None = None):
    """Flattened pixels (in [0, 1]) of a labelled folder: ``(features, labels, classes)``.

    ``size=None`` keeps the images' own size when they all share it (resized otherwise to
    the first image's size). ``gray`` averages the channels (the usual pixel baseline of
    grayscale data sets; harmless for colour ones).
    """
    src = LabelledImageFolder(folder, size=size or 0)
    if size is None:
        from ..data.decode import load_pil

        w, h = load_pil(src.files[0]).size
        src.size = min(w, h)
    x, kept = load_into_memory(src, report, progress=False)
    x = x.float().div_(255)
    if gray:
        x = x.mean(1)
    return x.flatten(1).numpy(), src.labels[kept.numpy()], src.classes
