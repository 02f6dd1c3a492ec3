"""RotNet — Gidaris, Singh & Komodakis 2018, "Unsupervised Representation Learning by
Predicting Image Rotations". Every image of the batch is shown at 0, 90, 180 and 270
degrees (all four rotations in the same batch, as in the paper) and a classifier on the
trunk's pooled features predicts which rotation was applied (4-way cross-entropy). The
trunk is what transfers; the classifier is dropped.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..augment.pretext import four_rotations
from ..heads import mlp
from .base import Method, MethodConfig, StepInfo, register


@dataclass
class RotationConfig(MethodConfig):
    head_hidden_dim: int = 0      # 0: a linear classifier; > 0: Linear-BN-ReLU-Linear
    head_layers: int = 2          # layers of the MLP head when head_hidden_dim > 0


@register("rotation")
class Rotation(Method):
    paper = "Gidaris et al. 2018, Unsupervised Representation Learning by Predicting Image Rotations (RotNet)"
    Config = RotationConfig
    exact_accumulation = True
    accumulation_note = "per-image cross-entropy over the four rotations"

    def __init__(self, backbone, cfg: RotationConfig, views):
        super().__init__(backbone, cfg, views)
        if cfg.head_hidden_dim < 0:
            raise ValueError(f"head_hidden_dim must be >= 0, got {cfg.head_hidden_dim}")
        layers = cfg.head_layers if cfg.head_hidden_dim > 0 else 1
        self.classifier = mlp(backbone.num_features, max(cfg.head_hidden_dim, 1), 4, layers)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Rotation logits (B, 4) of a normalised batch."""
        return self.classifier(self.backbone(x))

    def training_step(self, views: list[torch.Tensor], info: StepInfo) -> dict[str, torch.Tensor]:
        imgs, labels = four_rotations(views[0])
        logits = self.logits(imgs)
        loss = F.cross_entropy(logits.float(), labels)
        acc = (logits.argmax(1) == labels).float().mean()
        return {"loss": loss, "acc": acc.detach()}
