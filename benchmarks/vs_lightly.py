"""End-to-end training speed vs lightly (a benchmark-only dependency), measured in one process,
interleaved, on the same images, backbone, batch size, resolution and augmentation recipe,
data loading and augmentation included.

Cases (issue "scale out and beat lightly"):

==========  ===========================================  =====  ===========================
case        backbone                                     batch  views
==========  ===========================================  =====  ===========================
simclr      timm resnet18 (standard stem)                128    2 x 32 px
byol        timm resnet18                                128    2 x 32 px (asymmetric)
mocov2      timm resnet18, queue 4096                    128    2 x 32 px
dino        timm ViT-Tiny, 8 px patches, dynamic size    64     2 x 64 px + 4 x 32 px
mae         timm ViT-Tiny, 8 px patches                  64     1 x 64 px, mask 0.75
==========  ===========================================  =====  ===========================

lightly's side is the training loop its docs show for each method (a Dataset applying the
method's transform per PIL image behind a DataLoader, lightly's heads, losses and momentum
helpers, the student run once per view as in its examples), at its fastest setting on this
machine (channels_last for CNNs; the best of the loader-worker counts tried).

Besides images/s and peak memory, the script times the *model step alone* of our method
(forward + backward + optimizer step on views made in advance), counts its FLOPs with
``torch.utils.flop_counter.FlopCounterMode`` and reports FLOP/s against the machine's
measured GEMM and convolution peaks.

``--time-to-accuracy`` trains SimCLR on Fashion-MNIST (60k) with both libraries (same
backbone module, batch, optimizer and schedule), pausing the clock every ``--eval-every``
steps to run DINO's weighted k-NN on the 10k test images, and reports the training minutes
until k-NN top-1 reaches ``--target`` (0.80).

    python benchmarks/vs_lightly.py                                # all speed cases, CPU
    python benchmarks/vs_lightly.py --cases simclr dino --steps 20
    python benchmarks/vs_lightly.py --cases none --time-to-accuracy --fmnist ../shared/data/fashion-mnist
    python benchmarks/vs_lightly.py --device cuda --images 8192 --steps 40 --workers 0 8

Writes benchmarks/out/vs_lightly/results*.json and prints markdown rows for RESULTS.md.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

from sslfeatures import Pretrainer
from sslfeatures.augment import Views
from sslfeatures.data.demo import load_demo_arrays
from sslfeatures.methods.base import StepInfo
from sslfeatures.utils import autocast, cpu_model, resolve_precision

# lightly's SimCLRTransform at 32 px without blur (its CIFAR setting)
SIMCLR_VIEW = dict(scale=[0.08, 1.0], jitter=[0.8, 0.8, 0.8, 0.2], jitter_p=0.8, gray_p=0.2, blur_p=0.0, count=2)
# BYOL: lightly's BYOLView1/2Transform = the paper's asymmetric pair (blur 1.0 / 0.1, solarize 0 / 0.2)
BYOL_VIEWS = [dict(scale=[0.08, 1.0], jitter=[0.4, 0.4, 0.2, 0.1], jitter_p=0.8, gray_p=0.2, blur_p=1.0),
              dict(scale=[0.08, 1.0], jitter=[0.4, 0.4, 0.2, 0.1], jitter_p=0.8, gray_p=0.2, blur_p=0.1,
                   solarize_p=0.2)]
# MoCo v2: lightly's MoCoV2Transform (crop scale 0.2, jitter 0.4/0.4/0.4/0.1, blur 0.5)
MOCO_VIEW = dict(scale=[0.2, 1.0], jitter=[0.4, 0.4, 0.4, 0.1], jitter_p=0.8, gray_p=0.2, blur_p=0.5, count=2)
# DINO: lightly's DINOTransform = the paper's (2 global crops 0.4-1, 4 local crops 0.05-0.4 at half size)
DINO_VIEWS = [dict(scale=[0.4, 1.0], jitter=[0.4, 0.4, 0.2, 0.1], jitter_p=0.8, gray_p=0.2, blur_p=1.0, count=1),
              dict(scale=[0.4, 1.0], jitter=[0.4, 0.4, 0.2, 0.1], jitter_p=0.8, gray_p=0.2, blur_p=0.1,
                   solarize_p=0.2, count=1),
              dict(scale=[0.05, 0.4], size_frac=0.5, jitter=[0.4, 0.4, 0.2, 0.1], jitter_p=0.8, gray_p=0.2,
                   blur_p=0.5, count=4)]
MAE_VIEW = dict(scale=[0.2, 1.0], jitter_p=0.0, gray_p=0.0, blur_p=0.0, count=1)
VIT_TINY = dict(backbone="vit_tiny_patch16_224", patch_size=8)
WINDOW = 5  # steps per timing window: images/s is the median over windows, the first one left out
DINO_HEAD = dict(hidden_dim=512, bottleneck_dim=64, out_dim=2048)  # lightly's example head, used by both


@dataclass
class Case:
    size: int
    batch: int
    ours: dict[str, Any]
    lightly: Callable[[torch.device], tuple]   # -> (transform, module to train, step(views, step) -> loss, post(step))
    cnn: bool = True
    notes: str = ""
    extra: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- lightly's loops
def _timm_resnet18():
    import timm

    return timm.create_model("resnet18", num_classes=0)


def _timm_vit_tiny(size: int):
    import timm

    return timm.create_model("vit_tiny_patch16_224", img_size=size, patch_size=8, num_classes=0,
                             dynamic_img_size=True, drop_path_rate=0.1)


def lightly_simclr(device):
    from lightly.loss import NTXentLoss
    from lightly.models.modules import SimCLRProjectionHead
    from lightly.transforms import SimCLRTransform

    model = nn.Sequential(_timm_resnet18(), SimCLRProjectionHead(512, 2048, 128))
    crit = NTXentLoss(temperature=0.1)

    def step(views, i):
        return crit(model(views[0]), model(views[1]))

    return SimCLRTransform(input_size=32, gaussian_blur=0.0), model, step, None, ("sgd", 0.06)


def lightly_byol(device):
    from lightly.loss import NegativeCosineSimilarity
    from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead
    from lightly.models.utils import deactivate_requires_grad, update_momentum
    from lightly.transforms.byol_transform import BYOLTransform, BYOLView1Transform, BYOLView2Transform
    from lightly.utils.scheduler import cosine_schedule

    online = nn.ModuleDict(dict(backbone=_timm_resnet18(), proj=BYOLProjectionHead(512, 4096, 256),
                                pred=BYOLPredictionHead(256, 4096, 256)))
    target = nn.ModuleDict(dict(backbone=copy.deepcopy(online["backbone"]), proj=copy.deepcopy(online["proj"])))
    deactivate_requires_grad(target)
    target.to(device)
    crit = NegativeCosineSimilarity()

    def step(views, i):
        m = cosine_schedule(i, 1000, 0.996, 1.0)
        update_momentum(online["backbone"], target["backbone"], m)
        update_momentum(online["proj"], target["proj"], m)
        p0 = online["pred"](online["proj"](online["backbone"](views[0])))
        p1 = online["pred"](online["proj"](online["backbone"](views[1])))
        with torch.no_grad():
            z0 = target["proj"](target["backbone"](views[0]))
            z1 = target["proj"](target["backbone"](views[1]))
        return 0.5 * (crit(p0, z1) + crit(p1, z0))

    tf = BYOLTransform(view_1_transform=BYOLView1Transform(input_size=32),
                       view_2_transform=BYOLView2Transform(input_size=32))
    return tf, nn.ModuleList([online, target]), step, None, ("lars", 0.2 * 128 / 256)


def lightly_mocov2(device):
    from lightly.loss import NTXentLoss
    from lightly.models.modules import MoCoProjectionHead
    from lightly.models.utils import deactivate_requires_grad, update_momentum
    from lightly.transforms import MoCoV2Transform

    query = nn.Sequential(_timm_resnet18(), MoCoProjectionHead(512, 2048, 128))
    key = copy.deepcopy(query)
    deactivate_requires_grad(key)
    key.to(device)
    crit = NTXentLoss(temperature=0.2, memory_bank_size=(4096, 128))

    def step(views, i):
        update_momentum(query, key, 0.999)
        q = query(views[0])
        with torch.no_grad():
            k = key(views[1])
        return crit(q, k)

    return MoCoV2Transform(input_size=32), nn.ModuleList([query, key, crit]), step, None, ("sgd", 0.03 * 128 / 256)


def lightly_dino(device):
    from lightly.loss import DINOLoss
    from lightly.models.modules import DINOProjectionHead
    from lightly.models.utils import deactivate_requires_grad, update_momentum
    from lightly.transforms import DINOTransform
    from lightly.utils.scheduler import cosine_schedule

    student = nn.Sequential(_timm_vit_tiny(64), DINOProjectionHead(192, 512, 64, 2048, freeze_last_layer=1))
    teacher = nn.Sequential(_timm_vit_tiny(64), DINOProjectionHead(192, 512, 64, 2048))  # (weight norm: no deepcopy)
    teacher.load_state_dict(student.state_dict())
    deactivate_requires_grad(teacher)
    teacher.to(device)
    crit = DINOLoss(output_dim=2048, warmup_teacher_temp_epochs=30).to(device)

    def step(views, i):
        m = cosine_schedule(i, 1000, 0.996, 1.0)
        update_momentum(student[0], teacher[0], m)
        update_momentum(student[1], teacher[1], m)
        with torch.no_grad():
            t_out = [teacher(v) for v in views[:2]]
        s_out = [student(v) for v in views]
        return crit(t_out, s_out, epoch=0)

    def post(i):
        student[1].cancel_last_layer_gradients(current_epoch=0)

    tf = DINOTransform(global_crop_size=64, local_crop_size=32, n_local_views=4)
    return tf, nn.ModuleList([student, teacher]), step, post, ("adamw", 0.0005 * 64 / 256)


def lightly_mae(device):
    from lightly.models import utils
    from lightly.models.modules import MAEDecoderTIMM, MaskedVisionTransformerTIMM
    from lightly.transforms import MAETransform

    vit = _timm_vit_tiny(64)
    encoder = MaskedVisionTransformerTIMM(vit=vit)
    decoder = MAEDecoderTIMM(num_patches=vit.patch_embed.num_patches, patch_size=8, embed_dim=192,
                             decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, mlp_ratio=4.0,
                             proj_drop_rate=0.0, attn_drop_rate=0.0)
    seq_len = encoder.sequence_length
    mse = nn.MSELoss()

    def step(views, i):
        images = views[0]
        b = images.shape[0]
        idx_keep, idx_mask = utils.random_token_mask(size=(b, seq_len), mask_ratio=0.75, device=images.device)
        x = encoder.encode(images=images, idx_keep=idx_keep)
        x = decoder.embed(x)
        x_masked = utils.repeat_token(decoder.mask_token, (b, seq_len))
        x_masked = utils.set_at_index(x_masked, idx_keep, x.type_as(x_masked))
        pred = decoder.predict(utils.get_at_index(decoder.decode(x_masked), idx_mask))
        target = utils.get_at_index(utils.patchify(images, 8), idx_mask - 1)
        return mse(pred, target)

    return MAETransform(input_size=64), nn.ModuleList([encoder, decoder]), step, None, ("adamw", 1.5e-4 * 64 / 256)


CASES: dict[str, Case] = {
    "simclr": Case(32, 128, dict(method="simclr", backbone="resnet18", optimizer="sgd", lr=0.06, temperature=0.1,
                                 proj_hidden_dim=2048, views=[SIMCLR_VIEW]), lightly_simclr),
    "byol": Case(32, 128, dict(method="byol", backbone="resnet18", views=BYOL_VIEWS), lightly_byol),
    "mocov2": Case(32, 128, dict(method="mocov2", backbone="resnet18", queue_size=4096, views=[MOCO_VIEW]),
                   lightly_mocov2),
    "dino": Case(64, 64, dict(method="dino", **VIT_TINY, **DINO_HEAD, views=DINO_VIEWS), lightly_dino, cnn=False),
    "mae": Case(64, 64, dict(method="mae", **VIT_TINY, views=[MAE_VIEW]), lightly_mae, cnn=False),
}


# ----------------------------------------------------------------------------- measuring helpers
def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakMemory:
    """Peak memory of what runs inside: CUDA's allocator peak on a GPU; on a CPU the process's
    peak resident set (``ru_maxrss``) minus the resident set on entry, which is why every
    measurement runs in a fresh process (:func:`isolated`): a process that ran another model
    before would re-use freed memory and under-report."""

    def __init__(self, device: torch.device):
        self.device, self.peak_mb = device, 0.0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            with open("/proc/self/statm") as f:
                self._base = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            import resource

            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.peak_mb = (peak - self._base) / 2**20


def _in_child(fn_name: str, threads: int, args: tuple) -> dict:
    if threads:
        torch.set_num_threads(threads)
    return globals()[fn_name](*args)


def isolated(fn: Callable, threads: int, *args) -> dict:
    """Run ``fn(*args)`` in a fresh (spawned) process and return its result; the runs of the two
    libraries still interleave in one benchmark run, one process at a time. On a GPU (``threads``
    0) it runs in this process: the CUDA allocator's peak is exact there."""
    if not threads:
        return fn(*args)
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    # not multiprocessing.Pool: its daemonic workers may not start lightly's DataLoader workers
    with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
        return pool.submit(_in_child, fn.__name__, threads, args).result()


def real_images(n: int, size: int) -> list[Image.Image]:
    a = load_demo_arrays()["x_train"]
    a = np.concatenate([a] * (n // len(a) + 1))[:n]
    return [Image.fromarray(x).convert("RGB").resize((size, size), Image.BILINEAR) for x in a]


def image_folder(imgs, root: Path) -> Path:
    folder = root / f"images_{imgs[0].size[0]}px_{len(imgs)}"
    if not (folder / f"{len(imgs) - 1:05d}.png").exists():
        folder.mkdir(parents=True, exist_ok=True)
        for i, im in enumerate(imgs):
            im.save(folder / f"{i:05d}.png")
    return folder


def build_optimizer(name: str, params, lr: float):
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=1e-4)
    if name == "lars":
        from lightly.utils.lars import LARS

        return LARS(params, lr=lr, momentum=0.9, weight_decay=1.5e-6)
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.05)


# ----------------------------------------------------------------------------- augmentation alone
def bench_aug(n_images: int, reps: int = 3) -> dict:
    """Two SimCLR views per image at 32 px, batch 128, from decoded in-memory images: our
    batched tensor pipeline vs lightly's SimCLRTransform (PIL, per image) behind a DataLoader."""
    from lightly.transforms import SimCLRTransform

    imgs = real_images(n_images, 32)
    x = torch.stack([torch.from_numpy(np.asarray(i)).permute(2, 0, 1) for i in imgs])
    views = Views.from_config([SIMCLR_VIEW])
    out = {}
    best = 0.0
    for _ in range(reps):
        t = time.perf_counter()
        for s in range(0, len(x) - 127, 128):
            views(x[s:s + 128], 32)
        best = max(best, (len(x) // 128 * 128) / (time.perf_counter() - t))
    out["ours"] = best
    tf = SimCLRTransform(input_size=32, gaussian_blur=0.0)
    for w in (0, 1):
        dl = lightly_loader(imgs, tf, 128, w, torch.device("cpu"))
        best = 0.0
        for _ in range(2):
            t, n = time.perf_counter(), 0
            for v in dl:
                n += len(v[0])
            best = max(best, n / (time.perf_counter() - t))
        out[f"lightly_w{w}"] = best
        del dl
    return out


# ----------------------------------------------------------------------------- the two sides
def bench_ours(name: str, folder: Path, steps: int, out: Path, device: str, precision: str) -> dict:
    case, device = CASES[name], torch.device(device)
    kw = dict(case.ours)
    method = kw.pop("method")
    with PeakMemory(device) as mem:
        run = Pretrainer(method, image_size=case.size, batch_size=case.batch, epochs=1000, log_every=WINDOW,
                         progress=False, num_workers=0, checkpoint_every=10**9, device=str(device),
                         precision=precision, **kw).fit(folder, output_dir=out, overwrite=True,
                                                        max_steps=steps + WINDOW)
    ips = [m["img_per_s"] for m in run.metrics if "img_per_s" in m][1:]  # the first window warms up
    return {"img_per_s": statistics.median(ips), "peak_mb": mem.peak_mb}


class TransformedImages(torch.utils.data.Dataset):
    """lightly's documented input: PIL images through the method's transform, one at a time."""

    def __init__(self, imgs, tf):
        self.imgs, self.tf = imgs, tf

    def __len__(self):
        return len(self.imgs)

    def __getitem__(self, i):
        return self.tf(self.imgs[i])


def lightly_loader(imgs, tf, batch: int, workers: int, device):
    return torch.utils.data.DataLoader(TransformedImages(imgs, tf), batch_size=batch, num_workers=workers,
                                       drop_last=True, shuffle=True, persistent_workers=workers > 0,
                                       pin_memory=device.type == "cuda",
                                       prefetch_factor=4 if workers else None)


def bench_lightly(name: str, n_images: int, steps: int, workers: int, device: str, precision: str) -> dict:
    case, device = CASES[name], torch.device(device)
    amp = resolve_precision(precision, device)
    imgs = real_images(n_images, case.size)
    torch.manual_seed(0)
    tf, model, step_fn, post, (opt_name, lr) = case.lightly(device)
    model.to(device)
    if case.cnn:
        model.to(memory_format=torch.channels_last)
    opt = build_optimizer(opt_name, [p for p in model.parameters() if p.requires_grad], lr)
    with PeakMemory(device) as mem:
        dl = lightly_loader(imgs, tf, case.batch, workers, device)
        times, it = [], iter(dl)
        _sync(device)
        t = time.perf_counter()
        for i in range(steps + WINDOW):
            try:
                v = next(it)
            except StopIteration:
                it = iter(dl)
                v = next(it)
            views = [x.to(device, non_blocking=True) for x in v]
            if case.cnn:
                views = [x.contiguous(memory_format=torch.channels_last) for x in views]
            with autocast(device, amp):
                loss = step_fn(views, i)
            loss.backward()
            if post is not None:
                post(i)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if (i + 1) % WINDOW == 0:  # read the loss once per window, as our engine's log does
                float(loss.detach())
                now = time.perf_counter()
                if i >= WINDOW:  # the first window warms up
                    times.append(now - t)
                t = now
        del it, dl
    return {"img_per_s": WINDOW * case.batch / statistics.median(times), "peak_mb": mem.peak_mb}


def model_step_flops(name: str, device: str, precision: str, reps: int) -> dict:
    """Our method's model step alone (views made in advance): seconds, FLOPs, FLOP/s."""
    from torch.utils.flop_counter import FlopCounterMode

    case, device = CASES[name], torch.device(device)
    amp = resolve_precision(precision, device)
    kw = dict(case.ours)
    p = Pretrainer(kw.pop("method"), image_size=case.size, batch_size=case.batch, **kw)
    method = p.build().to(device)
    if case.cnn:
        method = method.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD([q for q in method.parameters() if q.requires_grad], lr=1e-5, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (case.batch, 3, case.size, case.size), dtype=torch.uint8, generator=g).to(device)
    views = method.views(x, case.size)
    if case.cnn:
        views = [v.contiguous(memory_format=torch.channels_last) for v in views]
    info = StepInfo(step=10, total_steps=1000, epoch=0, steps_per_epoch=100)
    method.train()

    def step():
        with autocast(device, amp):
            loss = method(views, info)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        method.after_optimizer_step(info)

    with FlopCounterMode(display=False) as fc:
        with autocast(device, amp):
            loss = method(views, info)["loss"]
        loss.backward()
    opt.zero_grad(set_to_none=True)
    flops = fc.get_total_flops()
    for _ in range(2):
        step()
    times = []
    for _ in range(reps):
        _sync(device)
        t = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t)
    sec = statistics.median(times)
    return {"step_s": sec, "gflop_per_step": flops / 1e9, "gflop_per_s": flops / sec / 1e9}


def machine_peaks(device, amp) -> dict:
    """Best GFLOP/s of a large matmul and of a 3x3 convolution (channels_last) on this device."""
    dtype = amp or torch.float32
    best = 0.0
    for n in ((8192,) if device.type == "cuda" else (1024, 2048, 3072)):
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        for _ in range(5):
            _sync(device)
            t = time.perf_counter()
            a @ b
            _sync(device)
            best = max(best, 2 * n**3 / (time.perf_counter() - t) / 1e9)
    bs, c, hw = (256, 256, 32) if device.type == "cuda" else (64, 128, 16)
    x = torch.randn(bs, c, hw, hw, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    conv = nn.Conv2d(c, c, 3, padding=1, bias=False).to(device=device, dtype=dtype).to(
        memory_format=torch.channels_last)
    conv_best = 0.0
    with torch.no_grad():
        for _ in range(6):
            _sync(device)
            t = time.perf_counter()
            conv(x)
            _sync(device)
            conv_best = max(conv_best, 2 * bs * c * c * 9 * hw * hw / (time.perf_counter() - t) / 1e9)
    return {"gemm_gflops": best, "conv_gflops": conv_best, "dtype": str(dtype).replace("torch.", "")}


# ----------------------------------------------------------------------------- time to accuracy
TTA_SIZE, TTA_BATCH, TTA_LR, TTA_TEMP = 28, 128, 1.0, 0.5
TTA_CHANNELS = [16, 32, 64, 128]  # ResNet-18 at quarter width with the 3x3/2 stem, for both libraries


def tta_simclr_kwargs(device: str, precision: str, epochs: int) -> dict[str, Any]:
    """``Pretrainer("simclr", **kw)`` settings of the time-to-accuracy run (also step_profile.py's)."""
    return dict(backbone="resnet18", image_size=TTA_SIZE, batch_size=TTA_BATCH, epochs=epochs, lr=TTA_LR,
                warmup_epochs=0.2, temperature=TTA_TEMP,
                views=[{"scale": [0.2, 1.0], "count": 2}],  # otherwise SimCLR's: jitter 0.8 (p 0.8), gray 0.2, blur 0.5
                backbone_kwargs={"channels": TTA_CHANNELS}, stem="small_s2", progress=False,
                mean=[0.5] * 3, std=[0.5] * 3,  # as lightly's transform: one k-NN input for both
                num_workers=0, device=device, precision=precision)


def time_to_accuracy(args, device, amp) -> list[dict]:
    """SimCLR on Fashion-MNIST 60k with both libraries: training minutes to k-NN top-1 >= target."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from build_demo_data import load_split

    from sslfeatures.backbones import create_backbone
    from sslfeatures.eval import weighted_knn

    src = Path(args.fmnist)
    xtr, ytr = load_split(src, "train")
    xte, yte = load_split(src, "test")
    size, batch, lr, temp = TTA_SIZE, TTA_BATCH, TTA_LR, TTA_TEMP
    total_steps = args.tta_max_epochs * (len(xtr) // batch)

    def knn(backbone) -> float:
        backbone.eval()
        feats = []
        with torch.no_grad(), autocast(device, amp):
            for arr in (xtr, xte):
                out = []
                for s in range(0, len(arr), 1024):
                    x = torch.from_numpy(arr[s:s + 1024]).to(device).float().div(255)
                    x = (x.unsqueeze(1).expand(-1, 3, -1, -1) - 0.5) / 0.5  # the mean/std both trained with
                    out.append(backbone(x).float().cpu())
                feats.append(torch.cat(out))
        backbone.train()
        return weighted_knn(feats[0], ytr, feats[1], yte)["top1"]

    rows = []
    # --- ours: one Pretrainer.fit on the in-memory arrays, set-up included; a callback stops the clock
    # every eval_every steps for the k-NN check, and ends the run at the target
    curve: list[tuple[float, int, float]] = []
    paused = 0.0
    t0 = time.perf_counter()

    def check(step: int, method: nn.Module) -> bool:
        nonlocal paused
        if step % args.eval_every:
            return False
        _sync(device)
        t = time.perf_counter()
        spent = t - t0 - paused
        acc = knn(method.encoder_backbone())
        curve.append((round(spent / 60, 3), step, acc))
        print(f"[ours] step {step} {spent / 60:.2f} min k-NN {acc:.4f}", flush=True)
        paused += time.perf_counter() - t
        return acc >= args.target or spent >= args.tta_budget_min * 60

    Pretrainer("simclr", **tta_simclr_kwargs(str(device), args.precision, args.tta_max_epochs)).fit(
        xtr, output_dir=Path(args.out) / "tta_ours", overwrite=True, callbacks=[check])
    rows.append({"lib": "sslfeatures", "curve": curve, "reached": bool(curve and curve[-1][2] >= args.target),
                 "minutes": curve[-1][0] if curve else None})

    # --- lightly: its documented SimCLR loop (DataLoader + SimCLRTransform + NTXentLoss) on the same backbone
    from lightly.loss import NTXentLoss
    from lightly.models.modules import SimCLRProjectionHead
    from lightly.transforms import SimCLRTransform
    from lightly.utils.lars import LARS
    from lightly.utils.scheduler import CosineWarmupScheduler

    torch.manual_seed(0)
    backbone = create_backbone("resnet18", image_size=size, stem="small_s2", channels=TTA_CHANNELS)
    model = nn.Sequential(backbone, SimCLRProjectionHead(backbone.num_features, 2048, 128)).to(device)
    model.to(memory_format=torch.channels_last)
    from lightly.models.utils import get_weight_decay_parameters

    # lightly's own benchmark set-up: no weight decay on biases and norm layers (as ours)
    decay, no_decay = get_weight_decay_parameters([model])
    opt = LARS([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}], lr=lr, momentum=0.9,
               weight_decay=1e-6)
    sched = CosineWarmupScheduler(opt, warmup_epochs=int(0.2 * len(xtr) // batch), max_epochs=total_steps)
    crit = NTXentLoss(temperature=temp)
    tf = SimCLRTransform(input_size=size, min_scale=0.2, gaussian_blur=0.5,
                         normalize={"mean": [0.5] * 3, "std": [0.5] * 3})
    imgs = [Image.fromarray(a).convert("RGB") for a in xtr]
    dl = lightly_loader(imgs, tf, batch, args.tta_workers, device)
    spent, step, curve, it = 0.0, 0, [], iter(dl)
    t = time.perf_counter()
    while step < total_steps and spent < args.tta_budget_min * 60:
        try:
            v = next(it)
        except StopIteration:
            it = iter(dl)
            v = next(it)
        x0, x1 = (x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last) for x in v)
        with autocast(device, amp):
            loss = crit(model(x0), model(x1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        step += 1
        if step % args.eval_every == 0:
            _sync(device)
            spent += time.perf_counter() - t
            acc = knn(backbone)
            curve.append((round(spent / 60, 3), step, acc))
            print(f"[lightly] step {step} {spent / 60:.2f} min k-NN {acc:.4f}", flush=True)
            if acc >= args.target:
                break
            t = time.perf_counter()
    rows.append({"lib": "lightly", "curve": curve, "reached": bool(curve and curve[-1][2] >= args.target),
                 "minutes": curve[-1][0] if curve else None})
    return rows


# ----------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=list(CASES), help=f"of {list(CASES)}, or 'none'")
    ap.add_argument("--images", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=15,
                    help=f"timed steps per measurement, a multiple of {WINDOW} (after {WINDOW} warm-up steps)")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1], help="lightly loader workers tried")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precision", default="auto", help="both libraries: auto = bf16 where the device has it")
    ap.add_argument("--out", default="benchmarks/out/vs_lightly")
    ap.add_argument("--time-to-accuracy", action="store_true")
    ap.add_argument("--fmnist", default="../shared/data/fashion-mnist")
    ap.add_argument("--target", type=float, default=0.80)
    ap.add_argument("--eval-every", type=int, default=117, help="steps between k-NN checks (117 = 1/4 epoch)")
    ap.add_argument("--tta-budget-min", type=float, default=20.0)
    ap.add_argument("--tta-max-epochs", type=int, default=10)
    ap.add_argument("--tta-workers", type=int, default=0)
    args = ap.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    amp = resolve_precision(args.precision, device)
    import lightly

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{cpu_model()}, {os.cpu_count()} cores, {args.threads} threads"
    res: dict[str, Any] = {"machine": dev_name, "torch": torch.__version__, "lightly": lightly.__version__,
                           "amp": str(amp), "cases": {}}
    cases = [c for c in args.cases if c != "none"]
    if cases:
        res["peaks"] = machine_peaks(device, amp)
        print("peaks", res["peaks"], flush=True)
        res["augmentation"] = isolated(bench_aug, args.threads, args.images)
        print("augmentation img/s", res["augmentation"], flush=True)
    for name in cases:
        case = CASES[name]
        imgs = real_images(args.images, case.size)
        folder = image_folder(imgs, out)
        r: dict[str, Any] = {}
        th = args.threads if device.type == "cpu" else 0
        run_dir, dev = out / f"run_{name}", str(device)
        r["ours"] = isolated(bench_ours, th, name, folder, args.steps, run_dir, dev, args.precision)
        for w in args.workers:
            r[f"lightly_w{w}"] = isolated(bench_lightly, th, name, args.images, args.steps, w, dev, args.precision)
        r["ours_again"] = isolated(bench_ours, th, name, folder, args.steps, run_dir, dev, args.precision)
        r["model_step"] = isolated(model_step_flops, th, name, dev, args.precision, max(3, args.steps // 2))
        best_l = max((v for k, v in r.items() if k.startswith("lightly")), key=lambda v: v["img_per_s"])
        ours = max(r["ours"]["img_per_s"], r["ours_again"]["img_per_s"])
        r["ratio"] = ours / best_l["img_per_s"]
        r["ratio_worst"] = min(r["ours"]["img_per_s"], r["ours_again"]["img_per_s"]) / best_l["img_per_s"]
        res["cases"][name] = r
        print(name, json.dumps(r), flush=True)
    if args.time_to_accuracy:
        res["time_to_accuracy"] = time_to_accuracy(args, device, amp)
        print(json.dumps(res["time_to_accuracy"]), flush=True)
    tag = f"{device.type}{'' if not cases else '_' + '_'.join(cases)}{'_tta' if args.time_to_accuracy else ''}"
    (out / f"results_{tag}.json").write_text(json.dumps(res, indent=2))
    print_table(res)


def print_table(res: dict) -> None:
    pk = res.get("peaks", {})
    for name, r in res.get("cases", {}).items():
        lw = {k: v for k, v in r.items() if k.startswith("lightly")}
        best_k = max(lw, key=lambda k: lw[k]["img_per_s"])
        ms = r["model_step"]
        peak = max(pk.get("gemm_gflops", 0), pk.get("conv_gflops", 0)) or float("nan")
        print(f"| {name} | {r['ours']['img_per_s']:.1f} / {r['ours_again']['img_per_s']:.1f} | "
              + " / ".join(f"{v['img_per_s']:.1f}" for v in lw.values())
              + f" | **{r['ratio']:.2f}x** ({r['ratio_worst']:.2f}x) | {r['ours']['peak_mb']:.0f} | "
              f"{lw[best_k]['peak_mb']:.0f} | {ms['gflop_per_step']:.2f} | {ms['gflop_per_s']:.1f} "
              f"({100 * ms['gflop_per_s'] / peak:.0f}% of peak) |")


if __name__ == "__main__":
    main()
