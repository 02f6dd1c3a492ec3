"""Backbones: any timm model by name, plus small-image stems, with pooled and patch outputs.

``create_backbone("resnet18", image_size=32, stem="small")`` gives a timm ResNet-18 whose
7x7/2 conv + max-pool stem is replaced by a 3x3/1 conv (the CIFAR stem);
``stem="small_s2"`` keeps one stride-2 (4x cheaper, for 28-64 px on a CPU). ViTs take
``patch_size`` and are built for ``image_size``; ``registers=4`` adds learnable register
tokens to a ViT (Darcet et al. 2024, "Vision Transformers Need Registers"). The wrapper
exposes ``num_features``, ``forward_tokens`` (patch-level features, prefix/register tokens
dropped) and pooling (``cls``, ``mean``, ``gem``; registers never enter a pooled output).
``norm="gn_ws"`` (with ``norm_groups=16``) makes a CNN batch-independent: GroupNorm +
weight-standardised convs instead of BatchNorm (BYOL's variant without batch statistics).
"""
from __future__ import annotations

import math
from typing import Any

import timm
import torch
import torch.nn as nn

POOLINGS = ("default", "cls", "mean", "gem")
STEMS = ("default", "small", "small_s2")
NORMS = ("default", "gn_ws")


def _to_gn_ws(module: nn.Module, groups: int) -> int:
    """Swap, in place, every ``BatchNorm2d`` for a ``GroupNorm`` and every ``Conv2d`` for a
    weight-standardised conv (timm's ``StdConv2d``; Qiao et al. 2019), keeping their
    initial weights: the batch-independent normalisation of Richemond et al. 2020, "BYOL
    works even without batch statistics". A layer with C channels gets ``gcd(groups, C)``
    groups. Returns the number of BatchNorm layers replaced."""
    from timm.layers import StdConv2d

    replaced = 0
    for child_name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            gn = nn.GroupNorm(math.gcd(groups, child.num_features), child.num_features, eps=child.eps,
                              affine=child.affine)
            if child.affine:  # keeps e.g. timm's zero-initialised last norm of each residual block
                gn.weight.data.copy_(child.weight.data)
                gn.bias.data.copy_(child.bias.data)
            setattr(module, child_name, gn)
            replaced += 1
        elif type(child) is nn.Conv2d:
            ws = StdConv2d(child.in_channels, child.out_channels, child.kernel_size, child.stride,
                           child.padding, child.dilation, child.groups, bias=child.bias is not None)
            ws.weight.data.copy_(child.weight.data)
            if child.bias is not None:
                ws.bias.data.copy_(child.bias.data)
            setattr(module, child_name, ws)
        else:
            replaced += _to_gn_ws(child, groups)
    return replaced


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


def _create_with_registers(name: str, registers: int, in_chans: int, kwargs: dict[str, Any],
                           is_vit: bool) -> nn.Module:
    """A timm ViT with ``registers`` extra learnable tokens (timm's ``reg_tokens``, or
    ``num_reg_tokens`` for EVA); timm counts them in ``num_prefix_tokens``, so patch tokens
    and every pooling skip them."""
    if isinstance(registers, bool) or not isinstance(registers, int) or registers < 0:
        raise ValueError(f"registers must be a non-negative integer, got {registers!r}")
    if not is_vit:
        raise ValueError(f"registers={registers} needs a ViT backbone; {name!r} has no token sequence")
    if "reg_tokens" in kwargs or "num_reg_tokens" in kwargs:
        raise ValueError("give the number of register tokens once: registers=N, not also timm's reg_tokens")
    for key in ("reg_tokens", "num_reg_tokens"):
        try:
            model = timm.create_model(name, pretrained=False, num_classes=0, in_chans=in_chans,
                                      **{key: registers}, **kwargs)
        except TypeError as e:
            if key in str(e):
                continue
            raise
        reg = getattr(model, "reg_token", None)
        if reg is not None and reg.shape[1] == registers:
            return model
    raise ValueError(f"backbone {name!r} does not support register tokens")


class Backbone(nn.Module):
    """A timm model with its classifier removed, plus pooling and patch-token access."""

    def __init__(self, name: str, image_size: int = 224, stem: str = "default",
                 patch_size: int | None = None, pooling: str = "default", in_chans: int = 3,
                 registers: int = 0, norm: str = "default", norm_groups: int = 16, **timm_kwargs: Any):
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
        if registers:
            model = _create_with_registers(name, registers, in_chans, kwargs, self.is_vit)
        else:
            model = timm.create_model(name, pretrained=False, num_classes=0, in_chans=in_chans, **kwargs)
        _adapt_stem(model, stem, name)
        if norm not in NORMS:
            raise ValueError(f"unknown norm {norm!r}; expected one of {NORMS}")
        if norm == "gn_ws":
            if isinstance(norm_groups, bool) or not isinstance(norm_groups, int) or norm_groups < 1:
                raise ValueError(f"norm_groups must be a positive integer, got {norm_groups!r}")
            if _to_gn_ws(model, norm_groups) == 0:
                raise ValueError(f"norm='gn_ws' replaces BatchNorm layers and {name!r} has none "
                                 "(it already uses no batch statistics)")
        self.model = model
        self.name = name
        self.num_features = int(model.num_features)
        self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 0))
        self.patch_size = int(model.patch_embed.patch_size[0]) if hasattr(model, "patch_embed") else None
        self.pooling = pooling
        self.config = dict(name=name, image_size=image_size, stem=stem, patch_size=patch_size,
                           pooling=pooling, in_chans=in_chans, registers=int(registers),
                           **({"norm": norm, "norm_groups": norm_groups} if norm != "default" else {}),
                           timm_kwargs=dict(timm_kwargs))

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

    def forward(self, x: torch.Tensor, pooling: str | None = None, last_blocks: int = 1) -> torch.Tensor:
        """Pooled embedding (B, num_features); with ``last_blocks=n > 1`` the pooled outputs of
        the last ``n`` blocks (ViT) or stages (CNN) concatenated, the last one last."""
        if last_blocks == 1:
            return self.pool(self.forward_features(x), pooling)
        feats = self.forward_last_blocks(x, last_blocks)
        # a CNN's head (its norm) fits only the last stage: earlier stages are averaged (or GeM)
        inner = pooling if self.is_vit or (pooling or self.pooling) == "gem" else "mean"
        return torch.cat([self.pool(f, inner) for f in feats[:-1]] + [self.pool(feats[-1], pooling)], 1)

    def forward_last_blocks(self, x: torch.Tensor, n: int) -> list[torch.Tensor]:
        """The unpooled outputs of the last ``n`` blocks (ViT: (B, T, D) tokens with the final
        norm applied, as DINO's ``get_intermediate_layers``) or stages (CNN: (B, C, H, W) maps)."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"last_blocks must be a positive integer, got {n!r}")
        if not hasattr(self.model, "forward_intermediates"):
            raise ValueError(f"last_blocks={n}: {self.name} does not expose its intermediate layers")
        if self.is_vit:
            depth = len(self.model.blocks)
            if n > depth:
                raise ValueError(f"last_blocks={n}: {self.name} has {depth} blocks")
            final, outs = self.model.forward_intermediates(x, indices=n, return_prefix_tokens=True, norm=True,
                                                           output_fmt="NLC")
            outs = [torch.cat([prefix, tokens], 1) if prefix is not None else tokens for tokens, prefix in outs]
        else:
            stages = len(self.model.feature_info)
            if n > stages:
                raise ValueError(f"last_blocks={n}: {self.name} has {stages} stages")
            final, outs = self.model.forward_intermediates(x, indices=n)
        return outs[:-1] + [final]  # the last one = forward_features (a CNN's head conv/norm included)


def create_backbone(name: str, image_size: int = 224, **kwargs: Any) -> Backbone:
    """Build a :class:`Backbone` (see its arguments)."""
    return Backbone(name, image_size=image_size, **kwargs)


def backbone_from_config(cfg: dict[str, Any]) -> Backbone:
    cfg = dict(cfg)
    if cfg.get("kind") is not None:  # a Lab-input or two-trunk (split-brain) backbone, see backbones/lab.py
        from .lab import backbone_kind

        return backbone_kind(cfg["kind"]).from_config(cfg)
    timm_kwargs = cfg.pop("timm_kwargs", {}) or {}
    return Backbone(**cfg, **timm_kwargs)


__all__ = ["Backbone", "create_backbone", "backbone_from_config", "POOLINGS", "STEMS"]
