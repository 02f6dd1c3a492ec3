"""Backbones: any timm model by name, plus small-image stems, with pooled and patch outputs.

``create_backbone("resnet18", image_size=32, stem="small")`` gives a timm ResNet-18 whose
7x7/2 conv + max-pool stem is replaced by a 3x3/1 conv (the CIFAR stem);
``stem="small_s2"`` keeps one stride-2 (4x cheaper, for 28-64 px on a CPU). ViTs take
``patch_size`` and are built for ``image_size``. The wrapper exposes ``num_features``,
``forward_tokens`` (patch-level features, prefix/register tokens dropped) and pooling
(``cls``, ``mean``, ``gem``).
"""
from __future__ import annotations

from typing import Any

import timm
import torch
import torch.nn as nn

POOLINGS = ("default", "cls", "mean", "gem")
STEMS = ("default", "small", "small_s2")


def _adapt_stem(model: nn.Module, stem: str, name: str) -> None:
    if stem == "default":
        return
    stride = 1 if stem == "small" else 2
    if hasattr(model, "conv1") and hasattr(model, "maxpool"):  # timm ResNet family
        conv = model.conv1
        if isinstance(conv, nn.Conv2d):
            model.conv1 = nn.Conv2d(conv.in_channels, conv.out_channels, 3, stride, 1, bias=False)
        else:  # deep stem: the first conv of the sequence carries the stride
            first = conv[0]
            conv[0] = nn.Conv2d(first.in_channels, first.out_channels, 3, stride, 1, bias=False)
        model.maxpool = nn.Identity()
        return
    raise ValueError(
        f"stem={stem!r} is supported for ResNet-style backbones; for {name!r} use the default "
        "stem (for ViTs pass patch_size for small images)")


class Backbone(nn.Module):
    """A timm model with its classifier removed, plus pooling and patch-token access."""

    def __init__(self, name: str, image_size: int = 224, stem: str = "default",
                 patch_size: int | None = None, pooling: str = "default", in_chans: int = 3,
                 **timm_kwargs: Any):
        super().__init__()
        if stem not in STEMS:
            raise ValueError(f"unknown stem {stem!r}; expected one of {STEMS}")
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}; expected one of {POOLINGS}")
        kwargs = dict(timm_kwargs)
        if patch_size is not None:
            kwargs["patch_size"] = patch_size
        if not timm.is_model(name):
            close = timm.list_models(f"*{name.split('_')[0]}*")[:10]
            raise ValueError(f"unknown backbone {name!r}; timm has e.g. {close or timm.list_models()[:10]}")
        self.is_vit = "vit" in name or "deit" in name or "eva" in name
        if self.is_vit:
            kwargs.setdefault("img_size", image_size)
            kwargs.setdefault("dynamic_img_size", True)
        model = timm.create_model(name, pretrained=False, num_classes=0, in_chans=in_chans, **kwargs)
        _adapt_stem(model, stem, name)
        self.model = model
        self.name = name
        self.num_features = int(model.num_features)
        self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 0))
        self.patch_size = int(model.patch_embed.patch_size[0]) if hasattr(model, "patch_embed") else None
        self.pooling = pooling
        self.config = dict(name=name, image_size=image_size, stem=stem, patch_size=patch_size,
                           pooling=pooling, in_chans=in_chans, timm_kwargs=dict(timm_kwargs))

    # -- features ---------------------------------------------------------------------
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """timm's unpooled features: (B, T, D) tokens for ViTs, (B, C, H, W) maps for CNNs."""
        return self.model.forward_features(x)

    def tokens_from_features(self, feats: torch.Tensor) -> torch.Tensor:
        if feats.ndim == 3:
            return feats[:, self.num_prefix_tokens:]
        return feats.flatten(2).transpose(1, 2)

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Patch-level features (B, N, D): ViT patch tokens or CNN feature-map cells."""
        return self.tokens_from_features(self.forward_features(x))

    def pool(self, feats: torch.Tensor, pooling: str | None = None) -> torch.Tensor:
        pooling = pooling or self.pooling
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}; expected one of {POOLINGS}")
        if pooling == "default":
            return self.model.forward_head(feats, pre_logits=True)
        if pooling == "cls":
            if feats.ndim != 3 or self.num_prefix_tokens == 0:
                raise ValueError(f"pooling='cls' needs a ViT with a class token; {self.name} has none")
            return feats[:, 0]
        tokens = self.tokens_from_features(feats)
        if pooling == "mean":
            return tokens.mean(1)
        return tokens.clamp(min=1e-6).pow(3).mean(1).pow(1 / 3)  # GeM, p = 3

    def forward(self, x: torch.Tensor, pooling: str | None = None) -> torch.Tensor:
        """Pooled embedding (B, num_features)."""
        return self.pool(self.forward_features(x), pooling)


def create_backbone(name: str, image_size: int = 224, **kwargs: Any) -> Backbone:
    """Build a :class:`Backbone` (see its arguments)."""
    return Backbone(name, image_size=image_size, **kwargs)


def backbone_from_config(cfg: dict[str, Any]) -> Backbone:
    cfg = dict(cfg)
    timm_kwargs = cfg.pop("timm_kwargs", {}) or {}
    return Backbone(**cfg, **timm_kwargs)


__all__ = ["Backbone", "create_backbone", "backbone_from_config", "POOLINGS", "STEMS"]
