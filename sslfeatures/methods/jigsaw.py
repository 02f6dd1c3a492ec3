"""Jigsaw puzzles — Noroozi & Favaro 2016, "Unsupervised Learning of Visual
Representations by Solving Jigsaw Puzzles".

Each image is cut into a 3x3 grid of cells and a random tile is taken inside every cell
(64 px tiles in 75 px cells in the paper, so tiles do not share edges); the tiles are
shuffled by one permutation from a fixed set chosen for maximal Hamming distance, and
the network classifies which permutation was used. Every tile goes through the same
trunk (shared weights, the "context-free network") and a per-tile ``fc6``; the nine
``fc6`` outputs are concatenated and classified by ``fc7``-``fc8``. Each tile is
normalised by its own mean and std, so tiles cannot be matched by low-level statistics.

The permutation set is generated once by the paper's greedy algorithm
(:func:`~sslfeatures.augment.pretext.maximal_hamming_permutations`) with a fixed seed
and shipped with the recipes (``recipes/jigsaw_permutations_<N>.json``); a set that is
not shipped is generated the same way. The trunk is what transfers.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..augment.pretext import (crop_tiles, grid_positions, load_permutations, maximal_hamming_permutations,
                               normalize_tiles, permute_tiles, resize_tiles_for_trunk)
from ..heads import mlp
from .base import Method, MethodConfig, StepInfo, register

log = logging.getLogger("sslfeatures")

GRID = 3


@dataclass
class JigsawConfig(MethodConfig):
    num_permutations: int = 1000
    permutations_file: str | None = None   # default: recipes/jigsaw_permutations_<N>.json, generated if absent
    permutation_seed: int = 0              # seed of the greedy algorithm when a set must be generated
    tile_ratio: float = 0.853              # tile side / cell side (64 / 75)
    tile_resize: int | None = None         # resize tiles to this many pixels before the trunk (ViTs: to whole patches)
    tile_norm: bool = True                 # per-tile mean/std normalisation
    tile_dim: int = 512                    # per-tile fc6
    head_hidden_dim: int = 4096            # fc7


def recipes_dir() -> Path:
    """The folder of the shipped recipes (and permutation sets)."""
    from ..engine.config import recipe_path

    return recipe_path("jigsaw").parent


def permutations_path(num_permutations: int) -> Path:
    """Where the shipped set of ``num_permutations`` permutations lives."""
    return recipes_dir() / f"jigsaw_permutations_{num_permutations}.json"


def resolve_permutations(cfg: JigsawConfig) -> torch.Tensor:
    """The permutation set of ``cfg`` as a (N, 9) long tensor: the given file, else the
    shipped file for N, else generated (seeded, deterministic)."""
    if cfg.permutations_file:
        path = Path(cfg.permutations_file)
        if not path.is_absolute() and not path.exists():
            path = recipes_dir() / path
        if not path.exists():
            raise FileNotFoundError(f"permutations_file {cfg.permutations_file!r} not found "
                                    f"(also looked in {path.parent})")
        perms = load_permutations(path)
    else:
        path = permutations_path(cfg.num_permutations)
        if path.exists():
            perms = load_permutations(path)
        else:
            log.info("generating %d jigsaw permutations (seed %d)", cfg.num_permutations, cfg.permutation_seed)
            perms = maximal_hamming_permutations(cfg.num_permutations, GRID * GRID, cfg.permutation_seed)
    if perms.shape != (cfg.num_permutations, GRID * GRID):
        raise ValueError(f"the permutation set {path} holds {perms.shape[0]} permutations of {perms.shape[1]} tiles; "
                         f"expected num_permutations={cfg.num_permutations} of {GRID * GRID}")
    return torch.as_tensor(perms, dtype=torch.long)


@register("jigsaw")
class Jigsaw(Method):
    paper = "Noroozi & Favaro 2016, Unsupervised Learning of Visual Representations by Solving Jigsaw Puzzles"
    Config = JigsawConfig
    exact_accumulation = True
    accumulation_note = "per-puzzle cross-entropy"

    def __init__(self, backbone, cfg: JigsawConfig, views):
        super().__init__(backbone, cfg, views)
        if not 0 < cfg.tile_ratio <= 1:
            raise ValueError(f"tile_ratio must be in (0, 1], got {cfg.tile_ratio}")
        self.register_buffer("permutations", resolve_permutations(cfg))
        self.fc6 = nn.Sequential(nn.Linear(backbone.num_features, cfg.tile_dim), nn.ReLU(inplace=True))
        self.classifier = mlp(GRID * GRID * cfg.tile_dim, cfg.head_hidden_dim, cfg.num_permutations, 2)

    def make_puzzle(self, views: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Cut and shuffle: ``(shuffled (B, 9, C, t, t), labels (B,), tiles (B, 9, C, t, t))``.

        ``shuffled[b, i] = tiles[b, permutations[labels[b], i]]``: position ``i`` of the
        puzzle shows tile ``permutations[label][i]`` of the original row-major grid.
        """
        b, _, h, w = views.shape
        size = min(h, w)
        cell = size // GRID
        tile = max(1, int(round(cell * self.cfg.tile_ratio)))
        tops, lefts = grid_positions(b, size, GRID, cell, tile, device=views.device)
        tiles = crop_tiles(views, tops, lefts, tile)
        labels = torch.randint(0, self.permutations.shape[0], (b,)).to(views.device)
        return permute_tiles(tiles, self.permutations[labels]), labels, tiles

    def logits(self, puzzles: torch.Tensor) -> torch.Tensor:
        """Permutation logits (B, N) of shuffled tiles (B, 9, C, t, t)."""
        b, t = puzzles.shape[:2]
        x = normalize_tiles(puzzles) if self.cfg.tile_norm else puzzles
        x = resize_tiles_for_trunk(x.flatten(0, 1), self.cfg.tile_resize,
                                   self.backbone.patch_size if self.backbone.is_vit else None)
        if not self.backbone.is_vit:
            x = x.contiguous(memory_format=torch.channels_last)
        feats = self.fc6(self.backbone(x)).view(b, t * self.cfg.tile_dim)
        return self.classifier(feats)

    def training_step(self, views: list[torch.Tensor], info: StepInfo) -> dict[str, torch.Tensor]:
        puzzles, labels, _ = self.make_puzzle(views[0])
        logits = self.logits(puzzles)
        loss = F.cross_entropy(logits.float(), labels)
        return {"loss": loss, "acc": (logits.argmax(1) == labels).float().mean().detach()}
