"""MoCo v1 and v2: a query encoder, a momentum (EMA) key encoder, and InfoNCE against a
FIFO queue of past keys as negatives.

- ``mocov1`` — He, Fan, Wu, Xie, Girshick 2020, "Momentum Contrast for Unsupervised Visual
  Representation Learning": a linear head to 128-d, temperature 0.07.
- ``mocov2`` — Chen, Fan, Girshick, He 2020, "Improved Baselines with Momentum Contrastive
  Learning": a 2-layer MLP head, temperature 0.2, stronger augmentations (blur).

BatchNorm and the "cheating" of section 3.3 of the MoCo paper: statistics shared by a query
and its positive key let the model solve the pretext task without learning. The paper computed
BN per GPU and shuffled the keys' batch across GPUs (shuffling BN); SimCLR's fix is global BN,
statistics over the whole batch. By default (``bn_splits=1``) both encoders normalise over the
whole batch: one process, or SyncBatchNorm across processes (the engine's default under
torchrun). ``bn_splits=n`` emulates shuffling BN inside each process, as MoCo's one-GPU
CIFAR demo: both encoders run on n sub-batches, the query encoder on the batch in order, the
key encoder on a random permutation of it. On Fashion-MNIST at batch 128 (groups of 16) it
cost 1.4x per step and 0.9 k-NN points after 2 epochs (benchmarks/RESULTS.md), so it is off.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..engine.distributed import gather_no_grad
from ..engine.ema import EMA
from ..heads import mlp
from ..losses import info_nce_queue
from .base import Method, MethodConfig, register


@dataclass
class MoCoConfig(MethodConfig):
    temperature: float = 0.2
    queue_size: int = 65536
    ema_momentum: float = 0.999
    proj_hidden_dim: int = 2048
    proj_dim: int = 128
    symmetric: bool = False
    bn_splits: int = 1   # >1: shuffling BN with this many BatchNorm groups per process


def split_forward(module: nn.Module, x: torch.Tensor, splits: int, shuffle: bool = False) -> torch.Tensor:
    """``module(x)`` computed on ``splits`` sub-batches, so that BatchNorm normalises each with its
    own statistics (one "GPU" each); with ``shuffle`` the sub-batches are a random permutation of
    the batch, and the outputs come back in the input's order."""
    splits = max(1, min(splits, len(x) // 2))  # at least 2 images per BN group
    if splits == 1:
        return module(x)
    order = torch.randperm(len(x), device=x.device) if shuffle else None
    chunks = (x[order] if shuffle else x).chunk(splits)
    out = torch.cat([module(c) for c in chunks])
    return out[torch.argsort(order)] if shuffle else out


@register("mocov2")
class MoCoV2(Method):
    paper = "Chen et al. 2020, Improved Baselines with Momentum Contrastive Learning (MoCo v2)"
    Config = MoCoConfig
    exact_accumulation = True
    accumulation_note = ("per-query InfoNCE against the queue, which is fixed during the accumulation window and "
                         "receives the keys of every micro-batch at the optimizer step")

    def __init__(self, backbone, cfg: MoCoConfig, views):
        super().__init__(backbone, cfg, views)
        self.query = nn.Sequential(backbone, self.build_head(backbone.num_features, cfg))
        self.key = EMA(self.query)
        self.register_buffer("queue", F.normalize(torch.randn(cfg.queue_size, cfg.proj_dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    def build_head(self, in_dim: int, cfg) -> nn.Module:
        """MoCo v2's projection head: Linear-ReLU-Linear (no BatchNorm)."""
        return mlp(in_dim, cfg.proj_hidden_dim, cfg.proj_dim, bn=False)

    def training_step(self, views, info):
        x1, x2 = views
        q1 = self.encode_query(x1)
        k2 = self.encode_key(x2)
        loss = info_nce_queue(q1, k2, self.queue, self.cfg.temperature)
        keys = [k2]
        if self.cfg.symmetric:
            q2 = self.encode_query(x2)
            k1 = self.encode_key(x1)
            loss = 0.5 * (loss + info_nce_queue(q2, k1, self.queue, self.cfg.temperature))
            keys.append(k1)
        keys = torch.cat(keys)
        if info.micro_step > 0 and getattr(self, "_pending_keys", None) is not None:
            keys = torch.cat([self._pending_keys, keys])  # gradient accumulation: enqueue every micro-batch's keys
        self._pending_keys = keys
        return {"loss": loss}

    def encode_query(self, x: torch.Tensor) -> torch.Tensor:
        return split_forward(self.query, x, self.cfg.bn_splits)

    @torch.no_grad()
    def encode_key(self, x: torch.Tensor) -> torch.Tensor:
        """The momentum encoder's keys, l2-normalised (BN groups shuffled when ``bn_splits > 1``)."""
        return F.normalize(split_forward(self.key, x, self.cfg.bn_splits, shuffle=True).float(), dim=1)

    @torch.no_grad()
    def after_optimizer_step(self, info):
        self.key.update(self.query, self.cfg.ema_momentum)
        keys = gather_no_grad(self._pending_keys)  # enqueue the whole global batch
        n, size = len(keys), len(self.queue)
        ptr = int(self.queue_ptr)
        idx = (torch.arange(n, device=keys.device) + ptr) % size
        self.queue[idx] = keys.to(self.queue.dtype)
        self.queue_ptr.fill_((ptr + n) % size)


@dataclass
class MoCoV1Config(MethodConfig):
    temperature: float = 0.07
    queue_size: int = 65536
    ema_momentum: float = 0.999
    proj_dim: int = 128
    symmetric: bool = False
    bn_splits: int = 1


@register("mocov1")
class MoCoV1(MoCoV2):
    """MoCo v1: as v2 but the backbone's pooled features go through one linear layer
    (the ResNet's ``fc`` resized to ``proj_dim``), and the paper's temperature 0.07."""

    paper = "He et al. 2020, Momentum Contrast for Unsupervised Visual Representation Learning (MoCo v1)"
    Config = MoCoV1Config

    def build_head(self, in_dim: int, cfg: MoCoV1Config) -> nn.Module:
        return nn.Linear(in_dim, cfg.proj_dim)
