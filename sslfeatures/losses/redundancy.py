"""Redundancy-reduction losses on the statistics of a batch of embeddings: Barlow Twins'
cross-correlation loss and VICReg's variance / invariance / covariance terms.

Both depend on batch statistics, so under DDP they gather the embeddings of every process
with :func:`gather_with_grad` and compute the loss of the *global* batch on each process
(the value the single-process run on that batch gives; with the gather's summed
gradients and DDP's averaging, the gradients match the single-process run as well).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..engine.distributed import gather_with_grad


def off_diagonal(m: torch.Tensor) -> torch.Tensor:
    """The off-diagonal entries of a square matrix, flattened."""
    n, n2 = m.shape
    if n != n2:
        raise ValueError(f"off_diagonal needs a square matrix, got {tuple(m.shape)}")
    return m.flatten()[:-1].view(n - 1, n + 1)[:, 1:].flatten()


def _global_pair(z1: torch.Tensor, z2: torch.Tensor, gather: bool, who: str) -> tuple[torch.Tensor, torch.Tensor]:
    if z1.ndim != 2 or z1.shape != z2.shape:
        raise ValueError(f"{who} expects two (B, D) tensors of one shape, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    z1, z2 = z1.float(), z2.float()
    if gather:
        z1, z2 = gather_with_grad(z1), gather_with_grad(z2)
    if z1.shape[0] < 2:
        raise ValueError(f"{who} needs at least 2 samples in the (global) batch, got {z1.shape[0]}")
    return z1, z2


def barlow_twins_loss(z1: torch.Tensor, z2: torch.Tensor, lambd: float = 0.0051, gather: bool = True,
                      eps: float = 1e-5) -> torch.Tensor:
    """Zbontar et al. 2021: ``sum_i (1 - C_ii)^2 + lambd * sum_{i != j} C_ij^2``, where ``C``
    is the cross-correlation matrix (D, D) of the two views' embeddings, each standardised
    along the batch (BatchNorm without affine, biased variance, as the paper's code)."""
    z1, z2 = _global_pair(z1, z2, gather, "barlow_twins_loss")
    n = z1.shape[0]
    z1 = (z1 - z1.mean(0)) / torch.sqrt(z1.var(0, unbiased=False) + eps)
    z2 = (z2 - z2.mean(0)) / torch.sqrt(z2.var(0, unbiased=False) + eps)
    c = z1.T @ z2 / n
    on_diag = (torch.diagonal(c) - 1).pow(2).sum()
    return on_diag + lambd * off_diagonal(c).pow(2).sum()


def vicreg_terms(z1: torch.Tensor, z2: torch.Tensor, gather: bool = True,
                 eps: float = 1e-4) -> dict[str, torch.Tensor]:
    """Bardes et al. 2022's three terms on the global batch: ``invariance`` (MSE between
    the views), ``variance`` (hinge keeping each dimension's std above 1, mean of both
    views) and ``covariance`` (sum of squared off-diagonal covariances / D, both views)."""
    z1, z2 = _global_pair(z1, z2, gather, "vicreg_terms")
    n, d = z1.shape
    invariance = F.mse_loss(z1, z2)
    z1, z2 = z1 - z1.mean(0), z2 - z2.mean(0)
    std1, std2 = torch.sqrt(z1.var(0) + eps), torch.sqrt(z2.var(0) + eps)
    variance = 0.5 * (F.relu(1 - std1).mean() + F.relu(1 - std2).mean())
    cov1, cov2 = z1.T @ z1 / (n - 1), z2.T @ z2 / (n - 1)
    covariance = off_diagonal(cov1).pow(2).sum() / d + off_diagonal(cov2).pow(2).sum() / d
    return {"invariance": invariance, "variance": variance, "covariance": covariance}


def vicreg_loss(z1: torch.Tensor, z2: torch.Tensor, sim_coeff: float = 25.0, std_coeff: float = 25.0,
                cov_coeff: float = 1.0, gather: bool = True) -> torch.Tensor:
    """VICReg: ``sim_coeff * invariance + std_coeff * variance + cov_coeff * covariance``
    (the paper's lambda = mu = 25, nu = 1); see :func:`vicreg_terms`."""
    t = vicreg_terms(z1, z2, gather)
    return sim_coeff * t["invariance"] + std_coeff * t["variance"] + cov_coeff * t["covariance"]
