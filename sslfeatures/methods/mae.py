"""MAE — He et al. 2021, "Masked Autoencoders Are Scalable Vision Learners". A ViT encoder
sees only a random 25% of the patches; a light transformer decoder re-inserts mask
tokens, un-shuffles, and predicts the pixels of the masked patches (per-patch normalised
targets); the loss is MSE on masked patches only.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import Block

from ..augment import random_patch_mask
from ..losses import masked_mse
from .base import Method, MethodConfig, register


def sincos_2d(dim: int, grid: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embedding (grid*grid, dim), as in MAE's decoder."""
    if dim % 4:
        raise ValueError("sin-cos position embedding needs a dim divisible by 4")
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float32),
                            torch.arange(grid, dtype=torch.float32), indexing="ij")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float32) / (dim / 4))
    out = [torch.sin(xs.reshape(-1, 1) * omega), torch.cos(xs.reshape(-1, 1) * omega),
           torch.sin(ys.reshape(-1, 1) * omega), torch.cos(ys.reshape(-1, 1) * omega)]
    return torch.cat(out, 1)


def patchify(imgs: torch.Tensor, p: int) -> torch.Tensor:
    b, c, h, w = imgs.shape
    x = imgs.reshape(b, c, h // p, p, w // p, p)
    return torch.einsum("bchpwq->bhwpqc", x).reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(x: torch.Tensor, p: int, c: int = 3) -> torch.Tensor:
    b, n, _ = x.shape
    g = int(n ** 0.5)
    x = x.reshape(b, g, g, p, p, c)
    return torch.einsum("bhwpqc->bchpwq", x).reshape(b, c, g * p, g * p)


@dataclass
class MAEConfig(MethodConfig):
    mask_ratio: float = 0.75
    decoder_dim: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16
    norm_pix_loss: bool = True


@register("mae")
class MAE(Method):
    paper = "He et al. 2021, Masked Autoencoders Are Scalable Vision Learners (MAE)"
    Config = MAEConfig
    exact_accumulation = True
    accumulation_note = "per-image masked MSE, the same number of masked patches in every image"

    def __init__(self, backbone, cfg: MAEConfig, views):
        super().__init__(backbone, cfg, views)
        vit = backbone.model
        if not hasattr(vit, "patch_embed") or not hasattr(vit, "blocks"):
            raise ValueError(f"MAE needs a ViT backbone (e.g. vit_small_patch16_224), got {backbone.name!r}")
        self.p = backbone.patch_size
        dim = backbone.num_features
        self.decoder_embed = nn.Linear(dim, cfg.decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.decoder_dim))
        nn.init.normal_(self.mask_token, std=0.02)
        self.decoder_blocks = nn.ModuleList(
            [Block(cfg.decoder_dim, cfg.decoder_heads, mlp_ratio=4.0, qkv_bias=True) for _ in range(cfg.decoder_depth)])
        self.decoder_norm = nn.LayerNorm(cfg.decoder_dim)
        self.decoder_pred = nn.Linear(cfg.decoder_dim, self.p * self.p * 3)
        self.decoder_prefix = backbone.num_prefix_tokens

    def _patch_pos(self, grid: tuple[int, int]) -> torch.Tensor:
        vit = self.backbone.model
        pos = vit.pos_embed
        n_pre = 0 if getattr(vit, "no_embed_class", False) else vit.num_prefix_tokens
        patch_pos = pos[:, n_pre:]
        old = int(patch_pos.shape[1] ** 0.5)
        if (old, old) != grid:
            patch_pos = resample_abs_pos_embed(patch_pos, list(grid), num_prefix_tokens=0)
        prefix_pos = pos[:, :n_pre]
        return patch_pos, prefix_pos

    def encode(self, imgs: torch.Tensor, mask_ratio: float):
        vit = self.backbone.model
        x = vit.patch_embed(imgs)
        if x.ndim == 4:  # NHWC with dynamic image size
            grid = (x.shape[1], x.shape[2])
            x = x.flatten(1, 2)
        else:
            g = int(x.shape[1] ** 0.5)
            grid = (g, g)
        patch_pos, prefix_pos = self._patch_pos(grid)
        x = x + patch_pos
        keep_idx, mask, restore = random_patch_mask(x.shape[0], x.shape[1], mask_ratio, x.device)
        x = torch.gather(x, 1, keep_idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        prefix = []
        if getattr(vit, "cls_token", None) is not None:
            cls = vit.cls_token
            if prefix_pos.shape[1]:
                cls = cls + prefix_pos[:, :1]
            prefix.append(cls.expand(x.shape[0], -1, -1))
        if getattr(vit, "reg_token", None) is not None:
            prefix.append(vit.reg_token.expand(x.shape[0], -1, -1))
        x = torch.cat(prefix + [x], 1)
        for blk in vit.blocks:
            x = blk(x)
        return vit.norm(x), mask, restore, grid

    def decode(self, x: torch.Tensor, restore: torch.Tensor, grid) -> torch.Tensor:
        x = self.decoder_embed(x)
        n_pre = self.decoder_prefix
        prefix, vis = x[:, :n_pre], x[:, n_pre:]
        n = restore.shape[1]
        masks = self.mask_token.to(x.dtype).expand(x.shape[0], n - vis.shape[1], -1)
        full = torch.cat([vis, masks], 1)
        full = torch.gather(full, 1, restore.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        pos = sincos_2d(x.shape[-1], grid[0]).to(x.device, x.dtype) if grid[0] == grid[1] else 0
        x = torch.cat([prefix, full + pos], 1)
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, n_pre:]

    def forward_loss(self, imgs: torch.Tensor):
        latent, mask, restore, grid = self.encode(imgs, self.cfg.mask_ratio)
        pred = self.decode(latent, restore, grid)
        return masked_mse(pred, patchify(imgs, self.p), mask, self.cfg.norm_pix_loss), pred, mask

    def training_step(self, views, info):
        loss, _, _ = self.forward_loss(views[0])
        return {"loss": loss}
