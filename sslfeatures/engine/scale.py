"""Scaling a run out: gradient accumulation, SyncBatchNorm, activation checkpointing,
``torch.compile`` and FSDP, as the engine applies them (``Pretrainer.fit``).

Everything here is opt-in through :class:`~sslfeatures.engine.TrainConfig` keys:

``accumulate_steps``
    Micro-batches per optimizer step. The effective batch is ``batch_size x world_size x
    accumulate_steps``; schedules, checkpoints and ``max_steps`` count optimizer steps.
    Whether this reproduces one step on the whole effective batch depends on the method
    (``Method.exact_accumulation``, see :func:`accumulation_warning`).
``sync_bn``
    BatchNorm statistics over the global batch instead of each process's share. ``None``
    (the default) turns it on whenever ``world_size > 1`` and the model has BatchNorm layers.
    Why on by default: every BN-using method in the library was published with global BN
    statistics (SimCLR, BYOL, SimSiam, Barlow Twins, VICReg, MoCo v3 all use SyncBN; MoCo
    v1/v2's "shuffle BN" exists for the same reason). Per-process statistics over a small
    per-GPU batch are noisy, change the method's behaviour with the number of GPUs, and let
    contrastive methods cheat through intra-batch statistics. The cost is one all-reduce
    per BN layer per forward, small next to the gradient all-reduce; turn it off
    (``sync_bn=False``) to trade fidelity for speed. It changes nothing on one process.
``grad_checkpointing``
    Recompute each ViT block in the backward pass (activation memory for one extra forward).
``compile``
    ``torch.compile`` of the backbone (its ViT blocks, or the whole CNN).
``strategy="fsdp"``
    Fully sharded data parallel (``torch.distributed.fsdp.fully_shard``): parameters,
    gradients and optimizer state sharded over processes, each ViT block its own unit.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn as nn

from . import distributed as dist

log = logging.getLogger("sslfeatures")


# -- gradient accumulation ----------------------------------------------------------------
def split_micro_batches(batch: Any, parts: int) -> list[Any]:
    """Cut one process's batch into ``parts`` equal micro-batches along the first axis.

    ``batch``: a tensor, or a dict of tensors / lists (e.g. images + captions). The engine
    asks the stream for ``batch_size x accumulate_steps`` items and trains on the slices.
    """
    if parts == 1:
        return [batch]
    if isinstance(batch, dict):
        split = {k: split_micro_batches(v, parts) for k, v in batch.items()}
        return [{k: split[k][i] for k in batch} for i in range(parts)]
    n = len(batch)
    if n % parts:
        raise ValueError(f"a batch of {n} cannot be cut into {parts} equal micro-batches")
    step = n // parts
    if isinstance(batch, torch.Tensor):
        return list(batch.split(step))
    return [batch[i * step:(i + 1) * step] for i in range(parts)]


def has_batchnorm(module: nn.Module) -> bool:
    """Whether ``module`` holds BatchNorm layers (which normalise with batch statistics)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


def accumulation_warning(method: nn.Module, accumulate_steps: int) -> str | None:
    """Why accumulating ``accumulate_steps`` micro-batches is not the same as one step on
    the whole effective batch for ``method`` (``None`` when it is, up to round-off)."""
    if accumulate_steps <= 1:
        return None
    reasons = []
    if not getattr(type(method), "exact_accumulation", False):
        reasons.append(getattr(type(method), "accumulation_note", "not analysed for gradient accumulation"))
    if has_batchnorm(method):
        reasons.append("BatchNorm layers normalise with the statistics of each micro-batch (SyncBatchNorm "
                       "syncs them across processes, not across micro-batches)")
    if not reasons:
        return None
    return (f"accumulate_steps={accumulate_steps} is approximate for {getattr(method, 'name', 'this method')}: "
            + "; ".join(reasons) + ". The gradients are those of the micro-batches, averaged.")


@contextlib.contextmanager
def gradient_sync(model: nn.Module, sync: bool) -> Iterator[None]:
    """Skip the gradient all-reduce of DDP/FSDP for micro-batches before the last one."""
    if sync:
        yield
        return
    if isinstance(model, nn.parallel.DistributedDataParallel):
        with model.no_sync():
            yield
        return
    setter = getattr(model, "set_requires_gradient_sync", None)  # FSDP2
    if setter is None:
        yield
        return
    setter(False)
    try:
        yield
    finally:
        setter(True)


# -- SyncBatchNorm ------------------------------------------------------------------------
class _AllReduceSum(torch.autograd.Function):
    """Sum over processes; the gradient of every process's copy is the sum of theirs."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        torch.distributed.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        torch.distributed.all_reduce(grad)
        return grad


class DistributedBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm with statistics over every process's batch, on any device.

    PyTorch's :class:`torch.nn.SyncBatchNorm` only runs on GPUs; this one is written with
    differentiable all-reduces (so autograd derives the backward) and serves CPU/gloo runs.
    On CUDA the engine uses ``torch.nn.SyncBatchNorm`` (fused kernels). The parameter and
    buffer names are BatchNorm's, so checkpoints and saved encoders do not change.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        if not (self.training and dist.is_distributed() and dist.world_size() > 1):
            return super().forward(x)
        dims = [0] + list(range(2, x.dim()))
        shape = [1, -1] + [1] * (x.dim() - 2)
        xf = x.float()
        count = torch.tensor([float(x.numel() // x.shape[1])], device=x.device)
        torch.distributed.all_reduce(count)
        mean = _AllReduceSum.apply(xf.sum(dims)) / count
        centred = xf - mean.view(shape)
        var = _AllReduceSum.apply(centred.pow(2).sum(dims)) / count  # biased, as BN normalises with
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = (1.0 / float(self.num_batches_tracked)) if self.momentum is None else self.momentum
                unbiased = var.detach() * count / (count - 1).clamp(min=1)
                self.running_mean.mul_(1 - m).add_(mean.detach().to(self.running_mean.dtype), alpha=m)
                self.running_var.mul_(1 - m).add_(unbiased.to(self.running_var.dtype), alpha=m)
        return y.to(x.dtype)


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Replace every BatchNorm layer of ``module`` by a synchronised one (in place where it
    can; returns the module). ``torch.nn.SyncBatchNorm`` on CUDA, :class:`DistributedBatchNorm`
    elsewhere; :func:`revert_sync_batchnorm` undoes it (the saved encoder has plain BN)."""
    return _swap_bn(module, torch.nn.SyncBatchNorm if device.type == "cuda" else DistributedBatchNorm)


def revert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Turn synchronised BatchNorm layers made by :func:`convert_sync_batchnorm` back into
    the plain ``BatchNorm{1,2,3}d`` they were (same parameters and running statistics)."""
    return _swap_bn(module, None)


def _swap_bn(module: nn.Module, target: type | None) -> nn.Module:
    def convert(m: nn.Module) -> nn.Module:
        if target is not None and isinstance(m, nn.modules.batchnorm._BatchNorm) \
                and not isinstance(m, (torch.nn.SyncBatchNorm, DistributedBatchNorm)):
            new = target(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats)
            new._sslf_plain_bn = type(m)
        elif target is None and hasattr(m, "_sslf_plain_bn"):
            new = m._sslf_plain_bn(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats)
        else:
            return m
        new.load_state_dict(m.state_dict())
        new = new.to(next(iter(m.state_dict().values())).device) if m.state_dict() else new
        new.requires_grad_(any(p.requires_grad for p in m.parameters()) if m.affine else False)
        new.train(m.training)
        return new

    for name, child in list(module.named_children()):
        new = convert(child)
        if new is not child:
            setattr(module, name, new)
        else:
            _swap_bn(child, target)
    return convert(module)


# -- activation checkpointing and compile -------------------------------------------------
def _vit_block_types() -> tuple[type, ...]:
    from timm.models import vision_transformer as vt

    types_ = [vt.Block, vt.ResPostBlock, vt.ParallelScalingBlock, vt.ParallelThingsBlock]
    with contextlib.suppress(ImportError, AttributeError):
        from timm.models.eva import EvaBlock

        types_.append(EvaBlock)
    return tuple(types_)


_CHECKPOINTED: dict[type, type] = {}


def _checkpointed_class(cls: type) -> type:
    if cls not in _CHECKPOINTED:
        def forward(self, *args: Any, **kwargs: Any):
            if not torch.is_grad_enabled():
                return cls.forward(self, *args, **kwargs)
            from torch.utils.checkpoint import checkpoint

            return checkpoint(cls.forward, self, *args, use_reentrant=False, **kwargs)

        _CHECKPOINTED[cls] = type(f"Checkpointed{cls.__name__}", (cls,), {"forward": forward})
    return _CHECKPOINTED[cls]


def vit_blocks(module: nn.Module) -> list[nn.Module]:
    """The transformer blocks (timm ViT/EVA blocks) anywhere in ``module``."""
    kinds = _vit_block_types()
    return [m for m in module.modules() if isinstance(m, kinds)]


def enable_grad_checkpointing(method: nn.Module) -> int:
    """Recompute every ViT block of ``method`` during backward instead of keeping its
    activations; returns how many blocks. Same results (the RNG state is replayed).

    This is timm's ``set_grad_checkpointing`` done per block rather than per model: timm's
    switch only acts inside ``VisionTransformer.forward_features``, while MAE, DINOv2 and
    others run the blocks themselves (masked tokens, decoders) and would not be checkpointed.
    Each block's class is swapped for a subclass whose ``forward`` checkpoints; parameter
    names, state dicts and deep copies (EMA teachers) are unchanged.
    """
    blocks = vit_blocks(method)
    if not blocks:
        raise ValueError("grad_checkpointing=True checkpoints ViT blocks and this model has none "
                         f"({type(method).__name__} on a CNN backbone); turn it off")
    for blk in blocks:
        if type(blk) not in _CHECKPOINTED.values():
            blk.__class__ = _checkpointed_class(type(blk))
    for mod in method.modules():  # timm's own switch too, for code paths through forward_features
        if hasattr(mod, "grad_checkpointing"):
            mod.grad_checkpointing = False  # the blocks already checkpoint; never do it twice
    return len(blocks)


def compile_backbone(method: nn.Module, **compile_kwargs: Any) -> int:
    """``torch.compile`` the compute of ``method``'s backbone in place (``nn.Module.compile``,
    so parameter names and state dicts do not change): each ViT block (which also covers
    methods that run the blocks themselves) or, for a CNN, the whole timm model. Returns the
    number of modules compiled. Compilation happens lazily at the first step."""
    backbone = getattr(method, "backbone", None)
    if backbone is None:
        raise ValueError(f"compile=True: {type(method).__name__} has no .backbone to compile")
    blocks = vit_blocks(method)
    targets = blocks if blocks else [getattr(backbone, "model", backbone)]
    for t in targets:
        t.compile(**compile_kwargs)
    return len(targets)


# -- FSDP ---------------------------------------------------------------------------------
def apply_fsdp(method: nn.Module, device: torch.device) -> nn.Module:
    """Shard ``method`` with FSDP2 (``fully_shard``): one unit per ViT block (student and
    teacher alike), the rest in the root unit. Returns ``method`` (sharded in place)."""
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError as e:  # pragma: no cover - torch < 2.6
        raise RuntimeError(f"strategy='fsdp' needs torch >= 2.6 (torch.distributed.fsdp.fully_shard): {e}") from None
    if not dist.is_distributed():
        raise RuntimeError("strategy='fsdp' shards the model over processes: launch the run with torchrun "
                           "(e.g. torchrun --nproc_per_node=8 ...); on one process use strategy='ddp'")
    blocks = vit_blocks(method)
    if not blocks:
        raise ValueError("strategy='fsdp' shards ViT blocks and this model has none; use strategy='ddp' "
                         "for CNN backbones (they fit one device)")
    from torch.distributed.device_mesh import init_device_mesh

    # the mesh of the training device: without one FSDP picks CUDA whenever it is present, also
    # for a run told to train on the CPU of a GPU machine
    mesh = init_device_mesh(device.type, (dist.world_size(),))
    for blk in blocks:
        fully_shard(blk, mesh=mesh)
    fully_shard(method, mesh=mesh)
    return method


def full_state_dicts(method: nn.Module, optimizer: torch.optim.Optimizer | None
                     ) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """Gather a sharded model's full state dict (and the optimizer's, in ``optimizer.state_dict()``
    layout: integer parameter ids) on every process, on the CPU. A collective (one all-gather
    per sharded tensor, in the same order everywhere): every process must call it."""
    # sorted keys: the order of a loaded optimizer's state differs between processes (string
    # hashing is seeded per process) and every all-gather must meet its partner
    msd = method.state_dict()
    model_sd = {k: full_tensor(msd[k]).detach().cpu() for k in sorted(msd)}
    if optimizer is None:
        return model_sd, None
    osd = optimizer.state_dict()
    state = {}
    for pid in sorted(osd["state"]):
        st = osd["state"][pid]
        state[pid] = {k: (full_tensor(st[k]).cpu() if isinstance(st[k], torch.Tensor) else st[k]) for k in sorted(st)}
    return model_sd, {"state": state, "param_groups": osd["param_groups"]}


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """``t`` whole: a DTensor (an FSDP2 shard) is all-gathered, a plain tensor returned as is."""
    full = getattr(t, "full_tensor", None)  # a DTensor (FSDP2 shard): all-gather it
    return full() if full is not None else t


def _local_slice(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This process's part of ``full`` in the layout of the DTensor ``like`` (FSDP2: dim-0
    chunks as ``torch.chunk`` cuts them), without any communication."""
    from torch.distributed.tensor import Replicate, Shard

    mesh, (placement,) = like.device_mesh, like.placements
    if isinstance(placement, Replicate):
        return full
    if not isinstance(placement, Shard) or mesh.ndim != 1:
        raise NotImplementedError(f"loading a full checkpoint into {placement} over a {mesh.ndim}-D mesh")
    chunks = torch.chunk(full, mesh.size(), dim=placement.dim)
    rank = mesh.get_local_rank()
    if rank < len(chunks):
        return chunks[rank]
    shape = list(full.shape)
    shape[placement.dim] = 0
    return full.new_empty(shape)


def load_full_state_dicts(method: nn.Module, optimizer: torch.optim.Optimizer | None,
                          model_sd: dict[str, torch.Tensor], optim_sd: dict[str, Any] | None) -> None:
    """Load full (unsharded) state dicts into a sharded model and its optimizer: every
    process holds the same full tensors and copies out its own shard (no communication)."""
    from torch.distributed.tensor import DTensor

    own = method.state_dict(keep_vars=True)
    missing, unexpected = sorted(own.keys() - model_sd.keys()), sorted(model_sd.keys() - own.keys())
    if missing or unexpected:
        raise RuntimeError(f"checkpoint does not match the model (missing {missing[:5]}, unexpected "
                           f"{unexpected[:5]}): was it written with a different method, backbone or config?")
    with torch.no_grad():
        for k, dst in own.items():
            src = model_sd[k]
            if isinstance(dst, DTensor):
                dst.to_local().copy_(_local_slice(src, dst))
            else:
                dst.copy_(src)
    if optimizer is None or optim_sd is None:
        return
    params = list(p for g in optimizer.param_groups for p in g["params"])
    state = {}
    for pid, st in optim_sd["state"].items():
        p = params[int(pid)]
        state[int(pid)] = {k: (_shard_like(v, p) if isinstance(v, torch.Tensor) and v.dim() > 0 else v)
                           for k, v in st.items()}
    optimizer.load_state_dict({"state": state, "param_groups": optim_sd["param_groups"]})


def _shard_like(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    if not isinstance(param, DTensor) or full.shape != param.shape:
        return full.to(param.device if not isinstance(param, DTensor) else param.to_local().device)
    local = _local_slice(full, param).to(param.to_local().device).clone()
    return DTensor.from_local(local, param.device_mesh, param.placements, run_check=False,
                              shape=param.shape, stride=param.stride())


__all__ = ["split_micro_batches", "accumulation_warning", "gradient_sync", "has_batchnorm",
           "DistributedBatchNorm", "convert_sync_batchnorm", "revert_sync_batchnorm", "vit_blocks",
           "enable_grad_checkpointing", "compile_backbone", "apply_fsdp", "full_state_dicts", "full_tensor",
           "load_full_state_dicts"]
