"""FCMAE — Woo et al. 2023, "ConvNeXt V2: Co-designing and Scaling ConvNets with Masked
Autoencoders". A fully convolutional masked autoencoder: a random 60% of the patches
(one patch = one cell of the encoder's last feature map, 32 px for the standard
ConvNeXt) are masked; the ConvNeXt encoder sees only the visible ones; a light decoder
(1x1 projection, mask tokens, one ConvNeXt V2 block) predicts the pixels of every patch;
the loss is the MSE on the masked patches only (per-patch normalised targets by default).

The paper's sparse convolutions are replaced by *dense masked* ones (its JAX recipe):
masked positions are zeroed before and after every spatial operation (stem, depthwise
convs, downsampling convs) and left out of GRN's global aggregation, which gives the
visible positions exactly the values a sparse encoder would. Works on timm ConvNeXt
backbones (``convnextv2_*``, GRN; ``convnext_*`` too). For small images give the stem a
smaller ``patch_size`` (e.g. ``patch_size=1`` or ``2``); the image size must be a multiple
of the encoder's total stride.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from timm.models.convnext import ConvNeXtBlock

from ..augment import random_patch_mask
from ..backbones import Backbone
from ..layers import ConvNeXtV2Block, global_response_norm
from ..losses import masked_mse
from .base import Method, MethodConfig, register
from .mae import patchify


@dataclass
class FCMAEConfig(MethodConfig):
    mask_ratio: float = 0.6
    decoder_dim: int = 512
    decoder_depth: int = 1
    norm_pix_loss: bool = True


def _resize_mask(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``mask`` ``(B, h, w)`` (1 = masked) repeated to ``like``'s spatial size: ``(B, 1, H, W)``."""
    h, w = mask.shape[-2:]
    H, W = like.shape[-2:]
    if H % h or W % w:
        raise ValueError(f"a {H}x{W} feature map is not a whole multiple of the {h}x{w} mask grid")
    return mask.repeat_interleave(H // h, 1).repeat_interleave(W // w, 2).unsqueeze(1).to(like.dtype)


def _masked_mlp(mlp: nn.Module, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """timm's (GRN-)MLP with GRN's statistics taken over visible positions only."""
    x = mlp.drop1(mlp.act(mlp.fc1(x)))
    grn = getattr(mlp, "grn", None)
    if grn is not None:
        x = global_response_norm(x, grn.weight, grn.bias, mask, channels_last=grn.channel_dim == -1, eps=grn.eps)
    else:
        x = mlp.norm(x)
    return mlp.drop2(mlp.fc2(x))


def _masked_block(blk: ConvNeXtBlock, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A timm ConvNeXt block in which masked positions (``mask`` ``(B, 1, H, W)``) stay zero
    and never reach a visible one (the input is already zero there)."""
    keep = 1.0 - mask
    shortcut = x
    x = blk.conv_dw(x) * keep
    if blk.use_conv_mlp:
        x = _masked_mlp(blk.mlp, blk.norm(x), mask)
    else:
        x = _masked_mlp(blk.mlp, blk.norm(x.permute(0, 2, 3, 1)), mask.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    if blk.gamma is not None:
        x = x * blk.gamma.reshape(1, -1, 1, 1)
    return (blk.drop_path(x) + blk.shortcut(shortcut)) * keep


def masked_convnext_features(model: nn.Module, imgs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Dense masked forward of a timm ConvNeXt: ``(B, C, h, w)`` features of ``imgs`` in which
    the cells where ``mask`` (``(B, h, w)``, 1 = masked) is set are zero and the others see
    only visible patches. With an all-zero mask it equals ``model.forward_features``."""
    x = model.stem(imgs)
    m = _resize_mask(mask, x)
    x = x * (1.0 - m)
    for stage in model.stages:
        if not isinstance(stage.downsample, nn.Identity):
            norm, conv = stage.downsample[0], stage.downsample[1]
            x = conv(norm(x) * (1.0 - m))
            m = _resize_mask(mask, x)
            x = x * (1.0 - m)
        for blk in stage.blocks:
            x = _masked_block(blk, x, m)
    return model.norm_pre(x)


def require_convnext(backbone: Backbone, method: str) -> None:
    model = backbone.model
    ok = hasattr(model, "stem") and hasattr(model, "stages") and all(
        isinstance(b, ConvNeXtBlock) for s in getattr(model, "stages", []) for b in s.blocks)
    if not ok:
        raise ValueError(f"{method} needs a timm ConvNeXt backbone (e.g. convnextv2_atto, convnextv2_base), "
                         f"got {backbone.name!r}")


@register("fcmae")
class FCMAE(Method):
    paper = "Woo et al. 2023, ConvNeXt V2: Co-designing and Scaling ConvNets with Masked Autoencoders (FCMAE)"
    Config = FCMAEConfig
    exact_accumulation = True
    accumulation_note = "per-image masked MSE, the same number of masked cells in every image"

    def __init__(self, backbone: Backbone, cfg: FCMAEConfig, views):
        super().__init__(backbone, cfg, views)
        require_convnext(backbone, self.name)
        if not 0.0 < cfg.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {cfg.mask_ratio}")
        model = backbone.model
        self.patch = int(model.feature_info[-1]["reduction"])  # one mask cell = one last-stage cell
        self.in_chans = int(model.stem[0].in_channels)
        self.proj = nn.Conv2d(backbone.num_features, cfg.decoder_dim, 1)
        self.mask_token = nn.Parameter(torch.zeros(1, cfg.decoder_dim, 1, 1))
        self.decoder = nn.Sequential(*[ConvNeXtV2Block(cfg.decoder_dim) for _ in range(cfg.decoder_depth)])
        self.pred = nn.Conv2d(cfg.decoder_dim, self.patch ** 2 * self.in_chans, 1)
        for m in [self.proj, self.pred, *self.decoder.modules()]:
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.mask_token, std=0.02)
        # the classifier head's norm is not part of the autoencoder: keep it fixed (identity
        # at init) so that distributed training sees no parameter without a gradient
        for p in model.head.parameters():
            p.requires_grad_(False)

    def random_mask(self, imgs: torch.Tensor) -> torch.Tensor:
        """``(B, h, w)`` float mask, 1 = masked, ``mask_ratio`` of the cells per image."""
        B, _, H, W = imgs.shape
        if H % self.patch or W % self.patch:
            raise ValueError(f"fcmae: the image size {H}x{W} is not a multiple of the encoder's total stride "
                             f"{self.patch}; change image_size, or the stem's patch_size / output_stride")
        h, w = H // self.patch, W // self.patch
        _, mask, _ = random_patch_mask(B, h * w, self.cfg.mask_ratio, imgs.device)
        return mask.view(B, h, w)

    def decode(self, latent: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Pixel predictions ``(B, h*w, patch**2 * C)`` from the masked encoder features."""
        x = self.proj(latent)
        m = mask.unsqueeze(1).to(x.dtype)
        x = x * (1.0 - m) + self.mask_token.to(x.dtype) * m
        x = self.pred(self.decoder(x))
        return x.flatten(2).transpose(1, 2)

    def forward_loss(self, imgs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mask = self.random_mask(imgs)
        latent = masked_convnext_features(self.backbone.model, imgs, mask)
        pred = self.decode(latent, mask)
        loss = masked_mse(pred, patchify(imgs, self.patch), mask.flatten(1), self.cfg.norm_pix_loss)
        return loss, pred, mask

    def training_step(self, views, info):
        loss, _, mask = self.forward_loss(views[0])
        return {"loss": loss, "masked_patches": mask.float().mean()}
