"""Losses of the classic pretext tasks: the colorization classification loss with class
rebalancing, weighted pixel regression, and a GAN's two losses in one backward pass."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy against a target distribution over dimension 1, optionally weighted
    per position (Zhang et al.'s multinomial loss with class rebalancing).

    ``logits``/``target``: (B, Q, ...); ``weights``: (B, ...) or ``None``. Returns the
    mean over positions of ``-w * sum_q target_q log softmax(logits)_q``.
    """
    if logits.shape != target.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} differ in shape")
    nll = -(target.float() * F.log_softmax(logits.float(), dim=1)).sum(1)
    if weights is not None:
        nll = nll * weights.float()
    return nll.mean()


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Squared error weighted per pixel and normalised by the total weight (Pathak et al.'s
    masked L2: zero weight on the context, more on the overlap band).

    ``weight`` broadcasts against ``pred``; channels are averaged.
    """
    err = (pred.float() - target.float()).pow(2).mean(1, keepdim=True) if pred.ndim == 4 else (pred - target).pow(2)
    w = weight.float().expand_as(err)
    return (err * w).sum() / w.sum().clamp(min=1e-8)


def adversarial_losses(discriminator: nn.Module, real: torch.Tensor, fake: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """The discriminator's and the generator's losses of a (non-saturating) GAN, built so
    that one ``backward`` of their sum updates each network with its own objective.

    * ``d_loss = BCE(D(real), 1) + BCE(D(fake.detach()), 0)``: reaches only D's parameters.
    * ``g_loss = BCE(D'(fake), 1)`` where D' is D with its parameters detached: reaches
      only the generator (through ``fake``), D is not pushed to be fooled.

    This is the simultaneous update of Pathak et al.'s context encoder (the generator's
    adversarial gradient uses the discriminator of the same iteration) with one optimizer.
    """
    ones = torch.ones(real.shape[0], device=real.device)
    zeros = torch.zeros(fake.shape[0], device=fake.device)
    d_real = discriminator(real).float().view(-1)
    d_fake = discriminator(fake.detach()).float().view(-1)
    d_loss = F.binary_cross_entropy_with_logits(d_real, ones) + F.binary_cross_entropy_with_logits(d_fake, zeros)
    frozen = {k: v.detach() for k, v in discriminator.named_parameters()}
    g_logits = functional_call(discriminator, frozen, (fake,), strict=False).float().view(-1)
    g_loss = F.binary_cross_entropy_with_logits(g_logits, torch.ones_like(g_logits))
    return d_loss, g_loss


__all__ = ["soft_cross_entropy", "weighted_mse", "adversarial_losses"]
