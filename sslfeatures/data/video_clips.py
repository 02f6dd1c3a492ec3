"""Training clips from a folder of videos: reference frames followed by a target frame.

``VideoClips("videos/", size=256, num_frames=4, frame_gap=1, decode_stride=4)`` describes
the clips; its :class:`VideoClipStream` (the engine builds it, as for image sources)
decodes every video once into RAM — frames resized so the shorter side is ``size`` and
centre-cropped square, every ``decode_stride``-th frame kept — and yields batches of
clips ``(B, num_frames, 3, size, size) uint8``: frames ``t, t + g, ..., t + (T-1) g`` of one
video (``g = frame_gap``). Every start ``t`` of every video is one sample; epochs are
seeded permutations of the samples, so runs resume exactly, as with images.

Videos are whatever :func:`sslfeatures.video.list_videos` finds (video files PyAV can
decode, or folders of frame images); a video that cannot be decoded is skipped and
recorded in the run's bad-file report.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from collections.abc import Iterator

import torch
from PIL import Image

from .decode import DecodeError, pil_to_tensor, resize_center_crop
from .loader import epoch_permutation
from .sources import BadFileReport

log = logging.getLogger("sslfeatures.data")


class VideoClipStream:
    """Batches of clips ``(B, T, 3, S, S) uint8`` from decoded videos; the interface of
    :class:`~sslfeatures.data.TrainStream` (``len``, ``epoch(e, start_step)``, ``memory``).

    ``memory`` holds every decoded frame (N, 3, S, S), which is also what the engine's
    collapse monitor embeds. ``cache_bytes`` bounds the decoded size: a larger set is an
    error that says how to shrink it (clips are sampled across whole videos, so they are
    not streamed from disk).
    """

    def __init__(self, source: VideoClips, batch_size: int, seed: int = 0, cache_bytes: int = 4 << 30,
                 num_workers: int | None = None, report: BadFileReport | None = None, rank: int = 0,
                 world_size: int = 1, progress: bool = True):
        from tqdm.auto import tqdm

        self.source, self.batch_size, self.seed = source, batch_size, seed
        self.report = report if report is not None else BadFileReport()
        self.rank, self.world_size = rank, world_size
        per_frame = 3 * source.size * source.size
        chunks, starts, total = [], [], 0
        for path in tqdm(source.videos, desc="decoding videos", unit="video", disable=not progress, leave=False):
            try:
                frames = source.decode(path)
            except DecodeError as err:
                self.report.add(str(path), err.reason)
                continue
            except (OSError, ValueError) as err:
                self.report.add(str(path), str(err))
                continue
            total += len(frames)
            if total * per_frame > cache_bytes:
                raise MemoryError(
                    f"the decoded videos exceed cache_bytes={cache_bytes} after {path}: lower image_size, raise "
                    "decode_stride, set max_frames_per_video, or raise cache_bytes")
            if len(frames) >= source.span:
                starts.append(torch.arange(len(frames) - source.span + 1) + (total - len(frames)))
            else:
                log.warning("%s: %d frames, fewer than the %d a clip spans; not sampled", path, len(frames),
                            source.span)
            chunks.append(frames)
        if not chunks:
            raise ValueError(f"none of the {len(source.videos)} videos in {source.root} could be decoded"
                             f"\n{self.report.summary()}")
        self.memory = torch.cat(chunks)
        self.starts = torch.cat(starts) if starts else torch.zeros(0, dtype=torch.long)
        self.offsets = torch.arange(source.num_frames) * source.frame_gap
        self.n = len(self.starts)
        global_batch = batch_size * world_size
        if self.n < global_batch:
            raise ValueError(
                f"only {self.n} clips of {source.num_frames} frames (gap {source.frame_gap}) in {source.root} for a "
                f"batch of {global_batch}: lower batch_size, frame_gap or decode_stride, or add videos")
        self.steps_per_epoch = self.n // global_batch

    def __len__(self) -> int:
        return self.steps_per_epoch

    def clip(self, index: torch.Tensor) -> torch.Tensor:
        """Clips for sample indices (B,) -> (B, T, 3, S, S) uint8."""
        frames = self.starts[index].unsqueeze(1) + self.offsets
        return self.memory[frames]

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[torch.Tensor]:
        perm = epoch_permutation(self.n, self.seed, epoch)
        gb = self.batch_size * self.world_size
        perm = perm[: self.steps_per_epoch * gb].view(self.steps_per_epoch, self.world_size, self.batch_size)
        for idx in perm[start_step:, self.rank]:
            yield self.clip(idx)


class VideoClips:
    """What to sample from a folder of videos (decoding happens in :class:`VideoClipStream`).

    Parameters
    ----------
    root: a folder of videos (recursive), or one video file / frame folder.
    size: side of the square frames.
    num_frames: frames per clip (references + target).
    frame_gap: distance between consecutive clip frames, in kept frames.
    decode_stride: keep every ``decode_stride``-th decoded frame.
    max_frames: keep at most this many frames per video (``None``: all).
    """

    def __init__(self, root: str | os.PathLike, size: int, num_frames: int = 4, frame_gap: int = 1,
                 decode_stride: int = 1, max_frames: int | None = None):
        from ..video.io import list_videos

        if not isinstance(root, (str, os.PathLike)):
            raise TypeError(f"video clips are read from a folder of videos (or one video); got {type(root).__name__}")
        for name, v in (("size", size), ("num_frames", num_frames), ("frame_gap", frame_gap),
                        ("decode_stride", decode_stride)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if num_frames < 2:
            raise ValueError(f"a clip needs at least 2 frames (references + target), got num_frames={num_frames}")
        if max_frames is not None and max_frames < 1:
            raise ValueError(f"max_frames must be >= 1 or None, got {max_frames!r}")
        self.root = Path(root)
        self.videos = list_videos(root)
        self.size, self.num_frames, self.frame_gap = size, num_frames, frame_gap
        self.decode_stride, self.max_frames = decode_stride, max_frames

    stream_class = VideoClipStream  # the engine builds ``stream_class(source, batch_size, ...)``

    @property
    def span(self) -> int:
        """Kept frames one clip covers."""
        return (self.num_frames - 1) * self.frame_gap + 1

    def decode(self, path: Path) -> torch.Tensor:
        """All kept frames of one video, (N, 3, size, size) uint8."""
        from ..video.io import iter_frames

        frames = []
        for arr in iter_frames(path, stride=self.decode_stride):
            frames.append(pil_to_tensor(resize_center_crop(Image.fromarray(arr), self.size)))
            if self.max_frames is not None and len(frames) >= self.max_frames:
                break
        if not frames:
            raise DecodeError(path, "the video has no frames")
        return torch.stack(frames)

    def __len__(self) -> int:
        return len(self.videos)


__all__ = ["VideoClips", "VideoClipStream"]
