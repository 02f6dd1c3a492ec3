"""Regression-style losses: BYOL's normalised MSE, MAE's masked pixel MSE."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def neg_cosine(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """BYOL's loss ``2 - 2 cos(p, z)`` (mean over the batch); ``z`` is a target (detached)."""
    return (2 - 2 * F.cosine_similarity(p.float(), z.detach().float(), dim=-1)).mean()


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
               norm_pix: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """MAE's loss: per-patch MSE averaged over masked patches only.

    ``pred``/``target``: (B, N, P) patch pixels; ``mask``: (B, N), 1 = masked.
    ``norm_pix`` normalises each target patch by its own mean and variance (MAE default).
    """
    target = target.float()
    if norm_pix:
        mean = target.mean(-1, keepdim=True)
        var = target.var(-1, keepdim=True)
        target = (target - mean) / (var + eps).sqrt()
    loss = (pred.float() - target).pow(2).mean(-1)
    return (loss * mask).sum() / mask.sum().clamp(min=1)
