"""Labelled data for the downstream evaluations: resolving what a user passes (a labelled
folder, or images with labels) and seeded, class-balanced sampling of labels.

Every sampler here draws, for each class, one seeded permutation of that class's items and
takes a prefix of it, so that for a fixed seed the 2-shot set contains the 1-shot set, the
10 % set contains the 1 % set, and so on: curves over shots or label fractions then vary
only in how many labels they see, not in which.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..data import LabelledImageFolder


@dataclass
class LabelledImages:
    """Images (paths or in-memory images) with integer labels into ``classes``."""

    images: list[Any]
    labels: np.ndarray
    classes: list[str]
    root: Path | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx: Sequence[int]) -> LabelledImages:
        idx = np.asarray(idx, dtype=np.int64)
        return LabelledImages([self.images[i] for i in idx], self.labels[idx], list(self.classes), self.root)


def encode_labels(labels: Sequence[Any], classes: Sequence[str] | None = None) -> tuple[np.ndarray, list[str]]:
    """Map labels (class names or integers) to ``int64`` indices into ``classes``.

    Without ``classes``: string labels give the sorted distinct names; integer labels
    ``0..C-1`` give the names ``"0"..."C-1"``.
    """
    arr = np.asarray(list(labels))
    if arr.ndim != 1 or len(arr) == 0:
        raise ValueError("labels must be a non-empty 1-D sequence (one label per image)")
    if arr.dtype.kind in "iu":
        if arr.min() < 0:
            raise ValueError(f"integer labels must be >= 0, got {int(arr.min())}")
        n = int(arr.max()) + 1
        if classes is None:
            classes = [str(i) for i in range(n)]
        elif len(classes) < n:
            raise ValueError(f"labels go up to {n - 1} but only {len(classes)} class names were given")
        return arr.astype(np.int64), [str(c) for c in classes]
    names = [str(x) for x in arr]
    if classes is None:
        classes = sorted(set(names))
    classes = [str(c) for c in classes]
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(names) - set(index))
    if unknown:
        raise ValueError(f"labels {unknown[:5]} are not among the classes {classes[:10]}")
    return np.asarray([index[n] for n in names], dtype=np.int64), classes


def resolve_labelled(data: Any, labels: Sequence[Any] | None = None,
                     classes: Sequence[str] | None = None) -> LabelledImages:
    """What the downstream APIs accept as labelled data:

    - a labelled folder ``root/<class>/**/<image>`` (classes are the sorted sub-folders);
    - images (paths, PIL images, arrays, tensors, or a 4-D batch) with ``labels``
      (class names or integers), optionally with ``classes`` to fix their order;
    - a ``(images, labels)`` pair.
    """
    if isinstance(data, tuple) and len(data) == 2 and labels is None:
        data, labels = data
    if isinstance(data, (str, os.PathLike)) and labels is None:
        src = LabelledImageFolder(data)
        if classes is not None and list(classes) != src.classes:
            raise ValueError(f"{data} has classes {src.classes}, not the {list(classes)} asked for")
        return LabelledImages(list(src.files), src.labels.copy(), list(src.classes), Path(data))
    if labels is None:
        raise ValueError("pass a labelled folder (root/<class>/<image>) or images together with labels=")
    if isinstance(data, (str, os.PathLike)):
        raise ValueError(f"{data} is a folder; its labels come from its sub-folders, so do not pass labels=")
    images = list(data)
    y, names = encode_labels(labels, classes)
    if len(images) != len(y):
        raise ValueError(f"{len(images)} images but {len(y)} labels")
    return LabelledImages(images, y, names)


def labelled_features(encoder: Any, data: Any, labels: Sequence[Any] | None = None,
                      classes: Sequence[str] | None = None, batch_size: int = 128,
                      **embed_kw: Any) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Frozen features ``(x (N, D) float32, y (N,) int64, classes)`` of labelled data.

    ``encoder`` is an :class:`~sslfeatures.Encoder`, or ``"raw"`` for the raw-pixel
    baseline (flattened grayscale pixels in [0, 1]; labelled folders only). Unreadable
    files in a folder are skipped and reported; in a list they raise.
    """
    if isinstance(encoder, str):
        if encoder != "raw":
            raise ValueError(f"encoder must be an Encoder or 'raw' (raw pixels), got {encoder!r}")
        if labels is not None or not isinstance(data, (str, os.PathLike)):
            raise ValueError("the raw-pixel baseline ('raw') takes a labelled folder")
        from .baselines import raw_pixel_features

        x, y, names = raw_pixel_features(data)
        return x.astype(np.float32, copy=False), np.asarray(y, np.int64), list(names)
    if isinstance(data, (str, os.PathLike)) and labels is None:
        x, y, names = encoder.embed_labelled(data, batch_size=batch_size, **embed_kw)
        if classes is not None and list(classes) != list(names):
            raise ValueError(f"{data} has classes {names}, not the {list(classes)} asked for")
        return x, np.asarray(y, np.int64), list(names)
    lab = resolve_labelled(data, labels, classes)
    x = encoder.embed(lab.images, batch_size=batch_size, strict=True, **embed_kw)
    return x, lab.labels, lab.classes


def _class_permutations(labels: np.ndarray, seed: int) -> dict[int, np.ndarray]:
    out = {}
    for c in np.unique(labels):
        rng = np.random.default_rng([int(seed), int(c)])
        out[int(c)] = rng.permutation(np.flatnonzero(labels == c))
    return out


def sample_per_class(labels: Sequence[int], n: int, seed: int = 0) -> np.ndarray:
    """Indices of ``n`` items of every class present in ``labels`` (seeded, sorted).

    The ``n``-shot set of a seed contains its ``m``-shot set for every ``m < n``.
    Raises ``ValueError`` when a class has fewer than ``n`` items.
    """
    y = np.asarray(labels, dtype=np.int64)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    perms = _class_permutations(y, seed)
    short = {c: len(p) for c, p in perms.items() if len(p) < n}
    if short:
        raise ValueError(f"{n} per class requested but class(es) {sorted(short)} have only "
                         f"{sorted(set(short.values()))} item(s)")
    return np.sort(np.concatenate([p[:n] for p in perms.values()]))


def sample_fraction(labels: Sequence[int], fraction: float, seed: int = 0) -> np.ndarray:
    """Indices of ``fraction`` of every class (rounded, at least one per class), seeded and sorted."""
    if not 0 < fraction <= 1:
        raise ValueError(f"label fraction must be in (0, 1], got {fraction}")
    y = np.asarray(labels, dtype=np.int64)
    perms = _class_permutations(y, seed)
    return np.sort(np.concatenate([p[:max(1, int(round(fraction * len(p))))] for p in perms.values()]))


def stratified_split(labels: Sequence[int], fraction: float, seed: int = 0,
                     min_keep: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into ``(kept, held_out)`` with ``fraction`` of every class held out.

    A class with fewer than ``min_keep + 1`` items is kept whole (nothing to hold out).
    """
    if not 0 <= fraction < 1:
        raise ValueError(f"held-out fraction must be in [0, 1), got {fraction}")
    y = np.asarray(labels, dtype=np.int64)
    keep, held = [], []
    for perm in _class_permutations(y, seed + 7919).values():
        k = int(round(fraction * len(perm)))
        if fraction > 0:
            k = max(1, k)
        k = min(k, max(0, len(perm) - min_keep))
        held.append(perm[:k])
        keep.append(perm[k:])
    return np.sort(np.concatenate(keep)), np.sort(np.concatenate(held))


__all__ = ["LabelledImages", "encode_labels", "resolve_labelled", "labelled_features", "sample_per_class",
           "sample_fraction", "stratified_split"]
