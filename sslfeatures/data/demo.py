"""The embedded demo set: 12,000 real Fashion-MNIST images (Expat licence, Zalando SE;
see ``demo/FASHION_MNIST_LICENSE.txt``), 1,000 train + 200 test per class, shipped in the
package so the demo and tests work offline. Rebuilt by ``scripts/build_demo_data.py``.
"""
from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image

FASHION_MNIST_CLASSES = ["t-shirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt",
                         "sneaker", "bag", "ankle_boot"]


def load_demo_arrays() -> dict[str, np.ndarray]:
    """``x_train (10000,28,28) uint8, y_train, x_test (2000,28,28), y_test``."""
    path = Path(str(resources.files("sslfeatures.data"))) / "demo" / "fashion_mnist_demo.npz"
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def write_image_folders(root: str | os.PathLike, x_train, y_train, x_test, y_test,
                        classes=FASHION_MNIST_CLASSES) -> dict[str, Path]:
    """Write ``root/unlabeled/`` (train images, no labels), ``root/train/<class>/`` and
    ``root/test/<class>/`` as PNG files; existing complete folders are reused."""
    root = Path(root)
    out = {"unlabeled": root / "unlabeled", "train": root / "train", "test": root / "test"}
    done = root / ".complete"
    if done.exists() and done.read_text().strip() == f"{len(x_train)}/{len(x_test)}":
        return out
    for split, xs, ys in (("train", x_train, y_train), ("test", x_test, y_test)):
        for c in classes:
            (out[split] / c).mkdir(parents=True, exist_ok=True)
        for i, (img, lab) in enumerate(zip(xs, ys)):
            Image.fromarray(img).save(out[split] / classes[int(lab)] / f"{split}_{i:05d}.png")
    out["unlabeled"].mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(x_train):
        Image.fromarray(img).save(out["unlabeled"] / f"img_{i:05d}.png")
    done.write_text(f"{len(x_train)}/{len(x_test)}")
    return out


def write_demo_folders(root: str | os.PathLike) -> dict[str, Path]:
    """The embedded demo set as image folders (see :func:`write_image_folders`)."""
    a = load_demo_arrays()
    return write_image_folders(root, a["x_train"], a["y_train"], a["x_test"], a["y_test"])
