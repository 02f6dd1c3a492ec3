"""Linear probe: multinomial logistic regression on frozen (standardised) features, with
the L2 strength chosen on a held-out 10% of the training set."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def _fit(x, y, c, wd, epochs, lr=1e-2, batch=1024, seed=0):
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(x.shape[1], c)
    opt = torch.optim.AdamW(lin.parameters(), lr=lr, weight_decay=wd)
    steps = epochs * max(1, (len(x) + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for s in range(0, len(x), batch):
            i = perm[s:s + batch]
            loss = F.cross_entropy(lin(x[i]), y[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return lin


def linear_probe(train_feats, train_labels, test_feats, test_labels, epochs: int = 60,
                 weight_decays=(0.0, 1e-4, 1e-3, 1e-2), seed: int = 0) -> dict[str, float]:
    """Test top-1 of the best-on-validation linear classifier, retrained on all train data."""
    xtr = torch.as_tensor(np.asarray(train_feats), dtype=torch.float32)
    xte = torch.as_tensor(np.asarray(test_feats), dtype=torch.float32)
    ytr = torch.as_tensor(np.asarray(train_labels), dtype=torch.long)
    yte = torch.as_tensor(np.asarray(test_labels), dtype=torch.long)
    mu, sd = xtr.mean(0), xtr.std(0).clamp(min=1e-6)
    xtr, xte = (xtr - mu) / sd, (xte - mu) / sd
    c = int(max(ytr.max(), yte.max())) + 1
    perm = torch.randperm(len(xtr), generator=torch.Generator().manual_seed(seed))
    nval = max(1, len(xtr) // 10)
    va, tr = perm[:nval], perm[nval:]
    torch.manual_seed(seed)
    best = max(weight_decays, key=lambda wd: (
        _fit(xtr[tr], ytr[tr], c, wd, epochs, seed=seed)(xtr[va]).argmax(1) == ytr[va]).float().mean().item())
    lin = _fit(xtr, ytr, c, best, epochs, seed=seed)
    with torch.no_grad():
        acc = (lin(xte).argmax(1) == yte).float().mean().item()
    return {"top1": acc, "weight_decay": best}
