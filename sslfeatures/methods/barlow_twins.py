"""Barlow Twins — Zbontar, Jing, Misra, LeCun, Deny 2021, "Barlow Twins: Self-Supervised
Learning via Redundancy Reduction". Both views go through the same encoder and a wide
3-layer projector; the loss drives the cross-correlation matrix of the two views'
batch-standardised embeddings to the identity (invariance on the diagonal, redundancy
reduction off it, weighted by ``lambd``). The cross-correlation is taken over the global
batch (embeddings gathered with gradients across processes).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from ..heads import mlp
from ..losses import barlow_twins_loss
from .base import Method, MethodConfig, register


@dataclass
class BarlowTwinsConfig(MethodConfig):
    proj_hidden_dim: int = 8192
    proj_dim: int = 8192
    proj_layers: int = 3
    lambd: float = 0.0051


@register("barlow_twins")
class BarlowTwins(Method):
    paper = "Zbontar et al. 2021, Barlow Twins: Self-Supervised Learning via Redundancy Reduction"
    Config = BarlowTwinsConfig
    exact_accumulation = False
    accumulation_note = "the cross-correlation matrix is normalised over the micro-batch"

    def __init__(self, backbone, cfg: BarlowTwinsConfig, views):
        super().__init__(backbone, cfg, views)
        self.encoder = nn.Sequential(
            backbone, mlp(backbone.num_features, cfg.proj_hidden_dim, cfg.proj_dim, cfg.proj_layers))

    def training_step(self, views, info):
        x1, x2 = views[:2]
        return {"loss": barlow_twins_loss(self.encoder(x1), self.encoder(x2), self.cfg.lambd)}
