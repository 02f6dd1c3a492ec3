"""Split-brain autoencoder — Zhang, Isola & Efros 2017, "Split-Brain Autoencoders:
Unsupervised Learning by Cross-Channel Prediction".

The network is split into two disjoint trunks: one sees the lightness L of an image (CIE
Lab) and predicts its colours ab, the other sees ab and predicts L. Both predictions are
classification, as in the paper: ab into the in-gamut bins of a grid of spacing 10
(soft-encoded targets, as for colorization), L into ``l_bins`` uniform bins.
``loss="regression"`` uses L2 for both instead. The transferred representation is the
concatenation of both trunks' features: the Encoder that comes out holds the two trunks
(:class:`~sslfeatures.backbones.lab.SplitBrainBackbone`), takes RGB images, and returns
``[features(L), features(ab)]``.

Each trunk is the named architecture (the paper halves AlexNet's width so that the pair
has one AlexNet's size; for a ResNet pass e.g. ``backbone_kwargs={"channels": [32, 64, 128, 256]}``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..augment.pretext import ab_gamut_bins, denormalize, quantize_uniform, rgb_to_lab, soft_encode_ab
from ..backbones.lab import SplitBrainBackbone
from ..losses import soft_cross_entropy
from .base import Method, MethodConfig, StepInfo, register
from .colorization import ABHead, feature_map

LOSSES = ("classification", "regression")


@dataclass
class SplitBrainConfig(MethodConfig):
    loss: str = "classification"   # classification (the paper) | regression (L2)
    ab_grid: float = 10.0          # ab quantisation grid (in-gamut bins)
    soft_neighbours: int = 5
    soft_sigma: float = 5.0
    l_bins: int = 50               # L quantisation (uniform bins over [0, 100])
    target_stride: int = 4         # predict at 1/target_stride of the input resolution
    head_dim: int = 256


@register("split_brain")
class SplitBrain(Method):
    paper = "Zhang et al. 2017, Split-Brain Autoencoders: Unsupervised Learning by Cross-Channel Prediction"
    Config = SplitBrainConfig
    exact_accumulation = True
    accumulation_note = "per-pixel losses, the same number of pixels per image"

    def __init__(self, backbone, cfg: SplitBrainConfig, views):
        if cfg.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {cfg.loss!r}")
        if cfg.l_bins < 2:
            raise ValueError(f"l_bins must be >= 2, got {cfg.l_bins}")
        trunks = SplitBrainBackbone.from_backbone(backbone, views.mean, views.std)
        super().__init__(trunks, cfg, views)
        self.register_buffer("bins", ab_gamut_bins(cfg.ab_grid))
        cls = cfg.loss == "classification"
        l_trunk, ab_trunk = trunks.halves
        self.head_l_to_ab = ABHead(l_trunk.num_features, cfg.head_dim, self.bins.shape[0] if cls else 2)
        self.head_ab_to_l = ABHead(ab_trunk.num_features, cfg.head_dim, cfg.l_bins if cls else 1)

    def predict(self, lab: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ab predicted from L, L predicted from ab)`` at 1/target_stride resolution."""
        size = max(1, lab.shape[-1] // self.cfg.target_stride)
        l_trunk, ab_trunk = self.backbone.halves
        from_l = self.head_l_to_ab(feature_map(l_trunk, l_trunk.features_from_lab(lab)), size)
        from_ab = self.head_ab_to_l(feature_map(ab_trunk, ab_trunk.features_from_lab(lab)), size)
        return from_l, from_ab

    def training_step(self, views: list[torch.Tensor], info: StepInfo) -> dict[str, torch.Tensor]:
        lab = rgb_to_lab(denormalize(views[0].float(), self.views.mean, self.views.std))
        pred_ab, pred_l = self.predict(lab)
        small = F.adaptive_avg_pool2d(lab, pred_ab.shape[-2:])
        if self.cfg.loss == "regression":
            loss_ab = F.mse_loss(pred_ab.float(), small[:, 1:] / 110.0)
            loss_l = F.mse_loss(pred_l.float(), small[:, :1] / 50.0 - 1.0)
        else:
            loss_ab = soft_cross_entropy(pred_ab, soft_encode_ab(small[:, 1:], self.bins, self.cfg.soft_neighbours,
                                                                 self.cfg.soft_sigma))
            loss_l = F.cross_entropy(pred_l.float(), quantize_uniform(small[:, 0], 0.0, 100.0, self.cfg.l_bins))
        return {"loss": loss_ab + loss_l, "loss_l_to_ab": loss_ab.detach(), "loss_ab_to_l": loss_l.detach()}
