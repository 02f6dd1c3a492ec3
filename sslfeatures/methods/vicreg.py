"""VICReg — Bardes, Ponce, LeCun 2022, "VICReg: Variance-Invariance-Covariance
Regularization for Self-Supervised Learning". Both views go through the same encoder and a
wide 3-layer expander; the loss is the MSE between the views (invariance) plus, on each
view, a hinge keeping every dimension's std above 1 (variance) and a penalty on the
off-diagonal covariances (covariance). Batch statistics are taken over the global batch
(embeddings gathered with gradients across processes).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from ..heads import mlp
from ..losses import vicreg_terms
from .base import Method, MethodConfig, register


@dataclass
class VICRegConfig(MethodConfig):
    proj_hidden_dim: int = 8192
    proj_dim: int = 8192
    proj_layers: int = 3
    sim_coeff: float = 25.0
    std_coeff: float = 25.0
    cov_coeff: float = 1.0


@register("vicreg")
class VICReg(Method):
    paper = "Bardes, Ponce, LeCun 2022, VICReg: Variance-Invariance-Covariance Regularization"
    Config = VICRegConfig
    exact_accumulation = False
    accumulation_note = "the variance and covariance terms are statistics of the micro-batch"

    def __init__(self, backbone, cfg: VICRegConfig, views):
        super().__init__(backbone, cfg, views)
        self.encoder = nn.Sequential(
            backbone, mlp(backbone.num_features, cfg.proj_hidden_dim, cfg.proj_dim, cfg.proj_layers))

    def training_step(self, views, info):
        x1, x2 = views[:2]
        t = vicreg_terms(self.encoder(x1), self.encoder(x2))
        c = self.cfg
        loss = c.sim_coeff * t["invariance"] + c.std_coeff * t["variance"] + c.cov_coeff * t["covariance"]
        return {"loss": loss, **{k: v.detach() for k, v in t.items()}}
