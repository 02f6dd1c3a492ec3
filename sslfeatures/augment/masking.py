"""Patch masking shared by masked-modelling methods (MAE, iBOT, FCMAE)."""
from __future__ import annotations

import torch


def random_patch_mask(batch: int, num_patches: int, ratio: float, device=None):
    """MAE's per-sample random masking by argsort of uniform noise.

    Returns ``(keep_idx (B, K), mask (B, N) with 1 = masked, restore_idx (B, N))`` where
    ``K = round(N * (1 - ratio))`` and ``restore_idx`` un-shuffles [kept, masked] tokens.
    """
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"mask ratio must be in [0, 1), got {ratio}")
    keep = max(1, int(round(num_patches * (1 - ratio))))
    noise = torch.rand(batch, num_patches).to(device)
    shuffle = torch.argsort(noise, dim=1)
    restore = torch.argsort(shuffle, dim=1)
    keep_idx = shuffle[:, :keep]
    mask = torch.ones(batch, num_patches, device=device)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, restore)
    return keep_idx, mask, restore
