"""Image-caption pairs for image-text methods (CLIP).

:class:`ImageTextPairs` reads pairs from

- a **folder**: every image below it (recursively) with a caption file of the same name
  beside it (``dog.jpg`` + ``dog.txt``); each non-empty line of the ``.txt`` is one caption
  of that image (one of them is drawn per epoch); images without a caption file are
  skipped, with a warning that counts them;
- a **CSV / TSV file**: a header naming a path column (``path``, ``image``, ``file``,
  ``filepath``, ``filename``) and a caption column (``caption``, ``text``, ``title``), or
  two columns without a header; relative paths are relative to the file's folder; an image
  may appear on several rows (one pair per row);
- **in memory**: a sequence of ``(image, caption)`` pairs, the image a path, PIL image,
  array or tensor.

:class:`PairStream` batches them for the engine: it yields dict batches
``{"images": uint8 (B, 3, S, S), "text": list[str]}`` with the same seeded order, exact
resume and bad-file handling as :class:`~sslfeatures.data.TrainStream`; the engine passes
the non-image entries to the method as keyword arguments.
"""
from __future__ import annotations

import csv
import logging
import os
from pathlib import Path
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader

from .decode import IMAGE_EXTENSIONS, load_pil, to_uint8_image
from .loader import TrainStream, _OrderSampler, epoch_permutation
from .sources import BadFileReport, ImageSource, LabelledImageFolder, list_images, load_into_memory

log = logging.getLogger("sslfeatures.data")

PATH_COLUMNS = ("path", "image", "file", "filepath", "filename", "image_path")
CAPTION_COLUMNS = ("caption", "text", "title", "captions")
CLASS_TEMPLATES = ("a photo of a {}.", "a blurry photo of a {}.", "a black and white photo of a {}.",
                   "a low resolution photo of a {}.", "a close-up photo of a {}.", "a photo of the {}.")


def _read_caption_file(path: Path) -> tuple[str, ...]:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ()
    return tuple(line.strip() for line in text.splitlines() if line.strip())


def _read_table(path: Path) -> tuple[list[Path], list[tuple[str, ...]]]:
    delimiter = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
    with open(path, newline="", encoding="utf-8-sig") as fh:
        rows = [r for r in csv.reader(fh, delimiter=delimiter) if any(c.strip() for c in r)]
    if not rows:
        raise ValueError(f"{path} is empty; expected rows of (image path, caption)")
    head = [c.strip().lower() for c in rows[0]]
    pcol = next((head.index(c) for c in PATH_COLUMNS if c in head), None)
    ccol = next((head.index(c) for c in CAPTION_COLUMNS if c in head), None)
    if pcol is not None and ccol is not None:
        rows = rows[1:]
    elif len(head) == 2 and head[0].endswith(IMAGE_EXTENSIONS):
        pcol, ccol = 0, 1  # no header: (path, caption)
    else:
        raise ValueError(
            f"{path}: cannot tell which columns hold the image path and the caption (header {rows[0]}); "
            f"name them with one of {PATH_COLUMNS} and one of {CAPTION_COLUMNS}, or give exactly two "
            "columns (path, caption) without a header")
    files, captions = [], []
    for i, r in enumerate(rows):
        if max(pcol, ccol) >= len(r):
            raise ValueError(f"{path}: row {i + 2} has {len(r)} column(s), expected at least {max(pcol, ccol) + 1}")
        cap = r[ccol].strip()
        if not cap:
            continue
        p = Path(r[pcol].strip()).expanduser()
        files.append(p if p.is_absolute() else path.parent / p)
        captions.append((cap,))
    return files, captions


class ImageTextPairs(ImageSource):
    """Image-caption pairs from a folder, a CSV/TSV file or a sequence (see the module doc).

    Behaves as an :class:`~sslfeatures.data.ImageSource` (item ``i`` decodes to a
    ``uint8`` (3, S, S) tensor); ``captions[i]`` holds the captions of item ``i``.
    """

    def __init__(self, data: Any, size: int = 224, crop_pct: float = 1.0):
        self.size, self.crop_pct = size, crop_pct
        self.items: list[Any]
        self.captions: list[tuple[str, ...]]
        if isinstance(data, (str, os.PathLike)):
            path = Path(data)
            if not path.exists():
                raise FileNotFoundError(f"image-caption data not found: {path}")
            if path.is_dir():
                self.items, self.captions = self._from_folder(path)
            elif path.suffix.lower() in (".csv", ".tsv", ".tab"):
                self.items, self.captions = _read_table(path)
            else:
                raise ValueError(f"{path}: image-caption data is a folder of images with same-named .txt "
                                 "captions, or a .csv/.tsv file of (path, caption) rows")
        else:
            self.items, self.captions = self._from_pairs(data)
        if not self.items:
            raise ValueError(f"no image-caption pairs in {data!r}")

    @staticmethod
    def _from_folder(root: Path) -> tuple[list[Any], list[tuple[str, ...]]]:
        items, captions, missing = [], [], []
        for f in list_images(root):
            caps = _read_caption_file(f.with_suffix(".txt"))
            if caps:
                items.append(f)
                captions.append(caps)
            else:
                missing.append(f)
        if not items:
            raise ValueError(
                f"none of the {len(missing)} images in {root} has a caption: put a same-named .txt file "
                f"beside each image (e.g. {missing[0].name} + {missing[0].with_suffix('.txt').name}), "
                "or pass a CSV of (path, caption) rows")
        if missing:
            log.warning("%d of %d images in %s have no caption (.txt) and are skipped, e.g. %s",
                        len(missing), len(missing) + len(items), root, missing[0])
        return items, captions

    @staticmethod
    def _from_pairs(data: Any) -> tuple[list[Any], list[tuple[str, ...]]]:
        items, captions = [], []
        for i, pair in enumerate(data):
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise TypeError(f"pair {i}: expected (image, caption), got {type(pair).__name__}")
            img, cap = pair
            caps = (cap,) if isinstance(cap, str) else tuple(cap)
            caps = tuple(c.strip() for c in caps if isinstance(c, str) and c.strip())
            if not caps:
                raise ValueError(f"pair {i}: the caption is empty or not a string")
            items.append(img)
            captions.append(caps)
        return items, captions

    def __len__(self) -> int:
        return len(self.items)

    def describe(self, index: int) -> str:
        obj = self.items[index]
        return str(obj) if isinstance(obj, (str, os.PathLike)) else f"pair {index}"

    def load(self, index: int):
        obj = self.items[index]
        if isinstance(obj, (str, os.PathLike)):
            return load_pil(obj)
        return to_uint8_image(obj)


class PairStream(TrainStream):
    """:class:`~sslfeatures.data.TrainStream` for :class:`ImageTextPairs`: yields
    ``{"images": uint8 (B, 3, S, S), "text": list[str]}``. An image with several captions
    gets one of them per epoch, drawn from ``seed`` and the epoch (so resume is exact)."""

    def __init__(self, source: ImageTextPairs, batch_size: int, seed: int = 0, cache_bytes: int = 4 << 30,
                 num_workers: int | None = None, report: BadFileReport | None = None, rank: int = 0,
                 world_size: int = 1, progress: bool = True):
        if not isinstance(source, ImageTextPairs):
            raise TypeError(f"PairStream batches ImageTextPairs, got {type(source).__name__}")
        # the base class checks the batch size and sets up streaming; decoding into memory is
        # done here, where the indices of the decodable items (hence their captions) are kept
        super().__init__(source, batch_size, seed, cache_bytes=0, num_workers=num_workers, report=report,
                         rank=rank, world_size=world_size, progress=progress)
        self.index = torch.arange(len(source))
        if len(source) * 3 * source.size * source.size <= cache_bytes:
            self.memory, self.index = load_into_memory(source, self.report, self.num_workers, progress)
            self.n = len(self.memory)
            if self.n < batch_size * world_size:
                raise ValueError(f"only {self.n} decodable image-caption pairs for a batch of "
                                 f"{batch_size * world_size}: lower batch_size or add pairs")
            self.steps_per_epoch = self.n // (batch_size * world_size)

    def _texts(self, items: Sequence[int], draws: torch.Tensor) -> list[str]:
        caps = self.source.captions
        return [caps[i][int(draws[i]) % len(caps[i])] for i in items]

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[dict[str, Any]]:
        gb = self.batch_size * self.world_size
        perm = epoch_permutation(self.n, self.seed, epoch)[: self.steps_per_epoch * gb]
        order = perm.view(self.steps_per_epoch, self.world_size, self.batch_size)[start_step:, self.rank]
        g = torch.Generator().manual_seed(int(self.seed) * 1_000_003 + int(epoch) + 7)
        draws = torch.randint(0, 2**31 - 1, (len(self.source),), generator=g)
        if self.memory is not None:
            for pos in order:
                yield {"images": self.memory[pos], "text": self._texts(self.index[pos].tolist(), draws)}
            return
        loader = DataLoader(self.source, batch_size=None, sampler=_OrderSampler(order.reshape(-1)),
                            num_workers=self.num_workers, prefetch_factor=4 if self.num_workers else None)
        imgs: list[torch.Tensor] = []
        idx: list[int] = []
        produced = 0
        for img, index, err in loader:
            if img is None:
                self.report.add(self.source.describe(int(index)), err)
                continue
            imgs.append(img)
            idx.append(int(index))
            if len(imgs) == self.batch_size:
                yield {"images": torch.stack(imgs), "text": self._texts(idx, draws)}
                imgs, idx, produced = [], [], produced + 1
        if imgs and produced < len(order):  # bad files shortened the epoch: pad the last batch
            k = len(imgs)
            imgs += [imgs[i % k] for i in range(self.batch_size - k)]
            idx += [idx[i % k] for i in range(self.batch_size - k)]
            yield {"images": torch.stack(imgs), "text": self._texts(idx, draws)}


ImageTextPairs.stream_class = PairStream  # the stream the engine batches this source with


def captions_from_labels(labelled_root: str | os.PathLike, out_csv: str | os.PathLike,
                         templates: Sequence[str] = CLASS_TEMPLATES, seed: int = 0) -> Path:
    """Write a CSV of (path, caption) pairs for a labelled folder (``root/<class>/<image>``):
    each image's caption is a template (``"a photo of a {}."``) filled with its class name
    (``_`` read as a space), the template drawn per image from ``seed``. This turns labels
    into captions (weak supervision), e.g. to train CLIP on a classification set."""
    if not templates or any("{}" not in t for t in templates):
        raise ValueError("templates must be a non-empty list of strings with a '{}' for the class name")
    src = LabelledImageFolder(labelled_root)
    g = torch.Generator().manual_seed(seed)
    pick = torch.randint(0, len(templates), (len(src.files),), generator=g).tolist()
    out = Path(out_csv)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "caption"])
        for f, lab, t in zip(src.files, src.labels, pick):
            w.writerow([str(Path(f).resolve()), templates[t].format(src.classes[int(lab)].replace("_", " "))])
    os.replace(tmp, out)
    return out


__all__ = ["ImageTextPairs", "PairStream", "captions_from_labels", "CLASS_TEMPLATES"]
