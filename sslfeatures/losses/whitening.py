"""W-MSE (Ermolov et al. 2021, "Whitening for Self-Supervised Representation Learning"):
whiten the embeddings of each view over random sub-batches, then pull the whitened views
of an image together with a normalised MSE. Whitening scatters the batch over the unit
sphere, which rules out the collapsed solution without negatives or a momentum encoder.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..engine.distributed import gather_with_grad


def whiten(x: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """Cholesky whitening along the batch: ``x`` (N, D) or a stack (G, N, D) of sub-batches
    -> centred rows with identity covariance, ``(x - mean) @ L^-T`` where ``L L^T =
    (1 - eps) * cov + eps * I`` (the paper's ``Whitening2d``, differentiable)."""
    if x.ndim not in (2, 3):
        raise ValueError(f"whiten expects (N, D) or (G, N, D), got {tuple(x.shape)}")
    n, d = x.shape[-2:]
    if n <= d:
        raise ValueError(f"whitening {d}-d embeddings needs more than {d} samples per whitening batch, "
                         f"got {n}: lower the embedding size (proj_dim) or raise w_size / the batch size")
    # in fp32 even under bf16/fp16 autocast: a covariance from bf16 matmuls (3 significant digits) is
    # near-singular for a 64-sample batch, and its Cholesky factor fails or whitens wrongly
    with torch.autocast(x.device.type, enabled=False):
        x = x.float()
        xc = x - x.mean(-2, keepdim=True)
        cov = xc.transpose(-1, -2) @ xc / (n - 1)
        eye = torch.eye(d, device=x.device, dtype=x.dtype)
        cov = (1 - eps) * cov + eps * eye
        chol, info = torch.linalg.cholesky_ex(cov)
        if bool((info != 0).any()):
            raise FloatingPointError(
                "W-MSE: the covariance of a whitening batch is singular (the embeddings have collapsed "
                "onto a subspace); raise w_eps (e.g. 1e-3), lower the lr or the embedding size")
        inv = torch.linalg.solve_triangular(chol, eye.expand_as(cov), upper=False)  # L^-1
        return xc @ inv.transpose(-1, -2)


def wmse_loss(views: list[torch.Tensor], w_size: int, w_iter: int = 1, eps: float = 0.0,
              gather: bool = True) -> torch.Tensor:
    """The W-MSE loss of the embeddings of ``len(views) >= 2`` views, each (B, D).

    ``w_iter`` times: draw a random permutation of the (global) batch, cut it into
    sub-batches of ``w_size`` images, whiten each view's embeddings within each sub-batch,
    and average ``2 - 2 cos`` between the whitened embeddings of every pair of views.
    Under DDP the embeddings are gathered with :func:`gather_with_grad`, so the
    sub-batches are drawn from the global batch (the permutation comes from torch's global
    RNG, which the engine seeds identically on every process).
    """
    if len(views) < 2:
        raise ValueError(f"W-MSE needs at least 2 views, got {len(views)}")
    if w_iter < 1:
        raise ValueError(f"w_iter must be >= 1, got {w_iter}")
    hs = [gather_with_grad(v.float()) if gather else v.float() for v in views]
    n, d = hs[0].shape
    if w_size < 2 or n % w_size:
        raise ValueError(f"W-MSE: the (global) batch of {n} images must be a multiple of w_size={w_size} "
                         "(the whitening sub-batch size); set w_size to a divisor of the batch size")
    h = torch.stack(hs)  # (V, N, D)
    total, pairs = 0.0, 0
    for _ in range(w_iter):
        perm = torch.randperm(n).to(h.device)
        z = whiten(h[:, perm].reshape(len(hs) * (n // w_size), w_size, d), eps)
        z = F.normalize(z.reshape(len(hs), n, d), dim=-1)
        for i in range(len(hs)):
            for j in range(i + 1, len(hs)):
                total = total + (2 - 2 * (z[i] * z[j]).sum(-1)).mean()
                pairs += 1
    return total / pairs
