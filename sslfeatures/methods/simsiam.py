"""SimSiam — Chen & He 2021, "Exploring Simple Siamese Representation Learning". One
encoder (backbone + 3-layer projector with BatchNorm on its output) shared by both views,
a 2-layer bottleneck predictor, and the symmetrised negative cosine between each view's
prediction and the other view's projection, which is treated as a constant
(stop-gradient). No negatives, no momentum encoder.

``stop_gradient=False`` removes the stop-gradient: the paper's Fig. 2 failure, where the
loss falls to (or, at small batches, near) its minimum of -1 and the output collapses to a
point or a line; the collapse monitor, which also watches the prediction
(:meth:`SimSiam.monitor_features`), reports it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..heads import mlp
from .base import Method, MethodConfig, register


@dataclass
class SimSiamConfig(MethodConfig):
    proj_hidden_dim: int = 2048
    proj_dim: int = 2048
    pred_hidden_dim: int = 512
    stop_gradient: bool = True


def _neg_cosine(p: torch.Tensor, z: torch.Tensor, stop_gradient: bool) -> torch.Tensor:
    """``D(p, z) = -cos(p, z)`` averaged over the batch; ``z`` detached under stop-gradient."""
    z = z.detach() if stop_gradient else z
    return -F.cosine_similarity(p.float(), z.float(), dim=-1).mean()


@register("simsiam")
class SimSiam(Method):
    paper = "Chen & He 2021, Exploring Simple Siamese Representation Learning (SimSiam)"
    Config = SimSiamConfig
    exact_accumulation = True
    accumulation_note = "per-pair cosine loss with a stop-gradient"

    def __init__(self, backbone, cfg: SimSiamConfig, views):
        super().__init__(backbone, cfg, views)
        self.encoder = nn.Sequential(
            backbone, mlp(backbone.num_features, cfg.proj_hidden_dim, cfg.proj_dim, 3, last_bn=True))
        self.predictor = mlp(cfg.proj_dim, cfg.pred_hidden_dim, cfg.proj_dim, 2)

    def training_step(self, views, info):
        x1, x2 = views[:2]
        z1, z2 = self.encoder(x1), self.encoder(x2)
        p1, p2 = self.predictor(z1), self.predictor(z2)
        sg = self.cfg.stop_gradient
        loss = 0.5 * (_neg_cosine(p1, z2, sg) + _neg_cosine(p2, z1, sg))
        with torch.no_grad():  # the paper's collapse indicator: std of the l2-normalised output
            z_std = F.normalize(z1.float(), dim=1).std(0).mean()
        return {"loss": loss, "z_std": z_std}

    def monitor_features(self, x: torch.Tensor) -> torch.Tensor:
        """The prediction ``p = h(f(x))`` that the loss pulls onto the other view's projection,
        watched by the collapse monitor beside the backbone's features. Without
        stop-gradient it degenerates first (the paper's Fig. 2), long before the backbone;
        unlike ``z`` it has no output BatchNorm to keep its batch statistics up."""
        return self.predictor(self.encoder(x))
