"""End-to-end fine-tuning of a pre-trained encoder on (a fraction of) the labels, and the
same backbone trained from scratch on the same labels for comparison.

>>> ft = enc.finetune("labelled/train", label_fraction=0.01, epochs=100, test="labelled/test")
>>> ft.test_top1, ft.classifier.predict(images)
>>> scratch = enc.finetune("labelled/train", label_fraction=0.01, epochs=100, test=..., from_scratch=True)

The recipe is MAE's / BEiT's fine-tuning recipe (He et al. 2021, appendix A.3; Bao et al.
2021): AdamW (betas 0.9/0.999, weight decay 0.05, none on biases, norms and position
embeddings), learning rate ``base_lr * batch_size / 256`` with linear warm-up and cosine
decay, **layer-wise learning-rate decay** (the head gets the full rate, each block below
it ``layer_decay`` times the one above; timm's ``param_groups_layer_decay``, so it works for
ViTs and CNNs alike), **drop path** (stochastic depth), label smoothing 0.1, a linear head
initialised with std 2e-5. Mixup / CutMix (timm's) are off by default: at a few hundred
or thousand labelled images they cost more than they give; set ``mixup=0.8, cutmix=1.0``
for MAE's full recipe. Augmentation is a random resized crop + flip, batched on the
device (:func:`sslfeatures.augment.ops.random_resized_crop`).

``label_fraction`` draws a class-balanced, seeded subset (nested: the 1 % set is inside the
10 % set for the same seed). ``from_scratch=True`` trains the same architecture from a
random initialisation with the same labels and recipe, except that layer-wise decay
defaults to 1 (there are no pre-trained lower layers to protect).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..augment.ops import normalize, random_resized_crop
from ..backbones import Backbone, backbone_from_config
from ..data import ArrayImages, BadFileReport, load_into_memory
from ..engine.optim import param_groups
from ..engine.schedules import warmup_cosine
from ..utils import autocast, resolve_device, resolve_precision
from .classifier import Classifier, build_head, calibrate_on
from .labels import LabelledImages, resolve_labelled, sample_fraction, stratified_split

log = logging.getLogger("sslfeatures")


@dataclass
class FinetuneResult:
    """What :func:`finetune` returns: the fine-tuned classifier and how it got there."""

    classifier: Classifier
    history: list[dict[str, float]]
    label_fraction: float
    n_labelled: int
    from_scratch: bool
    seconds: float
    test: dict[str, float] | None = None
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def test_top1(self) -> float | None:
        return None if self.test is None else self.test["top1"]

    def to_dict(self) -> dict[str, Any]:
        return {"label_fraction": self.label_fraction, "n_labelled": self.n_labelled,
                "from_scratch": self.from_scratch, "seconds": round(self.seconds, 2), "test": self.test,
                "config": self.config, "history": self.history}


class _Net(nn.Module):
    def __init__(self, backbone: Backbone, num_classes: int, pooling: str | None):
        super().__init__()
        self.backbone, self.pooling = backbone, pooling
        self.head = nn.Linear(backbone.num_features, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=2e-5)  # MAE's head initialisation
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x, self.pooling))


def _layer_decay_groups(net: _Net, weight_decay: float, layer_decay: float) -> list[dict]:
    """Backbone groups with per-layer ``lr_scale`` (timm), the head at scale 1."""
    model = net.backbone.model
    no_wd = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    try:
        from timm.optim import param_groups_layer_decay

        groups = param_groups_layer_decay(model, weight_decay, no_wd, layer_decay=layer_decay)
        # timm gives the backbone's top group scale 1; in MAE/BEiT the head alone has 1 and the
        # last block layer_decay**1, i.e. every backbone scale is one factor lower
        groups = [dict(g, lr_scale=g.get("lr_scale", 1.0) * layer_decay) for g in groups]
    except (AttributeError, NotImplementedError, TypeError) as exc:
        if layer_decay != 1.0:
            log.warning("layer-wise lr decay is not available for %s (%s); using one learning rate",
                        net.backbone.name, exc)
        groups = [dict(g, lr_scale=1.0) for g in param_groups(model, weight_decay)]
    for g in param_groups(net.head, weight_decay):
        groups.append(dict(g, lr_scale=1.0))
    return [{"params": g["params"], "weight_decay": g["weight_decay"], "lr_scale": g.get("lr_scale", 1.0)}
            for g in groups if g["params"]]


def _decode(images: LabelledImages, size: int, crop_pct: float, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    report = BadFileReport()
    x, kept = load_into_memory(ArrayImages(images.images, size=size, crop_pct=crop_pct), report,
                               num_workers=0, progress=False, desc=f"decoding {what}")
    if len(report):
        log.warning("%s: %s", what, report.summary())
    return x, torch.as_tensor(images.labels[kept.numpy()], dtype=torch.long)


@torch.no_grad()
def _logits(net: nn.Module, x: torch.Tensor, mean, std, device, amp, batch_size: int = 256) -> torch.Tensor:
    net.eval()
    out = []
    for s in range(0, len(x), batch_size):
        xb = normalize(x[s:s + batch_size].to(device).float().div_(255), mean, std)
        with autocast(device, amp):
            out.append(net(xb).float().cpu())
    return torch.cat(out)


def _build_backbone(config: dict[str, Any], drop_path: float) -> Backbone:
    cfg = dict(config)
    timm_kwargs = dict(cfg.get("timm_kwargs") or {})
    if drop_path > 0:
        timm_kwargs["drop_path_rate"] = drop_path
    cfg["timm_kwargs"] = timm_kwargs
    try:
        return backbone_from_config(cfg)
    except TypeError as exc:
        if drop_path <= 0:
            raise
        log.warning("%s does not take drop_path_rate (%s); fine-tuning without drop path", cfg["name"], exc)
        cfg["timm_kwargs"] = dict(config.get("timm_kwargs") or {})
        return backbone_from_config(cfg)


def finetune(encoder: Any, data: Any, labels: Sequence[Any] | None = None, label_fraction: float = 1.0,
             test: Any = None, epochs: int = 50, batch_size: int = 64, lr: float | None = None,
             base_lr: float = 1e-3, layer_decay: float | None = None, weight_decay: float = 0.05,
             drop_path: float = 0.1, warmup_epochs: float = 5.0, label_smoothing: float = 0.1,
             mixup: float = 0.0, cutmix: float = 0.0, crop_scale: tuple[float, float] = (0.25, 1.0),
             hflip: float = 0.5, from_scratch: bool = False, val_fraction: float = 0.0, eval_every: int = 0,
             seed: int = 0, device: str | torch.device | None = None, precision: str = "auto",
             max_steps: int | None = None, progress: bool = False) -> FinetuneResult:
    """Fine-tune ``encoder`` end to end on labelled ``data`` (see the module docstring).

    Parameters
    ----------
    data: a labelled folder (``root/<class>/<image>``) or images with ``labels``.
    label_fraction: share of every class's images used (class-balanced, seeded by ``seed``).
    test: labelled data (same classes) to report top-1 on; with ``eval_every=k`` also every
        ``k`` epochs (in ``history``).
    lr: peak learning rate; default ``base_lr * batch_size / 256`` (MAE's scaling; its
        ViT-L/H ``base_lr`` is 1e-3, ViT-B 5e-4).
    layer_decay: per-layer lr factor; default 0.75 (MAE ViT-L; 0.65 for ViT-B), 1 from scratch.
    warmup_epochs: linear warm-up (capped at a tenth of the run).
    val_fraction: share of the labelled subset held out to fit the temperature of the
        returned classifier's probabilities (0: temperature 1).
    max_steps: stop early (the schedule still spans ``epochs``), e.g. for smoke tests.
    """
    t0 = time.perf_counter()
    device = resolve_device(device if device is not None else encoder.device)
    amp = resolve_precision(precision, device)
    size, crop_pct = encoder.image_size, float(encoder.config.get("crop_pct", 1.0))
    mean, std = encoder.config["mean"], encoder.config["std"]
    layer_decay = (1.0 if from_scratch else 0.75) if layer_decay is None else float(layer_decay)
    if not 0 < layer_decay <= 1:
        raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay}")
    if epochs < 1 or batch_size < 2:
        raise ValueError(f"epochs must be >= 1 and batch_size >= 2, got {epochs} and {batch_size}")

    # -- data: a class-balanced label fraction, decoded once -----------------------------------
    full = resolve_labelled(data, labels)
    if len(np.unique(full.labels)) < 2:
        raise ValueError("fine-tuning needs labelled images of at least 2 classes")
    subset = full.subset(sample_fraction(full.labels, label_fraction, seed))
    val = None
    if val_fraction > 0:
        keep, held = stratified_split(subset.labels, val_fraction, seed)
        if len(held):
            subset, val = subset.subset(keep), subset.subset(held)
        else:
            log.warning("too few labelled images to hold out a calibration split; temperature stays 1")
    xtr, ytr = _decode(subset, size, crop_pct, "fine-tuning images")
    num_classes = len(full.classes)
    test_x = test_y = None
    if test is not None:
        test_set = resolve_labelled(test)
        if test_set.classes != full.classes:
            raise ValueError(f"test classes {test_set.classes} differ from the training classes {full.classes}")
        test_x, test_y = _decode(test_set, size, crop_pct, "test images")

    # -- model: the encoder's backbone (or a fresh one) with drop path + a linear head ----------
    torch.manual_seed(seed)
    bb_cfg = encoder.config["backbone"]
    backbone = _build_backbone(bb_cfg, drop_path)
    if not from_scratch:
        backbone.model.load_state_dict(encoder.backbone.model.state_dict())
    for p in backbone.parameters():
        p.requires_grad_(True)
    pooling = encoder.config.get("pooling")
    net = _Net(backbone, num_classes, pooling).to(device)
    batch_size = min(batch_size, len(xtr))
    if mixup > 0 or cutmix > 0:
        batch_size -= batch_size % 2  # timm's Mixup mixes pairs
    peak_lr = lr if lr is not None else base_lr * batch_size / 256
    groups = _layer_decay_groups(net, weight_decay, layer_decay)
    opt = torch.optim.AdamW(groups, lr=peak_lr, betas=(0.9, 0.999))
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    mix = None
    if mixup > 0 or cutmix > 0:
        from timm.data import Mixup

        mix = Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, label_smoothing=label_smoothing,
                    num_classes=num_classes)

    spe = max(1, len(xtr) // batch_size)
    total = epochs * spe
    warmup = int(min(warmup_epochs * spe, total / 10))
    stop = total if max_steps is None else min(total, max_steps)
    history: list[dict[str, float]] = []
    step = 0
    from tqdm.auto import tqdm

    bar = tqdm(total=stop, desc="fine-tune" + (" (scratch)" if from_scratch else ""), unit="step",
               disable=not progress, leave=False)
    for epoch in range(epochs):
        if step >= stop:
            break
        net.train()
        perm = torch.randperm(len(xtr), generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        losses = []
        for b in range(spe):
            if step >= stop:
                break
            torch.manual_seed(seed * 1_000_003 + step)
            idx = perm[b * batch_size:(b + 1) * batch_size]
            xb = xtr[idx].to(device).float().div_(255)
            yb = ytr[idx].to(device)
            xb = normalize(random_resized_crop(xb, size, scale=tuple(crop_scale), hflip_p=hflip), mean, std)
            cur = warmup_cosine(step, total, warmup, peak_lr, min(1e-6, 1e-3 * peak_lr))  # MAE's min_lr
            for g in opt.param_groups:
                g["lr"] = cur * g["lr_scale"]
            if mix is not None:
                xb, target = mix(xb, yb)
            with autocast(device, amp):
                out = net(xb)
            if mix is not None:
                loss = torch.sum(-target * F.log_softmax(out.float(), dim=-1), dim=-1).mean()
            else:
                loss = F.cross_entropy(out.float(), yb, label_smoothing=label_smoothing)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"fine-tuning loss is {loss.item()} at step {step}; "
                                         "try a lower lr or precision='fp32'")
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            losses.append(loss.item())
            step += 1
            bar.update(1)
        row = {"epoch": epoch + 1, "step": step, "loss": float(np.mean(losses)) if losses else math.nan,
               "lr": cur if losses else 0.0}
        if test_x is not None and eval_every and (epoch + 1) % eval_every == 0:
            row["test_top1"] = (_logits(net, test_x, mean, std, device, amp).argmax(1) == test_y).float().mean().item()
        history.append(row)
    bar.close()

    # -- the result: a frozen Encoder + linear head, i.e. a Classifier ----------------------------
    from ..encoder import Encoder

    final_bb = backbone_from_config(bb_cfg)
    final_bb.model.load_state_dict(net.backbone.model.state_dict())
    cfg = dict(encoder.config)
    cfg["finetune"] = {"label_fraction": label_fraction, "from_scratch": from_scratch, "epochs": epochs,
                       "n_labelled": int(len(xtr)), "pretrained_method": None if from_scratch else encoder.method}
    if from_scratch:
        cfg["method"] = None
    enc = Encoder(final_bb, cfg, device=device, precision=encoder.precision)
    head = build_head("linear", backbone.num_features, num_classes)
    head[1].load_state_dict(net.head.state_dict())
    temperature, metrics = 1.0, {"n_train": int(len(xtr)), "steps": step}
    if val is not None:
        xv, yv = _decode(val, size, crop_pct, "calibration images")
        temperature, cal = calibrate_on(_logits(net, xv, mean, std, device, amp), yv)
        metrics.update(cal)
    metrics["temperature"] = temperature
    clf = Classifier(enc, head, full.classes, head_kind="linear", temperature=temperature, metrics=metrics)
    test_res = None
    if test_x is not None:
        lt = _logits(net, test_x, mean, std, device, amp)
        test_res = {"top1": (lt.argmax(1) == test_y).float().mean().item(),
                    "nll": F.cross_entropy(lt / temperature, test_y).item(), "n": int(len(test_y))}
    config = {"epochs": epochs, "batch_size": batch_size, "lr": peak_lr, "layer_decay": layer_decay,
              "weight_decay": weight_decay, "drop_path": drop_path, "warmup_steps": warmup,
              "label_smoothing": label_smoothing, "mixup": mixup, "cutmix": cutmix, "crop_scale": list(crop_scale),
              "steps": step, "seed": seed}
    return FinetuneResult(clf, history, label_fraction, int(len(xtr)), from_scratch,
                          time.perf_counter() - t0, test_res, config)


__all__ = ["finetune", "FinetuneResult"]
