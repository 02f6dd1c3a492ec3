"""BYOL — Grill et al. 2020, "Bootstrap Your Own Latent". The online network (encoder,
projector, predictor) predicts an EMA target network's projection of another view;
symmetric ``2 - 2 cos`` loss; target momentum follows a cosine from 0.996 to 1.

Without batch statistics (Richemond et al. 2020, "BYOL works even without batch
statistics"): ``head_bn=False`` drops BatchNorm from the projector and predictor, and the
backbone option ``norm="gn_ws"`` swaps its BatchNorm for GroupNorm + weight
standardisation; ``recipes/byol_gn_ws.yaml`` sets both (``Pretrainer("byol",
recipe="byol_gn_ws")``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..engine.ema import EMA
from ..engine.schedules import cosine
from ..heads import mlp
from ..losses import neg_cosine
from .base import Method, MethodConfig, register


@dataclass
class BYOLConfig(MethodConfig):
    proj_hidden_dim: int = 4096
    proj_dim: int = 256
    pred_hidden_dim: int = 4096
    momentum_start: float = 0.996
    momentum_end: float = 1.0
    head_bn: bool = True


@register("byol")
class BYOL(Method):
    paper = "Grill et al. 2020, Bootstrap Your Own Latent (BYOL)"
    Config = BYOLConfig
    exact_accumulation = True
    accumulation_note = "per-pair cosine loss; the EMA target moves once per optimizer step, as with one big batch"

    def __init__(self, backbone, cfg: BYOLConfig, views):
        super().__init__(backbone, cfg, views)
        self.online = nn.Sequential(backbone, mlp(backbone.num_features, cfg.proj_hidden_dim, cfg.proj_dim,
                                                  bn=cfg.head_bn))
        self.predictor = mlp(cfg.proj_dim, cfg.pred_hidden_dim, cfg.proj_dim, bn=cfg.head_bn)
        self.target = EMA(self.online)

    def training_step(self, views, info):
        v1, v2 = views
        p1, p2 = self.predictor(self.online(v1)), self.predictor(self.online(v2))
        with torch.no_grad():
            z1, z2 = self.target(v1), self.target(v2)
        return {"loss": neg_cosine(p1, z2) + neg_cosine(p2, z1)}

    def after_optimizer_step(self, info):
        m = cosine(info.progress, self.cfg.momentum_start, self.cfg.momentum_end)
        self.target.update(self.online, m)
