"""The exponential-moving-average teacher used by MoCo, BYOL, DINO and friends."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn


class EMA(nn.Module):
    """A frozen copy of ``module`` updated as ``t = m * t + (1 - m) * s``.

    Buffers (e.g. BatchNorm statistics) are copied from the student at each update.
    """

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = copy.deepcopy(module)
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, student: nn.Module, momentum: float) -> None:
        t_params = list(self.module.parameters())
        s_params = list(student.parameters())
        if len(t_params) != len(s_params):
            raise RuntimeError("EMA teacher and student have different parameters")
        torch._foreach_mul_(t_params, momentum)
        torch._foreach_add_(t_params, [s.detach() for s in s_params], alpha=1 - momentum)
        for tb, sb in zip(self.module.buffers(), student.buffers()):
            tb.copy_(sb)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def train(self, mode: bool = True):
        # the teacher keeps the student's train/eval mode (BN in train mode as in the papers)
        return super().train(mode)
