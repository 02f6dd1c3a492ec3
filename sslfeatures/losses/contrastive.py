"""Contrastive losses: SimCLR's NT-Xent and InfoNCE against a queue of negatives."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..engine.distributed import gather_with_grad, rank


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1,
            gather: bool = True) -> torch.Tensor:
    """SimCLR's normalised-temperature cross entropy over 2N views.

    For every view the positive is the other view of the same image and the negatives are
    the remaining 2N - 2 views of the (global, under DDP) batch. Returns the mean over
    this process's 2B anchors; gradients reach every process's embeddings through
    :func:`gather_with_grad`.
    """
    z1, z2 = F.normalize(z1.float(), dim=1), F.normalize(z2.float(), dim=1)
    b = z1.shape[0]
    a1, a2 = (gather_with_grad(z1), gather_with_grad(z2)) if gather else (z1, z2)
    n = a1.shape[0]
    offset = rank() * b if gather and n != b else 0
    keys = torch.cat([a1, a2], 0)  # (2n, d)
    anchors = torch.cat([z1, z2], 0)  # (2b, d)
    logits = anchors @ keys.T / temperature  # (2b, 2n)
    idx = torch.arange(b, device=z1.device) + offset
    self_idx = torch.cat([idx, idx + n])
    pos_idx = torch.cat([idx + n, idx])
    logits[torch.arange(2 * b, device=z1.device), self_idx] = float("-inf")
    return F.cross_entropy(logits, pos_idx)


def info_nce_queue(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor,
                   temperature: float = 0.2) -> torch.Tensor:
    """MoCo's InfoNCE: positive logit ``q.k``, negatives ``q.queue`` (queue: (K, d),
    already l2-normalised); ``q`` and ``k`` are normalised here."""
    q, k = F.normalize(q.float(), dim=1), F.normalize(k.float(), dim=1)
    pos = (q * k).sum(1, keepdim=True)
    neg = q @ queue.T.to(q.dtype)
    logits = torch.cat([pos, neg], 1) / temperature
    return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))
