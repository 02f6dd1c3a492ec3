"""DINOv2 distillation — Oquab et al. 2024, "DINOv2: Learning Robust Visual Features without
Supervision", Sec. 5 ("Efficient implementation: distillation"): a smaller student is
trained with the DINOv2 losses against a bigger **frozen** teacher instead of an EMA of
itself; the masking and stochastic depth are removed, the iBOT loss covers every patch of
the two global crops, and a spare EMA of the student is kept as the final model.

The teacher is any :class:`~sslfeatures.Encoder` (``teacher=`` a run or exported folder, a
``.safetensors`` file or a hub id): a ViT or a CNN, of any width, patch size or input
normalisation. An Encoder carries no projection heads, so the teacher's DINO and iBOT
heads are DINO heads at random initialisation, kept frozen: the student learns to
reproduce the teacher's (Sinkhorn-Knopp balanced) soft assignments of its image-level and
patch features to fixed random prototypes. When the teacher's patch grid differs from the
student's (another patch size, or a CNN feature map) its patch features are resampled
bilinearly to the student's grid.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..engine.ema import EMA
from ..engine.schedules import cosine
from .base import register
from .dinov2 import DINOv2, DINOv2Config, dino_head


@dataclass
class DINOv2DistillConfig(DINOv2Config):
    teacher: str = ""                  # the frozen Encoder to distil
    mask_probability: float = 0.0      # the paper removes masking for distillation


@register("dinov2_distill")
class DINOv2Distill(DINOv2):
    paper = ("Oquab et al. 2024, DINOv2: Learning Robust Visual Features without Supervision "
             "(distillation of a frozen teacher)")
    Config = DINOv2DistillConfig

    def build_teacher(self) -> None:
        cfg = self.cfg
        if not cfg.teacher:
            raise ValueError("dinov2_distill needs teacher=<the frozen Encoder to distil: a run or exported "
                             "folder, a .safetensors file or a hub id 'org/name'>")
        from ..encoder import Encoder

        enc = Encoder.from_pretrained(cfg.teacher, device="cpu")
        bb = enc.backbone
        heads = {"dino_head": dino_head(bb.num_features, cfg.out_dim, cfg)}
        if cfg.ibot_separate_head:
            heads["ibot_head"] = dino_head(bb.num_features, cfg.ibot_out_dim, cfg)
        self.teacher = nn.ModuleDict({"backbone": bb, **heads}).eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        # views are normalised with the run's mean/std; the teacher expects its own
        run_mean, run_std = torch.tensor(self.views.mean), torch.tensor(self.views.std)
        t_mean = torch.tensor(enc.config["mean"], dtype=torch.float32)
        t_std = torch.tensor(enc.config["std"], dtype=torch.float32)
        self.register_buffer("teacher_scale", (run_std / t_std).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("teacher_shift", ((run_mean - t_mean) / t_std).view(1, -1, 1, 1), persistent=False)
        if cfg.mask_probability == 0:
            self.mask_token.requires_grad_(False)  # never used: no masking
        self.ema = EMA(self.student)

    def sample_masks(self, n_images, grid, device):
        if self.cfg.mask_probability > 0:
            return super().sample_masks(n_images, grid, device)
        return None, torch.ones(n_images, grid[0] * grid[1], dtype=torch.bool, device=device)

    @torch.no_grad()
    def teacher_logits(self, x, masks):
        bb = self.teacher["backbone"]
        p = self.student["backbone"].patch_size
        grid = (x.shape[-2] // p, x.shape[-1] // p)
        feats = bb.forward_features(x * self.teacher_scale.to(x.dtype) + self.teacher_shift.to(x.dtype))
        pooled = bb.pool(feats)
        if feats.ndim == 4:  # CNN: (B, C, h, w)
            fmap = feats
        else:
            tokens = bb.tokens_from_features(feats)
            h, w = x.shape[-2] // bb.patch_size, x.shape[-1] // bb.patch_size
            if h * w != tokens.shape[1]:
                raise ValueError(f"teacher {bb.name!r} gave {tokens.shape[1]} patch tokens for a {h}x{w} grid")
            fmap = tokens.transpose(1, 2).reshape(tokens.shape[0], -1, h, w)
        if tuple(fmap.shape[-2:]) != grid:
            fmap = F.interpolate(fmap.float(), size=grid, mode="bilinear", align_corners=False).to(fmap.dtype)
        patches = fmap.flatten(2).transpose(1, 2)
        return self.teacher["dino_head"](pooled), self.ibot_head(self.teacher)(patches[masks])

    def after_optimizer_step(self, info):
        m = cosine(info.progress, self.cfg.momentum_start, self.cfg.momentum_end)
        self.ema.update(self.student, m)

    def encoder_backbone(self):
        return self.ema.module["backbone"]  # the spare EMA of the student is the final model
