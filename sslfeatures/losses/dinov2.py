"""DINOv2's losses (Oquab et al. 2024, "DINOv2: Learning Robust Visual Features without
Supervision"): the image-level DINO loss and the patch-level iBOT loss, each with the
teacher targets either centred and sharpened (DINO) or balanced by Sinkhorn-Knopp
(SwAV's equipartition, DINOv2's choice), and the KoLeo regulariser that spreads the
features of a batch uniformly.
"""
from __future__ import annotations

import torch
import torch.distributed as torch_dist
import torch.nn as nn
import torch.nn.functional as F

from ..engine.distributed import is_distributed
from .dino import DINOLoss

CENTERINGS = ("centering", "sinkhorn_knopp")


def _all_reduce(x: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce across processes (a no-op in a single process)."""
    if is_distributed() and torch_dist.get_world_size() > 1:
        torch_dist.all_reduce(x, op=torch_dist.ReduceOp.MAX if op == "max" else torch_dist.ReduceOp.SUM)
    return x


def _check_centering(centering: str) -> str:
    if centering not in CENTERINGS:
        raise ValueError(f"unknown centering {centering!r}; expected one of {CENTERINGS}")
    return centering


@torch.no_grad()
def sinkhorn_knopp(logits: torch.Tensor, temp: float, n_iters: int = 3) -> torch.Tensor:
    """Soft assignments ``(B, K)`` of the rows of ``logits`` to ``K`` prototypes in which
    every prototype gets the same total mass over the *global* batch (all processes) and
    every row sums to 1 (Cuturi 2013; Caron et al. 2020, SwAV; DINOv2's teacher targets).

    The logits are shifted by their global maximum before ``exp``, which leaves the result
    unchanged and keeps it finite at any temperature. An empty ``logits`` (a process with
    no masked patch) is allowed and takes part in the collective operations.
    """
    if n_iters < 1:
        raise ValueError(f"Sinkhorn-Knopp needs at least one iteration, got {n_iters}")
    x = logits.float() / temp
    peak = x.amax() if x.numel() else x.new_tensor(float("-inf"))
    peak = _all_reduce(peak.clone(), "max")
    q = torch.exp(x - peak).t()  # K x B
    n_prototypes = q.shape[0]
    n_samples = _all_reduce(x.new_tensor(float(q.shape[1])))
    tiny = torch.finfo(q.dtype).tiny
    q = q / _all_reduce(q.sum()).clamp(min=tiny)
    for _ in range(n_iters):
        q = q / _all_reduce(q.sum(dim=1, keepdim=True)).clamp(min=tiny) / n_prototypes  # prototypes: 1/K each
        q = q / q.sum(dim=0, keepdim=True).clamp(min=tiny) / n_samples                 # samples: 1/B each
    return (q * n_samples).t()


def cross_entropy_across_views(student_out: list[torch.Tensor], teacher_probs: list[torch.Tensor],
                               student_temp: float) -> torch.Tensor:
    """DINO's multi-view cross-entropy: the mean over every (teacher view ``i``, student view
    ``j != i``) pair of ``-sum(p_teacher_i * log_softmax(s_j / T))`` (teacher views are the
    first ``len(teacher_probs)`` student views)."""
    log_p = [F.log_softmax(s.float() / student_temp, dim=-1) for s in student_out]
    total, terms = 0.0, 0
    for ti, t in enumerate(teacher_probs):
        for si, s in enumerate(log_p):
            if si != ti:
                total = total - (t * s).sum(dim=-1).mean()
                terms += 1
    if terms == 0:
        raise ValueError("the DINO loss needs at least two views (one teacher view and another view)")
    return total / terms


class DINOv2Loss(DINOLoss):
    """The image-level (class-token) DINO loss with DINOv2's choice of teacher targets.

    ``centering="centering"``: DINO's centred and sharpened softmax (the centre is an EMA of
    the teacher output, exactly :class:`~sslfeatures.losses.DINOLoss`);
    ``"sinkhorn_knopp"``: :func:`sinkhorn_knopp` over all teacher views of the batch.
    """

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9,
                 centering: str = "sinkhorn_knopp", sinkhorn_iterations: int = 3):
        super().__init__(out_dim, student_temp, center_momentum)
        self.centering = _check_centering(centering)
        self.sinkhorn_iterations = sinkhorn_iterations

    @torch.no_grad()
    def teacher_probs(self, teacher_out: list[torch.Tensor], teacher_temp: float) -> list[torch.Tensor]:
        """Targets for each teacher view (updates the centre in ``"centering"`` mode)."""
        if self.centering == "sinkhorn_knopp":
            q = sinkhorn_knopp(torch.cat(teacher_out), teacher_temp, self.sinkhorn_iterations)
            return list(q.chunk(len(teacher_out)))
        probs = [F.softmax((t.float() - self.center) / teacher_temp, dim=-1) for t in teacher_out]
        self.update_center(torch.cat(teacher_out))
        return probs

    def forward(self, student_out: list[torch.Tensor], teacher_out: list[torch.Tensor],
                teacher_temp: float) -> torch.Tensor:
        return cross_entropy_across_views(student_out, self.teacher_probs(teacher_out, teacher_temp),
                                          self.student_temp)


class iBOTPatchLoss(nn.Module):
    """iBOT's masked-patch loss (Zhou et al. 2022) as in DINOv2: for every masked patch of
    the student's view, cross-entropy between the teacher's target for that patch (computed
    on the unmasked view) and the student's prediction; each image weighs its masked
    patches by ``1 / (its number of masked patches)`` and the sum is divided by the number
    of images (images without a masked patch count, with zero loss).
    """

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9,
                 centering: str = "sinkhorn_knopp", sinkhorn_iterations: int = 3):
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.centering = _check_centering(centering)
        self.sinkhorn_iterations = sinkhorn_iterations
        self.register_buffer("center", torch.zeros(1, out_dim))

    @torch.no_grad()
    def teacher_probs(self, teacher_logits: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        if self.centering == "sinkhorn_knopp":
            return sinkhorn_knopp(teacher_logits, teacher_temp, self.sinkhorn_iterations)
        probs = F.softmax((teacher_logits.float() - self.center) / teacher_temp, dim=-1)
        self.update_center(teacher_logits)
        return probs

    @torch.no_grad()
    def update_center(self, teacher_logits: torch.Tensor) -> None:
        """EMA of the mean teacher patch logit over every masked patch of every process."""
        stats = torch.cat([teacher_logits.float().sum(0), teacher_logits.new_tensor([teacher_logits.shape[0]]).float()])
        stats = _all_reduce(stats)
        count = float(stats[-1])
        if count > 0:
            self.center.mul_(self.center_momentum).add_(stats[None, :-1] / count * (1 - self.center_momentum))

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, masks: torch.Tensor,
                teacher_temp: float) -> torch.Tensor:
        """``student_logits``/``teacher_logits``: ``(M, K)`` for the masked patches, in the
        order of ``tokens[masks]``; ``masks``: ``(B, N)`` bool with ``M`` true entries."""
        if student_logits.shape != teacher_logits.shape or student_logits.shape[0] != int(masks.sum()):
            raise ValueError(f"iBOT loss: {tuple(student_logits.shape)} student and {tuple(teacher_logits.shape)} "
                             f"teacher logits for {int(masks.sum())} masked patches")
        targets = self.teacher_probs(teacher_logits, teacher_temp)
        ce = -(targets * F.log_softmax(student_logits.float() / self.student_temp, dim=-1)).sum(-1)
        weight = (1.0 / masks.sum(-1).clamp(min=1).float()).unsqueeze(-1).expand_as(masks)[masks]
        return (ce * weight).sum() / masks.shape[0]


def koleo_loss(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """KoLeo regulariser (Sablayrolles et al. 2019, from the Kozachenko-Leonenko entropy
    estimator): ``-mean_i log(min_{j != i} ||x_i - x_j||)`` over the l2-normalised rows of
    ``x``; minimising it spreads the batch uniformly on the sphere."""
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"KoLeo needs a (B, D) batch with B >= 2, got shape {tuple(x.shape)}")
    x = F.normalize(x.float(), dim=-1, eps=eps)
    with torch.no_grad():
        sims = x @ x.t()
        sims.fill_diagonal_(-2.0)  # below any cosine: a point is never its own neighbour
        nearest = sims.argmax(dim=1)
    dist = F.pairwise_distance(x, x[nearest], p=2, eps=eps)
    return -torch.log(dist + eps).mean()


__all__ = ["CENTERINGS", "sinkhorn_knopp", "cross_entropy_across_views", "DINOv2Loss", "iBOTPatchLoss",
           "koleo_loss"]
