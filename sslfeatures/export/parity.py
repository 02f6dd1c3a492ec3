"""Parity between an exported file and the PyTorch encoder it came from, on real images.

Every figure is measured, never assumed: the largest absolute difference, that difference
relative to the reference's largest magnitude, and the cosine similarity of each output row
(the worst and the mean). A variant passes when its relative error and its worst cosine are
inside its :class:`Tolerance`; :func:`check_parity` raises :class:`ParityError` otherwise,
so an export that drifted fails loudly instead of shipping.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np


class ParityError(RuntimeError):
    """An exported model's outputs differ from PyTorch's by more than the tolerance."""


@dataclass(frozen=True)
class Tolerance:
    """``max_rel_error``: bound on ``max |got - ref| / max |ref|`` (``None``: not checked);
    ``min_cosine``: bound on the worst row's cosine similarity; ``min_mean_cosine``: bound
    on the mean cosine over rows (``None``: not checked)."""

    max_rel_error: float | None
    min_cosine: float
    min_mean_cosine: float | None = None


#: defaults per variant: fp32 must match to rounding; fp16 keeps ~3 significant digits;
#: int8 is judged by direction only, on average and for the worst image (its k-NN cost is
#: what ``export_encoder(..., knn=...)`` measures).
DEFAULT_TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance(max_rel_error=1e-3, min_cosine=0.9999),
    "fp16": Tolerance(max_rel_error=5e-2, min_cosine=0.999),
    "int8": Tolerance(max_rel_error=None, min_cosine=0.8, min_mean_cosine=0.95),
}


@dataclass
class ParityReport:
    """How far one output of one exported variant is from PyTorch."""

    variant: str
    output: str
    input_shape: list[int]
    max_abs_error: float
    max_rel_error: float
    min_cosine: float
    mean_cosine: float
    tolerance: Tolerance = field(default_factory=lambda: DEFAULT_TOLERANCES["fp32"])

    @property
    def passed(self) -> bool:
        tol = self.tolerance
        rel_ok = tol.max_rel_error is None or self.max_rel_error <= tol.max_rel_error
        mean_ok = tol.min_mean_cosine is None or self.mean_cosine >= tol.min_mean_cosine
        return bool(rel_ok and mean_ok and self.min_cosine >= tol.min_cosine and np.isfinite(self.max_abs_error))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["tolerance"] = asdict(self.tolerance)
        d["passed"] = self.passed
        return d

    def __str__(self) -> str:
        return (f"{self.variant} {self.output} {tuple(self.input_shape)}: max |err| {self.max_abs_error:.3g} "
                f"(rel {self.max_rel_error:.3g}), cosine min {self.min_cosine:.6f} mean {self.mean_cosine:.6f}")


def compare(reference: np.ndarray, got: np.ndarray, variant: str = "fp32", output: str = "embedding",
            input_shape: tuple[int, ...] | list[int] = (), tolerance: Tolerance | None = None) -> ParityReport:
    """Measure ``got`` against ``reference`` (same shape; rows are compared by cosine, the
    last axis being the feature axis)."""
    ref = np.asarray(reference, dtype=np.float64)
    out = np.asarray(got, dtype=np.float64)
    if ref.shape != out.shape:
        raise ParityError(f"{variant} {output}: shape {out.shape} differs from PyTorch's {ref.shape}")
    ref2, out2 = ref.reshape(-1, ref.shape[-1]), out.reshape(-1, out.shape[-1])
    diff = np.abs(out2 - ref2)
    max_abs = float(diff.max()) if diff.size else 0.0
    scale = float(np.abs(ref2).max()) if ref2.size else 0.0
    rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
    num = (ref2 * out2).sum(1)
    den = np.linalg.norm(ref2, axis=1) * np.linalg.norm(out2, axis=1)
    nz = den > 0
    cos = np.empty(len(ref2))
    cos[nz] = num[nz] / den[nz]
    cos[~nz] = (diff.max(1)[~nz] == 0).astype(np.float64)  # two zero rows agree; zero vs non-zero does not
    if not np.isfinite(out2).all():
        max_abs, rel, cos = float("inf"), float("inf"), np.zeros(1)
    return ParityReport(variant=variant, output=output, input_shape=[int(s) for s in input_shape],
                        max_abs_error=max_abs, max_rel_error=float(rel), min_cosine=float(cos.min()),
                        mean_cosine=float(cos.mean()),
                        tolerance=tolerance or DEFAULT_TOLERANCES.get(variant, DEFAULT_TOLERANCES["fp32"]))


def check_parity(reference: np.ndarray, got: np.ndarray, variant: str = "fp32", output: str = "embedding",
                 input_shape: tuple[int, ...] | list[int] = (), tolerance: Tolerance | None = None,
                 where: str = "") -> ParityReport:
    """:func:`compare`, raising :class:`ParityError` when the tolerance is exceeded."""
    rep = compare(reference, got, variant, output, input_shape, tolerance)
    if not rep.passed:
        tol = rep.tolerance
        raise ParityError(
            f"ONNX parity check failed{f' for {where}' if where else ''}: {rep}; tolerance: relative error "
            f"<= {tol.max_rel_error}, cosine >= {tol.min_cosine}"
            f"{'' if tol.min_mean_cosine is None else f', mean cosine >= {tol.min_mean_cosine}'}. "
            f"Pass tolerances={{'{variant}': Tolerance(...)}} "
            "to accept a larger error.")
    return rep


__all__ = ["ParityError", "ParityReport", "Tolerance", "DEFAULT_TOLERANCES", "compare", "check_parity"]
