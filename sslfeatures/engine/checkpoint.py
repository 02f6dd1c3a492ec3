"""Atomic checkpoints in safetensors + a JSON pointer; no pickle anywhere.

Layout in the run folder::

    checkpoints/ckpt-00001200.safetensors   model + optimiser tensors
    checkpoints/latest.json                  {"file": ..., "step": ..., ...}

Each tensor file is written to a temp name and renamed; ``latest.json`` is replaced only
after its tensor file is complete, so a crash at any moment leaves the previous
checkpoint intact and pointed to.
"""
from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file as st_load_file

from .. import utils
from ..utils import atomic_write_json, write_safetensors


def _flatten_optimizer(opt: torch.optim.Optimizer | dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt if isinstance(opt, dict) else opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim/{pid}/{k}"] = v
            else:
                scalars[f"{pid}/{k}"] = v
    groups = [{k: v for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"scalars": scalars, "param_groups": groups}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        if key.startswith("optim/"):
            _, pid, k = key.split("/", 2)
            state.setdefault(int(pid), {})[k] = v
    for key, v in meta["scalars"].items():
        pid, k = key.split("/", 1)
        state.setdefault(int(pid), {})[k] = v
    groups = [dict(g) for g in meta["param_groups"]]
    for g in groups:
        if "betas" in g and isinstance(g["betas"], list):
            g["betas"] = tuple(g["betas"])
    return {"state": state, "param_groups": groups}


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (a full disk, a read-only folder); the previous
    checkpoint is untouched and still the one ``latest.json`` points to."""


def _pointer(folder: Path) -> dict[str, Any] | None:
    """``latest.json``'s content, or None when there is no readable pointer."""
    try:
        meta = json.loads((folder / "latest.json").read_text())
        return meta if isinstance(meta, dict) and "file" in meta and "step" in meta else None
    except (OSError, ValueError):
        return None


def latest_step(folder: str | os.PathLike) -> int | None:
    """The step of the checkpoint ``folder/latest.json`` points to, or None when there is none."""
    meta = _pointer(Path(folder))
    return int(meta["step"]) if meta is not None else None


def _previous(folder: Path) -> str:
    meta = _pointer(folder)
    if meta is None:
        return "there was no previous checkpoint"
    return f"the previous checkpoint ({meta['file']}, step {meta['step']}) is intact"


def save_checkpoint(folder: str | os.PathLike, step: int, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, meta: dict[str, Any], keep: int = 1, *,
                    model_state: dict[str, torch.Tensor] | None = None,
                    optimizer_state: dict[str, Any] | None = None) -> Path:
    """Write ``ckpt-<step>.safetensors`` + ``latest.json`` atomically; prune older files.

    ``model_state`` / ``optimizer_state``: full state dicts to write instead of
    ``model.state_dict()`` / ``optimizer.state_dict()`` (a sharded FSDP model gathers them
    on every process first).

    A write that fails (``ENOSPC``...) raises :class:`CheckpointWriteError` naming the step,
    the folder and the cause; the half-written file is removed and the previous checkpoint
    stays the one ``latest.json`` points to.
    """
    folder = Path(folder)
    tensors = {f"model/{k}": v for k, v in (model.state_dict() if model_state is None else model_state).items()}
    otensors, ometa = _flatten_optimizer(optimizer if optimizer_state is None else optimizer_state)
    tensors.update(otensors)
    name = f"ckpt-{step:08d}.safetensors"
    for stale in folder.glob(".*.tmp") if folder.is_dir() else []:
        stale.unlink(missing_ok=True)  # half-written files of a killed run (one writer per run folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with utils.atomic_writer(folder / name) as fh:  # looked up at call time (tests inject faults)
            write_safetensors(fh, tensors)
        atomic_write_json(folder / "latest.json", dict(meta, step=step, file=name, optimizer=ometa))
    except OSError as e:
        if (folder / name).exists() and (_pointer(folder) or {}).get("file") != name:
            (folder / name).unlink(missing_ok=True)  # written, but latest.json never pointed to it
        cause = "the disk is full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
        raise CheckpointWriteError(
            e.errno, f"could not write the step-{step} checkpoint to {folder}: {cause}; {_previous(folder)}. "
                     "Free space (or choose another output_dir) and continue with resume=True") from e
    ckpts = sorted(folder.glob("ckpt-*.safetensors"))
    for old in ckpts[:-keep] if keep > 0 else []:
        if old.name != name:
            old.unlink(missing_ok=True)
    return folder / name


def load_checkpoint(folder: str | os.PathLike, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None = None,
                    map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Restore model (and optimiser) from ``folder/latest.json``; returns its metadata."""
    model_sd, osd, meta = read_checkpoint(folder, map_location)
    missing, unexpected = model.load_state_dict(model_sd, strict=False)
    if missing or unexpected:
        raise RuntimeError(
            f"checkpoint {Path(folder) / meta['file']} does not match the model (missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}): was it written with a different method, backbone or config?")
    if optimizer is not None:
        optimizer.load_state_dict(osd)
    return meta


def read_checkpoint(folder: str | os.PathLike, map_location: str | torch.device = "cpu"
                    ) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """``(model state dict, optimizer state dict, metadata)`` of ``folder/latest.json``'s
    checkpoint, without loading them into anything (optimizer tensors on ``map_location``)."""
    folder = Path(folder)
    ptr = folder / "latest.json"
    if not ptr.exists():
        raise FileNotFoundError(f"no checkpoint to resume from in {folder} (latest.json missing)")
    try:
        meta = json.loads(ptr.read_text())
        path = folder / meta["file"]
    except (ValueError, KeyError, TypeError) as e:
        raise RuntimeError(f"{ptr} is not a checkpoint pointer ({e}); it was not written by sslfeatures") from None
    if Path(meta["file"]).name != meta["file"]:
        raise RuntimeError(f"{ptr} points outside its folder ({meta['file']!r}); refusing to read it")
    if not path.is_file():
        raise FileNotFoundError(f"{ptr} points to {path.name}, which is missing")
    try:
        tensors = st_load_file(str(path))  # tensor by tensor from a memory map: no whole-file bytes copy
    except Exception as e:  # safetensors raises its own error type for a damaged header
        raise RuntimeError(f"checkpoint {path} is damaged ({e}); it cannot be resumed from") from None
    model_sd = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
    osd = _unflatten_optimizer({k: v.to(map_location) for k, v in tensors.items() if k.startswith("optim/")},
                               meta["optimizer"])
    return model_sd, osd, meta


def has_checkpoint(folder: str | os.PathLike) -> bool:
    return (Path(folder) / "latest.json").exists()
