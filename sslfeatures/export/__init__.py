"""Export and deployment of a frozen encoder.

* :func:`export_encoder` (what ``Encoder.export`` calls): ``model.safetensors`` +
  ``config.json`` in the Hugging Face layout (loadable by plain timm), ONNX with a dynamic
  batch and, where the backbone allows, dynamic image size, fp16 / int8 variants, a model
  card and ``export_report.json``; every file is loaded back and checked, the ONNX ones
  against PyTorch on real images (:mod:`.parity`).
* :class:`OrtEncoder`: the exported ONNX file behind the ``Encoder`` API (onnxruntime, CPU
  or CUDA provider); ``Encoder.from_pretrained("x.onnx")`` returns one.
* :func:`push_to_hub`: export + one commit to a hub repository.

The torch-free deployment kit (onnxruntime + numpy + Pillow + faiss) is the top-level
``export/`` folder of the repository.
"""
from .card import EVAL_RESULTS_NAME, model_card, write_model_card
from .exporter import FORMATS, QUANTIZE, REPORT_NAME, calibration_batches, export_encoder, parity_batch
from .hub import push_to_hub
from .onnx_export import (EMBEDDING_NAME, INPUT_NAME, ONNX_NAME, TOKENS_NAME, EncoderGraph, OnnxExport,
                          encoder_graph, export_onnx)
from .parity import DEFAULT_TOLERANCES, ParityError, ParityReport, Tolerance, check_parity, compare
from .quantize import FP16_NAME, INT8_NAME, quantize_int8, to_fp16
from .runtime import OrtEncoder, make_session, providers_for
from .timm_compat import timm_compatibility, timm_config, timm_model_args

__all__ = ["export_encoder", "calibration_batches", "parity_batch", "push_to_hub", "OrtEncoder", "make_session",
           "providers_for", "export_onnx", "encoder_graph", "EncoderGraph", "OnnxExport", "to_fp16", "quantize_int8",
           "ParityError", "ParityReport", "Tolerance", "DEFAULT_TOLERANCES", "check_parity", "compare",
           "model_card", "write_model_card", "timm_compatibility", "timm_config", "timm_model_args",
           "FORMATS", "QUANTIZE", "REPORT_NAME", "EVAL_RESULTS_NAME", "INPUT_NAME", "EMBEDDING_NAME", "TOKENS_NAME",
           "ONNX_NAME", "INT8_NAME", "FP16_NAME"]
