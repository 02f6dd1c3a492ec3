"""MoCo v3 — Chen, Xie, He 2021, "An Empirical Study of Training Self-Supervised Vision
Transformers". No queue: a query encoder (backbone, projector, predictor) and a momentum
key encoder (backbone, projector; EMA with a cosine momentum from 0.99 to 1); the loss is
the symmetrised InfoNCE of each view's query against the other view's keys, with the
other keys of the global batch (gathered across processes) as negatives, scaled by
``2 * temperature`` as in the official code.

For ViTs the paper's stability trick is on by default: the patch projection is a random
(Xavier-uniform) linear map that is never trained (``freeze_patch_embed``), and the
position embedding is a fixed 2-D sin-cos one (``sincos_pos_embed``). For ResNets use
``proj_layers=2, pred_last_bn=False, temperature=1.0`` (the paper's ResNet-50 recipe).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..engine.ema import EMA
from ..engine.schedules import cosine
from ..heads import mlp
from ..losses import info_nce
from .base import Method, MethodConfig, register
from .mae import sincos_2d


@dataclass
class MoCoV3Config(MethodConfig):
    temperature: float = 0.2
    proj_hidden_dim: int = 4096
    proj_dim: int = 256
    proj_layers: int = 3
    pred_hidden_dim: int = 4096
    pred_last_bn: bool = True
    momentum_start: float = 0.99
    momentum_end: float = 1.0
    freeze_patch_embed: bool = True
    sincos_pos_embed: bool = True


def _freeze_patch_projection(vit: nn.Module) -> None:
    """Random patch projection, kept fixed (MoCo v3, Sec. 5 "a trick for improving stability")."""
    proj = vit.patch_embed.proj
    fan = proj.in_channels * math.prod(proj.kernel_size) + proj.out_channels
    bound = math.sqrt(6.0 / fan)
    nn.init.uniform_(proj.weight, -bound, bound)
    if proj.bias is not None:
        nn.init.zeros_(proj.bias)
    for p in proj.parameters():
        p.requires_grad_(False)


def _fixed_sincos_pos_embed(vit: nn.Module) -> None:
    """Replace a ViT's learned position embedding by the fixed 2-D sin-cos one (prefix
    tokens get zeros), not trained."""
    pos = getattr(vit, "pos_embed", None)
    if pos is None:
        return
    n_pre = 0 if getattr(vit, "no_embed_class", False) else int(getattr(vit, "num_prefix_tokens", 0))
    grid = vit.patch_embed.grid_size
    if grid[0] != grid[1] or pos.shape[1] - n_pre != grid[0] * grid[1]:
        raise ValueError(f"sincos_pos_embed needs a square patch grid, got {tuple(grid)}")
    with torch.no_grad():
        pos.zero_()
        pos[0, n_pre:] = sincos_2d(pos.shape[-1], grid[0]).to(pos.dtype)
    pos.requires_grad_(False)


@register("mocov3")
class MoCoV3(Method):
    paper = "Chen, Xie, He 2021, An Empirical Study of Training Self-Supervised Vision Transformers (MoCo v3)"
    Config = MoCoV3Config
    exact_accumulation = False
    accumulation_note = "in-batch negatives: each micro-batch contrasts only with its own (global) micro-batch"

    def __init__(self, backbone, cfg: MoCoV3Config, views):
        super().__init__(backbone, cfg, views)
        if backbone.is_vit and hasattr(backbone.model, "patch_embed"):
            if cfg.freeze_patch_embed:
                _freeze_patch_projection(backbone.model)
            if cfg.sincos_pos_embed:
                _fixed_sincos_pos_embed(backbone.model)
        projector = mlp(backbone.num_features, cfg.proj_hidden_dim, cfg.proj_dim, cfg.proj_layers, last_bn=True)
        self.base = nn.Sequential(backbone, projector)
        self.predictor = mlp(cfg.proj_dim, cfg.pred_hidden_dim, cfg.proj_dim, 2, last_bn=cfg.pred_last_bn)
        self.momentum = EMA(self.base)

    def training_step(self, views, info):
        x1, x2 = views[:2]
        q1, q2 = self.predictor(self.base(x1)), self.predictor(self.base(x2))
        with torch.no_grad():
            k1, k2 = self.momentum(x1), self.momentum(x2)
        t = self.cfg.temperature
        loss = 2 * t * (info_nce(q1, k2, t) + info_nce(q2, k1, t))
        return {"loss": loss}

    def after_optimizer_step(self, info):
        m = cosine(info.progress, self.cfg.momentum_start, self.cfg.momentum_end)
        self.momentum.update(self.base, m)
