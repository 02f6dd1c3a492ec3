"""``Encoder.export``: write every requested file, then load each back and check it.

=====================  =====================================================================
file                   check
=====================  =====================================================================
``model.safetensors``  reloaded with ``Encoder.from_pretrained``: every tensor bit-identical
``model.onnx``         run in onnxruntime on real images against the PyTorch fp32 graph: at
                       the export size, at batch 1, and (dynamic exports) at a second,
                       non-square size, which exercises ViT position-embedding resampling
``model_fp16.onnx``    the same images, fp16 tolerance
``model_int8.onnx``    the same images, int8 tolerance; calibrated on the user's images
``config.json``        sslfeatures' keys + timm's (when timm can rebuild the backbone) + an
                       ``onnx`` section (input/outputs, dynamic axes, parity)
``README.md``          the model card (:mod:`sslfeatures.export.card`)
``export_report.json`` every parity figure and, with ``knn=(train, test)``, k-NN top-1 of
                       PyTorch and of each ONNX variant (the accuracy cost of fp16/int8)
=====================  =====================================================================

A parity error above tolerance raises :class:`~sslfeatures.export.ParityError`.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from ..data import ArrayImages, ImageFolder, iterate, list_images
from ..utils import atomic_write_json
from .card import EVAL_RESULTS_NAME, run_knn_results, write_model_card
from .onnx_export import (EMBEDDING_NAME, INPUT_NAME, ONNX_NAME, TOKENS_NAME, EncoderGraph, OnnxExport,
                          encoder_graph, export_onnx, size_multiple)
from .parity import DEFAULT_TOLERANCES, ParityError, ParityReport, Tolerance, check_parity
from .quantize import DEFAULT_INT8_OPS, FP16_NAME, INT8_NAME, quantize_int8, to_fp16
from .timm_compat import timm_compatibility, timm_config, timm_model_args

log = logging.getLogger("sslfeatures.export")

FORMATS = ("safetensors", "onnx")
QUANTIZE = ("int8", "fp16")
REPORT_NAME = "export_report.json"


# -- images ----------------------------------------------------------------------------------
def _image_source(encoder: Any, images: Any, size: int):
    """An image source over ``images`` (folder, files, arrays; ``None``: the embedded
    Fashion-MNIST test photos), decoded and centre-cropped at ``size``."""
    crop = float(encoder.config.get("crop_pct", 1.0))
    if images is None:
        from ..data.demo import load_demo_arrays

        a = load_demo_arrays()
        # one image of each class, then the next of each: a real, varied set
        order = np.argsort(a["y_test"], kind="stable").reshape(10, -1).T.reshape(-1)
        return ArrayImages(list(a["x_test"][order[:64]]), size=size, crop_pct=crop)
    if isinstance(images, (str, os.PathLike)) and Path(images).is_dir():
        return ImageFolder(images, size=size, crop_pct=crop)
    src, _ = encoder._source(images)
    src.size, src.crop_pct = size, crop
    return src


def _spread(n_total: int, n: int) -> list[int]:
    """``n`` indices spread evenly over ``range(n_total)`` (a folder sorted by class or
    name is sampled across all of it)."""
    if n_total <= n:
        return list(range(n_total))
    return sorted({int(i) for i in np.linspace(0, n_total - 1, n).round()})


def _batches(encoder: Any, images: Any, size: int, max_images: int, batch_size: int = 32
             ) -> Iterator[np.ndarray]:
    src = _image_source(encoder, images, size)
    idx = _spread(len(src), max_images)
    for x, _ in iterate(src, batch_size=batch_size, num_workers=0, indices=idx):
        yield np.ascontiguousarray(encoder._preprocess(x).float().cpu().numpy())


def calibration_batches(encoder: Any, images: Any, max_images: int = 128, batch_size: int = 32
                        ) -> Iterator[np.ndarray]:
    """Pre-processed float32 batches of up to ``max_images`` images from ``images`` (a
    folder, spread over all of it, or a list of images), as the encoder sees them."""
    if images is None:
        raise ValueError("int8 quantization is calibrated on your images: pass calibration='folder/' "
                         "(a few hundred images like the ones the encoder will embed)")
    if isinstance(images, (str, os.PathLike)) and Path(images).is_dir():
        list_images(images)  # a clear error for an empty folder, before any work
    return _batches(encoder, images, encoder.image_size, max_images, batch_size)


def parity_batch(encoder: Any, images: Any = None, n: int = 8, size: int | tuple[int, int] | None = None
                 ) -> np.ndarray:
    """``n`` real images, pre-processed as the encoder does: ``(n, 3, H, W)`` float32.
    ``size`` (an int or ``(H, W)``; default the encoder's) crops a non-square batch from
    images decoded at the larger side."""
    size = size or encoder.image_size
    h, w = (size, size) if isinstance(size, int) else size
    x = np.concatenate(list(_batches(encoder, images, max(h, w), n)))
    if not len(x):
        raise ValueError("no image for the parity check could be decoded")
    top, left = (x.shape[2] - h) // 2, (x.shape[3] - w) // 2
    return np.ascontiguousarray(x[:, :, top:top + h, left:left + w])


# -- checks ----------------------------------------------------------------------------------
def _reference(graph: EncoderGraph, x: np.ndarray) -> dict[str, np.ndarray]:
    with torch.no_grad():
        out = graph(torch.from_numpy(x))
    out = out if isinstance(out, tuple) else (out,)
    names = [EMBEDDING_NAME, TOKENS_NAME][:len(out)]
    return {n: o.numpy() for n, o in zip(names, out)}


def _check_file(path: Path, graph: EncoderGraph, batches: list[np.ndarray], variant: str,
                tolerance: Tolerance) -> list[ParityReport]:
    """Run ``path`` through the ORT encoder's own backbone on each batch against PyTorch."""
    from .runtime import make_session

    sess = make_session(path, device="cpu")
    outputs = [o.name for o in sess.get_outputs()]
    if [i.name for i in sess.get_inputs()] != [INPUT_NAME] or outputs[0] != EMBEDDING_NAME:
        raise ParityError(f"{path}: unexpected inputs/outputs {[i.name for i in sess.get_inputs()]} -> {outputs}")
    reports = []
    for x in batches:
        ref = _reference(graph, x)
        got = dict(zip(outputs, sess.run(outputs, {INPUT_NAME: x})))
        for name in ref:
            reports.append(check_parity(ref[name], got[name], variant, name, x.shape, tolerance, where=path.name))
    for r in reports:
        log.info("parity %s: %s", path.name, r)
    return reports


def _worst(reports: list[ParityReport]) -> dict[str, dict[str, float]]:
    """Per variant, the largest error and the lowest cosine over all its checks."""
    out: dict[str, dict[str, float]] = {}
    for r in reports:
        w = out.setdefault(r.variant, {"max_abs_error": 0.0, "min_cosine": 1.0})
        w["max_abs_error"] = max(w["max_abs_error"], r.max_abs_error)
        w["min_cosine"] = min(w["min_cosine"], r.min_cosine)
    return out


def _verify_safetensors(encoder: Any, folder: Path) -> None:
    from ..encoder import Encoder

    back = Encoder.from_pretrained(folder, device="cpu")
    mine = encoder.backbone.model.state_dict()
    theirs = back.backbone.model.state_dict()
    if mine.keys() != theirs.keys():
        raise RuntimeError(f"export check failed: {folder} holds other tensors than the encoder")
    for k, v in theirs.items():
        if not torch.equal(v.cpu(), mine[k].cpu()):
            raise RuntimeError(f"export check failed: {k} differs after reload")


def _normalise_quantize(quantize: str | Sequence[str] | None) -> list[str]:
    if quantize is None:
        return []
    qs = [quantize] if isinstance(quantize, str) else list(quantize)
    for q in qs:
        if q not in QUANTIZE:
            raise ValueError(f"unknown quantize option {q!r}; expected None or one of {QUANTIZE}")
    return list(dict.fromkeys(qs))


def _knn(encoder: Any, knn: tuple[Any, Any]) -> dict[str, Any]:
    res = encoder.evaluate_knn(knn[0], knn[1], progress=False)
    return {"top1": float(res["top1"]), "top5": float(res["top5"])}


# -- the export -------------------------------------------------------------------------------
def export_encoder(encoder: Any, folder: str | os.PathLike, formats: Sequence[str] = ("safetensors",),
                   quantize: str | Sequence[str] | None = None, *, patch_tokens: bool = False,
                   pooling: str | None = None, dynamic_size: bool | str = "auto", opset: int | None = None,
                   calibration: Any = None, calibration_size: int = 128, int8_method: str = "minmax",
                   int8_ops: Sequence[str] | None = DEFAULT_INT8_OPS,
                   check_images: Any = None, n_check: int = 8, tolerances: dict[str, Tolerance] | None = None,
                   knn: tuple[Any, Any] | None = None, data_description: str | None = None,
                   license: str = "apache-2.0", card: bool = True, repo_id: str | None = None) -> dict[str, Path]:
    """Export ``encoder`` into ``folder``; every file written is loaded back and checked.

    ``formats``: ``"safetensors"`` (PyTorch weights, timm-loadable) and/or ``"onnx"``.
    ``quantize``: ``None``, ``"int8"``, ``"fp16"`` or both, written beside ``model.onnx``
    (needs ``"onnx"``); int8 is calibrated on ``calibration`` (a folder or list of
    images; up to ``calibration_size`` of them, ``int8_method`` sets the activation ranges,
    ``int8_ops`` the op types quantized). ``patch_tokens``: a second ONNX output
    ``patch_tokens`` (N, T, D). ``pooling``: the pooled output's pooling (default the
    encoder's). ``dynamic_size``: ``"auto"`` (dynamic height/width when the backbone's
    graph allows it, verified at a second size; else a fixed-size export), ``True``
    (required) or ``False``. ``check_images``: real images for the parity checks
    (default: a sample of ``calibration``, else the embedded Fashion-MNIST test photos);
    ``tolerances`` overrides :data:`~sslfeatures.export.parity.DEFAULT_TOLERANCES`.
    ``knn=(train_folder, test_folder)`` measures weighted k-NN top-1 of PyTorch and of each
    ONNX variant. ``data_description`` / ``license`` fill the model card (``card=False``
    skips it). Returns ``{kind: path}`` for every file written.
    """
    formats = list(formats)
    for fmt in formats:
        if fmt not in FORMATS:
            raise ValueError(f"unknown export format {fmt!r}; supported: {', '.join(map(repr, FORMATS))}")
    if not formats:
        raise ValueError(f"formats is empty; choose from {FORMATS}")
    quant = _normalise_quantize(quantize)
    if quant and "onnx" not in formats:
        raise ValueError(f"quantize={quantize!r} makes ONNX variants: add 'onnx' to formats")
    if "int8" in quant and calibration is None:
        calibration_batches(encoder, None)  # raises the explanation
    if knn is not None and (not isinstance(knn, (tuple, list)) or len(knn) != 2):
        raise ValueError("knn must be a (train_folder, test_folder) pair of labelled folders")
    unknown = set(tolerances or {}) - set(DEFAULT_TOLERANCES)
    if unknown:
        raise ValueError(f"tolerances for unknown variants {sorted(unknown)}; expected keys among "
                         f"{list(DEFAULT_TOLERANCES)}")
    tols = {**DEFAULT_TOLERANCES, **(tolerances or {})}
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    config = dict(encoder.config)
    config.pop("onnx", None)  # an encoder loaded from an earlier export: that export's ONNX section is stale
    config["num_features"] = int(encoder.num_features)
    config["license"] = license
    timm_ok, timm_note = timm_compatibility(encoder.backbone)
    if timm_ok:
        config.update(timm_config(encoder.backbone, config))
    report: dict[str, Any] = {"timm_compatible": timm_ok, "timm_note": timm_note, "parity": []}

    if "safetensors" in formats:
        encoder.save_pretrained(folder)
        files["safetensors"] = folder / "model.safetensors"

    onnx_info: OnnxExport | None = None
    if "onnx" in formats:
        graph = encoder_graph(encoder, pooling, patch_tokens)
        images = check_images if check_images is not None else calibration
        check = [parity_batch(encoder, images, n_check)]
        try:
            onnx_info, reports = _export_checked_onnx(encoder, graph, folder, dynamic_size, opset, images, check[0],
                                                      tols["fp32"])
            files["onnx"] = onnx_info.path
            if "fp16" in quant:
                path = to_fp16(onnx_info.path, folder / FP16_NAME)
                reports += _check_file(path, graph, check, "fp16", tols["fp16"])
                files["onnx_fp16"] = path
            if "int8" in quant:
                path = quantize_int8(onnx_info.path, folder / INT8_NAME,
                                     calibration_batches(encoder, calibration, calibration_size),
                                     method=int8_method, op_types=int8_ops)
                reports += _check_file(path, graph, check, "int8", tols["int8"])
                files["onnx_int8"] = path
        except BaseException:  # no ONNX file that failed (or missed) its check is left behind
            for name, q in ((ONNX_NAME, None), (FP16_NAME, "fp16"), (INT8_NAME, "int8")):
                if q is None or q in quant:
                    (folder / name).unlink(missing_ok=True)
            raise
        report["parity"] = [r.to_dict() for r in reports]
        config["onnx"] = {**onnx_info.to_dict(), "input": INPUT_NAME, "input_layout": "NCHW float32, normalised",
                          "pooling": graph.pooling, "patch_tokens": bool(patch_tokens),
                          "num_features": int(encoder.num_features),
                          "files": {k: p.name for k, p in files.items() if k.startswith("onnx")},
                          "parity": _worst(reports)}
    atomic_write_json(folder / "config.json", config)
    files["config"] = folder / "config.json"
    if "safetensors" in formats:
        _verify_safetensors(encoder, folder)

    knn_res = None
    if knn is not None:
        from .runtime import OrtEncoder

        knn_res = {"train": str(knn[0]), "test": str(knn[1]), "torch": _knn(encoder, knn)}
        for key, path in files.items():
            if key.startswith("onnx"):
                knn_res[key] = _knn(OrtEncoder.from_pretrained(path, device="cpu"), knn)
        for key, res in knn_res.items():
            if isinstance(res, dict) and key != "torch":
                res["top1_change"] = res["top1"] - knn_res["torch"]["top1"]
        atomic_write_json(folder / EVAL_RESULTS_NAME, {"knn": knn_res})
        files["eval_results"] = folder / EVAL_RESULTS_NAME
        log.info("k-NN top-1: %s", {k: v["top1"] for k, v in knn_res.items() if isinstance(v, dict)})
    report["knn"] = knn_res
    report["onnx"] = config.get("onnx")
    atomic_write_json(folder / REPORT_NAME, report)
    files["report"] = folder / REPORT_NAME
    if card:
        files["card"] = write_model_card(
            folder, config, source_dir=getattr(encoder, "source_dir", None), files=files,
            parity=report["parity"], knn=knn_res if knn_res is not None else run_knn_results(
                getattr(encoder, "source_dir", None)),
            data_description=data_description, license=license, repo_id=repo_id,
            timm_args=timm_model_args(encoder.backbone) if timm_ok else None, timm_note=timm_note)
    json.dumps(report)  # the report is plain JSON (fails loudly on a stray numpy value)
    return files


def _export_checked_onnx(encoder: Any, graph: EncoderGraph, folder: Path, dynamic_size: bool | str,
                         opset: int | None, images: Any, x: np.ndarray,
                         tolerance: Tolerance) -> tuple[OnnxExport, list[ParityReport]]:
    """Export fp32 ONNX and check it on the batch ``x`` (export size), at batch 1 and (when
    dynamic) on ``images`` at a second, non-square size; an ``"auto"`` export whose dynamic
    graph is wrong at the second size is redone at a fixed size."""
    size = encoder.image_size
    info = export_onnx(graph, folder / ONNX_NAME, size, dynamic_size=dynamic_size, opset=opset)
    reports = _check_file(info.path, graph, [x, x[:1]], "fp32", tolerance)
    if info.dynamic_image_size:
        step = size_multiple(encoder.backbone)
        other = (size + step, size + 2 * step)
        try:
            reports += _check_file(info.path, graph, [parity_batch(encoder, images, len(x), other)], "fp32",
                                   tolerance)
        except Exception as exc:  # noqa: BLE001 - a parity error, or onnxruntime failing at that size
            if dynamic_size is True:
                raise ParityError(f"the dynamic-size ONNX export is wrong at {other[0]}x{other[1]}: {exc}") from exc
            log.warning("the dynamic-size ONNX graph is wrong at %dx%d (%s); exporting at a fixed %d px instead",
                        other[0], other[1], exc, size)
            info = export_onnx(graph, folder / ONNX_NAME, size, dynamic_size=False, opset=opset)
            info.note = f"the dynamic-size graph failed the parity check at {other[0]}x{other[1]}"
            reports = _check_file(info.path, graph, [x, x[:1]], "fp32", tolerance)
    return info, reports


__all__ = ["export_encoder", "calibration_batches", "parity_batch", "FORMATS", "QUANTIZE", "REPORT_NAME"]
