"""Speed vs lightly (a benchmark-only dependency), measured in one process on the same
images, backbone, batch size, resolution and SimCLR augmentation recipe.

1. Augmentation throughput: two SimCLR views per image at 32 px, batch 128, from decoded
   in-memory images: sslfeatures' batched tensor pipeline vs lightly's SimCLRTransform
   (torchvision PIL transforms, per image), the latter also with a 1-worker DataLoader.
2. Training images/s: SimCLR, timm ResNet-18 (standard stem) at 32 px, batch 128, SGD,
   data loading + augmentation + forward/backward/step included. lightly's loop is the one
   its docs show (DataLoader + SimCLRTransform + SimCLRProjectionHead + NTXentLoss), run
   at its fastest setting here (channels_last, best of 0/1 loader workers).

    python benchmarks/vs_lightly.py [--images 2048] [--steps 12]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sslfeatures import Pretrainer
from sslfeatures.augment import Views
from sslfeatures.data.demo import load_demo_arrays

SIZE, BATCH = 32, 128
SIMCLR_SPEC = dict(size=SIZE, scale=[0.08, 1.0], jitter=[0.8, 0.8, 0.8, 0.2], jitter_p=0.8, gray_p=0.2,
                   blur_p=0.0, count=2)  # lightly's SimCLRTransform at 32 px: no blur (CIFAR setting)


def real_images(n: int) -> list[Image.Image]:
    a = load_demo_arrays()["x_train"][:n]
    return [Image.fromarray(x).convert("RGB").resize((SIZE, SIZE), Image.BILINEAR) for x in a]


def bench_aug_ours(imgs, reps=5) -> float:
    x = torch.stack([torch.from_numpy(np.asarray(i)).permute(2, 0, 1) for i in imgs])
    views = Views.from_config([SIMCLR_SPEC])
    best = 0.0
    for _ in range(reps):
        t = time.perf_counter()
        for s in range(0, len(x) - BATCH + 1, BATCH):
            views(x[s:s + BATCH], SIZE)
        best = max(best, (len(x) // BATCH * BATCH) / (time.perf_counter() - t))
    return best


def lightly_loader(imgs, workers: int, shuffle: bool = False):
    """lightly's documented input path: a Dataset applying SimCLRTransform per PIL image."""
    from lightly.transforms import SimCLRTransform

    tf = SimCLRTransform(input_size=SIZE, gaussian_blur=0.0)

    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return len(imgs)

        def __getitem__(self, i):
            return tf(imgs[i])

    return torch.utils.data.DataLoader(DS(), batch_size=BATCH, num_workers=workers, drop_last=True,
                                       shuffle=shuffle, persistent_workers=workers > 0)


def bench_aug_lightly(imgs, workers: int, reps=2) -> float:
    dl = lightly_loader(imgs, workers)
    best = 0.0
    for _ in range(reps):
        t = time.perf_counter()
        n = 0
        for v in dl:
            n += len(v[0])
        best = max(best, n / (time.perf_counter() - t))
    return best


def bench_train_lightly(imgs, steps: int, workers: int) -> float:
    import timm
    from lightly.loss import NTXentLoss
    from lightly.models.modules import SimCLRProjectionHead

    torch.manual_seed(0)
    backbone = timm.create_model("resnet18", num_classes=0)
    model = torch.nn.Sequential(backbone, SimCLRProjectionHead(512, 2048, 128)).to(memory_format=torch.channels_last)
    crit = NTXentLoss(temperature=0.1)
    opt = torch.optim.SGD(model.parameters(), lr=0.06, momentum=0.9)
    dl = lightly_loader(imgs, workers, shuffle=True)
    times, it = [], iter(dl)
    t = time.perf_counter()
    for step in range(steps + 2):
        try:
            v = next(it)
        except StopIteration:
            it = iter(dl)
            v = next(it)
        x0 = v[0].contiguous(memory_format=torch.channels_last)
        x1 = v[1].contiguous(memory_format=torch.channels_last)
        loss = crit(model(x0), model(x1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        now = time.perf_counter()
        if step >= 2:
            times.append(now - t)
        t = now
    return BATCH / statistics.median(times)


def bench_train_ours(folder: Path, steps: int, out: Path) -> float:
    run = Pretrainer("simclr", backbone="resnet18", image_size=SIZE, batch_size=BATCH, epochs=100,
                     optimizer="sgd", lr=0.06, temperature=0.1, log_every=1, progress=False, num_workers=0,
                     proj_hidden_dim=2048, views=[SIMCLR_SPEC], checkpoint_every=10**9).fit(
        folder, output_dir=out, overwrite=True, max_steps=steps + 2)
    ips = [m["img_per_s"] for m in run.metrics if "img_per_s" in m][2:]
    return statistics.median(ips)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--out", default="benchmarks/out/vs_lightly")
    args = ap.parse_args()
    torch.set_num_threads(2)
    import lightly

    out = Path(args.out)
    folder = out / "images"
    imgs = real_images(args.images)
    if not folder.exists():
        folder.mkdir(parents=True)
        for i, im in enumerate(imgs):
            im.save(folder / f"{i:05d}.png")
    res = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
           "torch": torch.__version__, "lightly": lightly.__version__}
    res["aug_ours"] = bench_aug_ours(imgs)
    res["aug_lightly_w0"] = bench_aug_lightly(imgs, 0)
    res["aug_lightly_w1"] = bench_aug_lightly(imgs, 1)
    res["train_ours"] = bench_train_ours(folder, args.steps, out / "run")
    res["train_lightly_w0"] = bench_train_lightly(imgs, args.steps, 0)
    res["train_lightly_w1"] = bench_train_lightly(imgs, args.steps, 1)
    res["train_ours_again"] = bench_train_ours(folder, args.steps, out / "run")  # interleaved
    print(json.dumps(res, indent=2))
    (out / "results.json").write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
