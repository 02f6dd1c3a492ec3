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


@pytest.mark.parametrize("layout", ["gray", "gray_c1", "rgb", "rgba", "tensor_chw", "tensor_1hw", "tensor_hwc",
                                    "float", "other_size"])
def test_one_array_loads_whole_exactly_as_image_by_image(layout, photos):
    """A (N,...) uint8 array at the training size skips the per-image PIL pass (60k Fashion-MNIST
    images: seconds of set-up), and gives the same bytes; everything else still goes image by image."""
    rgb = np.stack([p[:28, :28] for p in photos[:4]] * 3)  # (12, 28, 28, 3) real pixels
    x = {"gray": rgb[..., 0], "gray_c1": rgb[..., :1], "rgb": rgb,
         "rgba": np.concatenate([rgb, rgb[..., :1]], -1), "tensor_chw": torch.from_numpy(rgb).permute(0, 3, 1, 2),
         "tensor_1hw": torch.from_numpy(rgb[..., 0]).unsqueeze(1), "tensor_hwc": torch.from_numpy(rgb),
         "float": rgb[..., 0] / 255.0, "other_size": rgb[:, :20, :20, 0]}[layout]
    fast = layout not in ("rgba", "float", "other_size")
    for size, crop, whole in [(28, 1.0, fast), (24, 1.0, False), (28, 0.875, False)]:
        src = ArrayImages(x, size=size, crop_pct=crop)
        one_by_one = torch.stack([src[i][0] for i in range(len(src))])
        assert (src.as_batch() is not None) == whole, (size, crop)
        got, kept = load_into_memory(src, progress=False, num_workers=0)
        assert torch.equal(got, one_by_one) and kept.tolist() == list(range(len(src)))
    if isinstance(x, np.ndarray) and fast:
        got, _ = load_into_memory(ArrayImages(x, size=28), progress=False, num_workers=0)
        got.zero_()
        assert x.any()  # a copy: the caller's array is not shared with the training stream

def test_labelled_folder(labelled_images):
    train, _ = labelled_images
    ds = LabelledImageFolder(train, size=24)
    assert ds.classes == ["class_0", "class_1", "class_2", "class_3"]
    assert len(ds) == 32 and np.bincount(ds.labels).tolist() == [8, 8, 8, 8]
