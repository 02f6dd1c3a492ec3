"""Small helpers shared across the package: devices, precision, seeding, atomic writes."""
from __future__ import annotations

import json
import os
import platform
import random
import tempfile
from contextlib import contextmanager, nullcontext
from pathlib import Path
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None``/``"auto"`` picks the ``SSLFEATURES_DEVICE`` environment variable when set (e.g.
    ``cpu`` to keep a GPU machine's jobs on its CPU), else CUDA when present, else CPU."""
    if device is None or device == "auto":
        env = os.environ.get("SSLFEATURES_DEVICE", "").strip()
        if env and env != "auto":
            try:
                return torch.device(env)
            except RuntimeError:
                raise ValueError(f"SSLFEATURES_DEVICE={env!r} is not a device; use cpu, cuda, cuda:N or auto") from None
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    return torch.device(device)


def _cpuinfo_field(name: str) -> str | None:
    """The value of the first ``name : value`` line of Linux's /proc/cpuinfo (None elsewhere or unreadable)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith(name):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_flags() -> set[str]:
    """The CPU's instruction-set flags from Linux's /proc/cpuinfo (empty elsewhere or when unreadable)."""
    return set((_cpuinfo_field("flags") or "").split())


def cpu_model() -> str:
    """The CPU's model name from Linux's /proc/cpuinfo, else what :mod:`platform` knows (for benchmark records)."""
    return _cpuinfo_field("model name") or platform.processor() or platform.machine()


def cpu_has_fast_bf16() -> bool:
    """True when this CPU has native bf16 matmul units (AVX512-BF16 or AMX)."""
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """Map a precision name to the autocast dtype (``None`` = fp32, no autocast).

    ``"auto"``: the ``SSLFEATURES_PRECISION`` environment variable when set (e.g. ``fp32``
    for bit-reproducible results on a CPU with bf16 units), else bf16 on CUDA when supported
    (else fp16), bf16 on CPUs with native bf16 units, fp32 otherwise.
    """
    precision = precision.lower()
    if precision == "auto":
        precision = os.environ.get("SSLFEATURES_PRECISION", "").strip().lower() or "auto"
        if precision not in ("auto", "fp32", "32", "float32", "bf16", "bfloat16", "fp16", "16", "float16"):
            raise ValueError(f"SSLFEATURES_PRECISION={precision!r}: use fp32, bf16, fp16 or auto")
    if precision in ("fp32", "32", "float32"):
        return None
    if precision in ("bf16", "bfloat16"):
        return torch.bfloat16
    if precision in ("fp16", "16", "float16"):
        if device.type != "cuda":
            raise ValueError("fp16 autocast is only supported on CUDA; use 'bf16' or 'fp32' on CPU")
        return torch.float16
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_has_fast_bf16() else None
    raise ValueError(f"unknown precision {precision!r}; expected one of auto, fp32, bf16, fp16")


def autocast(device: torch.device, dtype: torch.dtype | None):
    """An autocast context for ``dtype`` on ``device`` (a no-op for fp32)."""
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


@contextmanager
def atomic_writer(path: str | os.PathLike) -> Iterator[Any]:
    """Open a binary temp file in ``path``'s folder; on a clean exit it is fsynced and
    ``os.replace``d over ``path``, on an error removed (``path`` keeps its old content)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file in the same folder + ``os.replace``."""
    with atomic_writer(path) as fh:
        fh.write(data)


_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
              torch.uint8: "U8", torch.bool: "BOOL"}
_ST_DTYPES.update({getattr(torch, name): code for name, code in  # dtypes newer torch releases have
                   [("uint16", "U16"), ("uint32", "U32"), ("uint64", "U64"), ("float8_e4m3fn", "F8_E4M3"),
                    ("float8_e5m2", "F8_E5M2")] if hasattr(torch, name)})


def write_safetensors(fh: Any, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Stream ``tensors`` to the binary file ``fh`` in the safetensors format, one tensor at a
    time: a tensor on another device, in another memory layout (channels_last) or sharing
    storage with another is copied to a contiguous CPU tensor just before it is written, so
    at most one tensor's copy exists at a time (``safetensors.torch.save`` needs copies of
    all of them plus the whole file as bytes). The writes go through ``fh``, so
    :func:`atomic_writer` and its error handling apply."""
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, t in tensors.items():
        if t.dtype not in _ST_DTYPES:
            raise TypeError(f"safetensors cannot store {name!r} of dtype {t.dtype}")
        n = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads the header to a multiple of 8 bytes
    fh.write(len(raw).to_bytes(8, "little"))
    fh.write(raw)
    for t in tensors.values():
        if t.numel():
            t = t.detach().to("cpu").contiguous()
            fh.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


@contextmanager
def eval_mode(module: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Temporarily put ``module`` in eval mode."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)
