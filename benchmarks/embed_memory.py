"""Peak memory (RSS) of embedding a folder, against the folder's size.

Each size runs in a fresh process (peak RSS is per process): a folder of N images (hard
links to a few distinct PNGs, so a million-file folder costs inodes, not disk) is embedded
with ``Encoder.embed_folder`` and the process reports its peak RSS. Streaming means the
peak is a constant (torch, the model, a few batches in flight) plus the result itself
(N x D float32) plus the file list, so *peak minus result* should stay flat:

    python benchmarks/embed_memory.py                       # 1k, 4k, 16k, 64k images
    python benchmarks/embed_memory.py --sizes 1000 1000000  # the issue's 1M (slow on CPU)

Writes a table to stdout and ``benchmarks/out/embed_memory.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "out" / "embed_memory.json"


def make_folder(root: Path, n: int, side: int = 96, distinct: int = 16) -> Path:
    """``root/n`` with ``n`` images in sub-folders of 1000 (hard links to ``distinct`` PNGs)."""
    import numpy as np
    from PIL import Image

    folder = root / f"n{n}"
    if folder.exists():
        return folder
    src = root / "_src"
    src.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    originals = []
    for i in range(distinct):
        p = src / f"{i}.png"
        if not p.exists():
            Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(p)
        originals.append(p)
    for i in range(n):
        sub = folder / f"{i // 1000:04d}"
        if i % 1000 == 0:
            sub.mkdir(parents=True, exist_ok=True)
        os.link(originals[i % distinct], sub / f"{i:07d}.png")
    return folder


def child(folder: str, batch_size: int, workers: int) -> None:
    """Embed ``folder`` and print one JSON line: images, dim, seconds, peak RSS (bytes)."""
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    from sslfeatures import Encoder

    enc = Encoder.random_init("resnet18", image_size=32, stem="small_s2",
                              backbone_kwargs={"channels": [16, 32, 64, 128]}, device="cpu", precision="fp32")
    t0 = time.perf_counter()
    paths, feats = enc.embed_folder(folder, batch_size=batch_size, num_workers=workers, progress=False)
    seconds = time.perf_counter() - t0
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux: kilobytes
    print(json.dumps({"images": len(paths), "dim": int(feats.shape[1]), "seconds": round(seconds, 2),
                      "peak_rss": peak_kb * 1024, "result_bytes": int(feats.nbytes)}))


def measure(folder: Path, batch_size: int, workers: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", str(folder), "--batch-size", str(batch_size),
                          "--workers", str(workers)], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000, 16000, 64000])
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--root", help="where to build the folders (default: a temp folder)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args.child, args.batch_size, args.workers)
        return 0
    tmp = None if args.root else tempfile.TemporaryDirectory(prefix="embed-mem-")
    root = Path(args.root or tmp.name)
    rows = []
    print(f"{'images':>9} {'seconds':>8} {'peak RSS MB':>12} {'result MB':>10} {'peak - result MB':>17}")
    for n in args.sizes:
        r = measure(make_folder(root, n), args.batch_size, args.workers)
        r["peak_minus_result_mb"] = round((r["peak_rss"] - r["result_bytes"]) / 2**20, 1)
        rows.append(r)
        print(f"{r['images']:>9} {r['seconds']:>8} {r['peak_rss'] / 2**20:>12.1f} {r['result_bytes'] / 2**20:>10.1f} "
              f"{r['peak_minus_result_mb']:>17}")
    if len(rows) > 1:
        a, b = rows[0], rows[-1]
        per_image = ((b["peak_rss"] - b["result_bytes"] - a["peak_rss"] + a["result_bytes"])
                     / (b["images"] - a["images"]))
        print(f"growth beyond the result: {per_image:.0f} bytes per image (the file list); "
              f"extrapolated to 1M images: {per_image * 1e6 / 2**20:.0f} MB + the result")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"batch_size": args.batch_size, "workers": args.workers, "rows": rows}, indent=2) + "\n")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
