"""Relative patch location — Doersch, Gupta & Efros 2015, "Unsupervised Visual
Representation Learning by Context Prediction".

A 3x3 grid of patches is cut from each image with gaps between the patches (half a
patch side, 48 px for 96 px patches in the paper) and a random jitter of each patch (up
to 7 px for 96 px); the centre patch and one of its eight neighbours go through the same
trunk (shared weights), their features are concatenated, and a classifier predicts
which of the eight positions the neighbour came from. Against the chromatic-aberration
shortcut (the lens shifts colour channels with the position in the frame), each patch's
green-magenta component is projected out ("projection", the default) or two of its
three channels are replaced by noise ("color_drop"). The trunk is what transfers.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..augment.ops import normalize
from ..augment.pretext import (color_drop, crop_tiles, denormalize, grid_positions, project_out_green_magenta,
                               resize_tiles_for_trunk)
from ..heads import mlp
from .base import Method, MethodConfig, StepInfo, register

ABERRATION_GUARDS = ("projection", "color_drop", "none")
#: grid index (row-major, 0..8) of the neighbour for each class label 0..7; 4 is the centre
NEIGHBOURS = (0, 1, 2, 3, 5, 6, 7, 8)


@dataclass
class RelativeLocationConfig(MethodConfig):
    gap_ratio: float = 0.5            # gap between neighbouring patches / patch side (48 / 96)
    jitter_ratio: float = 0.073       # max jitter of a patch / patch side (7 / 96)
    patch_resize: int | None = None   # resize patches to this many pixels before the trunk (ViTs: to whole patches)
    aberration: str = "projection"    # projection | color_drop | none
    pairs_per_image: int = 1          # neighbours classified per image (1..8); the paper samples one
    head_hidden_dim: int = 4096       # fc7 of the paper's pair classifier
    head_layers: int = 2


def patch_geometry(image_size: int, gap_ratio: float, jitter_ratio: float) -> tuple[int, int, int]:
    """``(patch, cell, jitter)`` in pixels for a 3x3 grid in an ``image_size`` image: the
    largest patch whose grid (cells of patch + gap) fits, and the jitter it allows."""
    patch = int(image_size // (3 * (1 + gap_ratio)))
    if patch < 2:
        raise ValueError(f"a {image_size}px image is too small for a 3x3 patch grid with gap_ratio={gap_ratio}; "
                         "use larger views (e.g. views=[{'size': 64}])")
    gap = max(0, int(round(gap_ratio * patch)))
    jitter = min(int(round(jitter_ratio * patch)), gap // 2)
    return patch, patch + gap, jitter


def sample_pairs(views: torch.Tensor, pairs_per_image: int, gap_ratio: float, jitter_ratio: float
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cut the 3x3 grid and pick neighbours: ``(centre (B, C, p, p), neighbours (B, k, C, p, p),
    labels (B, k))`` where label ``l`` means grid cell ``NEIGHBOURS[l]``."""
    b, _, h, w = views.shape
    patch, cell, jitter = patch_geometry(min(h, w), gap_ratio, jitter_ratio)
    tops, lefts = grid_positions(b, min(h, w), 3, cell, patch, jitter=jitter, device=views.device)
    tiles = crop_tiles(views, tops, lefts, patch)                                    # (B, 9, C, p, p)
    labels = torch.argsort(torch.rand(b, 8), dim=1)[:, :pairs_per_image].to(views.device)  # distinct per image
    cells = torch.tensor(NEIGHBOURS, device=views.device)[labels]
    idx = cells.view(b, -1, 1, 1, 1).expand(-1, -1, *tiles.shape[2:])
    return tiles[:, 4], torch.gather(tiles, 1, idx), labels


@register("relative_location")
class RelativeLocation(Method):
    paper = "Doersch et al. 2015, Unsupervised Visual Representation Learning by Context Prediction"
    Config = RelativeLocationConfig
    exact_accumulation = True
    accumulation_note = "per-pair cross-entropy, the same number of pairs per image"

    def __init__(self, backbone, cfg: RelativeLocationConfig, views):
        super().__init__(backbone, cfg, views)
        if cfg.aberration not in ABERRATION_GUARDS:
            raise ValueError(f"aberration must be one of {ABERRATION_GUARDS}, got {cfg.aberration!r}")
        if not 1 <= cfg.pairs_per_image <= 8:
            raise ValueError(f"pairs_per_image must be in 1..8, got {cfg.pairs_per_image}")
        if cfg.gap_ratio < 0 or cfg.jitter_ratio < 0:
            raise ValueError("gap_ratio and jitter_ratio must be >= 0")
        self.classifier = mlp(2 * backbone.num_features, cfg.head_hidden_dim, 8, cfg.head_layers)

    def _guard(self, patches: torch.Tensor) -> torch.Tensor:
        """Chromatic-aberration guard on normalised patches (N, 3, p, p)."""
        if self.cfg.aberration == "none":
            return patches
        mean, std = self.views.mean, self.views.std
        rgb = denormalize(patches, mean, std)
        rgb = project_out_green_magenta(rgb) if self.cfg.aberration == "projection" else color_drop(rgb)
        return normalize(rgb, mean, std)

    def _embed(self, patches: torch.Tensor) -> torch.Tensor:
        patches = resize_tiles_for_trunk(self._guard(patches), self.cfg.patch_resize,
                                         self.backbone.patch_size if self.backbone.is_vit else None)
        if not self.backbone.is_vit:
            patches = patches.contiguous(memory_format=torch.channels_last)
        return self.backbone(patches)

    def logits(self, centre: torch.Tensor, neighbours: torch.Tensor) -> torch.Tensor:
        """Position logits (B * k, 8) for centre patches (B, C, p, p) and neighbours (B, k, C, p, p)."""
        b, k = neighbours.shape[:2]
        feats = self._embed(torch.cat([centre, neighbours.flatten(0, 1)]))
        fc, fn = feats[:b], feats[b:]
        pair = torch.cat([fc.repeat_interleave(k, 0), fn], 1)
        return self.classifier(pair)

    def training_step(self, views: list[torch.Tensor], info: StepInfo) -> dict[str, torch.Tensor]:
        centre, neighbours, labels = sample_pairs(views[0], self.cfg.pairs_per_image, self.cfg.gap_ratio,
                                                  self.cfg.jitter_ratio)
        logits = self.logits(centre, neighbours)
        labels = labels.reshape(-1)
        loss = F.cross_entropy(logits.float(), labels)
        return {"loss": loss, "acc": (logits.argmax(1) == labels).float().mean().detach()}
