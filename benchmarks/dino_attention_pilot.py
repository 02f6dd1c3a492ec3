"""DINO attention pilot: pre-train the visual-probes example's ViT with DINO on a chosen unlabeled
set and score its CLS attention against the example's exact object masks, beside random init.

The test images are the 48 composites ``examples/visual_probes.py`` draws with its default
``--crops 1024 --seed 0``. Training data (``--data``):

* ``crops``: random crops of the scikit-image photos, as the example;
* ``composites``: 1,024 *other* composites (generator seed 1; their masks are never used), so the
  training images are object-centric like the test set, as ImageNet is for DINO.

Usage (one thread, ~34 minutes for 600 steps on a 2-core Zen 1 host)::

    python benchmarks/dino_attention_pilot.py --data composites --steps 600 \
        --set '{"teacher_temp": 0.04}' --out benchmarks/out/dino_attention_pilot
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import visual_probes as vp  # noqa: E402

from sslfeatures import Encoder  # noqa: E402
from sslfeatures.viz import attention_maps, mask_precision, threshold_mass  # noqa: E402


def attention_share(enc: Encoder, comps) -> dict[str, float]:
    """Where the heads-averaged 60 %-mass attention mask lies: its share of the image and the
    fraction of it on the object (the object's base rate is its share of the image)."""
    share, on_object = [], []
    for img, mask in comps:
        m = threshold_mass(attention_maps(enc, img).mean(0), 0.6)
        share.append(float(m.mean()))
        on_object.append(mask_precision(m, mask))
    return {"attention_mask_share": float(np.mean(share)), "attention_mask_on_object": float(np.mean(on_object))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", choices=["crops", "composites"], default="composites")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--set", default="{}", help="JSON overrides of the example's DINO settings")
    ap.add_argument("--out", default="benchmarks/out/dino_attention_pilot")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    pics = vp.photos()
    crops, _ = vp.crops(pics, 1024, 96, rng)
    vp.crops(pics, 8 * len(pics), 96, rng)            # the example's held-out crops (keeps its generator in step)
    test = vp.composites(pics, 48, rng)
    train = crops if args.data == "crops" else [c for c, _ in vp.composites(pics, 1024, np.random.default_rng(1))]
    extra = json.loads(args.set)
    t0 = time.perf_counter()
    run_dir = vp.pretrain("dino", train, args.steps, 32, out, **{**vp.DINO, **extra})
    rows = {"data": args.data, "steps": args.steps, "overrides": extra,
            "train_minutes": (time.perf_counter() - t0) / 60}
    rand = Encoder.random_init("vit_tiny_patch16_224", image_size=vp.SIZE, patch_size=8, seed=0, device="cpu",
                               backbone_kwargs={"depth": 4})
    for name, enc in (("dino", Encoder.from_pretrained(run_dir, device="cpu")), ("random_init", rand)):
        rows[name] = {**vp.mask_numbers(enc, test), **attention_share(enc, test)}
    print(json.dumps(rows, indent=1))
    with open(out / "results.jsonl", "a") as f:
        f.write(json.dumps(rows) + "\n")


if __name__ == "__main__":
    main()
