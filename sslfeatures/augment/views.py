"""View recipes: what a method asks for (two views, multi-crop, a masked view), built
from the batched ops. A :class:`ViewSpec` is one augmentation chain; a method's config
lists its specs and :func:`make_views` applies them to a ``uint8`` batch on the device.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from collections.abc import Sequence
from typing import Any

import torch

from . import ops

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class ViewSpec:
    """One augmentation chain (defaults: SimCLR's ImageNet recipe).

    ``size`` of ``None`` means the run's ``image_size``; ``size_frac`` scales it (DINO's
    local crops are 96/224 of the global size).
    """

    size: int | None = None
    size_frac: float = 1.0
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    jitter: tuple[float, float, float, float] = (0.8, 0.8, 0.8, 0.2)
    jitter_p: float = 0.8
    gray_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.0
    count: int = 1

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ViewSpec:
        from ..config import ConfigError, from_dict

        if not isinstance(d, dict):
            raise ConfigError(f"a view is a mapping of view options, got {d!r}")
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown view option(s) {sorted(unknown)}; expected some of {sorted(known)}")
        return from_dict(cls, d, where="view")  # types checked, lists become tuples

    def out_size(self, image_size: int) -> int:
        base = self.size if self.size is not None else image_size
        return max(8, int(round(base * self.size_frac)))

    def __call__(self, x: torch.Tensor, image_size: int) -> torch.Tensor:
        """``x``: float (B,3,H,W) in [0,1] -> augmented float batch in [0,1]."""
        x = ops.random_resized_crop(x, self.out_size(image_size), self.scale, self.ratio, self.hflip)
        if self.jitter_p > 0 and any(self.jitter):
            x = ops.color_jitter(x, *self.jitter, p=self.jitter_p)
        x = ops.random_grayscale(x, self.gray_p)
        x = ops.gaussian_blur(x, self.blur_p, self.blur_sigma)
        x = ops.solarize(x, self.solarize_p)
        return x


@dataclass
class Views:
    """A method's full view recipe: a list of specs (each may repeat ``count`` times)."""

    specs: list[ViewSpec] = field(default_factory=lambda: [ViewSpec(), ViewSpec()])
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    @classmethod
    def from_config(cls, specs: Sequence[dict | ViewSpec], mean=IMAGENET_MEAN, std=IMAGENET_STD) -> Views:
        return cls([s if isinstance(s, ViewSpec) else ViewSpec.from_dict(s) for s in specs],
                   tuple(mean), tuple(std))

    def __call__(self, batch: torch.Tensor, image_size: int) -> list[torch.Tensor]:
        """``batch``: uint8 (B,3,H,W) on the device -> list of normalised float views."""
        x = batch.float().div_(255.0)
        out = []
        for spec in self.specs:
            for _ in range(spec.count):
                out.append(ops.normalize(spec(x, image_size), self.mean, self.std))
        return out
