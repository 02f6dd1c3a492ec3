"""DINO's self-distillation loss with teacher centering and sharpening."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..engine.distributed import all_reduce_mean


class DINOLoss(nn.Module):
    """Cross-entropy between the sharpened, centred teacher distribution of each global
    crop and the student distribution of every *other* crop (Caron et al. 2021, Alg. 1).

    The centre is an EMA (``center_momentum``) of the teacher's batch-mean output.
    """

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9):
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(self, student_out: list[torch.Tensor], teacher_out: list[torch.Tensor],
                teacher_temp: float) -> torch.Tensor:
        t = [F.softmax((o.float() - self.center) / teacher_temp, dim=-1).detach() for o in teacher_out]
        s = [F.log_softmax(o.float() / self.student_temp, dim=-1) for o in student_out]
        total, terms = 0.0, 0
        for ti, tq in enumerate(t):
            for si, sv in enumerate(s):
                if si == ti:  # same view: skip
                    continue
                total = total + torch.sum(-tq * sv, dim=-1).mean()
                terms += 1
        self.update_center(torch.cat(teacher_out))
        return total / terms

    @torch.no_grad()
    def update_center(self, teacher_output: torch.Tensor) -> None:
        batch_center = all_reduce_mean(teacher_output.float().mean(0, keepdim=True))
        self.center.mul_(self.center_momentum).add_(batch_center * (1 - self.center_momentum))
