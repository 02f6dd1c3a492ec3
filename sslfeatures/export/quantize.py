"""Reduced-precision variants of an exported ONNX encoder.

* :func:`to_fp16`: weights and activations in float16, inputs and outputs kept float32
  (onnxruntime's own float16 converter; ops without a float16 kernel stay float32).
* :func:`quantize_int8`: onnxruntime *static* quantization (QDQ format): int8 per-channel
  weights, uint8 activations whose ranges are calibrated on real images from the user's
  folder. Only the matrix ops (Conv, MatMul, Gemm) are quantized by default: they hold
  nearly all the compute, while quantizing normalisations, softmax and GELU costs accuracy
  for little speed.
"""
from __future__ import annotations

import itertools
import logging
import os
import shutil
import tempfile
from pathlib import Path
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from .onnx_export import INPUT_NAME

log = logging.getLogger("sslfeatures.export")

INT8_NAME = "model_int8.onnx"
FP16_NAME = "model_fp16.onnx"
CALIBRATION_METHODS = ("minmax", "percentile", "entropy")
DEFAULT_INT8_OPS = ("Conv", "MatMul", "Gemm")


def to_fp16(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Write a float16 copy of the float32 ONNX model ``src`` to ``dst`` (float32 I/O)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(src))
    half = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=True)
    dst = Path(dst)
    onnx.save(half, str(dst))
    return dst


class _Batches:
    """An onnxruntime ``CalibrationDataReader`` over pre-processed image batches."""

    def __init__(self, batches: Iterable[np.ndarray]):
        self._it: Iterator[np.ndarray] = iter(batches)
        self.count = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._it, None)
        if batch is None:
            return None
        self.count += int(len(batch))
        return {INPUT_NAME: np.ascontiguousarray(batch, dtype=np.float32)}

    def rewind(self) -> None:  # pragma: no cover - onnxruntime calls it only for some methods
        raise RuntimeError("calibration batches can be read once")


def quantize_int8(src: str | os.PathLike, dst: str | os.PathLike, calibration: Iterable[np.ndarray],
                  per_channel: bool = True, method: str = "minmax",
                  op_types: Sequence[str] | None = DEFAULT_INT8_OPS) -> Path:
    """Statically quantize the float32 ONNX model ``src`` to int8 (QDQ) at ``dst``.

    ``calibration``: pre-processed float32 batches ``(N, 3, H, W)`` (normalised as the
    encoder expects), e.g. from :func:`sslfeatures.export.calibration_batches`. ``method``:
    how activation ranges are set from them (``minmax``, ``percentile`` or ``entropy``).
    ``op_types``: op types to quantize (``None``: every op onnxruntime can quantize).
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if method not in CALIBRATION_METHODS:
        raise ValueError(f"unknown calibration method {method!r}; expected one of {CALIBRATION_METHODS}")
    calib = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
             "entropy": CalibrationMethod.Entropy}[method]
    dst = Path(dst)
    batches = iter(calibration)
    first = next(batches, None)
    if first is None or len(first) == 0:
        raise ValueError("int8 calibration needs images: the calibration source yielded no decodable image")
    reader = _Batches(itertools.chain([first], batches))
    with tempfile.TemporaryDirectory(prefix="sslfeatures-int8-") as tmp:
        pre = Path(tmp) / "pre.onnx"
        try:  # onnxruntime's recommended pre-processing: graph optimisation + shape inference
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        except Exception as exc:  # noqa: BLE001 - quantizing the graph as exported still works
            log.info("int8 pre-processing skipped (%s: %s)", type(exc).__name__, exc)
            shutil.copyfile(src, pre)
        quantize_static(str(pre), str(dst), reader, quant_format=QuantFormat.QDQ, per_channel=per_channel,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=calib, op_types_to_quantize=list(op_types) if op_types else None,
                        calibration_providers=["CPUExecutionProvider"])
    log.info("int8 quantization calibrated on %d images -> %s", reader.count, dst)
    return dst


__all__ = ["to_fp16", "quantize_int8", "INT8_NAME", "FP16_NAME", "CALIBRATION_METHODS", "DEFAULT_INT8_OPS"]
