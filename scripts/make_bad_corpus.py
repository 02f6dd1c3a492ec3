"""Write the bad-inputs corpus: image/video files a user's folder may really hold.

Every case is a file (or symlink/folder) that training, embedding, indexing and video
propagation must either handle correctly (``expect == "ok"``: decoded to an upright 8-bit
RGB image) or skip with one clear line naming the file and the reason (``expect ==
"skip"``; ``reason`` is a substring of the reason sslfeatures reports). The tests build
the corpus into a temp folder through :func:`make_corpus`; nothing binary is committed.

    python scripts/make_bad_corpus.py tests/data/bad      # writes the files + manifest.json

The manifest (``manifest.json``) maps each case to its file name (non-UTF-8 names are
stored with Python's surrogate escapes: ``os.fsencode(name)`` gives the raw bytes back).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import struct
import sys
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image


@dataclass
class Case:
    """One corpus entry: ``name`` (file name in the corpus folder), ``expect`` ("ok" or
    "skip"), ``reason`` (substring of the skip reason), ``size`` (the upright (W, H) an
    "ok" image decodes to, when it matters) and ``note`` (what the case exercises)."""

    name: str
    expect: str
    reason: str = ""
    size: tuple[int, int] | None = None
    note: str = ""


def _photo(w: int = 48, h: int = 32, seed: int = 0) -> Image.Image:
    """A small non-trivial RGB picture (smooth gradients + noise), deterministic."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    arr = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), (xx + yy) * 127 // max(w + h - 2, 1)], -1)
    arr = np.clip(arr + rng.integers(-20, 20, arr.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _bomb_png(side: int = 30000) -> bytes:
    """A tiny PNG whose header claims ``side x side`` pixels (900 M for 30000: far above
    twice Pillow's ``MAX_IMAGE_PIXELS``); only a few rows of pixel data follow."""
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1-bit grayscale
    rows = zlib.compress(b"\x00" * (1 + side // 8) * 4)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", rows) + _png_chunk(b"IEND", b"")


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _mp4_bytes() -> bytes | None:
    """A real 8-frame MPEG-4 clip (needs PyAV), or None when PyAV is missing."""
    try:
        import av
    except ImportError:
        return None
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for i in range(8):
            arr = np.full((32, 32, 3), i * 30, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def make_corpus(dest: str | os.PathLike) -> dict[str, Case]:
    """Write every case into ``dest`` (created) and return ``{case_id: Case}``.

    Also writes ``dest/manifest.json``. Cases that the platform cannot express (a
    non-UTF-8 or newline file name on a file system that refuses it) are left out of the
    returned mapping rather than faked.
    """
    root = Path(dest)
    root.mkdir(parents=True, exist_ok=True)
    cases: dict[str, Case] = {}

    def put(case_id: str, name: str, data: bytes, case: Case) -> None:
        try:
            with open(os.path.join(os.fsencode(root), os.fsencode(name)), "wb") as fh:
                fh.write(data)
        except (OSError, UnicodeError):
            return
        cases[case_id] = case

    photo = _photo()
    jpg, png = _save(photo, "JPEG", quality=90), _save(photo, "PNG")

    put("good", "good.png", png, Case("good.png", "ok", size=(48, 32), note="control: a plain RGB PNG"))
    put("truncated_jpeg", "truncated.jpg", jpg[: len(jpg) // 2],
        Case("truncated.jpg", "skip", "truncated", note="JPEG cut in half"))
    put("truncated_png", "truncated.png", png[: len(png) // 2],
        Case("truncated.png", "skip", "truncated", note="PNG cut in half"))
    put("zero_bytes", "empty.jpg", b"", Case("empty.jpg", "skip", "empty file", note="0-byte file"))
    put("text_as_jpg", "notes.jpg", b"shopping list: milk, eggs\n" * 20,
        Case("notes.jpg", "skip", "not a recognised image", note="a text file named .jpg"))
    put("html_as_png", "page.png", b"<!doctype html><html><body>404 Not Found</body></html>\n",
        Case("page.png", "skip", "not a recognised image", note="an HTML error page saved as .png"))
    put("cmyk_jpeg", "cmyk.jpg", _save(photo.convert("CMYK"), "JPEG", quality=90),
        Case("cmyk.jpg", "ok", size=(48, 32), note="CMYK JPEG"))
    gray16 = Image.fromarray((np.arange(32 * 48, dtype=np.uint16).reshape(32, 48) * 40).astype(np.uint16))
    put("png_16bit", "gray16.png", _save(gray16, "PNG"), Case("gray16.png", "ok", size=(48, 32), note="16-bit PNG"))
    rgba = photo.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(photo.size))
    put("rgba", "rgba.png", _save(rgba, "PNG"), Case("rgba.png", "ok", size=(48, 32), note="RGBA with varying alpha"))
    pal = photo.convert("P", palette=Image.ADAPTIVE, colors=16)
    put("palette_transparency", "palette_t.png", _save(pal, "PNG", transparency=0),
        Case("palette_t.png", "ok", size=(48, 32), note="palette PNG with a transparent index"))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    put("exif_rotated", "exif_rot.jpg", _save(photo, "JPEG", exif=exif.tobytes()),
        Case("exif_rot.jpg", "ok", size=(32, 48), note="EXIF orientation 6: stored 48x32, upright 32x48"))
    put("one_pixel", "one_pixel.png", _save(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG"),
        Case("one_pixel.png", "ok", size=(1, 1), note="1x1 image"))
    put("decompression_bomb", "bomb.png", _bomb_png(),
        Case("bomb.png", "skip", "decompression-bomb", note="header claims 30000x30000 pixels"))
    frames = [_photo(seed=i) for i in range(3)]
    put("animated_gif", "animated.gif", _save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50,
                                              loop=0),
        Case("animated.gif", "ok", size=(48, 32), note="3-frame GIF: the first frame is used"))
    put("multipage_tiff", "pages.tif", _save(frames[0], "TIFF", save_all=True, append_images=frames[1:]),
        Case("pages.tif", "ok", size=(48, 32), note="3-page TIFF: the first page is used"))
    put("float_tiff", "float.tif", _save(Image.fromarray(np.linspace(0, 1, 32 * 48, dtype=np.float32).reshape(32, 48)),
                                         "TIFF"),
        Case("float.tif", "ok", size=(48, 32), note="32-bit float TIFF in [0, 1]"))
    put("la_mode", "gray_alpha.png", _save(photo.convert("LA"), "PNG"),
        Case("gray_alpha.png", "ok", size=(48, 32), note="grayscale + alpha"))
    put("png_named_jpg", "really_png.jpg", png,
        Case("really_png.jpg", "ok", size=(48, 32), note="a valid PNG with a .jpg extension"))
    mp4 = _mp4_bytes()
    broken = mp4[: len(mp4) // 2] if mp4 else b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 40
    put("truncated_mp4", "broken.mp4", broken,
        Case("broken.mp4", "skip", "video", note="an MP4 cut in half (its index is lost)"))
    # a symlink loop: loop_a.jpg -> loop_b.jpg -> loop_a.jpg
    try:
        os.symlink("loop_b.jpg", root / "loop_a.jpg")
        os.symlink("loop_a.jpg", root / "loop_b.jpg")
        cases["symlink_loop"] = Case("loop_a.jpg", "skip", "symlink loop", note="two symlinks pointing at each other")
        cases["symlink_loop_b"] = Case("loop_b.jpg", "skip", "symlink loop", note="the other end of the loop")
        (root / "sub").mkdir(exist_ok=True)
        os.symlink("..", root / "sub" / "up")  # a folder loop: sub/up -> corpus root
        cases["folder_loop"] = Case("sub/up", "ok", note="a folder symlink back to its parent (walked once)")
    except (OSError, NotImplementedError):
        pass
    put("unreadable", "unreadable.jpg", jpg, Case("unreadable.jpg", "skip", "permission denied",
                                                 note="chmod 000 (readable anyway when running as root)"))
    if "unreadable" in cases:
        os.chmod(root / "unreadable.jpg", 0)
        if os.access(root / "unreadable.jpg", os.R_OK):  # root ignores file modes
            cases["unreadable"] = Case("unreadable.jpg", "ok", size=(48, 32),
                                       note="chmod 000, but this process can read it anyway (root)")
    put("non_utf8_name", os.fsdecode(b"caf\xe9_latin1.png"), png,
        Case(os.fsdecode(b"caf\xe9_latin1.png"), "ok", size=(48, 32), note="a Latin-1 (non-UTF-8) file name"))
    put("newline_name", "two\nlines.jpg", b"not an image",
        Case("two\nlines.jpg", "skip", "not a recognised image",
             note="a bad file whose name holds a newline: still reported on one line"))
    manifest = {k: asdict(c) for k, c in cases.items()}
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return cases


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dest", help="folder to write the corpus into (created)")
    args = ap.parse_args(argv)
    cases = make_corpus(args.dest)
    for k, c in cases.items():
        print(f"{k:22s} {c.expect:5s} {c.name!r}  {c.note}")
    print(f"{len(cases)} cases in {args.dest}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
