"""InfoNCE with in-batch negatives: MoCo v3's loss (and the image side of CLIP's)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..engine.distributed import gather_with_grad, rank


def info_nce(query: torch.Tensor, key: torch.Tensor, temperature: float = 0.2,
             gather: bool = True) -> torch.Tensor:
    """Cross-entropy of each query against every key of the (global) batch.

    ``query`` and ``key`` are (B, D) rows of this process (l2-normalised here); the positive
    of query ``i`` is key ``i``, and the negatives are the other keys of the global batch,
    gathered from every process with :func:`gather_with_grad` (so keys that carry
    gradients, as in CLIP, get them back from every process). Returns the mean over this
    process's B queries; under DDP the gradient average over processes then equals the
    single-process gradient of the mean over the global batch.
    """
    if query.ndim != 2 or query.shape != key.shape:
        raise ValueError(f"info_nce expects two (B, D) tensors of one shape, got {tuple(query.shape)} "
                         f"and {tuple(key.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    q = F.normalize(query.float(), dim=1)
    k = F.normalize(key.float(), dim=1)
    keys = gather_with_grad(k) if gather else k
    b = q.shape[0]
    offset = rank() * b if gather and keys.shape[0] != b else 0
    logits = q @ keys.T / temperature  # (B, world * B)
    labels = torch.arange(b, device=q.device) + offset
    return F.cross_entropy(logits, labels)
