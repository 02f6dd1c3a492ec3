"""SimCLR — Chen et al. 2020, "A Simple Framework for Contrastive Learning of Visual
Representations". Two augmented views per image, an MLP projection head, and the
NT-Xent loss with the other 2N-2 views of the batch as negatives.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..heads import mlp
from ..losses import nt_xent
from .base import Method, MethodConfig, register


@dataclass
class SimCLRConfig(MethodConfig):
    temperature: float = 0.1
    proj_hidden_dim: int = 2048
    proj_dim: int = 128
    proj_layers: int = 2


@register("simclr")
class SimCLR(Method):
    paper = "Chen et al. 2020, A Simple Framework for Contrastive Learning (SimCLR)"
    Config = SimCLRConfig
    exact_accumulation = False
    accumulation_note = "in-batch negatives: each micro-batch contrasts only with its own (global) micro-batch"

    def __init__(self, backbone, cfg: SimCLRConfig, views):
        super().__init__(backbone, cfg, views)
        self.projector = mlp(backbone.num_features, cfg.proj_hidden_dim, cfg.proj_dim, cfg.proj_layers)

    def training_step(self, views, info):
        x1, x2 = views
        z1 = self.projector(self.backbone(x1))
        z2 = self.projector(self.backbone(x2))
        return {"loss": nt_xent(z1, z2, self.cfg.temperature)}
