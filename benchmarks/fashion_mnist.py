"""Accuracy benchmark: pre-train each method on Fashion-MNIST train (60k, labels unused),
then weighted k-NN (k=20, T=0.07, cosine) and a linear probe of the frozen features on
train -> test (10k), beside raw pixels and the same backbone at random init.

    python benchmarks/fashion_mnist.py --src ../shared/data/fashion-mnist --methods simclr mae
    python benchmarks/fashion_mnist.py --baselines-only

Writes one JSON line per row to benchmarks/out/fashion_mnist/results.jsonl and prints the
markdown table that goes into benchmarks/RESULTS.md. The per-method settings below are
the paper recipes with the overrides needed to fit 28 px images and <= 20 CPU-minutes on
2 cores (backbone size, epochs, head widths); each override is listed in the table.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from build_demo_data import load_split  # noqa: E402

from sslfeatures import Encoder, Pretrainer  # noqa: E402
from sslfeatures.data.demo import write_image_folders  # noqa: E402
from sslfeatures.eval import linear_probe, raw_pixel_features, weighted_knn  # noqa: E402

CNN = dict(backbone="resnet18", stem="small_s2", backbone_kwargs={"channels": [32, 64, 128, 256]},
           image_size=28, num_workers=0)
VIT = dict(backbone="vit_tiny_patch16_224", patch_size=4, image_size=28, num_workers=0,
           backbone_kwargs={"depth": 6})

SETTINGS: dict[str, dict] = {
    "simclr": dict(CNN, epochs=2, batch_size=128, lr=1.0, warmup_epochs=0.2, temperature=0.5,
                   views=[{"scale": [0.2, 1.0], "count": 2}]),
    "mocov2": dict(CNN, epochs=2, batch_size=128, lr=0.2, warmup_epochs=0.2, queue_size=16384,
                   ema_momentum=0.99, views=[{"scale": [0.2, 1.0], "jitter": [0.4, 0.4, 0.4, 0.1], "count": 2}]),
    "byol": dict(CNN, epochs=1, batch_size=128, lr=1.0, warmup_epochs=0.2, proj_hidden_dim=1024,
                 pred_hidden_dim=1024, momentum_start=0.99,
                 views=[{"scale": [0.2, 1.0], "jitter": [0.4, 0.4, 0.2, 0.1], "blur_p": 1.0},
                        {"scale": [0.2, 1.0], "jitter": [0.4, 0.4, 0.2, 0.1], "blur_p": 0.1, "solarize_p": 0.2}]),
    "dino": dict(CNN, epochs=1, batch_size=128, lr=1e-3, warmup_epochs=0.2, out_dim=4096,
                 weight_decay_end=0.04, warmup_teacher_temp_epochs=0.3, momentum_start=0.99,
                 freeze_last_layer_epochs=0, use_bn_in_head=True,
                 views=[{"scale": [0.4, 1.0], "blur_p": 1.0, "count": 1},
                        {"scale": [0.4, 1.0], "blur_p": 0.1, "solarize_p": 0.2, "count": 1},
                        {"scale": [0.1, 0.4], "size_frac": 0.5715, "count": 2}]),
    "mae": dict(VIT, epochs=3, batch_size=128, lr=1.5e-3, warmup_epochs=0.3, decoder_dim=128,
                decoder_depth=2, decoder_heads=4, pooling="mean"),
}


def write_folders(src: Path, root: Path) -> dict[str, Path]:
    xtr, ytr = load_split(src, "train")
    xte, yte = load_split(src, "test")
    return write_image_folders(root, xtr, ytr, xte, yte)


def evaluate(enc: Encoder, folders) -> dict:
    xtr, ytr, _ = enc.embed_labelled(folders["train"], batch_size=256)
    xte, yte, _ = enc.embed_labelled(folders["test"], batch_size=256)
    return {"knn": weighted_knn(xtr, ytr, xte, yte)["top1"], "linear": linear_probe(xtr, ytr, xte, yte)["top1"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", default="../shared/data/fashion-mnist")
    ap.add_argument("--work", default="benchmarks/out/fashion_mnist")
    ap.add_argument("--methods", nargs="*", default=list(SETTINGS))
    ap.add_argument("--baselines-only", action="store_true")
    ap.add_argument("--folders-only", action="store_true", help="only write the image folders")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    folders = write_folders(Path(args.src), work / "data")
    if args.folders_only:
        return
    results = work / "results.jsonl"
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"

    def emit(row):
        row["machine"] = machine
        with open(results, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)

    if args.baselines_only:
        xtr, ytr, _ = raw_pixel_features(folders["train"])
        xte, yte, _ = raw_pixel_features(folders["test"])
        emit({"row": "raw pixels", "knn": weighted_knn(xtr, ytr, xte, yte)["top1"],
              "linear": linear_probe(xtr, ytr, xte, yte)["top1"]})
        for name, cfg in (("ResNet-18 (half width, 3x3/2 stem) 28 px", CNN), ("ViT-Tiny/4, 6 blocks, 28 px", VIT)):
            enc = Encoder.random_init(cfg["backbone"], image_size=28, stem=cfg.get("stem", "default"),
                                      patch_size=cfg.get("patch_size"), backbone_kwargs=cfg["backbone_kwargs"])
            emit({"row": f"random init {name}", **evaluate(enc, folders)})
        return

    for method in args.methods:
        cfg = dict(SETTINGS[method])
        t0, c0 = time.perf_counter(), time.process_time()
        run = Pretrainer(method, **cfg).fit(folders["unlabeled"], output_dir=work / f"run_{method}", overwrite=True)
        minutes = (time.perf_counter() - t0) / 60
        cpu_minutes = (time.process_time() - c0) / 60  # CPU time of all this process's threads
        res = evaluate(Encoder.from_pretrained(run.output_dir), folders)
        emit({"row": method, "backbone": cfg["backbone"], "overrides": {k: v for k, v in cfg.items() if k != "num_workers"},
              "epochs": cfg["epochs"], "train_minutes": round(minutes, 1), "train_cpu_minutes": round(cpu_minutes, 1),
              "threads": args.threads, "steps": run.steps, **res})


if __name__ == "__main__":
    main()
