"""Where a training step goes: set-up, per-step time, augmentation alone, model step alone
(with and without the engine's host-side finiteness check), and a torch.profiler table.

The settings are the time-to-accuracy run of ``vs_lightly.py`` (SimCLR, quarter-width
ResNet-18 with the 3x3/2 stem, 28 px, batch 128, LARS, Fashion-MNIST 60k in memory).

    python benchmarks/step_profile.py --device cuda --fmnist ../shared/data/fashion-mnist
    python benchmarks/step_profile.py --device cpu --short        # a smoke run on a small CPU
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from build_demo_data import load_split  # noqa: E402

from sslfeatures import Pretrainer  # noqa: E402
from sslfeatures.methods.base import StepInfo  # noqa: E402
from vs_lightly import TTA_BATCH, TTA_SIZE, tta_simclr_kwargs  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--fmnist", default="../shared/data/fashion-mnist")
    ap.add_argument("--short", action="store_true", help="few steps (a smoke run)")
    args = ap.parse_args()
    dev = args.device
    n1, n2, reps, prof_steps = (3, 5, 3, 4) if args.short else (40, 160, 50, 30)
    xtr, _ = load_split(Path(args.fmnist), "train")
    kw = dict(tta_simclr_kwargs(dev, "auto", epochs=10), checkpoint_every=10**9)

    def sync():
        if dev.startswith("cuda"):
            torch.cuda.synchronize()

    for extra in [{}, {"channels_last": False}, {"precision": "fp32"}]:
        res = {}
        for n in (n1, n2):
            t = time.perf_counter()
            r = Pretrainer("simclr", **{**kw, **extra}).fit(xtr, output_dir=f"/tmp/step_profile_{n}", overwrite=True,
                                                        max_steps=n)
            res[n] = (time.perf_counter() - t, r.seconds)
        per = (res[n2][1] - res[n1][1]) / (n2 - n1)
        print(f"{extra or 'defaults'}: fit({n1} steps) {res[n1][0]:.2f} s, of which set-up "
              f"{res[n1][0] - res[n1][1]:.2f} s; per step {per * 1e3:.1f} ms", flush=True)

    m = Pretrainer("simclr", **kw).build().to(dev).to(memory_format=torch.channels_last)
    x = torch.from_numpy(xtr[:TTA_BATCH].copy()).unsqueeze(1).expand(-1, 3, -1, -1).contiguous().to(dev)

    def bench(fn) -> float:
        for _ in range(5):
            fn()
        sync()
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        sync()
        return (time.perf_counter() - t) / reps * 1e3

    print(f"augmentation alone (2 views, batch {TTA_BATCH}): {bench(lambda: m.views(x, TTA_SIZE)):.2f} ms", flush=True)
    views = [v.contiguous(memory_format=torch.channels_last) for v in m.views(x, TTA_SIZE)]
    opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
    info = StepInfo(0, 1000, 0, 468)

    def step(check: bool = False):
        opt.zero_grad(set_to_none=True)
        with torch.autocast(torch.device(dev).type, torch.bfloat16, enabled=dev.startswith("cuda")):
            loss = m(views, info)["loss"]
        loss.backward()
        if check:
            bool(torch.isfinite(loss))  # what the engine's non-finite guard costs: one host wait per step
        opt.step()

    print(f"model step alone: {bench(step):.2f} ms; with a host check: {bench(lambda: step(True)):.2f} ms",
          flush=True)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.startswith("cuda") else [])
    with profile(activities=acts) as prof:
        Pretrainer("simclr", **kw).fit(xtr, output_dir="/tmp/step_profile_prof", overwrite=True,
                                       max_steps=prof_steps)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25), flush=True)
    if dev.startswith("cuda"):
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=12), flush=True)


if __name__ == "__main__":
    main()
