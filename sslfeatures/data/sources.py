"""Image sources: a folder (recursive), a labelled folder (class = sub-folder), arrays.

Every source yields fixed-size ``uint8`` tensors (3, S, S): decoding and resizing happen
once per image here; random augmentation happens later, batched, on the training device
(see :mod:`sslfeatures.augment`). Files that cannot be decoded are skipped and recorded in
a :class:`BadFileReport` (path + reason, each file once).
"""
from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .decode import (IMAGE_EXTENSIONS, DecodeError, display_path, load_pil, pil_to_tensor, resize_center_crop,
                     to_uint8_image)

log = logging.getLogger("sslfeatures.data")


def list_images(root: str | os.PathLike, recursive: bool = True) -> list[Path]:
    """All image files below ``root`` (sorted). Clear errors for a missing or empty folder."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"data folder not found: {root}")
    if root.is_file():
        if root.suffix.lower() in IMAGE_EXTENSIONS:
            return [root]
        raise ValueError(f"{root} is a file, not an image folder")
    files: list[Path] = []
    seen_dirs: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        try:
            st = os.stat(dirpath)
            key = (st.st_dev, st.st_ino)
        except OSError:
            dirnames[:] = []
            continue
        if key in seen_dirs:  # symlink loop
            dirnames[:] = []
            continue
        seen_dirs.add(key)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS):
                files.append(Path(dirpath) / name)
        if not recursive:
            break
    if not files:
        raise ValueError(
            f"no images found in {root} (looked for {', '.join(IMAGE_EXTENSIONS)}"
            f"{' recursively' if recursive else ''})")
    return sorted(files)


@dataclass
class BadFileReport:
    """Files skipped because they could not be decoded: each is logged once, on one line
    naming the file and the reason, and :meth:`summary` lists them all at the end.

    ``strict=True`` turns the first bad file into a :class:`DecodeError` instead (fail
    fast: nothing is skipped silently); ``quiet=True`` records without logging (for a
    caller that reports the files itself).
    """

    entries: dict[str, str] = field(default_factory=dict)
    strict: bool = False
    quiet: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, path: str, reason: str) -> None:
        """Record ``path`` as skipped for ``reason`` (or raise it, in strict mode)."""
        reason = " ".join(str(reason).split())  # one line, whatever the decoder said
        with self._lock:
            if path in self.entries:
                return
            self.entries[path] = reason
        if self.strict:
            raise DecodeError(path, f"{reason} (strict mode: fix or remove the file, or turn strict off to "
                                    "skip unreadable files)")
        if not self.quiet:
            log.warning("skipping unreadable image %s: %s", display_path(path), reason)

    def __len__(self) -> int:
        return len(self.entries)

    def summary(self) -> str:
        """One line per skipped file under a count, or ``"all images decoded"``."""
        if not self.entries:
            return "all images decoded"
        lines = [f"{len(self.entries)} file(s) skipped:"]
        lines += [f"  {display_path(p)}: {r}" for p, r in sorted(self.entries.items())]
        return "\n".join(lines)

    def write(self, path: str | os.PathLike) -> None:
        """``path\treason`` lines (paths escaped as in the log), written atomically."""
        from ..utils import atomic_write_bytes

        text = "".join(f"{display_path(p)}\t{r}\n" for p, r in sorted(self.entries.items()))
        atomic_write_bytes(path, text.encode("utf-8"))


class ImageSource(Dataset):
    """Base: a sequence of images, each returned as ``(uint8 tensor (3,S,S) | None, index, error)``."""

    size: int = 224
    crop_pct: float = 1.0

    def __len__(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self, index: int) -> str:
        return f"item {index}"

    def load(self, index: int):  # -> PIL image
        raise NotImplementedError

    def as_batch(self) -> torch.Tensor | None:
        """All images at once as a ``uint8`` tensor (N,3,S,S), where a source can give exactly
        what :meth:`__getitem__` gives without a per-image pass; ``None``: decode image by image."""
        return None

    def __getitem__(self, index: int):
        try:
            img = self.load(index)
            img = resize_center_crop(img, self.size, self.crop_pct)
            return pil_to_tensor(img), index, None
        except DecodeError as err:
            return None, index, err.reason
        except (ValueError, TypeError, OSError) as err:
            return None, index, str(err)
        except Exception as err:  # one odd item must not stop a run: it is reported with the error
            return None, index, f"{type(err).__name__}: {err}"


class ImageFolder(ImageSource):
    """All images below a folder (recursive), no labels."""

    def __init__(self, root: str | os.PathLike, size: int = 224, crop_pct: float = 1.0,
                 recursive: bool = True, files: Sequence[Path] | None = None):
        self.root = Path(root)
        self.files = list(files) if files is not None else list_images(root, recursive)
        self.size, self.crop_pct = size, crop_pct

    def __len__(self) -> int:
        return len(self.files)

    def describe(self, index: int) -> str:
        return str(self.files[index])

    def load(self, index: int):
        return load_pil(self.files[index])


class LabelledImageFolder(ImageFolder):
    """``root/<class>/**/image``: the class is the first-level sub-folder (sorted names)."""

    def __init__(self, root: str | os.PathLike, size: int = 224, crop_pct: float = 1.0):
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"labelled data folder not found: {root}")
        self.classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
        if not self.classes:
            raise ValueError(f"{root} has no class sub-folders (expected root/<class>/<image>)")
        files, labels = [], []
        for ci, cname in enumerate(self.classes):
            try:
                cfiles = list_images(root / cname)
            except ValueError:
                continue
            files += cfiles
            labels += [ci] * len(cfiles)
        if not files:
            raise ValueError(f"no images found in the class folders of {root}")
        super().__init__(root, size, crop_pct, files=files)
        self.labels = np.asarray(labels, dtype=np.int64)


class ArrayImages(ImageSource):
    """In-memory images: a list of PIL images / arrays / tensors, or one (N,H,W[,C]) array."""

    def __init__(self, images: Any, size: int = 224, crop_pct: float = 1.0):
        self._stacked: Any = None  # the (N,...) array as given, for the whole-array fast path
        if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4 or \
                isinstance(images, np.ndarray) and images.ndim == 3 and images.shape[-1] not in (3, 4):
            self._stacked = images
            images = list(images)
        self.images = list(images)
        if not self.images:
            raise ValueError("no images given")
        self.size, self.crop_pct = size, crop_pct

    def as_batch(self) -> torch.Tensor | None:
        """One ``uint8`` array or tensor of gray (N,S,S[,1]) or RGB (N,S,S,3) / tensor (N,3,S,S)
        images already at the source's size (nothing to resize or crop) in one copy."""
        x = self._stacked
        if x is None or int(round(self.size / self.crop_pct)) != self.size:
            return None
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu()
            if t.dtype != torch.uint8:
                return None
            t = t.numpy()
            if t.shape[1] not in (1, 3, 4):  # items are HWC (see to_uint8_image)
                t = t.transpose(0, 3, 1, 2)
        else:
            if x.dtype != np.uint8:
                return None
            t = x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)  # (N,H,W) gray or (N,H,W,C)
        if t.shape[1] not in (1, 3) or t.shape[2:] != (self.size, self.size):  # RGBA is composited per image
            return None
        out = torch.empty((len(t), 3, self.size, self.size), dtype=torch.uint8)
        out.numpy()[...] = t  # a copy: gray broadcasts to the three channels, as PIL's L -> RGB
        return out

    def __len__(self) -> int:
        return len(self.images)

    def load(self, index: int):
        obj = self.images[index]
        if isinstance(obj, (str, os.PathLike)):
            return load_pil(obj)
        return to_uint8_image(obj)

    def describe(self, index: int) -> str:
        obj = self.images[index]
        return str(obj) if isinstance(obj, (str, os.PathLike)) else f"item {index}"


def _collate(items):
    imgs = [it[0] for it in items if it[0] is not None]
    idx = [it[1] for it in items if it[0] is not None]
    bad = [(it[1], it[2]) for it in items if it[0] is None]
    x = torch.stack(imgs) if imgs else torch.empty(0, dtype=torch.uint8)
    return x, torch.as_tensor(idx, dtype=torch.long), bad


def default_workers() -> int:
    return max(0, min(8, (os.cpu_count() or 1) - 1))


def iterate(source: ImageSource, batch_size: int = 256, num_workers: int | None = None,
            report: BadFileReport | None = None, indices: Sequence[int] | None = None,
            ) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(uint8 batch, source indices)`` in order, skipping (and reporting) bad files."""
    num_workers = default_workers() if num_workers is None else num_workers
    ds = source if indices is None else torch.utils.data.Subset(source, list(indices))
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=_collate, persistent_workers=False)
    for x, idx, bad in loader:
        if report is not None:
            for i, reason in bad:  # indices are the source's own, Subset or not
                report.add(source.describe(int(i)), reason)
        if len(x):
            yield x, idx


def load_into_memory(source: ImageSource, report: BadFileReport | None = None,
                     num_workers: int | None = None, progress: bool = True,
                     desc: str = "decoding") -> tuple[torch.Tensor, torch.Tensor]:
    """Decode a whole source into one ``uint8`` tensor (N,3,S,S); returns it and kept indices."""
    from tqdm.auto import tqdm

    whole = source.as_batch()
    if whole is not None:  # one array already at the right size: no per-image decoding to do
        return whole, torch.arange(len(whole))
    out = torch.empty((len(source), 3, source.size, source.size), dtype=torch.uint8)
    keep = torch.zeros(len(source), dtype=torch.bool)
    bar = tqdm(total=len(source), desc=desc, unit="img", disable=not progress, leave=False)
    for x, idx in iterate(source, batch_size=256, num_workers=num_workers, report=report):
        out[idx] = x
        keep[idx] = True
        bar.update(len(idx))
    bar.close()
    kept = keep.nonzero().squeeze(1)
    if len(kept) == 0:
        raise ValueError(f"none of the {len(source)} images could be decoded"
                         + (f"\n{report.summary()}" if report is not None else ""))
    if len(kept) < len(source):
        out = out[kept]
    return out, kept
