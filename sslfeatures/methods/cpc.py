"""CPC v2 — Hénaff et al. 2019, "Data-Efficient Image Recognition with Contrastive
Predictive Coding" (after van den Oord et al. 2018, "Representation Learning with
Contrastive Predictive Coding").

Each view is cut into a ``grid_size`` x ``grid_size`` grid of overlapping patches (7 x 7
with 50% overlap in the paper); every patch gets its own augmentation (horizontal flip and
colour dropping, the paper's patch-based augmentation) and is encoded *separately* by the
backbone into one vector ``z[i, j]``. An autoregressive context network summarises, for
every location, the rows above and including its own: ``"conv"`` is the paper's
PixelCNN-style stack (1x1, 1x3 within the row, 2x1 over the previous and current row, 1x1,
residual), ``"gru"`` runs a GRU down the rows. From the
context ``c[i, j]`` a linear map ``W_k`` per row offset ``k`` predicts the (projected)
encoding of the patch ``k`` rows below, ``z[i + k, j]``, and the InfoNCE loss asks each
prediction to pick its patch among all patches of the batch (other locations of the same
image and of other images). With ``directions`` 2 or 4 the same is done on the grid turned
upside down (CPC v2 predicts from both directions) and sideways (left-right, right-left),
each direction with its own context network and ``W_k``.

Encoder. The run's :class:`~sslfeatures.Encoder` is the patch encoder (the backbone
trunk). Applied to a whole image it returns the backbone's pooled feature map, which for
a CNN trunk is the mean of its local (patch-level) features over the whole image:
densely pooled patch features, the fully-convolutional form of the paper's mean over the
patch grid. ``Encoder.patch_features`` gives the local features themselves, and
:func:`grid_features` the exact patch-grid features used in training (mean-pooled). Use
a normalisation that does not mix patches (the paper replaces batch norm by layer norm):
the recipe builds the ResNet with ``norm_layer: groupnorm1`` (GroupNorm with one group,
i.e. layer norm over each patch's feature map).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..augment import ops
from ..losses import location_info_nce
from .base import Method, MethodConfig, StepInfo, register

CONTEXTS = ("conv", "gru")
_ROTATIONS = (0, 2, 1, 3)  # quarter turns: top-down, bottom-up, then the two horizontal directions


def grid_geometry(image_size: int, grid_size: int, overlap: float) -> tuple[int, int]:
    """``(patch, stride)`` in pixels of a ``grid_size`` x ``grid_size`` grid of square patches
    covering ``image_size`` with neighbouring patches sharing ``overlap`` of their side."""
    if grid_size < 2:
        raise ValueError(f"grid_size must be >= 2, got {grid_size}")
    if not 0 <= overlap < 1:
        raise ValueError(f"patch_overlap must be in [0, 1), got {overlap}")
    patch = int(image_size / (1 + (grid_size - 1) * (1 - overlap)))
    stride = (image_size - patch) // (grid_size - 1)
    if patch < 8 or stride < 1:
        raise ValueError(f"a {grid_size}x{grid_size} grid with overlap {overlap} on {image_size} px images gives "
                         f"{patch} px patches; use a smaller grid_size or larger images (>= 8 px patches)")
    return patch, stride


def extract_patches(x: torch.Tensor, grid_size: int, patch: int, stride: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, grid_size, grid_size, C, patch, patch): row-major patch grid."""
    p = x.unfold(2, patch, stride).unfold(3, patch, stride)[:, :, :grid_size, :grid_size]
    if p.shape[2] < grid_size or p.shape[3] < grid_size:
        raise ValueError(f"a {tuple(x.shape[-2:])} image holds fewer than {grid_size}x{grid_size} "
                         f"{patch} px patches at stride {stride}")
    return p.permute(0, 2, 3, 1, 4, 5)


def offset_pairs(batch: int, rows: int, cols: int, offset: int,
                 device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices into a row-major (batch, rows, cols) grid: every context location
    ``(b, i, j)`` with ``i + offset < rows``, and its target ``(b, i + offset, j)``."""
    if not 0 < offset < rows:
        raise ValueError(f"row offset must be in [1, {rows - 1}] for {rows} rows, got {offset}")
    b, i, j = torch.meshgrid(torch.arange(batch, device=device), torch.arange(rows - offset, device=device),
                             torch.arange(cols, device=device), indexing="ij")
    src = (b * rows + i) * cols + j
    return src.reshape(-1), (src + offset * cols).reshape(-1)


class MaskedConvContext(nn.Module):
    """CPC v2's PixelCNN-style context: residual blocks of 1x1 -> 1x3 (same row) -> 2x1 over
    (previous row, this row) -> 1x1. The output at row ``i`` depends on rows ``<= i`` only."""

    def __init__(self, dim: int, hidden: int = 256, layers: int = 5):
        super().__init__()
        self.out_dim = dim
        self.blocks = nn.ModuleList(nn.Sequential(
            nn.Conv2d(dim, hidden, 1), nn.ReLU(),
            nn.Conv2d(hidden, hidden, (1, 3), padding=(0, 1)),
            nn.ZeroPad2d((0, 0, 1, 0)), nn.Conv2d(hidden, hidden, (2, 1)), nn.ReLU(),
            nn.Conv2d(hidden, dim, 1)) for _ in range(layers))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        c = z
        for blk in self.blocks:
            c = c + blk(c)
        return F.relu(c)


class GRUContext(nn.Module):
    """A GRU down the rows, one sequence per column; each step reads the patch and the mean
    of its row, so the output at ``(i, j)`` summarises rows ``<= i``."""

    def __init__(self, dim: int, hidden: int = 256, layers: int = 1):
        super().__init__()
        self.out_dim = hidden
        self.gru = nn.GRU(2 * dim, hidden, num_layers=layers, batch_first=True)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        b, d, r, c = z.shape
        x = torch.cat([z, z.mean(3, keepdim=True).expand_as(z)], 1)  # (B, 2D, R, C)
        h, _ = self.gru(x.permute(0, 3, 2, 1).reshape(b * c, r, 2 * d))
        return h.reshape(b, c, r, -1).permute(0, 3, 2, 1)


@dataclass
class CPCConfig(MethodConfig):
    grid_size: int = 7               # patches per side
    patch_overlap: float = 0.5       # fraction of a patch's side shared with its neighbour
    context: str = "conv"            # "conv" (PixelCNN-style masked convolutions) or "gru"
    context_layers: int = 5
    context_hidden: int = 256
    target_dim: int = 64             # patch encodings are projected (1x1) to this size
    emb_scale: float = 0.1           # predictions are scaled by this (the paper's code)
    min_offset: int = 3              # predict rows i + k for min_offset <= k <= max_offset
    max_offset: int = 3
    directions: int = 2              # 1: top-down, 2: + bottom-up, 4: + left-right and right-left
    patch_flip_p: float = 0.5        # per-patch horizontal flip
    patch_color_drop_p: float = 0.5  # per-patch colour dropping: keep one random channel, the others at the mean
    patch_jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)
    patch_jitter_p: float = 0.0      # per-patch colour jitter (not in the paper; useful on grayscale data)


@register("cpc")
class CPC(Method):
    paper = "Hénaff et al. 2019, Data-Efficient Image Recognition with Contrastive Predictive Coding (CPC v2)"
    Config = CPCConfig
    exact_accumulation = False
    accumulation_note = "negatives are every patch of the micro-batch"

    def __init__(self, backbone, cfg: CPCConfig, views):
        super().__init__(backbone, cfg, views)
        if cfg.context not in CONTEXTS:
            raise ValueError(f"unknown context {cfg.context!r}; expected one of {CONTEXTS}")
        if cfg.directions not in (1, 2, 4):
            raise ValueError(f"directions must be 1, 2 or 4, got {cfg.directions}")
        if not 1 <= cfg.min_offset <= cfg.max_offset < cfg.grid_size:
            raise ValueError(f"need 1 <= min_offset <= max_offset < grid_size, got {cfg.min_offset}, "
                             f"{cfg.max_offset}, {cfg.grid_size}")
        patch, _ = grid_geometry(int(backbone.config["image_size"]), cfg.grid_size, cfg.patch_overlap)
        if backbone.patch_size and patch % backbone.patch_size:
            raise ValueError(f"{patch} px patches are not a multiple of the ViT's patch_size {backbone.patch_size}; "
                             "change grid_size, patch_overlap, image_size or patch_size")
        dim = backbone.num_features
        self.offsets = list(range(cfg.min_offset, cfg.max_offset + 1))
        self.target_proj = nn.Conv2d(dim, cfg.target_dim, 1)
        self.contexts = nn.ModuleList()
        self.predictors = nn.ModuleList()
        for _ in range(cfg.directions):
            ctx = (MaskedConvContext(dim, cfg.context_hidden, cfg.context_layers) if cfg.context == "conv"
                   else GRUContext(dim, cfg.context_hidden, cfg.context_layers))
            self.contexts.append(ctx)
            self.predictors.append(nn.ModuleList(nn.Conv2d(ctx.out_dim, cfg.target_dim, 1) for _ in self.offsets))

    def _augment_patches(self, p: torch.Tensor) -> torch.Tensor:
        """CPC v2's patch-based augmentation, drawn independently for every patch (normalised
        in, normalised out): horizontal flip, colour dropping, optional colour jitter."""
        cfg = self.cfg
        n, c = p.shape[:2]
        if cfg.patch_jitter_p > 0 and any(cfg.patch_jitter):
            mean, std = p.new_tensor(self.views.mean).view(1, -1, 1, 1), p.new_tensor(self.views.std).view(1, -1, 1, 1)
            x = ops.color_jitter((p * std + mean).clamp(0, 1), *cfg.patch_jitter, p=cfg.patch_jitter_p)
            p = ops.normalize(x, self.views.mean, self.views.std).to(p.dtype)
        if cfg.patch_flip_p > 0:
            flip = (torch.rand(n) < cfg.patch_flip_p).to(p.device).view(-1, 1, 1, 1)
            p = torch.where(flip, p.flip(-1), p)
        if cfg.patch_color_drop_p > 0 and c > 1:
            drop = (torch.rand(n) < cfg.patch_color_drop_p).to(p.device)
            keep = F.one_hot(torch.randint(c, (n,)), c).to(p.device, torch.bool)  # (N, C): the kept channel
            channel_on = keep | ~drop[:, None]
            p = p * channel_on.view(n, c, 1, 1).to(p.dtype)  # 0 = the mean after normalisation
        return p

    def encode_grid(self, x: torch.Tensor, augment: bool = False) -> torch.Tensor:
        """Encode every patch of the grid separately: (B, C, H, W) -> (B, D, G, G)."""
        g = self.cfg.grid_size
        patch, stride = grid_geometry(x.shape[-1], g, self.cfg.patch_overlap)
        p = extract_patches(x, g, patch, stride).reshape(-1, x.shape[1], patch, patch)
        if augment:
            p = self._augment_patches(p)
        z = self.backbone(p.contiguous(memory_format=torch.channels_last) if not self.backbone.is_vit else p)
        return z.reshape(x.shape[0], g, g, -1).permute(0, 3, 1, 2)

    def cpc_loss(self, z: torch.Tensor) -> torch.Tensor:
        """Mean InfoNCE over directions and row offsets for a (B, D, G, G) grid of encodings."""
        b, _, g, _ = z.shape
        targets = self.target_proj(z)
        loss = z.new_zeros((), dtype=torch.float32)
        for ctx_net, preds, turns in zip(self.contexts, self.predictors, _ROTATIONS):
            zr, tr = torch.rot90(z, turns, (2, 3)), torch.rot90(targets, turns, (2, 3))
            ctx = ctx_net(zr)
            bank = tr.permute(0, 2, 3, 1).reshape(b * g * g, -1)  # every patch of the batch, row-major
            for k, w_k in zip(self.offsets, preds):
                pred = (w_k(ctx) * self.cfg.emb_scale).permute(0, 2, 3, 1).reshape(b * g * g, -1)
                src, dst = offset_pairs(b, g, g, k, z.device)
                loss = loss + location_info_nce(pred[src], bank, dst)
        return loss / (len(self.contexts) * len(self.offsets))

    def training_step(self, views: list[torch.Tensor], info: StepInfo) -> dict[str, torch.Tensor]:
        losses = [self.cpc_loss(self.encode_grid(v, augment=True)) for v in views]
        return {"loss": sum(losses) / len(losses)}


@torch.no_grad()
def grid_features(backbone: nn.Module, x: torch.Tensor, grid_size: int = 7, overlap: float = 0.5,
                  pooling: str | None = None) -> torch.Tensor:
    """The paper's image representation: encode each patch of the grid separately and
    mean-pool over the grid. ``backbone``: an :class:`~sslfeatures.Backbone` (e.g.
    ``Encoder.backbone``); ``x``: a normalised (B, C, H, W) batch. Returns (B, D)."""
    patch, stride = grid_geometry(x.shape[-1], grid_size, overlap)
    p = extract_patches(x, grid_size, patch, stride).reshape(-1, x.shape[1], patch, patch)
    z = backbone(p, pooling) if pooling else backbone(p)
    return z.reshape(x.shape[0], grid_size * grid_size, -1).mean(1)
