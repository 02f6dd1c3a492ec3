"""Rebuild the embedded demo set (sslfeatures/data/demo/fashion_mnist_demo.npz) from the
original Fashion-MNIST idx files (e.g. ../shared/data/fashion-mnist or Debian's
/usr/share/datasets/fashion-mnist): the first 1,000 train and 200 test images of each class.

    python scripts/build_demo_data.py --src ../shared/data/fashion-mnist
"""
from __future__ import annotations

import argparse
import gzip
import shutil
from pathlib import Path

import numpy as np

DEST = Path(__file__).resolve().parents[1] / "sslfeatures" / "data" / "demo"


def read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        data = fh.read()
    magic = int.from_bytes(data[:4], "big")
    ndim = magic & 0xFF
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_split(src: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    prefix = "train" if split == "train" else "t10k"
    def find(kind):
        for name in (f"{prefix}-{kind}-idx{3 if kind == 'images' else 1}-ubyte.gz",
                     f"{prefix}-{kind}-idx{3 if kind == 'images' else 1}-ubyte"):
            if (src / name).exists():
                return src / name
        raise FileNotFoundError(f"{prefix} {kind} not found in {src}")
    return read_idx(find("images")), read_idx(find("labels"))


def per_class(x, y, n):
    idx = np.concatenate([np.flatnonzero(y == c)[:n] for c in range(10)])
    idx.sort()
    return x[idx], y[idx]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--src", default="../shared/data/fashion-mnist")
    ap.add_argument("--train-per-class", type=int, default=1000)
    ap.add_argument("--test-per-class", type=int, default=200)
    args = ap.parse_args()
    src = Path(args.src)
    xtr, ytr = per_class(*load_split(src, "train"), args.train_per_class)
    xte, yte = per_class(*load_split(src, "test"), args.test_per_class)
    DEST.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(DEST / "fashion_mnist_demo.npz", x_train=xtr, y_train=ytr, x_test=xte, y_test=yte)
    if (src / "COPYRIGHT").exists():
        shutil.copy(src / "COPYRIGHT", DEST / "FASHION_MNIST_LICENSE.txt")
    print(f"wrote {DEST / 'fashion_mnist_demo.npz'}: train {xtr.shape}, test {xte.shape}, "
          f"{(DEST / 'fashion_mnist_demo.npz').stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
