"""Decoding every kind of image a user may have, and bad-file handling."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sslfeatures.data import (ArrayImages, BadFileReport, DecodeError, ImageFolder, LabelledImageFolder,
                              list_images, load_into_memory, load_pil, to_uint8_image)


def test_missing_and_empty_folders_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        list_images(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match="no images found"):
        list_images(tmp_path / "empty")


def test_modes_decode_to_rgb(tmp_path, photos):
    img = photos[0][:40, :30]
    rgba = np.concatenate([img, np.full(img.shape[:2] + (1,), 0, np.uint8)], -1)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")  # fully transparent -> white
    Image.fromarray(img).convert("P").save(tmp_path / "pal.gif")
    Image.fromarray(img[..., 0].astype(np.uint16) * 257).save(tmp_path / "deep.png")  # 16-bit
    Image.fromarray(img).convert("L").save(tmp_path / "gray.bmp")
    Image.fromarray(img).convert("CMYK").save(tmp_path / "cmyk.jpg")
    Image.fromarray(img).save(tmp_path / "x.webp")
    Image.fromarray(img).save(tmp_path / "x.tiff")
    assert np.asarray(load_pil(tmp_path / "rgba.png")).min() == 255
    deep = np.asarray(load_pil(tmp_path / "deep.png"))
    assert deep.shape == (40, 30, 3) and abs(int(deep[..., 0].astype(int).mean()) - int(img[..., 0].mean())) <= 1
    for name in ("pal.gif", "gray.bmp", "cmyk.jpg", "x.webp", "x.tiff"):
        out = load_pil(tmp_path / name)
        assert out.mode == "RGB" and out.size == (30, 40), name
    assert len(list_images(tmp_path)) == 7


def test_exif_orientation_is_applied(tmp_path, photos):
    img = Image.fromarray(photos[1][:20, :50])  # landscape 50x20
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    img.save(tmp_path / "rot.jpg", exif=exif.tobytes())
    assert load_pil(tmp_path / "rot.jpg").size == (20, 50)


def test_broken_files_are_reported_once_not_raised(tmp_path, photos):
    Image.fromarray(photos[0][:32, :32]).save(tmp_path / "good.png")
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.png").write_text("<html>not an image</html>")
    data = (tmp_path / "good.png").read_bytes()
    (tmp_path / "trunc.png").write_bytes(data[: len(data) // 3])
    src = ImageFolder(tmp_path, size=16)
    report = BadFileReport()
    x, kept = load_into_memory(src, report, num_workers=0, progress=False)
    assert x.shape == (1, 3, 16, 16) and x.dtype == torch.uint8
    assert len(report) == 3
    reasons = report.entries
    assert "empty file" in reasons[str(tmp_path / "empty.jpg")]
    assert "not a recognised image" in reasons[str(tmp_path / "text.png")]
    with pytest.raises(DecodeError, match="empty file"):
        load_pil(tmp_path / "empty.jpg")


def test_in_memory_inputs(photos):
    img = photos[2]
    pil = Image.fromarray(img)
    as_float = img.astype(np.float32) / 255
    chw = torch.from_numpy(img).permute(2, 0, 1)
    ref = np.asarray(to_uint8_image(pil))
    for obj in (img, as_float, chw, chw.float() / 255):
        assert np.abs(np.asarray(to_uint8_image(obj)).astype(int) - ref).max() <= 1
    with pytest.raises(ValueError, match="cannot interpret"):
        to_uint8_image(np.zeros((4, 5, 7), np.uint8))
    with pytest.raises(TypeError, match="cannot embed"):
        to_uint8_image("not a path object but a str is not an image")
    src = ArrayImages(np.stack([img[:64, :64]] * 3), size=32)
    assert len(src) == 3 and src[0][0].shape == (3, 32, 32)


def test_labelled_folder(labelled_images):
    train, _ = labelled_images
    ds = LabelledImageFolder(train, size=24)
    assert ds.classes == ["class_0", "class_1", "class_2", "class_3"]
    assert len(ds) == 32 and np.bincount(ds.labels).tolist() == [8, 8, 8, 8]
