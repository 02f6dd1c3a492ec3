"""DINO — Caron et al. 2021, "Emerging Properties in Self-Supervised Vision Transformers".
Self-distillation with no labels: a student sees every crop (2 global + N local), an EMA
teacher sees only the global crops; the teacher output is centred and sharpened, and the
student matches it across views by cross-entropy (Algorithm 1 of the paper).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..engine.ema import EMA
from ..engine.schedules import cosine, linear_warmup_then_constant
from ..heads import DINOHead
from ..losses import DINOLoss
from .base import Method, MethodConfig, register


@dataclass
class DINOConfig(MethodConfig):
    out_dim: int = 65536
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    use_bn_in_head: bool = False
    norm_last_layer: bool = True
    student_temp: float = 0.1
    warmup_teacher_temp: float = 0.04
    teacher_temp: float = 0.07
    warmup_teacher_temp_epochs: float = 30
    center_momentum: float = 0.9
    momentum_start: float = 0.996
    momentum_end: float = 1.0
    freeze_last_layer_epochs: float = 1


class _Branch(nn.Module):
    """Backbone + head, run once per group of same-resolution crops."""

    def __init__(self, backbone, head):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, crops: list[torch.Tensor]) -> list[torch.Tensor]:
        feats, start = [], 0
        while start < len(crops):  # batch consecutive crops of equal size together
            end = start
            while end < len(crops) and crops[end].shape[-1] == crops[start].shape[-1]:
                end += 1
            feats.append(self.backbone(torch.cat(crops[start:end])))
            start = end
        out = self.head(torch.cat(feats))
        return list(out.chunk(len(crops)))


@register("dino")
class DINO(Method):
    paper = "Caron et al. 2021, Emerging Properties in Self-Supervised Vision Transformers (DINO)"
    Config = DINOConfig
    exact_accumulation = False
    accumulation_note = ("the teacher centre is updated from every micro-batch (accumulate_steps EMA updates per "
                         "optimizer step instead of one from the whole batch)")

    def __init__(self, backbone, cfg: DINOConfig, views):
        super().__init__(backbone, cfg, views)
        head = DINOHead(backbone.num_features, cfg.out_dim, cfg.hidden_dim, cfg.bottleneck_dim,
                        use_bn=cfg.use_bn_in_head, norm_last_layer=cfg.norm_last_layer)
        self.student = _Branch(backbone, head)
        self.teacher = EMA(self.student)
        self.criterion = DINOLoss(cfg.out_dim, cfg.student_temp, cfg.center_momentum)

    def training_step(self, views, info):
        # global crops are the leading views at full size (they may come from several specs,
        # e.g. the paper's two global crops with different blur/solarize); the rest are local
        n_global = next((i for i, v in enumerate(views) if v.shape[-2:] != views[0].shape[-2:]), len(views))
        with torch.no_grad():
            teacher_out = self.teacher(views[:n_global])
        student_out = self.student(views)
        warmup_steps = int(self.cfg.warmup_teacher_temp_epochs * info.steps_per_epoch)
        t_temp = linear_warmup_then_constant(info.step, warmup_steps, self.cfg.warmup_teacher_temp,
                                             self.cfg.teacher_temp)
        loss = self.criterion(student_out, teacher_out, t_temp)
        return {"loss": loss, "teacher_temp": torch.tensor(t_temp)}

    def before_optimizer_step(self, info):
        if info.epoch_float < self.cfg.freeze_last_layer_epochs:
            for p in self.student.head.last_layer.parameters():
                p.grad = None

    def after_optimizer_step(self, info):
        m = cosine(info.progress, self.cfg.momentum_start, self.cfg.momentum_end)
        self.teacher.update(self.student, m)

    def encoder_backbone(self):
        return self.teacher.module.backbone  # the paper evaluates the teacher
