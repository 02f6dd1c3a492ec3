"""InfoNCE over spatial locations: CPC's predicted-vs-encoded patches, and dense
contrastive learning's corresponding locations of two views."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..engine.distributed import all_reduce_mean, gather_no_grad, gather_with_grad, rank, world_size


def location_info_nce(queries: torch.Tensor, keys: torch.Tensor, positives: torch.Tensor,
                      temperature: float = 1.0) -> torch.Tensor:
    """Each query against a bank of keys: the positive of query ``i`` is
    ``keys[positives[i]]``, every other key is a negative (CPC: a prediction ``W_k c`` against
    all encoded patches of the batch). Scores are plain dot products (CPC's are bilinear, so
    nothing is normalised here) divided by ``temperature``; returns the mean over queries.
    """
    if queries.ndim != 2 or keys.ndim != 2 or queries.shape[1] != keys.shape[1]:
        raise ValueError(f"expected (M, D) queries and (N, D) keys, got {tuple(queries.shape)} and {tuple(keys.shape)}")
    if positives.shape != (queries.shape[0],):
        raise ValueError(f"expected one positive index per query, got shape {tuple(positives.shape)}")
    logits = queries.float() @ keys.float().T / temperature
    return F.cross_entropy(logits, positives)


def dense_info_nce(a: torch.Tensor, b: torch.Tensor, valid: torch.Tensor, temperature: float = 0.2,
                   gather: bool = True) -> torch.Tensor:
    """Location-level InfoNCE between two views: ``a[i]`` and ``b[i]`` (M, D) embed the same
    point of the same image seen in two views; ``valid`` (M,) marks the points that have a
    correspondence (inside both crops). Each valid ``a[i]`` must pick ``b[i]`` among the valid
    ``b`` of the whole (global, under DDP) batch: other locations of the same image and of
    other images are the negatives. Embeddings are l2-normalised here.

    Under DDP the keys are gathered with :func:`gather_with_grad` and the loss is the sum
    over this process's valid anchors divided by the global number of valid anchors (times
    the world size), so that DDP's gradient average equals the single-process gradient of
    the mean over all valid anchors, whatever each process's count.
    """
    if a.shape != b.shape or a.ndim != 2 or valid.shape != a.shape[:1]:
        raise ValueError(f"expected (M, D), (M, D) and (M,), got {tuple(a.shape)}, {tuple(b.shape)}, "
                         f"{tuple(valid.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    a, b = F.normalize(a.float(), dim=1), F.normalize(b.float(), dim=1)
    valid = valid.bool()
    keys, key_valid = (gather_with_grad(b), gather_no_grad(valid.float()).bool()) if gather else (b, valid)
    m = a.shape[0]
    offset = rank() * m if gather and keys.shape[0] != m else 0
    logits = (a @ keys.T / temperature).masked_fill(~key_valid[None], float("-inf"))
    labels = torch.arange(m, device=a.device) + offset
    loss_sum = F.cross_entropy(logits[valid], labels[valid], reduction="sum")
    count = valid.sum().float()
    if gather and world_size() > 1:
        count = all_reduce_mean(count.clone()) * world_size()
        return loss_sum * world_size() / count.clamp(min=1)
    return loss_sum / count.clamp(min=1)
