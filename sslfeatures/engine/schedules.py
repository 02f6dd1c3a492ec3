"""Schedules as pure functions of training progress (0 = first step, 1 = last)."""
from __future__ import annotations

import math


def cosine(progress: float, start: float, end: float) -> float:
    """Half-cosine from ``start`` (progress 0) to ``end`` (progress 1)."""
    p = min(max(progress, 0.0), 1.0)
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * p))


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, peak: float,
                  final: float = 0.0, start: float = 0.0) -> float:
    """Linear warm-up from ``start`` to ``peak`` over ``warmup_steps``, then cosine to ``final``."""
    if warmup_steps > 0 and step < warmup_steps:
        return start + (peak - start) * step / warmup_steps
    rest = max(1, total_steps - warmup_steps)
    return cosine((step - warmup_steps) / rest, peak, final)


def linear_warmup_then_constant(step: int, warmup_steps: int, start: float, end: float) -> float:
    """DINO's teacher temperature: linear from ``start`` to ``end`` over ``warmup_steps``."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return end
    return start + (end - start) * step / warmup_steps
