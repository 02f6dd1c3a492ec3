"""torch.distributed helpers: rank/world size and all-gather that keeps gradients."""
from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def is_main_process() -> bool:
    return rank() == 0


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        out = [torch.zeros_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x.contiguous())
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads):
        # every rank's loss used every rank's slice: sum their gradients for our slice
        g = torch.stack(grads)
        dist.all_reduce(g)
        return g[dist.get_rank()]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from all processes along dim 0, with gradients flowing back to
    each process's own slice (a plain ``all_gather`` silently drops them)."""
    if not is_distributed() or world_size() == 1:
        return x
    return torch.cat(_GatherWithGrad.apply(x), 0)


@torch.no_grad()
def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    if not is_distributed() or world_size() == 1:
        return x
    out = [torch.zeros_like(x) for _ in range(world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, 0)


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    if is_distributed() and world_size() > 1:
        dist.all_reduce(x)
        x /= world_size()
    return x


def local_rank() -> int:
    import os

    return int(os.environ.get("LOCAL_RANK", 0))


def init_from_env(timeout_s: float | None = None, device: torch.device | None = None) -> None:
    """Join the process group torchrun describes in the environment (no-op otherwise).

    ``timeout_s``: how long joining, and later any collective, may wait for a peer before
    failing (a process that died or hangs) instead of blocking the others forever.
    ``device``: where training runs: NCCL for CUDA, gloo for the CPU (also on a GPU machine
    told to train on its CPU). ``None``: NCCL when CUDA is present.
    """
    import os
    from datetime import timedelta

    if is_distributed() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    cuda = torch.cuda.is_available() if device is None else device.type == "cuda"
    backend = "nccl" if cuda else "gloo"
    kwargs = {"timeout": timedelta(seconds=float(timeout_s))} if timeout_s else {}
    dist.init_process_group(backend=backend, **kwargs)


class PeerLostError(RuntimeError):
    """Another process of a distributed run died or stopped answering; this one stops too."""


_COMM_FAILURE_WORDS = ("connection closed", "connection reset", "broken pipe", "timed out", "timeout",
                       "gloo", "nccl", "processgroup", "process group", "socket", "peer")


def is_comm_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is a failed collective (a peer process gone or hung)."""
    backend_error = getattr(dist, "DistBackendError", None)
    if backend_error is not None and isinstance(exc, backend_error):
        return True
    if isinstance(exc, (RuntimeError, OSError)) and not isinstance(exc, PeerLostError):
        text = str(exc).lower()
        return any(w in text for w in _COMM_FAILURE_WORDS)
    return False


def barrier() -> None:
    if is_distributed():
        dist.barrier()
