"""Decoding any image file a user may have into a ``uint8`` RGB tensor.

Handles EXIF orientation, RGBA / LA / palette-with-transparency (composited on white),
16-bit and 32-bit integer images (rescaled to 8 bits), float TIFFs, CMYK, grayscale and
multi-frame files (first frame). Anything Pillow cannot decode raises :class:`DecodeError`
with the reason, so callers can skip the file and report it.
"""
from __future__ import annotations

import errno
import os
import struct
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def display_path(path: str | os.PathLike) -> str:
    """``path`` made safe to print on one line: bytes that are not UTF-8 become ``\\xNN``
    escapes, control characters (a newline in a file name) their backslash escapes."""
    s = os.fsdecode(path)
    if s.isprintable():
        return s
    out = []
    for ch in s:
        if 0xDC80 <= ord(ch) <= 0xDCFF:  # an undecodable byte, kept by surrogateescape
            out.append(f"\\x{ord(ch) - 0xDC00:02x}")
        elif not ch.isprintable():
            out.append(ch.encode("unicode_escape", "backslashreplace").decode("ascii"))
        else:
            out.append(ch)
    return "".join(out)


class DecodeError(RuntimeError):
    """A file that could not be decoded as an image; ``str(err)`` says why."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{display_path(self.path)}: {reason}")


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        if img.mode.startswith("I;16"):
            arr = arr / 65535.0 * 255.0
        elif hi > 255 or lo < 0:
            arr = (arr - lo) / max(hi - lo, 1e-12) * 255.0
        elif img.mode == "F" and hi <= 1.0:
            arr = arr * 255.0
        img = Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), mode="L")
    if img.mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
    if img.mode == "La":  # premultiplied: Pillow converts it to LA only
        img = img.convert("LA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa"):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)
    if img.mode != "RGB":
        img = img.convert("RGB")
    return img


def pil_to_rgb(img: Image.Image) -> Image.Image:
    """Normalise a PIL image to upright 8-bit RGB (EXIF orientation applied)."""
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # broken EXIF block: keep the pixels as stored
        pass
    return _to_rgb(img)


def decode_bytes(data: bytes) -> Image.Image:
    """Encoded image bytes (an upload, a shard member) -> upright RGB, as files decode;
    ``ValueError`` with the reason when they are not a readable image."""
    import io

    if not data:
        raise ValueError("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                img.seek(0)
                img.load()
                return pil_to_rgb(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ValueError(f"image too large (decompression-bomb guard): {exc}") from None
    except Image.UnidentifiedImageError:
        raise ValueError("not a recognised image format") from None
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as exc:
        raise ValueError(f"corrupt or truncated image ({exc})") from None


def load_pil(path: str | os.PathLike) -> Image.Image:
    """Open ``path`` and return an upright 8-bit RGB PIL image, or raise :class:`DecodeError`."""
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.seek(0)
                img.load()
                return pil_to_rgb(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DecodeError(path, f"image too large (decompression-bomb guard): {exc}") from None
    except FileNotFoundError:
        raise DecodeError(path, "file not found") from None
    except PermissionError:
        raise DecodeError(path, "permission denied") from None
    except IsADirectoryError:
        raise DecodeError(path, "is a directory") from None
    except Image.UnidentifiedImageError:
        size = path.stat().st_size if path.exists() else 0
        reason = "empty file" if size == 0 else "not a recognised image format"
        raise DecodeError(path, reason) from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise DecodeError(path, "symlink loop (the link points, through other links, back at itself)") from None
        if exc.errno == errno.EACCES:
            raise DecodeError(path, "permission denied") from None
        if exc.errno is not None:  # an I/O error (EIO, ENAMETOOLONG, ...), not bad pixels
            raise DecodeError(path, f"cannot read the file ({exc.strerror})") from None
        raise DecodeError(path, f"corrupt or truncated image ({exc})") from None
    except (SyntaxError, ValueError, EOFError, struct.error, MemoryError) as exc:
        raise DecodeError(path, f"corrupt or truncated image ({type(exc).__name__}: {exc})") from None
    except Exception as exc:  # a Pillow plugin tripping over crafted bytes must not stop a run
        raise DecodeError(path, f"could not decode ({type(exc).__name__}: {exc})") from None


def resize_center_crop(img: Image.Image, size: int, crop_pct: float = 1.0) -> Image.Image:
    """Resize the shorter side to ``size / crop_pct`` and center-crop ``size x size``."""
    scale_to = int(round(size / crop_pct))
    w, h = img.size
    if w < 1 or h < 1:
        raise ValueError(f"the image is empty ({w}x{h} pixels)")
    if (w, h) != (scale_to, scale_to) or scale_to != size:
        s = scale_to / min(w, h)
        nw, nh = max(size, int(round(w * s))), max(size, int(round(h * s)))
        if (nw, nh) != (w, h):
            img = img.resize((nw, nh), Image.BICUBIC if s > 1 else Image.BILINEAR,
                             reducing_gap=None)
        left, top = (nw - size) // 2, (nh - size) // 2
        img = img.crop((left, top, left + size, top + size))
    return img


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> ``uint8`` tensor (3, H, W)."""
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def to_uint8_image(obj: Any) -> Image.Image:
    """Turn any supported in-memory image into an RGB PIL image.

    Accepts a PIL image, a numpy array (HW, HWC with C in 1/3/4, uint8 or float in [0, 1],
    uint16) or a torch tensor (CHW/HW, uint8 or float in [0, 1]).
    """
    if isinstance(obj, Image.Image):
        return pil_to_rgb(obj)
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu()
        if t.ndim == 3 and t.shape[0] in (1, 3, 4):
            t = t.permute(1, 2, 0)
        obj = t.numpy()
    if isinstance(obj, np.ndarray):
        arr = obj
        if arr.ndim == 3 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
            raise ValueError(
                f"cannot interpret an array of shape {tuple(obj.shape)} as an image: expected "
                "(H, W), (H, W, C) or (C, H, W) with C in 1, 3, 4")
        if arr.shape[0] < 1 or arr.shape[1] < 1:
            raise ValueError(f"the image array of shape {tuple(obj.shape)} is empty")
        if arr.dtype == np.uint8:
            pass
        elif arr.dtype == np.uint16:
            arr = (arr.astype(np.float64) / 257.0 + 0.5).astype(np.uint8)
        elif np.issubdtype(arr.dtype, np.floating):
            if not np.isfinite(arr).all():
                raise ValueError("image array contains NaN or Inf")
            arr = (np.clip(arr, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
        elif arr.dtype == np.bool_:
            arr = arr.astype(np.uint8) * 255
        else:
            raise ValueError(f"unsupported image dtype {arr.dtype}; use uint8, uint16 or float in [0, 1]")
        return _to_rgb(Image.fromarray(np.ascontiguousarray(arr)))
    raise TypeError(
        f"cannot embed an object of type {type(obj).__name__}: pass a path, PIL image, "
        "numpy array or torch tensor")
