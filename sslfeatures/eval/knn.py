"""Weighted k-NN classification on frozen features (DINO's evaluation: cosine similarity,
the k nearest training samples vote with weight exp(sim / T))."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


@torch.no_grad()
def weighted_knn(train_feats, train_labels, test_feats, test_labels, k: int = 20,
                 temperature: float = 0.07, num_classes: int | None = None,
                 chunk: int = 1024) -> dict[str, float]:
    """Top-1/top-5 accuracy of DINO's weighted k-NN classifier (k=20, T=0.07 by default)."""
    xtr = F.normalize(torch.as_tensor(np.asarray(train_feats), dtype=torch.float32), dim=1)
    xte = F.normalize(torch.as_tensor(np.asarray(test_feats), dtype=torch.float32), dim=1)
    ytr = torch.as_tensor(np.asarray(train_labels), dtype=torch.long)
    yte = torch.as_tensor(np.asarray(test_labels), dtype=torch.long)
    if len(xtr) != len(ytr) or len(xte) != len(yte):
        raise ValueError("features and labels differ in length")
    c = int(num_classes or int(max(ytr.max(), yte.max())) + 1)
    k = min(k, len(xtr))
    top1 = top5 = 0
    for s in range(0, len(xte), chunk):
        sim = xte[s:s + chunk] @ xtr.T
        val, idx = sim.topk(k, dim=1)
        w = (val / temperature).exp()
        votes = torch.zeros(len(val), c).scatter_add_(1, ytr[idx], w)
        pred = votes.argsort(1, descending=True)
        y = yte[s:s + chunk]
        top1 += (pred[:, 0] == y).sum().item()
        top5 += (pred[:, : min(5, c)] == y[:, None]).any(1).sum().item()
    n = len(xte)
    return {"top1": top1 / n, "top5": top5 / n, "k": k, "temperature": temperature}
