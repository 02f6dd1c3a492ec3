"""Representation-collapse monitor: the std of l2-normalised embeddings and effective rank."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


@torch.no_grad()
def collapse_stats(emb: torch.Tensor) -> dict[str, float]:
    """``norm_std``: per-dimension std of the l2-normalised embeddings times sqrt(D) —
    about 1 for well-spread features, 0 when every image maps to the same vector (the
    measure of the SimSiam paper). ``eff_rank``: exp of the entropy of the normalised
    singular values of the centred embeddings (Roy & Vetterli 2007), between 1 and D."""
    z = F.normalize(emb.float(), dim=1)
    d = z.shape[1]
    norm_std = float(z.std(0).mean() * math.sqrt(d))
    zc = z - z.mean(0, keepdim=True)
    s = torch.linalg.svdvals(zc)
    p = s / s.sum().clamp(min=1e-12)
    ent = -(p * torch.log(p.clamp(min=1e-12))).sum()
    return {"norm_std": norm_std, "eff_rank": float(torch.exp(ent))}


def is_collapsed(stats: dict[str, float], min_std: float = 0.01, min_rank: float = 1.5) -> bool:
    """True when the backbone's embeddings, or the method's head embeddings (``head_*``
    keys, when the method exposes them), have collapsed."""
    return any(stats[f"{p}norm_std"] < min_std or stats[f"{p}eff_rank"] < min_rank
               for p in ("", "head_") if f"{p}norm_std" in stats)
