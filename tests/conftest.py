"""Shared fixtures: tiny real images (scikit-image's photos), written to temp folders."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

torch.set_num_threads(2)
# The suite checks CPU fp32 semantics (bit-exact resume and round trips, exact preprocessing, gloo
# workers), also on a GPU machine or a CPU with bf16 units, where "auto" would pick CUDA / bf16;
# tests/test_cuda.py runs the GPU checks with an explicit device="cuda", other tests ask for bf16.
os.environ.setdefault("SSLFEATURES_DEVICE", "cpu")
os.environ.setdefault("SSLFEATURES_PRECISION", "fp32")

PHOTOS = ["astronaut", "chelsea", "coffee", "rocket", "camera", "coins", "immunohistochemistry",
          "hubble_deep_field", "retina", "page", "motorcycle_left", "text"]


def _photos() -> list[np.ndarray]:
    from skimage import data

    out = []
    for name in PHOTOS:
        try:
            img = getattr(data, name)()
        except Exception:  # some images are fetched at run time; skip those offline
            continue
        if img.ndim == 2:
            img = np.stack([img] * 3, -1)
        out.append(np.ascontiguousarray(img[..., :3]).astype(np.uint8))
    assert len(out) >= 6, "scikit-image photos are needed for the tests"
    return out


@pytest.fixture(scope="session")
def photos() -> list[np.ndarray]:
    return _photos()


@pytest.fixture(scope="session")
def tiny_images(tmp_path_factory, photos) -> Path:
    """48 small real crops (64x64) of scikit-image photos in one folder (nested)."""
    root = tmp_path_factory.mktemp("tiny_images")
    rng = np.random.default_rng(0)
    k = 0
    while k < 48:
        pil = Image.fromarray(photos[k % len(photos)])
        w, h = pil.size
        s = int(min(w, h) * rng.uniform(0.4, 0.9))
        x0, y0 = rng.integers(0, w - s + 1), rng.integers(0, h - s + 1)
        crop = pil.crop((x0, y0, x0 + s, y0 + s)).resize((64, 64), Image.BILINEAR)
        sub = root / f"part{k % 2}"
        sub.mkdir(exist_ok=True)
        crop.save(sub / f"img_{k:03d}.png")
        k += 1
    return root


@pytest.fixture(scope="session")
def labelled_images(tmp_path_factory, photos) -> tuple[Path, Path]:
    """train/ and test/ labelled folders: class = source photo, images = random crops."""
    root = tmp_path_factory.mktemp("labelled")
    rng = np.random.default_rng(1)
    for split, n in (("train", 8), ("test", 3)):
        for i, img in enumerate(photos[:4]):
            d = root / split / f"class_{i}"
            d.mkdir(parents=True)
            pil = Image.fromarray(img)
            w, h = pil.size
            for j in range(n):
                s = int(min(w, h) * rng.uniform(0.5, 0.9))
                x0, y0 = rng.integers(0, w - s + 1), rng.integers(0, h - s + 1)
                pil.crop((x0, y0, x0 + s, y0 + s)).resize((48, 48)).save(d / f"{j}.jpg")
    return root / "train", root / "test"


@pytest.fixture(autouse=True)
def _quiet_logs(caplog):
    caplog.set_level(logging.WARNING)


@pytest.fixture
def fast_tiny_runs(monkeypatch):
    """One torch thread (tiny models; the test machine is shared) and no loss plots (matplotlib
    is most of a tiny run's time and has nothing to do with what is tested there)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setattr("sslfeatures.plots.plot_loss_curve", lambda *a, **k: None)
    yield
    torch.set_num_threads(threads)
