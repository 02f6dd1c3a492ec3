"""Reading videos as streams of ``uint8`` RGB frames, and writing them back.

A *video* is either a file PyAV can decode (``mp4``, ``avi``, ``mov``, ``mkv``, ``webm``,
``gif``, ...) or a folder of frame images (sorted by name, natural order so ``2.png``
comes before ``10.png``). :func:`iter_frames` is a generator: frames are decoded one at a
time, so a long video costs the memory of one frame (plus whatever the caller keeps).

>>> for frame in iter_frames("clip.mp4", max_side=480, stride=2):
...     frame.shape          # (H, W, 3) uint8, RGB
"""
from __future__ import annotations

import os
import re
from fractions import Fraction
from pathlib import Path
from collections.abc import Iterable, Iterator

import numpy as np
from PIL import Image

from ..data.decode import IMAGE_EXTENSIONS, DecodeError, load_pil

VIDEO_EXTENSIONS = (".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".gif", ".mpg", ".mpeg", ".ogv", ".wmv", ".flv")
FRAME_EXTENSIONS = tuple(e for e in IMAGE_EXTENSIONS if e != ".gif")


def _require_av():
    try:
        import av
    except ImportError:  # pragma: no cover - av is an optional extra
        raise ImportError("decoding video files needs PyAV: pip install 'sslfeatures[video]' (or pip install av)") \
            from None
    return av


def _natural_key(path: Path) -> list:
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", path.name)]


def is_video_file(path: str | os.PathLike) -> bool:
    """True when ``path`` has a video-file extension (gif included)."""
    return Path(path).suffix.lower() in VIDEO_EXTENSIONS


def frame_files(folder: str | os.PathLike) -> list[Path]:
    """The frame images of a frame folder, in natural order (``2.png`` before ``10.png``)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise NotADirectoryError(f"{folder} is not a folder of frames")
    files = [p for p in folder.iterdir()
             if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in FRAME_EXTENSIONS]
    if not files:
        raise ValueError(f"no frame images in {folder} (looked for {', '.join(FRAME_EXTENSIONS)})")
    return sorted(files, key=_natural_key)


def list_videos(folder: str | os.PathLike) -> list[Path]:
    """Every video below ``folder`` (recursive, sorted): video files, plus each sub-folder
    that directly holds frame images (a *frame folder*; its own sub-folders are not
    searched further). A ``folder`` that is itself a frame folder gives ``[folder]``."""
    root = Path(folder)
    if not root.exists():
        raise FileNotFoundError(f"video folder not found: {root}")
    if root.is_file():
        if is_video_file(root):
            return [root]
        raise ValueError(f"{root} is a file, not a video folder (video extensions: {', '.join(VIDEO_EXTENSIONS)})")
    found: list[Path] = []
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen:  # symlink loop
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        visible = [f for f in filenames if not f.startswith(".")]
        if any(f.lower().endswith(FRAME_EXTENSIONS) for f in visible):
            found.append(Path(dirpath))
            dirnames[:] = []
            continue
        found.extend(Path(dirpath) / f for f in visible if f.lower().endswith(VIDEO_EXTENSIONS))
    if not found:
        raise ValueError(f"no videos found in {root} (looked for {', '.join(VIDEO_EXTENSIONS)} files and "
                         "folders of frame images)")
    return sorted(found)


def _check_args(max_side: int | None, stride: int) -> None:
    if max_side is not None and (not isinstance(max_side, int) or max_side < 1):
        raise ValueError(f"max_side must be a positive int or None, got {max_side!r}")
    if not isinstance(stride, int) or stride < 1:
        raise ValueError(f"stride must be a positive int, got {stride!r}")


def _fit(img: Image.Image, max_side: int | None) -> np.ndarray:
    if max_side is not None and max(img.size) > max_side:
        s = max_side / max(img.size)
        img = img.resize((max(1, round(img.width * s)), max(1, round(img.height * s))), Image.BILINEAR,
                         reducing_gap=None)
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(img, dtype=np.uint8)


def _iter_gif(path: Path) -> Iterator[Image.Image]:
    """A GIF's frames with Pillow (which also writes them, see :class:`VideoWriter`): no PyAV needed."""
    try:
        img = Image.open(path)
    except (OSError, SyntaxError) as exc:
        raise DecodeError(path, f"cannot open as a GIF ({exc})") from None
    with img:
        try:
            for k in range(getattr(img, "n_frames", 1)):
                img.seek(k)
                yield img.convert("RGB")
        except (OSError, EOFError, SyntaxError) as exc:
            raise DecodeError(path, f"corrupt GIF frame ({exc})") from None


def _iter_file(path: Path) -> Iterator[Image.Image]:
    if path.suffix.lower() == ".gif":
        yield from _iter_gif(path)
        return
    av = _require_av()
    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError) as exc:  # type: ignore[attr-defined]
        raise DecodeError(path, f"cannot open as a video ({exc})") from None
    try:
        if not container.streams.video:
            raise DecodeError(path, "the file has no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        try:
            for frame in container.decode(stream):
                yield frame.to_image()  # RGB PIL image, rotation metadata is not applied
        except av.error.FFmpegError as exc:  # type: ignore[attr-defined]
            raise DecodeError(path, f"corrupt video stream ({exc})") from None
    finally:
        container.close()


def iter_frames(path: str | os.PathLike, max_side: int | None = None, stride: int = 1) -> Iterator[np.ndarray]:
    """Yield the frames of a video file or frame folder as ``(H, W, 3) uint8`` RGB arrays.

    Args:
        path: a video file (decoded with PyAV; GIFs with Pillow) or a folder of frame images.
        max_side: if given, frames whose longer side exceeds it are resized (bilinear,
            aspect ratio kept) so that the longer side equals ``max_side``.
        stride: keep every ``stride``-th frame (frames 0, stride, 2*stride, ...).

    Frames are decoded lazily, one at a time. Raises :class:`FileNotFoundError` for a
    missing path and :class:`~sslfeatures.data.DecodeError` for an undecodable file.
    """
    _check_args(max_side, stride)
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"video not found: {path}")
    source: Iterable[Image.Image]
    if path.is_dir():
        source = (load_pil(f) for f in frame_files(path))
    elif path.suffix.lower() in FRAME_EXTENSIONS:
        raise ValueError(f"{path} is a single image; pass a video file or a folder of frames")
    else:
        source = _iter_file(path)
    for i, img in enumerate(source):
        if i % stride == 0:
            yield _fit(img, max_side)


def read_frames(path: str | os.PathLike, max_side: int | None = None, stride: int = 1,
                max_frames: int | None = None) -> np.ndarray:
    """All frames of a video as one ``(T, H, W, 3) uint8`` array (see :func:`iter_frames`);
    ``max_frames`` stops after that many kept frames. Memory grows with the video's
    length: use :func:`iter_frames` for long videos."""
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be >= 1 or None, got {max_frames!r}")
    frames: list[np.ndarray] = []
    for frame in iter_frames(path, max_side=max_side, stride=stride):
        if frames and frame.shape != frames[0].shape:
            raise ValueError(f"{path}: frame {len(frames)} has shape {frame.shape}, frame 0 has {frames[0].shape}")
        frames.append(frame)
        if max_frames is not None and len(frames) >= max_frames:
            break
    if not frames:
        raise ValueError(f"{path} has no frames")
    return np.stack(frames)


def video_fps(path: str | os.PathLike, default: float = 25.0) -> float:
    """The frame rate of a video file (``default`` for frame folders or unknown rates)."""
    path = Path(path)
    if path.is_dir():
        return default
    if path.suffix.lower() == ".gif":  # Pillow: the first frame's duration in ms
        try:
            with Image.open(path) as img:
                ms = img.info.get("duration")
        except (OSError, SyntaxError):
            return default
        return 1000.0 / ms if isinstance(ms, (int, float)) and ms > 0 else default
    av = _require_av()
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                return default
            rate = container.streams.video[0].average_rate or container.streams.video[0].guessed_rate
            return float(rate) if rate else default
    except (av.error.FFmpegError, OSError):  # type: ignore[attr-defined]
        return default


class VideoWriter:
    """Write RGB frames to a video file, streaming; the container follows the suffix.

    ``.gif`` is written with Pillow (palette per frame; frames are buffered as small
    palette images until :meth:`close`), anything else with PyAV (``libx264``/``yuv420p``
    for ``.mp4``/``.mov``/``.mkv``, ``libvpx-vp9`` for ``.webm``, ``mpeg4`` otherwise).
    Use as a context manager.
    """

    def __init__(self, path: str | os.PathLike, fps: float = 25.0, codec: str | None = None):
        self.path = Path(path)
        self.fps = float(fps)
        if not self.fps > 0:
            raise ValueError(f"fps must be > 0, got {fps!r}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._gif: list[Image.Image] | None = [] if self.path.suffix.lower() == ".gif" else None
        self._codec = codec
        self._container = None
        self._stream = None
        self._shape: tuple[int, ...] | None = None
        self._size: tuple[int, int] = (0, 0)  # encoded (H, W): even sizes for yuv420p

    def _open(self, h: int, w: int) -> None:
        av = _require_av()
        suffix = self.path.suffix.lower()
        codec = self._codec or {".mp4": "libx264", ".mov": "libx264", ".mkv": "libx264", ".m4v": "libx264",
                                ".webm": "libvpx-vp9"}.get(suffix, "mpeg4")
        self._container = av.open(str(self.path), mode="w")
        rate = Fraction(self.fps).limit_denominator(1001)
        self._stream = self._container.add_stream(codec, rate=rate)
        self._stream.width, self._stream.height = w, h
        self._stream.pix_fmt = "yuv420p"

    def write(self, frame: np.ndarray) -> None:
        """Append one ``(H, W, 3) uint8`` RGB frame."""
        frame = np.asarray(frame)
        if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
            raise ValueError(f"expected an (H, W, 3) uint8 frame, got {frame.shape} {frame.dtype}")
        if self._shape is None:
            self._shape = frame.shape
        elif frame.shape != self._shape:
            raise ValueError(f"frame shape {frame.shape} differs from the first frame's {self._shape}")
        if self._gif is not None:
            self._gif.append(Image.fromarray(frame).quantize(colors=255, method=Image.Quantize.MEDIANCUT))
            return
        if self._container is None:
            h, w = frame.shape[:2]
            if h < 2 or w < 2:
                raise ValueError(f"frames of {h}x{w} pixels are too small to encode; use a .gif")
            self._size = (h - h % 2, w - w % 2)  # yuv420p needs even sizes: drop an odd last row/column
            self._open(*self._size)
        av = _require_av()
        frame = np.ascontiguousarray(frame[: self._size[0], : self._size[1]])
        for packet in self._stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
            self._container.mux(packet)

    def close(self) -> None:
        if self._gif is not None:
            if self._gif:
                self._gif[0].save(self.path, save_all=True, append_images=self._gif[1:], loop=0,
                                  duration=max(20, round(1000 / self.fps)), disposal=1)
            self._gif = None
            return
        if self._container is not None:
            for packet in self._stream.encode():
                self._container.mux(packet)
            self._container.close()
            self._container = None

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_video(path: str | os.PathLike, frames: Iterable[np.ndarray], fps: float = 25.0) -> Path:
    """Write ``frames`` (iterable of ``(H, W, 3) uint8``) to ``path`` (see :class:`VideoWriter`)."""
    with VideoWriter(path, fps=fps) as writer:
        n = 0
        for frame in frames:
            writer.write(frame)
            n += 1
    if n == 0:
        raise ValueError("write_video: no frames given")
    return Path(path)


__all__ = ["VIDEO_EXTENSIONS", "FRAME_EXTENSIONS", "list_videos", "iter_frames", "read_frames", "frame_files",
           "is_video_file", "video_fps", "VideoWriter", "write_video"]
