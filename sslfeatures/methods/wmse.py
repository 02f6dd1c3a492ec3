"""W-MSE — Ermolov, Siarohin, Sangineto, Sebe 2021, "Whitening for Self-Supervised
Representation Learning". Every view goes through the same encoder and a 2-layer
projector to a small embedding (64-128 d); the embeddings of each view are whitened
(Cholesky) within random sub-batches of ``w_size`` images, and the loss is the normalised
MSE between the whitened embeddings of every pair of views of an image, averaged over
``w_iter`` random draws of the sub-batches. No negatives, no momentum encoder.

The sub-batches are cut from the global batch (embeddings gathered with gradients across
processes), so the global batch must be a multiple of ``w_size``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..heads import mlp
from ..losses import wmse_loss
from .base import Method, MethodConfig, register


@dataclass
class WMSEConfig(MethodConfig):
    proj_hidden_dim: int = 1024
    proj_dim: int = 128
    w_size: int = 256
    w_iter: int = 4
    w_eps: float = 0.0


@register("wmse")
class WMSE(Method):
    paper = "Ermolov et al. 2021, Whitening for Self-Supervised Representation Learning (W-MSE)"
    Config = WMSEConfig
    exact_accumulation = False
    accumulation_note = "whitening over sub-batches cut from the micro-batch"

    def __init__(self, backbone, cfg: WMSEConfig, views):
        super().__init__(backbone, cfg, views)
        if cfg.proj_dim >= cfg.w_size:
            raise ValueError(f"W-MSE whitens {cfg.proj_dim}-d embeddings within sub-batches of w_size={cfg.w_size} "
                             "images; w_size must be larger than proj_dim (the paper uses 2x)")
        self.projector = mlp(backbone.num_features, cfg.proj_hidden_dim, cfg.proj_dim)

    def training_step(self, views, info):
        # as the paper's code: the backbone runs per view, the projector on all views at once
        h = self.projector(torch.cat([self.backbone(v) for v in views]))
        loss = wmse_loss(list(h.chunk(len(views))), self.cfg.w_size, self.cfg.w_iter, self.cfg.w_eps)
        return {"loss": loss}
