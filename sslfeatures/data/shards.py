"""WebDataset tar shards: the second input format beside image folders, for data at scale.

A shard is a plain tar file whose members are grouped into samples by key (the member's
name up to the first dot of its base name: ``000123.jpg`` + ``000123.path`` form sample
``000123``), the WebDataset convention, so shards written by the ``webdataset`` package or
``tar`` itself are read too. Training reads the image member of each sample; other members
are ignored (``.path``, written by :func:`write_shards`, names the original file in reports).

``Pretrainer.fit("shards/train-{000000..000009}.tar")`` (brace ranges), a folder of ``.tar``
files, or one ``.tar`` file. Shards are streamed, never extracted: each epoch shuffles the
shard order (seeded per epoch), gives every process its own shards and every DataLoader
worker its own subset of those, and shuffles samples through a seeded buffer. A sample
whose image does not decode is skipped and reported (shard + member, with the reason) as
for folders; member names with ``..`` or an absolute path, and links or devices, are refused
(reported, never read). ``sslfeatures shard FOLDER --out DIR`` writes shards from a folder.
"""
from __future__ import annotations

import io
import json
import logging
import os
import re
import tarfile
from pathlib import Path
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .archive import member_name_problem
from .decode import IMAGE_EXTENSIONS, decode_bytes, pil_to_tensor, resize_center_crop
from .loader import epoch_permutation
from .sources import BadFileReport, default_workers, list_images

log = logging.getLogger("sslfeatures.data")

INDEX_NAME = "shards.json"  # written next to the shards: sample counts, so no shard is scanned to count
SHUFFLE_BUFFER = 2000       # samples held per worker to shuffle within and across its shards
_IMAGE_EXTS = tuple(e.lstrip(".") for e in IMAGE_EXTENSIONS)


# -- naming -------------------------------------------------------------------------------
def _brace_expand(pattern: str) -> list[str]:
    """``a-{000..002}.tar`` -> ``a-000.tar a-001.tar a-002.tar`` (zero padding kept);
    ``{x,y}`` alternatives too; several groups multiply."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m is None:
        return [pattern]
    body, head, tail = m.group(1), pattern[:m.start()], pattern[m.end():]
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = rng.group(1), rng.group(2)
        width = len(lo) if lo.startswith("0") else 0
        if int(hi) < int(lo):
            raise ValueError(f"empty shard range {{{body}}} in {pattern!r}")
        items = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        items = body.split(",")
    return [x for item in items for x in _brace_expand(head + item + tail)]


def is_shard_spec(data: Any) -> bool:
    """Whether ``data`` names tar shards: a ``.tar`` path or pattern, or a folder holding
    ``.tar`` files and no images at its top level."""
    if not isinstance(data, (str, os.PathLike)):
        return False
    text = os.fspath(data)
    if text.endswith(".tar"):
        return True
    p = Path(text)
    if not p.is_dir():
        return False
    try:
        names = [e.name for e in os.scandir(p) if e.is_file()]
    except OSError:
        return False
    return any(n.endswith(".tar") for n in names) and not any(n.lower().endswith(IMAGE_EXTENSIONS) for n in names)


def expand_shards(spec: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """The shard files ``spec`` names (a pattern with ``{a..b}``, a folder, a file or a list),
    checked to exist."""
    if isinstance(spec, (list, tuple)):
        paths = [Path(p) for p in spec]
    else:
        text = os.fspath(spec)
        if Path(text).is_dir():
            paths = sorted(q for q in Path(text).iterdir() if q.suffix == ".tar" and not q.name.startswith("."))
            if not paths:
                raise ValueError(f"no .tar shards in {text}")
        else:
            paths = [Path(x) for x in _brace_expand(text)]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} shard(s) not found, e.g. {missing[0]}")
    if not paths:
        raise ValueError(f"no shards in {spec!r}")
    return paths


def _split_key(name: str) -> tuple[str, str]:
    """``dir/000123.seg.png`` -> (``dir/000123``, ``seg.png``): WebDataset's sample key + extension."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), (ext.lower() if dot else "")


def unsafe_member_reason(member: tarfile.TarInfo) -> str | None:
    """Why a tar member is refused (path traversal, link, device), or None when it is a
    plain file with a relative name inside the archive."""
    problem = member_name_problem(member.name)
    if problem is not None:
        return f"unsafe member name: {problem}"
    if not member.isfile():
        return "not a regular file (link, device or directory member)"
    return None


# -- reading ------------------------------------------------------------------------------
def decode_image_bytes(data: bytes, size: int, crop_pct: float = 1.0) -> torch.Tensor:
    """Encoded image bytes -> (3, size, size) uint8, as folders decode; ValueError with the
    reason when the bytes are not a readable image."""
    rgb = decode_bytes(data)
    return pil_to_tensor(resize_center_crop(rgb, size, crop_pct))


def iter_samples(shard: Path) -> Iterator[tuple[str, dict[str, bytes], str | None]]:
    """``(key, {extension: bytes}, None)`` per sample of ``shard`` in file order, or
    ``(member name, {}, reason)`` for a refused member. Streams (``r|*``): nothing is extracted."""
    current: str | None = None
    parts: dict[str, bytes] = {}
    try:
        with tarfile.open(shard, mode="r|*") as tar:
            for member in tar:
                reason = unsafe_member_reason(member)
                if reason is not None:
                    if not member.isdir():
                        yield member.name, {}, reason
                    continue
                key, ext = _split_key(member.name)
                if key != current:
                    if current is not None and parts:
                        yield current, parts, None
                    current, parts = key, {}
                fh = tar.extractfile(member)
                parts[ext] = fh.read() if fh is not None else b""
    except (tarfile.TarError, OSError, EOFError) as exc:
        yield "", {}, f"damaged shard, the rest of it is skipped ({exc})"
    if current is not None and parts:
        yield current, parts, None


def count_samples(shard: Path) -> int:
    """Samples with an image member in ``shard`` (reads the tar headers and data once)."""
    return sum(1 for _, parts, err in iter_samples(shard) if err is None and _image_ext(parts))


def _image_ext(parts: dict[str, bytes]) -> str | None:
    return next((e for e in parts if e.rsplit(".", 1)[-1] in _IMAGE_EXTS), None)


def _read_index(paths: list[Path]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for folder in {p.parent for p in paths}:
        idx = folder / INDEX_NAME
        if idx.is_file():
            try:
                data = json.loads(idx.read_text(encoding="utf-8"))
                for entry in data.get("shards", []):
                    counts[str((folder / str(entry["name"])).resolve())] = int(entry["count"])
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.warning("ignoring %s (%s): counting samples by reading the shards", idx, exc)
    return counts


class ShardSource:
    """The shards of a training run and their sample counts (from ``shards.json`` when it
    is there, else by reading each shard once)."""

    def __init__(self, spec: Any, size: int = 224, crop_pct: float = 1.0):
        self.shards = expand_shards(spec)
        self.size, self.crop_pct = size, crop_pct
        known = _read_index(self.shards)
        self.counts = []
        for p in self.shards:
            n = known.get(str(p.resolve()))
            self.counts.append(n if n is not None else count_samples(p))
        if sum(self.counts) == 0:
            raise ValueError(f"no image samples in the {len(self.shards)} shard(s) {self.shards[0]}...")

    def __len__(self) -> int:
        return int(sum(self.counts))


class _ShardReader(IterableDataset):
    """One process's shards for one epoch, split among DataLoader workers; yields
    ``(image | None, description, reason | None)`` in a seeded order."""

    def __init__(self, source: ShardSource, shards: list[int], seed: int, epoch: int, rank: int,
                 buffer: int = SHUFFLE_BUFFER):
        self.source, self.shards, self.seed, self.epoch, self.rank, self.buffer = \
            source, shards, seed, epoch, rank, buffer

    def __iter__(self):
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        mine = self.shards[wid::nw]
        rng = np.random.default_rng([int(self.seed), int(self.epoch), int(self.rank), wid])
        buf: list[tuple] = []
        for i in mine:
            path = self.source.shards[i]
            for key, parts, err in iter_samples(path):
                if err is not None:
                    buf.append((None, f"{path}:{key}" if key else str(path), err))
                else:
                    ext = _image_ext(parts)
                    if ext is None:
                        continue  # a sample with no image (e.g. captions only) is not an error
                    where = parts.get("path", b"").decode("utf-8", "replace") or f"{key}.{ext}"
                    buf.append((parts[ext], f"{path}:{where}", None))
                if len(buf) >= self.buffer:
                    yield self._decode(buf.pop(int(rng.integers(len(buf)))))
        while buf:
            yield self._decode(buf.pop(int(rng.integers(len(buf)))))

    def _decode(self, item: tuple) -> tuple[torch.Tensor | None, str, str | None]:
        data, where, err = item
        if err is not None:
            return None, where, err
        try:
            return decode_image_bytes(data, self.source.size, self.source.crop_pct), where, None
        except ValueError as exc:
            return None, where, str(exc)
        except Exception as exc:  # one odd sample must not stop a run: it is reported with the error
            return None, where, f"{type(exc).__name__}: {exc}"


class ShardStream:
    """:class:`~sslfeatures.data.TrainStream` for tar shards (``len``, ``epoch(e, start)``,
    ``memory``): every process streams its own shards; each yields ``steps_per_epoch``
    batches of ``batch_size`` per epoch, ``steps_per_epoch = samples // (batch_size x
    world_size)``. A process whose shards hold fewer samples than that reads them again
    (another shuffle) to fill its last batches, so all processes take the same number of
    steps; shards of equal size (what ``sslfeatures shard`` writes) keep that rare.

    Resuming mid-epoch re-reads and skips this process's samples up to the resume point
    (decoding them: tar shards cannot be indexed), then continues with the same batches
    the uninterrupted run had. The order is a function of the seed, the epoch, the process
    and the number of DataLoader workers (each worker shuffles its own shards and the
    loader interleaves them): resume with the same ``num_workers`` for an exact replay.
    """

    memory = None  # never decoded into RAM as a whole

    def __init__(self, source: ShardSource, batch_size: int, seed: int = 0, cache_bytes: int = 4 << 30,
                 num_workers: int | None = None, report: BadFileReport | None = None, rank: int = 0,
                 world_size: int = 1, progress: bool = True):
        del cache_bytes, progress  # shards are streamed, never cached
        self.source, self.batch_size, self.seed = source, batch_size, seed
        self.report = report if report is not None else BadFileReport()
        self.num_workers = default_workers() if num_workers is None else num_workers
        self.rank, self.world_size = rank, world_size
        if len(source.shards) < world_size:
            raise ValueError(f"{len(source.shards)} shard(s) for {world_size} processes: every process needs "
                             "at least one; write more, smaller shards (sslfeatures shard --max-count)")
        self.n = len(source)
        global_batch = batch_size * world_size
        if self.n < global_batch:
            raise ValueError(f"only {self.n} samples in the shards for a batch of {global_batch}: lower "
                             "batch_size or add images")
        self.steps_per_epoch = self.n // global_batch

    def __len__(self) -> int:
        return self.steps_per_epoch

    def shards_of(self, epoch: int) -> list[int]:
        """This process's shards in ``epoch`` (a seeded permutation dealt round-robin)."""
        order = epoch_permutation(len(self.source.shards), self.seed, epoch).tolist()
        return order[self.rank::self.world_size]

    def _samples(self, epoch: int) -> Iterator[torch.Tensor]:
        shards = self.shards_of(epoch)
        for rnd in range(1_000_000):
            reader = _ShardReader(self.source, shards, self.seed + 7919 * rnd, epoch, self.rank)
            workers = min(self.num_workers, len(shards))
            loader = DataLoader(reader, batch_size=None, num_workers=workers,
                                prefetch_factor=4 if workers else None)
            good = 0
            for img, where, err in loader:
                if img is None:
                    self.report.add(where, err)
                    continue
                good += 1
                yield img
            if good == 0:
                raise ValueError(f"process {self.rank}: none of the samples of its shards "
                                 f"{[str(self.source.shards[i]) for i in shards][:3]} could be decoded"
                                 f"\n{self.report.summary()}")

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[torch.Tensor]:
        """Yield this process's batches of ``epoch`` from batch ``start_step`` on."""
        samples = self._samples(epoch)
        for _ in range(start_step * self.batch_size):  # resume: skip what was trained on
            next(samples)
        for _ in range(start_step, self.steps_per_epoch):
            yield torch.stack([next(samples) for _ in range(self.batch_size)])
        samples.close()


ShardSource.stream_class = ShardStream  # the stream the engine batches this source with


# -- writing ------------------------------------------------------------------------------
def write_shards(folder: str | os.PathLike, out: str | os.PathLike, max_count: int = 1000,
                 prefix: str = "train", shuffle: bool = True, seed: int = 0,
                 report: BadFileReport | None = None) -> list[Path]:
    """Pack the images below ``folder`` into ``out/<prefix>-000000.tar``, ... (``max_count``
    samples each) plus ``out/shards.json`` (names and sample counts). Images are stored as
    they are (no re-encoding) under sequential keys, each with a ``.path`` member naming the
    original file relative to ``folder``. Files are shuffled first (``shuffle``, seeded)
    so that each shard is a random sample of the set: training shuffles shard order and
    within a buffer only. Every file is written to a temp name and renamed when complete;
    ``shards.json`` comes last. Unreadable files are skipped and reported.
    """
    if max_count < 1:
        raise ValueError(f"max_count must be 1 or more, got {max_count}")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", prefix):
        raise ValueError(f"prefix {prefix!r}: use letters, digits, '_', '-' and '.' only")
    from ..utils import atomic_write_json, atomic_writer

    root = Path(folder)
    files = list_images(root)
    if shuffle:
        files = [files[i] for i in np.random.default_rng(seed).permutation(len(files))]
    report = report if report is not None else BadFileReport()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    entries: list[dict[str, Any]] = []
    index, pos = 0, 0
    while pos < len(files):
        path = out / f"{prefix}-{len(written):06d}.tar"
        count = 0
        with atomic_writer(path) as fh, tarfile.open(fileobj=fh, mode="w", format=tarfile.PAX_FORMAT) as tar:
            while pos < len(files) and count < max_count:
                f = files[pos]
                pos += 1
                try:
                    data = f.read_bytes()
                except OSError as exc:
                    report.add(str(f), exc.strerror or str(exc))
                    continue
                if not data:
                    report.add(str(f), "empty file")
                    continue
                key = f"{index:09d}"
                ext = f.suffix.lower().lstrip(".")
                rel = f.relative_to(root).as_posix().encode("utf-8", "surrogateescape")
                for name, blob in ((f"{key}.{ext}", data), (f"{key}.path", rel)):
                    info = tarfile.TarInfo(name)
                    info.size, info.mode, info.mtime = len(blob), 0o644, 0
                    tar.addfile(info, io.BytesIO(blob))
                index += 1
                count += 1
        if count == 0:
            path.unlink(missing_ok=True)
            continue
        written.append(path)
        entries.append({"name": path.name, "count": count})
    if not written:
        raise ValueError(f"none of the {len(files)} images below {root} could be read\n{report.summary()}")
    atomic_write_json(out / INDEX_NAME, {"format": "webdataset", "samples": index, "shards": entries})
    return written


__all__ = ["ShardSource", "ShardStream", "write_shards", "expand_shards", "is_shard_spec", "iter_samples",
           "count_samples", "decode_image_bytes", "unsafe_member_reason"]
