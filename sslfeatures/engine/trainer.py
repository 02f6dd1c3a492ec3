"""The one training loop shared by every method: :class:`Pretrainer`.

``Pretrainer("simclr", backbone="resnet18", image_size=32).fit("images/")`` decodes the
folder, builds the method from its recipe, trains with warm-up + cosine schedules,
checkpoints atomically, logs metrics, watches for collapse, and saves the frozen
encoder (``model.safetensors`` + ``config.json``) in the run folder.
"""
from __future__ import annotations

import csv
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from ..augment import Views
from ..backbones import create_backbone
from ..config import to_dict
from ..data import ArrayImages, BadFileReport, ImageFolder, TrainStream
from ..methods import StepInfo
from ..utils import atomic_write_bytes, atomic_write_json, autocast, resolve_device, resolve_precision
from . import distributed as dist
from . import scale
from .checkpoint import has_checkpoint, latest_step, load_checkpoint, read_checkpoint, save_checkpoint
from .config import TrainConfig, resolve_config, resolve_method
from .monitor import collapse_stats, is_collapsed
from .optim import build_optimizer, param_groups
from .schedules import cosine, warmup_cosine

log = logging.getLogger("sslfeatures")


class NonFiniteLossError(FloatingPointError):
    """The loss or gradients became NaN/Inf; the last good checkpoint is kept."""


MAX_CONSECUTIVE_SKIPS = 20  # on_nonfinite="skip": this many bad batches in a row means the run diverged


def _grads_finite(params: list[torch.nn.Parameter], total_norm: torch.Tensor | None) -> torch.Tensor:
    """A 0-dim bool tensor: every gradient is finite (no host sync here)."""
    if total_norm is not None:  # clip_grad_norm_ already reduced them: NaN/Inf propagate into the norm
        return torch.isfinite(scale.full_tensor(total_norm))  # a DTensor under FSDP: gathered
    grads = [p.grad for p in params if p.grad is not None]
    grads = [g.to_local() if hasattr(g, "to_local") else g for g in grads]  # FSDP: this process's shards
    if not grads:
        return torch.ones((), dtype=torch.bool)
    return torch.stack(torch._foreach_norm(grads)).isfinite().all()


def _nonfinite_message(what: str, step: int, epoch: int, last_good: int | None, ckdir: Path, lr: float,
                       cfg: TrainConfig) -> str:
    kept = (f"the last good checkpoint (step {last_good}) is kept in {ckdir}: continue from it with resume=True"
            if last_good is not None else "no checkpoint had been written yet")
    return (f"non-finite {what} at step {step} (epoch {epoch}); {kept}. Usual fixes: a lower lr (now {lr:.3g}), "
            f"precision='fp32' (now {cfg.precision!r}), gradient clipping (clip_grad=1.0, now {cfg.clip_grad}); or "
            "on_nonfinite='skip' to skip such batches")


@dataclass
class Run:
    """What :meth:`Pretrainer.fit` returns."""

    output_dir: Path
    config: dict[str, Any]
    metrics: list[dict[str, Any]] = field(default_factory=list)
    bad_files: dict[str, str] = field(default_factory=dict)
    steps: int = 0
    seconds: float = 0.0
    skipped_steps: list[int] = field(default_factory=list)  # batches skipped by on_nonfinite="skip"

    @property
    def final_loss(self) -> float:
        losses = [m["loss"] for m in self.metrics if "loss" in m]
        return losses[-1] if losses else float("nan")

    def encoder(self, **kwargs):
        from ..encoder import Encoder

        return Encoder.from_pretrained(self.output_dir, **kwargs)


def _default_output_dir(method: str) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{method}-{stamp}"


def _step_seed(seed: int, step: int) -> int:
    return (int(seed) * 1_000_003 + int(step) * 7919 + 12345) % (2**63 - 1)


def _micro_seed(seed: int, step: int, slot: int) -> int:
    """The RNG seed (augmentations, masks) of one micro-batch of optimizer step ``step``.

    ``slot = rank x accumulate_steps + micro`` is where the micro-batch's images sit in the
    step's global batch, so the same images get the same random draws whatever the split
    into processes and micro-batches (2 processes x 1 == 1 process x 2 micro-batches).
    Slot 0 keeps the single-process seed of earlier versions.
    """
    base = _step_seed(seed, step)
    return base if slot == 0 else (base + int(slot) * 0x9E3779B97F4A7C15) % (2**63 - 1)


class Pretrainer:
    """Self-supervised pre-training of a backbone with a named method.

    Parameters
    ----------
    method: a registered method name (``sslfeatures.list_methods()``), or a shipped recipe
        variant's name (``"byol_gn_ws"``: BYOL with ``recipes/byol_gn_ws.yaml``).
    backbone: a timm model name; defaults to the recipe's (the paper's).
    recipe: a YAML file to use instead of ``recipes/<method>.yaml``.
    **overrides: any recipe key (``epochs``, ``batch_size``, ``image_size``, ``lr``,
        ``stem``, ``precision``, ...) or method hyper-parameter (``temperature``, ...).
    """

    def __init__(self, method: str, backbone: str | None = None, *, recipe: str | Path | None = None,
                 **overrides: Any):
        self.method_cls, recipe = resolve_method(method, recipe)
        if backbone is not None:
            overrides["backbone"] = backbone
        self.cfg, self.method_cfg = resolve_config(self.method_cls.name, recipe, overrides,
                                                   self.method_cls.Config)
        self.views = Views.from_config(self.cfg.views or [{}, {}], self.cfg.mean, self.cfg.std)

    # -- building ---------------------------------------------------------------------
    def build(self):
        return self.method_cls(self._backbone(), self.method_cfg, self.views)

    def _backbone(self):
        cfg = self.cfg
        return create_backbone(cfg.backbone, image_size=cfg.image_size, stem=cfg.stem,
                               patch_size=cfg.patch_size, pooling=cfg.pooling, **cfg.backbone_kwargs)

    def full_config(self) -> dict[str, Any]:
        d = to_dict(self.cfg)
        d["method_args"] = to_dict(self.method_cfg)
        return d

    def _source(self, data: Any, size: int):
        make_source = getattr(self.method_cls, "make_source", None)
        if make_source is not None:  # a method with its own data (video clips); its source names its stream_class
            return make_source(data, size, self.method_cfg)
        if getattr(self.method_cls, "needs_text", False):  # image-text methods train on captioned images
            from ..data.pairs import ImageTextPairs

            return ImageTextPairs(data, size=size)
        from ..data.shards import ShardSource, is_shard_spec

        if is_shard_spec(data):  # WebDataset tar shards: streamed, split over processes and workers
            return ShardSource(data, size=size)
        if isinstance(data, (str, os.PathLike)):
            return ImageFolder(data, size=size)
        return ArrayImages(data, size=size)

    # -- training ---------------------------------------------------------------------
    def fit(self, data: Any, output_dir: str | os.PathLike | None = None, resume: bool = False,
            overwrite: bool = False, max_steps: int | None = None,
            callbacks: Sequence[Callable[[int, torch.nn.Module], Any]] = ()) -> Run:
        """Train on ``data`` (an image folder, WebDataset tar shards -- ``"shards/train-{000000..000009}.tar"``
        or a folder of ``.tar`` files, see :mod:`sslfeatures.data.shards` -- or a list/array of
        images) and save the encoder.

        ``resume=True`` continues from ``output_dir``'s last checkpoint, reproducing the
        uninterrupted run exactly (same seed, same batches, same augmentations).
        ``max_steps`` stops early (the schedules still span the full run), e.g. for tests.

        ``callbacks`` are called after every optimizer step as ``callback(step, method)``
        (``step`` counts from 1; ``method`` is the training module, whose
        ``encoder_backbone()`` is the encoder being trained), on every process under
        ``torchrun``. One may evaluate (under ``torch.no_grad()``: the method is put back in
        train mode afterwards) or log; returning ``True`` ends the run after this step, saved
        as a run stopped by ``max_steps`` is (under ``torchrun``: the same answer on every process).

        Under ``torchrun`` every process calls ``fit`` with the same arguments (see the
        README's "Scaling out"); if another process dies or stops answering, this one raises
        :class:`~sslfeatures.engine.distributed.PeerLostError` naming the checkpoint to
        resume from, instead of waiting forever.
        """
        try:
            return self._fit(data, output_dir, resume, overwrite, max_steps, callbacks)
        except Exception as exc:
            if not (dist.is_distributed() and dist.world_size() > 1 and dist.is_comm_failure(exc)):
                raise
            out = getattr(self, "_output_dir", None)
            ckdir = out / "checkpoints" if out is not None else None
            latest = latest_step(ckdir) if ckdir is not None else None
            kept = (f"the last checkpoint (step {latest}) is in {ckdir}: start the job again with resume=True "
                    "(sslfeatures pretrain --resume) to continue from it") if latest is not None else \
                "no checkpoint had been written yet"
            first = " ".join(str(exc).split())[:300]
            msg = (f"process {dist.rank()} of {dist.world_size()}: another process of this run died or stopped "
                   f"answering ({type(exc).__name__}: {first}); {kept}")
            log.error(msg)
            raise dist.PeerLostError(msg) from exc

    def _fit(self, data: Any, output_dir: str | os.PathLike | None, resume: bool, overwrite: bool,
             max_steps: int | None, callbacks: Sequence[Callable[[int, torch.nn.Module], Any]] = ()) -> Run:
        cfg = self.cfg
        accum = int(cfg.accumulate_steps)
        if accum < 1:
            raise ValueError(f"accumulate_steps must be 1 or more, got {cfg.accumulate_steps}")
        if not (cfg.epochs > 0 and math.isfinite(cfg.epochs)):
            raise ValueError(f"epochs must be a finite number more than 0, got {cfg.epochs}")
        if resume and output_dir is None:
            raise ValueError("resume=True needs the output_dir of the run to continue")
        out = Path(output_dir) if output_dir is not None else _default_output_dir(cfg.method)
        ckdir = out / "checkpoints"
        self._output_dir = out
        if has_checkpoint(ckdir) and not resume and not overwrite:
            raise FileExistsError(
                f"{out} already holds a training run; pass resume=True to continue it, "
                "overwrite=True to start again, or another output_dir")
        if resume and not has_checkpoint(ckdir):
            raise FileNotFoundError(f"resume=True but {out} has no checkpoint to resume from")

        device = resolve_device(cfg.device)
        dist.init_from_env(cfg.dist_timeout, device)
        if dist.is_distributed() and device.type == "cuda":
            if dist.local_rank() >= torch.cuda.device_count():
                raise RuntimeError(
                    f"process with LOCAL_RANK {dist.local_rank()} has no GPU: this node has "
                    f"{torch.cuda.device_count()} CUDA device(s); start at most that many processes per node "
                    "(torchrun --nproc_per_node), or train on the CPU with device='cpu' (gloo)")
            device = torch.device("cuda", dist.local_rank())
            torch.cuda.set_device(device)
        amp_dtype = resolve_precision(cfg.precision, device)
        main = dist.is_main_process()

        # data first: a missing/empty folder fails before any model is built
        # decoded at image_size at least: views smaller than it (FixRes-style low-resolution training)
        # crop from the full-resolution image, not from a downscaled copy
        load_size = max([cfg.image_size] + [spec.out_size(cfg.image_size) for spec in self.views.specs])
        source = self._source(data, load_size)
        report = BadFileReport(strict=cfg.strict)
        stream_cls = getattr(source, "stream_class", TrainStream)  # e.g. PairStream for captioned images
        # with accumulation each process takes batch_size x accumulate_steps images per optimizer
        # step and trains on them in accumulate_steps slices (scale.split_micro_batches)
        stream = stream_cls(source, cfg.batch_size * accum, seed=cfg.seed, cache_bytes=cfg.cache_bytes,
                            num_workers=cfg.num_workers, report=report, rank=dist.rank(),
                            world_size=dist.world_size(), progress=cfg.progress and main)

        torch.manual_seed(cfg.seed)
        method = self.build().to(device)
        cnn = not method.backbone.is_vit
        sharded = cfg.strategy == "fsdp"
        if sharded and amp_dtype == torch.float16:
            raise ValueError("strategy='fsdp' trains in fp32 or bf16 (precision='bf16'); fp16 needs a sharded "
                             "gradient scaler that the engine does not use")
        if sharded and hasattr(method, "save_artifacts"):
            raise ValueError(f"strategy='fsdp' does not support {cfg.method} (it saves more than the encoder); "
                             "use strategy='ddp'")
        if cfg.grad_checkpointing:
            scale.enable_grad_checkpointing(method)
        sync_bn = cfg.sync_bn if cfg.sync_bn is not None else scale.has_batchnorm(method)
        if sync_bn and dist.world_size() > 1:
            method = scale.convert_sync_batchnorm(method, device)
        if cfg.channels_last and cnn:
            method = method.to(memory_format=torch.channels_last)
        if cfg.compile:
            scale.compile_backbone(method)
        model = method
        if sharded:
            scale.apply_fsdp(method, device)
        elif dist.is_distributed():
            model = torch.nn.parallel.DistributedDataParallel(
                method, device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=False)
        note = scale.accumulation_warning(method, accum)
        if note and main:
            log.warning(note)
        make_groups = getattr(method, "param_groups", None)  # a method may scale a module's lr (a GAN's discriminator)
        groups = (make_groups(cfg.weight_decay) if make_groups
                  else param_groups(method.trainable_modules(), cfg.weight_decay))
        global_batch = cfg.batch_size * dist.world_size() * accum  # images per optimizer step
        peak_lr = cfg.lr if cfg.lr is not None else cfg.base_lr * global_batch / 256
        optimizer = build_optimizer(cfg.optimizer, groups, peak_lr, cfg.weight_decay, cfg.momentum, cfg.betas)
        scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

        spe = len(stream)
        total = max(1, int(cfg.epochs * spe + 0.5))  # fractional epochs (2.5) end mid-epoch
        warmup = int(round(cfg.warmup_epochs * spe))
        step, metrics = 0, []
        last_good: int | None = None  # the step of the newest checkpoint on disk
        skipped: list[int] = []
        if resume:
            if sharded:  # every process reads the full tensors and keeps its shard
                model_sd, optim_sd, meta = read_checkpoint(ckdir, map_location="cpu")
                scale.load_full_state_dicts(method, optimizer, model_sd, optim_sd)
            else:
                meta = load_checkpoint(ckdir, method, optimizer, map_location=device)
            step = last_good = int(meta["step"])
            step = _resume_step(meta, step, spe, global_batch, peak_lr, main)
            metrics = _read_metrics(out / "metrics.csv", step)
            if main:
                log.info("resuming %s from step %d", out, step)
        if main:
            if overwrite and not resume and ckdir.exists():
                shutil.rmtree(ckdir)  # the caller asked to start again: drop the old run's checkpoints
            out.mkdir(parents=True, exist_ok=True)
            atomic_write_json(out / "train_config.json", self.full_config())

        probe = _probe_batch(stream, 512)
        t_start = time.perf_counter()
        last_log_t, last_log_step = t_start, step
        stop_at = total if max_steps is None else min(total, max_steps)
        from tqdm.auto import tqdm

        bar = tqdm(total=stop_at, initial=step, desc=f"{cfg.method}", unit="step",
                   disable=not (cfg.progress and main), dynamic_ncols=True)
        model.train()
        while step < stop_at:
            epoch, start = divmod(step, spe)
            for batch in stream.epoch(epoch, start):
                info = StepInfo(step, total, epoch, spe, 0, accum)
                torch.manual_seed(_micro_seed(cfg.seed, step, dist.rank() * accum))
                lr = warmup_cosine(step, total, warmup, peak_lr, cfg.min_lr)
                wd = cfg.weight_decay if cfg.weight_decay_end is None else cosine(
                    info.progress, cfg.weight_decay, cfg.weight_decay_end)
                for g in optimizer.param_groups:
                    g["lr"] = lr * g.get("lr_scale", 1.0)
                    if g.get("apply_wd", True):
                        g["weight_decay"] = wd
                optimizer.zero_grad(set_to_none=True)
                loss = None
                for micro, part in enumerate(scale.split_micro_batches(batch, accum)):
                    if micro:
                        torch.manual_seed(_micro_seed(cfg.seed, step, dist.rank() * accum + micro))
                    extras: dict[str, Any] = {}
                    if isinstance(part, dict):  # a source with more than images (captions): the rest goes to the method
                        extras = {k: v for k, v in part.items() if k != "images"}
                        part = part["images"]
                    part = part.to(device, non_blocking=True)
                    views = method.views(part, cfg.image_size)
                    if cfg.channels_last and cnn:
                        views = [v.contiguous(memory_format=torch.channels_last) for v in views]
                    # micro-batches before the last skip DDP's gradient all-reduce; the gradients add up
                    with scale.gradient_sync(model, micro == accum - 1):
                        with autocast(device, amp_dtype):
                            outs = model(views, replace(info, micro_step=micro) if accum > 1 else info, **extras)
                        micro_loss = outs["loss"]
                        scaler.scale(micro_loss / accum if accum > 1 else micro_loss).backward()
                    part_loss = micro_loss.detach() / accum if accum > 1 else micro_loss
                    loss = part_loss if loss is None else loss + part_loss
                scaler.unscale_(optimizer)
                method.before_optimizer_step(info)
                total_norm = None
                if cfg.clip_grad:
                    total_norm = torch.nn.utils.clip_grad_norm_(method.parameters(), cfg.clip_grad)
                finite = torch.isfinite(loss.detach().float())
                if not scaler.is_enabled():  # fp16's GradScaler skips steps with inf gradients itself
                    finite = finite & _grads_finite(list(method.parameters()), total_norm)
                if dist.is_distributed():  # every rank takes the same decision
                    finite = finite.to(device).float()
                    torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
                if not bool(finite):
                    what = f"loss ({loss.item()})" if not torch.isfinite(loss) else "gradient"
                    if (cfg.on_nonfinite != "skip"
                            or (len(skipped) >= MAX_CONSECUTIVE_SKIPS
                                and skipped[-MAX_CONSECUTIVE_SKIPS] == step - MAX_CONSECUTIVE_SKIPS)):
                        if cfg.on_nonfinite == "skip":
                            what += f" for {MAX_CONSECUTIVE_SKIPS + 1} batches in a row"
                        raise NonFiniteLossError(_nonfinite_message(what, step, epoch, last_good, ckdir, lr, cfg))
                    log.warning("step %d: non-finite %s; batch skipped (on_nonfinite='skip')", step, what)
                    skipped.append(step)
                    optimizer.zero_grad(set_to_none=True)
                    if scaler.is_enabled():
                        scaler.update()  # lowers the fp16 loss scale
                else:
                    scaler.step(optimizer)
                    scaler.update()
                    method.after_optimizer_step(info)
                step += 1
                bar.update(1)
                if callbacks:
                    stop = [bool(cb(step, method)) for cb in callbacks]  # every callback runs, each step
                    model.train()
                    if any(stop):
                        stop_at = step
                if step % cfg.log_every == 0 or step == stop_at:
                    now = time.perf_counter()
                    ips = (step - last_log_step) * global_batch / max(now - last_log_t, 1e-9)
                    last_log_t, last_log_step = now, step
                    row = {"step": step, "epoch": round(step / spe, 4), "loss": float(loss.detach()),
                           "lr": lr, "wd": wd, "img_per_s": round(ips, 2)}
                    row.update({k: float(v) for k, v in outs.items() if k != "loss"})
                    metrics.append(row)
                    bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{lr:.2e}", ips=f"{ips:.0f}")
                end_of_epoch = step % spe == 0
                if (main or sharded) and (end_of_epoch or step % cfg.checkpoint_every == 0 or step == stop_at):
                    # FSDP: every process takes part in gathering the full state; rank 0 writes it
                    model_sd, optim_sd = scale.full_state_dicts(method, optimizer) if sharded else (None, None)
                    if main:
                        if end_of_epoch or step == stop_at:
                            watched = _EncoderOnly(self._unsharded_backbone(method, model_sd)) if sharded else method
                            stats = _monitor(watched, probe, device, cfg, amp_dtype)
                            metrics.append({"step": step, "epoch": round(step / spe, 4), **stats})
                            if is_collapsed(stats):
                                log.warning("representation collapse at step %d: %s (all images map to nearly the "
                                            "same embedding)", step,
                                            ", ".join(f"{k}={v:.4f}" for k, v in stats.items()))
                        save_checkpoint(ckdir, step, method, optimizer,
                                        {"epoch": epoch, "method": cfg.method, "total_steps": total,
                                         "steps_per_epoch": spe, "global_batch": global_batch,
                                         "batch_size": cfg.batch_size, "world_size": dist.world_size(),
                                         "accumulate_steps": accum, "peak_lr": peak_lr},
                                        model_state=model_sd, optimizer_state=optim_sd)
                        last_good = step
                        _write_metrics(out, metrics)
                if step >= stop_at:
                    break
        bar.close()
        seconds = time.perf_counter() - t_start
        final_backbone = None
        if sharded:  # gathering the shards is a collective: every process takes part
            final_backbone = self._unsharded_backbone(method, scale.full_state_dicts(method, None)[0])
        if main:
            from ..encoder import Encoder

            if final_backbone is None:
                scale.revert_sync_batchnorm(method)  # the saved encoder has plain BatchNorm layers
                final_backbone = method.encoder_backbone()
            enc = Encoder(final_backbone, _encoder_config(cfg, method))
            enc.save_pretrained(out)
            if hasattr(method, "save_artifacts"):  # what a method ships besides the encoder (CLIP's text tower)
                method.save_artifacts(out)
            report.write(out / "bad_files.txt")
            if len(report):
                log.warning(report.summary())
        dist.barrier()
        if skipped:
            log.warning("%d batch(es) with a non-finite loss or gradient were skipped: steps %s", len(skipped),
                        skipped[:20])
        return Run(out, self.full_config(), metrics, dict(report.entries), step, seconds, skipped)

    def _unsharded_backbone(self, method, model_sd: dict[str, torch.Tensor]):
        """A plain (unsharded) copy of ``method``'s encoder backbone holding ``model_sd``'s weights."""
        target = method.encoder_backbone()
        prefix = next(name for name, mod in method.named_modules() if mod is target)
        bb = self._backbone()
        head = f"{prefix}." if prefix else ""
        bb.load_state_dict({k[len(head):]: v for k, v in model_sd.items() if k.startswith(head)})
        return bb


class _EncoderOnly(torch.nn.Module):
    """What :func:`_monitor` needs of a method, for an unsharded copy of its encoder."""

    def __init__(self, backbone: torch.nn.Module):
        super().__init__()
        self.backbone = backbone

    def encoder_backbone(self) -> torch.nn.Module:
        return self.backbone


def _resume_step(meta: dict[str, Any], step: int, spe: int, global_batch: int, peak_lr: float, main: bool) -> int:
    """The optimizer step to continue from, in this run's numbering.

    With the same images per optimizer step (``batch_size x world_size x accumulate_steps``)
    the step is the checkpoint's, and every step sees the same images as the uninterrupted
    run, whatever the number of processes. With another global batch the position is kept
    in epochs and images (epoch boundaries stay where they were) and the schedules are
    re-derived for the new number of steps: that run is not a replay of the original.
    """
    old_gb, old_spe = meta.get("global_batch"), meta.get("steps_per_epoch")
    old_world = meta.get("world_size")
    if old_gb is None or old_spe is None or (int(old_gb) == global_batch and int(old_spe) == spe):
        if main and old_world is not None and int(old_world) != dist.world_size():
            log.info("resuming a %s-process run on %d process(es) with the same global batch (%d): the same "
                     "images per step", old_world, dist.world_size(), global_batch)
        return step
    epoch, pos = divmod(step, int(old_spe))
    new = epoch * spe + min(spe, (pos * int(old_gb)) // global_batch)
    if main:
        old_lr = meta.get("peak_lr")
        log.warning("resuming with a global batch of %d images per step (the checkpoint used %d): continuing at "
                    "step %d of the new schedule (step %d before); schedules are re-derived%s; this is not an "
                    "exact continuation of the original run", global_batch, int(old_gb), new, step,
                    f", peak lr {peak_lr:.3g} (was {old_lr:.3g})" if old_lr is not None and old_lr != peak_lr else "")
    return new


def _encoder_config(cfg: TrainConfig, method) -> dict[str, Any]:
    return {"backbone": method.encoder_backbone().config, "image_size": cfg.image_size,
            "mean": list(cfg.mean), "std": list(cfg.std), "crop_pct": 1.0,
            "pooling": cfg.pooling, "method": cfg.method, "paper": method.paper}


def _probe_batch(stream: TrainStream, n: int) -> torch.Tensor:
    if stream.memory is not None:
        return stream.memory[: min(n, len(stream.memory))]
    batch = next(iter(stream.epoch(0)))
    return batch["images"] if isinstance(batch, dict) else batch


@torch.no_grad()
def _monitor(method, probe: torch.Tensor, device, cfg: TrainConfig, amp_dtype) -> dict[str, float]:
    from ..augment.ops import normalize

    bb = method.encoder_backbone()
    # a method may also expose the embedding its loss acts on (SimSiam's projection): it can
    # collapse while the backbone's features still look spread; watched as head_norm_std / head_eff_rank
    head = getattr(method, "monitor_features", None)
    was, method_was = bb.training, method.training
    (method if head is not None else bb).eval()
    embs, heads = [], []
    with torch.no_grad():  # a probe, not a training step: no autograd graph for its 512 images
        for chunk in probe.split(256):
            x = chunk.to(device).float().div(255)
            if x.shape[-1] != cfg.image_size:
                x = torch.nn.functional.interpolate(x, size=cfg.image_size, mode="bilinear", antialias=True)
            x = normalize(x, cfg.mean, cfg.std)
            with autocast(device, amp_dtype):
                embs.append(bb(x).float())
                if head is not None:
                    heads.append(head(x).float())
    if head is not None:
        method.train(method_was)
    bb.train(was)
    stats = collapse_stats(torch.cat(embs))
    if heads:
        stats.update({f"head_{k}": v for k, v in collapse_stats(torch.cat(heads)).items()})
    return stats


def _write_metrics(out: Path, metrics: list[dict[str, Any]]) -> None:
    keys: list[str] = []
    for row in metrics:
        keys += [k for k in row if k not in keys]
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(metrics)
    atomic_write_bytes(out / "metrics.csv", buf.getvalue().encode())
    try:
        from ..plots import plot_loss_curve

        plot_loss_curve(metrics, out / "loss.png")
    except Exception as exc:  # a plot must never stop training
        log.debug("loss plot failed: %s", exc)


def _read_metrics(path: Path, upto_step: int) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows = []
    with open(path) as fh:
        for row in csv.DictReader(fh):
            r = {k: (float(v) if v not in ("", None) else None) for k, v in row.items()}
            r = {k: v for k, v in r.items() if v is not None}
            if r.get("step", math.inf) <= upto_step:
                r["step"] = int(r["step"])
                rows.append(r)
    return rows
