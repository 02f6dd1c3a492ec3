"""Torch -> ONNX for a frozen encoder: pooled embedding (+ optional patch tokens), dynamic
batch, and dynamic image size where the backbone's graph allows it.

Exporter choice: the ``torch.export``-based exporter (``dynamo=True``). It traces with
symbolic sizes, so the arithmetic a ViT does on the input size (the number of patches, and
timm's bicubic resampling of the position embedding to that grid) stays symbolic in the
graph. The TorchScript exporter records those Python ints as constants: a ViT exported at
32 px then fails at 48 px (its position embedding keeps 16 + 1 rows). It is kept only as
the last fallback, for a fixed-size export of a model ``torch.export`` cannot trace.

Two things are done to every ``torch.export`` graph:

* the exporter's intermediate shape annotations (``value_info``) are dropped: for some
  models (ConvNeXt V2 with non-square inputs) they tie dimensions that are not equal, and
  onnxruntime's memory planner then fails with "Shape mismatch attempting to re-use
  buffer"; onnxruntime infers the shapes itself;
* whether height and width really stayed symbolic is read back from the graph: when the
  model's code pins them (``torch.export`` then specialises them silently), the export is a
  fixed-size one and says so (:attr:`OnnxExport.dynamic_image_size` is ``False`` and
  :attr:`OnnxExport.note` gives the reason).
"""
from __future__ import annotations

import contextlib
import copy
import importlib.util
import io
import logging
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

log = logging.getLogger("sslfeatures.export")

INPUT_NAME = "images"
EMBEDDING_NAME = "embedding"
TOKENS_NAME = "patch_tokens"
ONNX_NAME = "model.onnx"
DYNAMIC_SIZE_MODES = ("auto", True, False)


class EncoderGraph(nn.Module):
    """What the ONNX file holds: ``images`` (N, 3, H, W) float32, normalised with the
    encoder's mean/std -> ``embedding`` (N, D) [+ ``patch_tokens`` (N, T, D)]."""

    def __init__(self, backbone: nn.Module, pooling: str | None = None, patch_tokens: bool = False):
        super().__init__()
        self.backbone = backbone
        self.pooling = pooling
        self.patch_tokens = patch_tokens

    def forward(self, images: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        feats = self.backbone.forward_features(images)
        emb = self.backbone.pool(feats, self.pooling)
        if self.patch_tokens:
            return emb, self.backbone.tokens_from_features(feats)
        return emb


def encoder_graph(encoder: Any, pooling: str | None = None, patch_tokens: bool = False) -> EncoderGraph:
    """A CPU fp32, contiguous-format copy of ``encoder``'s backbone wrapped for export (the
    encoder itself is left untouched: it may live on a GPU in channels_last)."""
    backbone = copy.deepcopy(encoder.backbone).cpu().float().eval()
    backbone.to(memory_format=torch.contiguous_format)
    pooling = pooling or encoder.config.get("pooling") or "default"
    return EncoderGraph(backbone, pooling, patch_tokens).eval()


def size_multiple(backbone: nn.Module) -> int:
    """The input-size step of ``backbone``: the ViT patch size, else the CNN's total stride
    (timm's ``feature_info``), else 32."""
    patch = getattr(backbone, "patch_size", None)
    if patch:
        return int(patch)
    info = getattr(getattr(backbone, "model", None), "feature_info", None)
    try:
        return int(info[-1]["reduction"])
    except (TypeError, KeyError, IndexError):
        return 32


@dataclass
class OnnxExport:
    """What :func:`export_onnx` wrote."""

    path: Path
    exporter: str                  # "torch.export" or "torchscript"
    opset: int
    dynamic_batch: bool
    dynamic_image_size: bool
    image_size: int                # the size it was traced at (the only size when not dynamic)
    outputs: list[str]
    note: str = ""                 # why the image size is fixed, when it is

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["path"] = Path(self.path).name
        return d


def _onnx_modules():
    """The ``onnx`` module, or a clear error when the ONNX extra is not installed."""
    missing = [m for m in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(f"ONNX export needs {', '.join(missing)}: pip install 'sslfeatures[onnx]'")
    import onnx

    return onnx


def _input_dims(model) -> list[int | str]:
    dims = model.graph.input[0].type.tensor_type.shape.dim
    return [d.dim_param if d.dim_param else d.dim_value for d in dims]


def _finalise(path: Path) -> tuple[int, list[int | str]]:
    """Drop intermediate shape annotations (see the module docstring), keep one
    self-contained file; returns (opset, input dims)."""
    onnx = _onnx_modules()
    model = onnx.load(str(path))
    del model.graph.value_info[:]
    onnx.checker.check_model(model)
    tmp = path.with_name(path.name + ".tmp")
    onnx.save(model, str(tmp))
    os.replace(tmp, path)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    return int(opset), _input_dims(model)


def _dynamo_export(graph: EncoderGraph, example: torch.Tensor, path: Path, outputs: list[str],
                   dynamic_hw: bool, opset: int | None) -> None:
    dims: dict[int, Any] = {0: torch.export.Dim("batch", min=1, max=1 << 16)}
    if dynamic_hw:  # from one step of the backbone (a patch, or the CNN's total stride) up
        low = min(size_multiple(graph.backbone), int(example.shape[-1]))  # the example size must be in range
        dims[2] = torch.export.Dim("height", min=low, max=1 << 14)
        dims[3] = torch.export.Dim("width", min=low, max=1 << 14)
    # the exporter prints progress lines to stdout; keep them in the debug log
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(graph, (example,), None, dynamo=True, input_names=[INPUT_NAME],
                                 output_names=outputs, dynamic_shapes={"images": dims},
                                 opset_version=opset, external_data=False, verbose=False)
    log.debug("torch.onnx.export: %s", buf.getvalue())
    prog.save(str(path), external_data=False)


def _torchscript_export(graph: nn.Module, example: torch.Tensor, path: Path, outputs: list[str],
                        opset: int | None) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(graph, (example,), str(path), dynamo=False, input_names=[INPUT_NAME],
                          output_names=outputs, opset_version=opset or 18,
                          dynamic_axes={n: {0: "batch"} for n in [INPUT_NAME, *outputs]})


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def export_onnx(graph: EncoderGraph, path: str | os.PathLike, image_size: int,
                dynamic_size: bool | str = "auto", opset: int | None = None) -> OnnxExport:
    """Export ``graph`` to ``path`` (one self-contained file, dynamic batch).

    ``dynamic_size``: ``"auto"`` makes height and width dynamic when the backbone's graph
    allows it and falls back to a fixed ``image_size`` export (logged, with the reason in
    :attr:`OnnxExport.note`) when it does not; ``True`` requires dynamic sizes (an error
    otherwise); ``False`` exports at ``image_size`` only. The graph is not checked against
    PyTorch here: :func:`sslfeatures.export.export_encoder` does that on real images.
    """
    if dynamic_size not in DYNAMIC_SIZE_MODES:
        raise ValueError(f"dynamic_size must be one of {DYNAMIC_SIZE_MODES}, got {dynamic_size!r}")
    _onnx_modules()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    outputs = [EMBEDDING_NAME] + ([TOKENS_NAME] if graph.patch_tokens else [])
    in_chans = int(getattr(graph.backbone, "config", {}).get("in_chans", 3))
    g = torch.Generator().manual_seed(0)
    # batch 2: torch.export specialises a size-1 dimension to a constant
    example = torch.randn(2, in_chans, image_size, image_size, generator=g)
    note, exporter = "", "torch.export"
    attempts: list[tuple[str, bool]] = [("torch.export", True)] if dynamic_size is not False else []
    if dynamic_size is not True:
        attempts += [("torch.export", False), ("torchscript", False)]
    errors: list[str] = []
    for exporter, dyn in attempts:
        try:
            if exporter == "torch.export":
                _dynamo_export(graph, example, path, outputs, dyn, opset)
            else:
                _torchscript_export(graph, example, path, outputs, opset)
            break
        except Exception as exc:  # noqa: BLE001 - the next attempt is a narrower export; reasons are kept
            errors.append(f"{exporter} ({'dynamic' if dyn else 'fixed'} size): {_first_line(exc)}")
            log.info("ONNX export attempt failed: %s", errors[-1])
    else:
        raise RuntimeError("ONNX export failed:\n  " + "\n  ".join(errors))
    used_opset, dims = _finalise(path)
    dynamic_hw = isinstance(dims[2], str) and isinstance(dims[3], str)
    if errors:
        note = "dynamic-size export failed (" + "; ".join(errors) + ")"
    elif dynamic_size is False:
        note = "fixed size requested"
    elif not dynamic_hw:
        note = ("torch.export specialised the image size: the backbone's code depends on the input "
                "size as a Python value")
    if dynamic_size is True and not dynamic_hw:
        raise RuntimeError(f"dynamic_size=True but the export of {path} has a fixed image size: {note}")
    if not dynamic_hw:
        log.warning("ONNX export %s has a fixed input size %dx%d (%s); dynamic batch only",
                    path, image_size, image_size, note)
    return OnnxExport(path=path, exporter=exporter, opset=used_opset, dynamic_batch=isinstance(dims[0], str),
                      dynamic_image_size=dynamic_hw, image_size=int(image_size), outputs=outputs, note=note)


__all__ = ["EncoderGraph", "encoder_graph", "export_onnx", "OnnxExport", "size_multiple", "INPUT_NAME",
           "EMBEDDING_NAME", "TOKENS_NAME", "ONNX_NAME"]
