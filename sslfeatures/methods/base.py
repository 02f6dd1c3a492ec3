"""The method interface and registry.

A method owns only what its paper describes: its views, heads, loss and teacher update.
The engine owns the loop, devices, precision, schedules, checkpoints and distribution.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn as nn

from ..augment import Views
from ..backbones import Backbone

_REGISTRY: dict[str, type[Method]] = {}


def register(name: str):
    """Class decorator: make a method available as ``Pretrainer(name)``."""

    def deco(cls: type[Method]) -> type[Method]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"method {name!r} is already registered")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def list_methods() -> list[str]:
    return sorted(_REGISTRY)


def get_method(name: str) -> type[Method]:
    key = name.lower().replace("-", "_")
    if key not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; available methods: {', '.join(list_methods())}")
    return _REGISTRY[key]


@dataclass
class StepInfo:
    """Where training is: the method reads its schedules from this."""

    step: int
    total_steps: int
    epoch: int
    steps_per_epoch: int
    micro_step: int = 0          # which micro-batch of the optimizer step (gradient accumulation)
    accumulate_steps: int = 1    # micro-batches per optimizer step

    @property
    def progress(self) -> float:
        return self.step / max(1, self.total_steps - 1)

    @property
    def epoch_float(self) -> float:
        return self.step / max(1, self.steps_per_epoch)


@dataclass
class MethodConfig:
    """Base of every method's hyper-parameters (subclasses add theirs)."""


class Method(nn.Module):
    """Base class. Subclasses set ``Config`` and implement :meth:`training_step`."""

    name: ClassVar[str] = "method"
    paper: ClassVar[str] = ""
    Config: ClassVar[type] = MethodConfig
    #: Gradient accumulation (``accumulate_steps > 1``) reproduces one step on the whole
    #: effective batch (up to float round-off): True only when the loss is a mean of per-sample
    #: terms with no other sample in them (no in-batch negatives, no batch statistics in the
    #: loss, no state updated per forward pass). BatchNorm layers in training mode make any
    #: method approximate on top of this (their statistics are per micro-batch); the engine
    #: checks for those itself. ``accumulation_note`` says why a method is approximate.
    exact_accumulation: ClassVar[bool] = False
    accumulation_note: ClassVar[str] = "not analysed for gradient accumulation"

    def __init__(self, backbone: Backbone, cfg: Any, views: Views):
        super().__init__()
        self.backbone = backbone
        self.cfg = cfg
        self.views = views

    # -- what the engine calls ------------------------------------------------------
    def training_step(self, views: list[torch.Tensor], info: StepInfo) -> dict[str, torch.Tensor]:
        """Return a dict with at least ``loss`` (scalars only; extra keys are logged)."""
        raise NotImplementedError

    def forward(self, views: list[torch.Tensor], info: StepInfo) -> dict[str, torch.Tensor]:
        return self.training_step(views, info)

    def before_optimizer_step(self, info: StepInfo) -> None:
        """Called after ``backward`` and before clipping / ``optimizer.step``."""

    def after_optimizer_step(self, info: StepInfo) -> None:
        """Called after ``optimizer.step`` (EMA teacher updates go here)."""

    def encoder_backbone(self) -> Backbone:
        """The backbone the paper transfers (saved as the run's Encoder)."""
        return self.backbone

    def trainable_modules(self) -> list[nn.Module]:
        return [self]
