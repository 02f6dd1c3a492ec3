"""Colorization — Zhang, Isola & Efros 2016, "Colorful Image Colorization".

The trunk sees only the lightness channel L of each image (CIE Lab) and predicts its
colours ab. By default (the paper's loss) ab is quantised into the in-gamut bins of a
grid of spacing 10 (:func:`~sslfeatures.augment.pretext.ab_gamut_bins`), each pixel's
target is soft-encoded on its 5 nearest bins (Gaussian, sigma 5), and the loss is a
per-pixel cross-entropy weighted by class rebalancing: ``w ∝ ((1 - lambda) p~ + lambda / Q)^-1``
with ``lambda = 0.5`` and ``p~`` the empirical bin distribution smoothed with sigma 5.
The empirical distribution is accumulated over the training batches (the paper used
ImageNet's), as a running mean that the checkpoints keep. ``loss="regression"`` is the
L2-on-ab baseline. Predictions are made at 1/4 of the input resolution, as in the paper,
from the trunk's last feature map; :meth:`Colorization.colorize` decodes them with the
annealed mean (T = 0.38). The trunk (an L-input network) is what transfers: its Encoder
takes RGB images and converts them to L itself.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..augment.pretext import (ab_gamut_bins, annealed_mean, denormalize, hard_ab_bins, lab_to_rgb, rebalance_weights,
                               rgb_to_lab, soft_encode_ab)
from ..backbones.lab import LabBackbone
from ..losses import soft_cross_entropy
from .base import Method, MethodConfig, StepInfo, register

LOSSES = ("classification", "regression")


@dataclass
class ColorizationConfig(MethodConfig):
    loss: str = "classification"     # classification (quantised ab, the paper) | regression (L2 on ab)
    ab_grid: float = 10.0            # spacing of the ab quantisation grid
    soft_neighbours: int = 5         # soft encoding: nearest bins per pixel
    soft_sigma: float = 5.0          # soft encoding: Gaussian sigma (ab units)
    rebalance_lambda: float = 0.5    # class rebalancing mix with the uniform distribution (0 = full rebalancing)
    rebalance_sigma: float = 5.0     # smoothing of the empirical distribution (ab units)
    rebalance: bool = True
    prior_window: int = 1000         # the empirical prior is a running mean over up to this many batches
    target_stride: int = 4           # predict ab at 1/target_stride of the input resolution
    head_dim: int = 256              # channels of the prediction head's hidden conv
    temperature: float = 0.38        # annealed-mean temperature used by colorize()


class ABHead(nn.Module):
    """From a feature map to per-pixel predictions (bins or ab) at ``out_size``."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(in_dim, hidden, 3, padding=1, bias=False), nn.BatchNorm2d(hidden),
                                 nn.ReLU(inplace=True), nn.Conv2d(hidden, out_dim, 1))

    def forward(self, fmap: torch.Tensor, out_size: int) -> torch.Tensor:
        y = self.net(fmap)
        return F.interpolate(y, size=out_size, mode="bilinear", align_corners=False)


def feature_map(backbone, feats: torch.Tensor) -> torch.Tensor:
    """Spatial features (B, D, h, w) from CNN maps or ViT tokens."""
    if feats.ndim == 4:
        return feats
    tokens = backbone.tokens_from_features(feats)
    g = int(round(tokens.shape[1] ** 0.5))
    return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, g, g)


class ABTargets(nn.Module):
    """Zhang et al.'s ab targets: soft-encoded bins, and class-rebalancing weights from a
    running empirical prior (kept in the state dict, so checkpoints resume it)."""

    def __init__(self, grid: float, neighbours: int, sigma: float, lam: float, prior_sigma: float, window: int):
        super().__init__()
        self.register_buffer("bins", ab_gamut_bins(grid))
        q = self.bins.shape[0]
        self.register_buffer("prior", torch.full((q,), 1.0 / q))
        self.register_buffer("batches_seen", torch.zeros((), dtype=torch.long))
        self.neighbours, self.sigma, self.lam = neighbours, sigma, lam
        self.prior_sigma, self.window = prior_sigma, window

    @property
    def num_bins(self) -> int:
        return self.bins.shape[0]

    def encode(self, ab: torch.Tensor) -> torch.Tensor:
        return soft_encode_ab(ab, self.bins, self.neighbours, self.sigma)

    def nearest(self, ab: torch.Tensor) -> torch.Tensor:
        """Each pixel's nearest bin (B, H, W)."""
        return hard_ab_bins(ab, self.bins)

    @torch.no_grad()
    def update_prior(self, nearest: torch.Tensor) -> None:
        """Fold a batch's bin histogram (``nearest``: bin indices) into the running prior."""
        hist = torch.bincount(nearest.flatten(), minlength=self.num_bins).float()
        hist = hist / hist.sum().clamp(min=1)
        n = int(self.batches_seen.clamp(max=self.window - 1))
        self.prior.mul_(n / (n + 1)).add_(hist / (n + 1))
        self.batches_seen += 1

    def pixel_weights(self, nearest: torch.Tensor) -> torch.Tensor:
        """Rebalancing weight of each pixel's nearest bin (``nearest``: (B, H, W) indices)."""
        w = rebalance_weights(self.prior, self.bins, self.lam, self.prior_sigma)
        return w[nearest]


@register("colorization")
class Colorization(Method):
    paper = "Zhang et al. 2016, Colorful Image Colorization"
    Config = ColorizationConfig
    exact_accumulation = False
    accumulation_note = "the class-rebalancing prior is updated from every micro-batch"

    def __init__(self, backbone, cfg: ColorizationConfig, views):
        if cfg.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {cfg.loss!r}")
        if cfg.target_stride < 1:
            raise ValueError(f"target_stride must be >= 1, got {cfg.target_stride}")
        trunk = LabBackbone.from_backbone(backbone, "L", views.mean, views.std)
        super().__init__(trunk, cfg, views)
        self.targets = ABTargets(cfg.ab_grid, cfg.soft_neighbours, cfg.soft_sigma, cfg.rebalance_lambda,
                                 cfg.rebalance_sigma, cfg.prior_window)
        out = self.targets.num_bins if cfg.loss == "classification" else 2
        self.head = ABHead(trunk.num_features, cfg.head_dim, out)

    def predict(self, lab: torch.Tensor) -> torch.Tensor:
        """Per-pixel outputs at 1/target_stride resolution: bin logits (B, Q, h, w) or ab/110 (B, 2, h, w)."""
        fmap = feature_map(self.backbone, self.backbone.features_from_lab(lab))
        return self.head(fmap, max(1, lab.shape[-1] // self.cfg.target_stride))

    def training_step(self, views: list[torch.Tensor], info: StepInfo) -> dict[str, torch.Tensor]:
        lab = rgb_to_lab(denormalize(views[0].float(), self.views.mean, self.views.std))
        out = self.predict(lab)
        ab = F.adaptive_avg_pool2d(lab[:, 1:], out.shape[-2:])
        if self.cfg.loss == "regression":
            return {"loss": F.mse_loss(out.float(), ab / 110.0)}
        weights = None
        if self.cfg.rebalance:
            nearest = self.targets.nearest(ab)
            if self.training:
                self.targets.update_prior(nearest)
            weights = self.targets.pixel_weights(nearest)
        loss = soft_cross_entropy(out, self.targets.encode(ab), weights)
        return {"loss": loss}

    @torch.no_grad()
    def colorize(self, rgb: torch.Tensor) -> torch.Tensor:
        """Colorize RGB images in [0, 1] (B, 3, H, W) from their lightness alone: the
        predicted ab (annealed mean, or the regression output) upsampled and combined
        with the input's L. Returns RGB in [0, 1]."""
        lab = rgb_to_lab(rgb.float())
        out = self.predict(lab).float()
        ab = annealed_mean(out, self.targets.bins, self.cfg.temperature) if self.cfg.loss == "classification" \
            else out * 110.0
        ab = F.interpolate(ab, size=lab.shape[-2:], mode="bilinear", align_corners=False)
        return lab_to_rgb(torch.cat([lab[:, :1], ab], 1))
