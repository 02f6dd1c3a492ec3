"""Embedding speed of an exported encoder, and the k-NN cost of int8 (issue: export and
deployment, must-show 1), all in one run on one machine.

1. Images/s of ResNet-18 and ViT-S/16 at 224 px, batch 1 and 64, on pre-processed inputs
   (decoding is the same for every backend and left out): eager PyTorch fp32;
   channels_last (CNNs); bf16 autocast only where ``cpu_has_fast_bf16()`` (AVX512-BF16/AMX)
   says the CPU has native bf16; ``torch.compile`` (``--compile``, or always without
   ``--quick``); onnxruntime fp32; onnxruntime int8 (static, calibrated on 64 real images).
   The ONNX files are written by ``Encoder.export`` itself, parity-checked as users get them.
2. k-NN top-1 (weighted, k=20, T=0.07) on the embedded Fashion-MNIST demo split (10,000
   train / 2,000 test) with PyTorch, ORT fp32 and ORT int8 embeddings of the same encoder
   (``--knn-model``: a run/exported folder, by default ``demo_out/run`` from ``make demo``
   when it exists, else a random-init ResNet-18/2 at 28 px, which is then said in the table).

    python benchmarks/export_speed.py --quick          # ~minutes: short timings, 2,000/500 k-NN subset, no compile
    python benchmarks/export_speed.py                  # the full run for RESULTS.md

Prints markdown tables; appends one JSON line per row to benchmarks/out/export_speed/results.jsonl.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from sslfeatures import Encoder
from sslfeatures.data.demo import load_demo_arrays
from sslfeatures.eval import weighted_knn
from sslfeatures.export import OrtEncoder, make_session
from sslfeatures.utils import cpu_has_fast_bf16

MODELS = {"ResNet-18": dict(backbone="resnet18"), "ViT-S/16": dict(backbone="vit_small_patch16_224")}
SIZE = 224


def throughput(fn: Callable[[], Any], batch: int, seconds: float, min_iters: int = 3) -> float:
    """Images/s of ``fn`` (one batch per call), after a warm-up call; the median of the
    per-call rates over ``seconds`` (at least ``min_iters`` calls)."""
    fn()
    rates, start = [], time.perf_counter()
    while len(rates) < min_iters or time.perf_counter() - start < seconds:
        t = time.perf_counter()
        fn()
        rates.append(batch / (time.perf_counter() - t))
    return float(np.median(rates))


def demo_images(n: int, seed: int = 0) -> list[np.ndarray]:
    a = load_demo_arrays()["x_train"]
    idx = np.random.default_rng(seed).choice(len(a), n, replace=False)
    return [a[i] for i in idx]


def speed_rows(name: str, backbone: str, batches: list[int], seconds: float, compile_: bool, threads: int,
               work: Path) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    enc = Encoder.random_init(backbone, image_size=SIZE, device="cpu", precision="fp32")
    folder = work / backbone
    t0 = time.perf_counter()
    files = enc.export(folder, formats=["onnx"], quantize="int8", calibration=demo_images(64),
                       calibration_size=64, check_images=demo_images(8, seed=1), card=False)
    export_s = time.perf_counter() - t0
    parity = json.loads((folder / "config.json").read_text())["onnx"]["parity"]
    is_cnn = not enc.backbone.is_vit
    # the Encoder keeps CNNs in channels_last; the eager baseline is the plain contiguous model
    model = copy.deepcopy(enc.backbone.model).eval().to(memory_format=torch.contiguous_format)
    cl_model = copy.deepcopy(model).to(memory_format=torch.channels_last) if is_cnn else model
    rows = []
    sessions = {"ORT fp32": make_session(files["onnx"], device="cpu", threads=threads),
                "ORT int8": make_session(files["onnx_int8"], device="cpu", threads=threads)}
    compiled = None
    for batch in batches:
        x = torch.randn(batch, 3, SIZE, SIZE)
        xn = x.numpy()
        variants: dict[str, Callable[[], Any]] = {}

        def eager(m=model, inp=x):
            with torch.inference_mode():
                return m(inp)
        variants["torch eager fp32"] = eager
        x_cl = x.contiguous(memory_format=torch.channels_last) if is_cnn else x
        if is_cnn:
            def channels_last(m=cl_model, inp=x_cl):
                with torch.inference_mode():
                    return m(inp)
            variants["torch channels_last"] = channels_last
        if cpu_has_fast_bf16():
            def bf16(m=cl_model, inp=x_cl):
                with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
                    return m(inp)
            variants["torch bf16 autocast"] = bf16
        if compile_:
            if compiled is None:
                compiled = torch.compile(cl_model)

            def comp(m=compiled, inp=x_cl):
                with torch.inference_mode():
                    return m(inp)
            variants["torch.compile"] = comp
        for label, sess in sessions.items():
            variants[label] = (lambda s=sess, inp=xn: s.run(["embedding"], {"images": inp}))
        base = None
        for label, fn in variants.items():
            t = time.perf_counter()
            ips = throughput(fn, batch, seconds)
            base = base or ips
            row = {"part": "speed", "model": name, "backbone": backbone, "batch": batch, "backend": label,
                   "images_per_s": round(ips, 2), "vs_eager": round(ips / base, 2), "threads": threads,
                   "seconds": round(time.perf_counter() - t, 1)}
            if label.startswith("ORT"):
                row["parity"] = parity["int8" if "int8" in label else "fp32"]
                row["export_seconds"] = round(export_s, 1)
            rows.append(row)
            print(f"  {name} batch {batch} {label}: {ips:.1f} img/s ({row['vs_eager']}x)", flush=True)
    return rows


def knn_rows(model_path: str | None, n_train: int, n_test: int, threads: int, work: Path) -> list[dict[str, Any]]:
    a = load_demo_arrays()
    rng = np.random.default_rng(0)
    tr = np.sort(rng.choice(len(a["x_train"]), n_train, replace=False)) if n_train < len(a["x_train"]) else \
        np.arange(len(a["x_train"]))
    te = np.sort(rng.choice(len(a["x_test"]), n_test, replace=False)) if n_test < len(a["x_test"]) else \
        np.arange(len(a["x_test"]))
    xtr, ytr, xte, yte = a["x_train"][tr], a["y_train"][tr], a["x_test"][te], a["y_test"][te]
    if model_path:
        enc = Encoder.from_pretrained(model_path, device="cpu", precision="fp32")
        what = f"{enc.config.get('method')} {enc.config['backbone']['name']} ({model_path})"
    else:
        enc = Encoder.random_init("resnet18", image_size=28, stem="small_s2", device="cpu", precision="fp32",
                                  backbone_kwargs={"channels": [32, 64, 128, 256]})
        what = "random-init ResNet-18/2, 28 px (no --knn-model and no demo_out/run)"
    folder = work / "knn_model"
    files = enc.export(folder, formats=["onnx"], quantize="int8", calibration=list(xtr[:256]),
                       calibration_size=256, card=False)
    encoders = {"torch fp32": enc, "ORT fp32": OrtEncoder.from_pretrained(files["onnx"], device="cpu", threads=threads),
                "ORT int8": OrtEncoder.from_pretrained(files["onnx_int8"], device="cpu", threads=threads)}
    rows, base = [], None
    for label, e in encoders.items():
        t = time.perf_counter()
        ftr = e.embed(list(xtr), batch_size=256, num_workers=0, progress=False)
        fte = e.embed(list(xte), batch_size=256, num_workers=0, progress=False)
        res = weighted_knn(ftr, ytr, fte, yte, num_classes=10)
        base = res["top1"] if base is None else base
        rows.append({"part": "knn", "model": what, "backend": label, "top1": round(res["top1"], 4),
                     "top5": round(res["top5"], 4), "top1_change_points": round(100 * (res["top1"] - base), 2),
                     "n_train": int(len(xtr)), "n_test": int(len(xte)), "seconds": round(time.perf_counter() - t, 1)})
        print(f"  k-NN {label}: top-1 {res['top1']:.4f}", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="short timings, k-NN on a 2,000/500 subset, no compile")
    ap.add_argument("--compile", action="store_true", help="include torch.compile in --quick")
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 64])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--knn-model", dest="knn_model", help="run/exported folder for the k-NN part")
    ap.add_argument("--no-knn", dest="knn", action="store_false")
    ap.add_argument("--no-speed", dest="speed", action="store_false", help="only the k-NN part")
    ap.add_argument("--out", default="benchmarks/out/export_speed")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    seconds = 2.0 if args.quick else 15.0
    compile_ = args.compile or not args.quick
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    machine = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
               "threads": args.threads, "torch": torch.__version__, "fast_bf16": cpu_has_fast_bf16(),
               "quick": args.quick, "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    import onnxruntime

    machine["onnxruntime"] = onnxruntime.__version__
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="export-speed-") as tmp:
        for name in args.models if args.speed else []:
            print(f"{name}: exporting and timing", flush=True)
            new = speed_rows(name, MODELS[name]["backbone"], args.batches, seconds, compile_, args.threads, Path(tmp))
            with open(out / "results.jsonl", "a") as fh:  # kept even if a later part fails
                fh.writelines(json.dumps({**machine, **r}) + "\n" for r in new)
            rows += new
        if args.knn:
            model = args.knn_model or ("demo_out/run" if Path("demo_out/run/model.safetensors").exists() else None)
            n_train, n_test = (2000, 500) if args.quick else (10000, 2000)
            print(f"k-NN on Fashion-MNIST demo ({n_train}/{n_test})", flush=True)
            rows += knn_rows(model, n_train, n_test, args.threads, Path(tmp))
    with open(out / "results.jsonl", "a") as fh:
        for r in rows:
            if r["part"] != "speed":  # speed rows were written as each model finished
                fh.write(json.dumps({**machine, **r}) + "\n")
    print(f"\n{json.dumps(machine)}\n")
    print("| model | batch | backend | images/s | vs eager fp32 |\n|---|---|---|---|---|")
    for r in rows:
        if r["part"] == "speed":
            print(f"| {r['model']} | {r['batch']} | {r['backend']} | {r['images_per_s']:.1f} | {r['vs_eager']:.2f}x |")
    knn = [r for r in rows if r["part"] == "knn"]
    if knn:
        print(f"\nk-NN top-1, Fashion-MNIST demo split ({knn[0]['n_train']} train / {knn[0]['n_test']} test), "
              f"{knn[0]['model']}:\n")
        print("| backend | k-NN top-1 | change (points) |\n|---|---|---|")
        for r in knn:
            print(f"| {r['backend']} | {r['top1']:.4f} | {r['top1_change_points']:+.2f} |")
    print(f"\nappended {len(rows)} rows to {out / 'results.jsonl'}")


if __name__ == "__main__":
    main()
