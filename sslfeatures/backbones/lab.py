"""Backbones that see an image in CIE Lab: the trunks colorization methods transfer.

Colorization (Zhang et al. 2016) and video colorization (Vondrick et al. 2018) train a
trunk on the L (lightness) channel only; the split-brain autoencoder (Zhang et al. 2017)
trains one trunk on L and another on ab and transfers the concatenation of both. These
classes keep the :class:`~sslfeatures.backbones.Backbone` interface — they take the
same normalised RGB batch every encoder takes and convert it inside ``forward`` — so
``Encoder.embed``, k-NN, export and search work on them unchanged.

Their ``config`` carries ``kind`` (``"lab"`` or ``"split_brain"``), which
:func:`sslfeatures.backbones.backbone_from_config` uses to rebuild them on load; the
saved state dict is ``model``'s, as for every backbone (for the split-brain trunk the
keys are prefixed ``L.`` and ``ab.``).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

from ..augment.pretext import denormalize, lab_network_input, rgb_to_lab
from . import Backbone

LAB_CHANNELS = ("L", "ab", "Lab")


def _check_channels(lab_channels: str) -> None:
    if lab_channels not in LAB_CHANNELS:
        raise ValueError(f"lab_channels must be one of {LAB_CHANNELS}, got {lab_channels!r}")


class LabBackbone(Backbone):
    """A timm trunk fed with some Lab channels (``lab_channels``: ``"L"``, ``"ab"`` or ``"Lab"``) of an RGB image.

    ``forward``/``forward_features`` take the normalised RGB batch every encoder takes
    (``input_mean``/``input_std`` are that normalisation), convert it to Lab and keep
    ``lab_channels`` (L scaled to [-1, 1], ab divided by 110). Methods that already hold Lab
    call :meth:`features_from_lab`.
    """

    def __init__(self, name: str, image_size: int = 224, lab_channels: str = "L",
                 input_mean: Sequence[float] = (0.485, 0.456, 0.406),
                 input_std: Sequence[float] = (0.229, 0.224, 0.225), in_chans: int | None = None,
                 **kwargs: Any):
        _check_channels(lab_channels)
        n = 3 if lab_channels == "Lab" else len(lab_channels)
        if in_chans is not None and in_chans != n:
            raise ValueError(f"lab_channels={lab_channels!r} has {n} input channel(s), but in_chans={in_chans}")
        super().__init__(name, image_size=image_size, in_chans=n, **kwargs)
        self.lab_channels = lab_channels
        self.input_mean = tuple(float(v) for v in input_mean)
        self.input_std = tuple(float(v) for v in input_std)
        self.config.update(kind="lab", lab_channels=lab_channels, input_mean=list(self.input_mean),
                           input_std=list(self.input_std))

    @classmethod
    def from_backbone(cls, backbone: Backbone, lab_channels: str, input_mean: Sequence[float],
                      input_std: Sequence[float]) -> LabBackbone:
        """The same architecture as ``backbone`` (name, size, stem, timm options), fed Lab."""
        cfg = dict(backbone.config)
        for k in ("in_chans", "kind", "lab_channels", "input_mean", "input_std"):
            cfg.pop(k, None)
        timm_kwargs = cfg.pop("timm_kwargs", {}) or {}
        return cls(**cfg, **timm_kwargs, lab_channels=lab_channels, input_mean=input_mean, input_std=input_std)

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> LabBackbone:
        cfg = dict(cfg)
        cfg.pop("kind", None)
        timm_kwargs = cfg.pop("timm_kwargs", {}) or {}
        return cls(**cfg, **timm_kwargs)

    def lab_from_input(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised RGB (B, 3, H, W) -> Lab (B, 3, H, W), L in [0, 100]."""
        return rgb_to_lab(denormalize(x.float(), self.input_mean, self.input_std))

    def features_from_lab(self, lab: torch.Tensor) -> torch.Tensor:
        """timm's unpooled features of a Lab batch (L in [0, 100])."""
        x = lab_network_input(lab, self.lab_channels)
        if not self.is_vit:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model.forward_features(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features_from_lab(self.lab_from_input(x))

    def forward_intermediates(self, x: torch.Tensor, **kwargs: Any):
        """timm's ``forward_intermediates`` of the trunk for a normalised RGB batch (the
        colour conversion applied first); same arguments and return values as timm's."""
        lab = lab_network_input(self.lab_from_input(x), self.lab_channels)
        return self.model.forward_intermediates(lab, **kwargs)


class SplitBrainBackbone(nn.Module):
    """Two disjoint trunks of the same architecture, one on L and one on ab (Zhang et al.
    2017); the features are the two trunks' features concatenated along channels.

    Same interface as :class:`~sslfeatures.backbones.Backbone`: ``forward`` (pooled,
    ``2 * D``), ``forward_features`` (maps or tokens concatenated along the feature
    dimension), ``forward_tokens``, ``pool``. ``model`` is a ``ModuleDict`` with the
    trunks under ``"L"`` and ``"ab"``, so its state dict is what the Encoder saves.
    """

    HALVES = ("L", "ab")

    def __init__(self, name: str, image_size: int = 224, input_mean: Sequence[float] = (0.485, 0.456, 0.406),
                 input_std: Sequence[float] = (0.229, 0.224, 0.225), stem: str = "default",
                 patch_size: int | None = None, pooling: str = "default", **timm_kwargs: Any):
        super().__init__()
        common = dict(image_size=image_size, input_mean=input_mean, input_std=input_std, stem=stem,
                      patch_size=patch_size, pooling=pooling, **timm_kwargs)
        self.model = nn.ModuleDict({h: LabBackbone(name, lab_channels=h, **common) for h in self.HALVES})
        first = self.model["L"]
        self.name = name
        self.is_vit = first.is_vit
        self.num_prefix_tokens = first.num_prefix_tokens
        self.patch_size = first.patch_size
        self.pooling = pooling
        self.half_features = [self.model[h].num_features for h in self.HALVES]
        self.num_features = sum(self.half_features)
        self.config = dict(kind="split_brain", name=name, image_size=image_size, stem=stem, patch_size=patch_size,
                           pooling=pooling, input_mean=[float(v) for v in input_mean],
                           input_std=[float(v) for v in input_std], timm_kwargs=dict(timm_kwargs))

    @classmethod
    def from_backbone(cls, backbone: Backbone, input_mean: Sequence[float],
                      input_std: Sequence[float]) -> SplitBrainBackbone:
        cfg = dict(backbone.config)
        for k in ("in_chans", "kind", "lab_channels", "input_mean", "input_std"):
            cfg.pop(k, None)
        timm_kwargs = cfg.pop("timm_kwargs", {}) or {}
        return cls(**cfg, **timm_kwargs, input_mean=input_mean, input_std=input_std)

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> SplitBrainBackbone:
        cfg = dict(cfg)
        cfg.pop("kind", None)
        timm_kwargs = cfg.pop("timm_kwargs", {}) or {}
        return cls(**cfg, **timm_kwargs)

    @property
    def halves(self) -> tuple[LabBackbone, LabBackbone]:
        return self.model["L"], self.model["ab"]

    def _cat_dim(self) -> int:
        return -1 if self.is_vit else 1

    def features_from_lab(self, lab: torch.Tensor) -> torch.Tensor:
        return torch.cat([h.features_from_lab(lab) for h in self.halves], self._cat_dim())

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Both trunks' unpooled features, concatenated (channels for CNNs, width for ViTs)."""
        lab = self.halves[0].lab_from_input(x)
        return self.features_from_lab(lab)

    def forward_intermediates(self, x: torch.Tensor, **kwargs: Any):
        """Both trunks' ``forward_intermediates``, concatenated like :meth:`forward_features`."""
        outs = [h.forward_intermediates(x, **kwargs) for h in self.halves]
        cat = self._cat_dim()

        def join(a, b):
            if isinstance(a, (list, tuple)):
                return [join(u, v) for u, v in zip(a, b)]
            return torch.cat([a, b], 1 if a.ndim == 4 else cat)

        return join(*outs) if not isinstance(outs[0], tuple) else tuple(join(a, b) for a, b in zip(*outs))

    def tokens_from_features(self, feats: torch.Tensor) -> torch.Tensor:
        return self.halves[0].tokens_from_features(feats)  # both trunks share one token layout

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        return self.tokens_from_features(self.forward_features(x))

    def pool(self, feats: torch.Tensor, pooling: str | None = None) -> torch.Tensor:
        """Pool each trunk's share of ``feats`` with that trunk, then concatenate."""
        parts = torch.split(feats, self.half_features, dim=self._cat_dim())
        return torch.cat([h.pool(p, pooling or self.pooling) for h, p in zip(self.halves, parts)], -1)

    def forward(self, x: torch.Tensor, pooling: str | None = None) -> torch.Tensor:
        """Pooled embedding (B, 2 * D): [L trunk's features, ab trunk's features]."""
        return self.pool(self.forward_features(x), pooling)


BACKBONE_KINDS: dict[str, Any] = {"lab": LabBackbone, "split_brain": SplitBrainBackbone}


def backbone_kind(kind: str):
    """The class that rebuilds a backbone whose config has ``kind``."""
    if kind not in BACKBONE_KINDS:
        raise ValueError(f"unknown backbone kind {kind!r}; known kinds: {sorted(BACKBONE_KINDS)}")
    return BACKBONE_KINDS[kind]


__all__ = ["LabBackbone", "SplitBrainBackbone", "backbone_kind", "BACKBONE_KINDS", "LAB_CHANNELS"]
