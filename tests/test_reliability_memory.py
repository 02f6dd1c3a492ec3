"""Bounded memory: embedding a folder streams. Peak RSS grows by the result (N x D floats)
and the file list, never by the decoded images (benchmarks/embed_memory.py measures it at
scale)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
from PIL import Image

CHILD = textwrap.dedent("""
    import json, resource, sys
    import torch
    torch.set_num_threads(1)
    from sslfeatures import Encoder
    enc = Encoder.random_init("resnet18", image_size=16, stem="small_s2",
                              backbone_kwargs={"channels": [8, 16, 32, 64]}, device="cpu", precision="fp32")
    out = []
    for folder in sys.argv[1:]:
        paths, feats = enc.embed_folder(folder, batch_size=32, num_workers=0, progress=False)
        out.append({"n": len(paths), "result": int(feats.nbytes),
                    "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024})
        del feats
    print(json.dumps(out))
""")


def _folder(root: Path, n: int, originals: list[Path]) -> Path:
    folder = root / f"n{n}"
    folder.mkdir()
    for i in range(n):
        os.link(originals[i % len(originals)], folder / f"{i:05d}.png")
    return folder


def test_embedding_memory_does_not_grow_with_folder_size(tmp_path):
    rng = np.random.default_rng(0)
    originals = []
    for i in range(8):  # 192x192 RGB: 110 KB decoded each, so keeping 1600 of them would cost 177 MB
        p = tmp_path / f"src{i}.png"
        Image.fromarray(rng.integers(0, 255, (192, 192, 3), dtype=np.uint8)).save(p)
        originals.append(p)
    small, big = _folder(tmp_path, 160, originals), _folder(tmp_path, 1600, originals)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-c", CHILD, str(small), str(big)], capture_output=True, text=True,
                         env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    a, b = json.loads(res.stdout.strip().splitlines()[-1])
    assert (a["n"], b["n"]) == (160, 1600)
    growth = b["peak"] - a["peak"]
    allowed = b["result"] + 24 * 2**20  # the result array + slack for allocator noise; not 177 MB of images
    assert growth <= allowed, f"peak RSS grew by {growth / 2**20:.1f} MB for 10x the images"
