"""An :class:`~sslfeatures.Encoder` whose forward pass runs in onnxruntime.

``Encoder.from_pretrained("out/model.onnx")`` (or a folder holding ``model.onnx`` +
``config.json`` and no ``model.safetensors``) returns an :class:`OrtEncoder`: the same
decoding, resizing and normalisation as the PyTorch encoder (it *is* that code: only the
backbone call differs), the same ``embed`` / ``embed_folder`` / ``patch_features`` /
``embed_labelled`` / ``evaluate_knn`` / ``evaluate_linear``. onnxruntime's CUDA provider is
used when ``onnxruntime-gpu`` is installed and a GPU is visible (``pip install
'sslfeatures[gpu]'``), the CPU provider otherwise or when ``device="cpu"``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..encoder import CONFIG_NAME, Encoder
from .onnx_export import EMBEDDING_NAME, INPUT_NAME, ONNX_NAME, TOKENS_NAME

VARIANT_FILES = {"fp32": ONNX_NAME, "int8": "model_int8.onnx", "fp16": "model_fp16.onnx"}


def providers_for(device: str | torch.device | None = None) -> list[str]:
    """onnxruntime execution providers for ``device``: ``None``/``"auto"`` -> CUDA when
    onnxruntime has it (``onnxruntime-gpu``), else CPU; ``"cpu"`` -> CPU; ``"cuda"`` ->
    CUDA (an error when onnxruntime was installed without it)."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    kind = "auto" if device is None else str(device).split(":")[0]
    if kind == "cpu":
        return ["CPUExecutionProvider"]
    if kind == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise ValueError("device='cuda' but onnxruntime has no CUDA provider (available: "
                             f"{available}); install onnxruntime-gpu: pip install 'sslfeatures[gpu]'")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if kind != "auto":
        raise ValueError(f"unknown device {device!r} for onnxruntime; use 'auto', 'cpu' or 'cuda'")
    return (["CUDAExecutionProvider", "CPUExecutionProvider"] if "CUDAExecutionProvider" in available
            else ["CPUExecutionProvider"])


def make_session(path: str | os.PathLike, device: str | torch.device | None = None,
                 providers: Sequence[str] | None = None, threads: int | None = None):
    """An ``onnxruntime.InferenceSession`` on ``path`` with full graph optimisation."""
    try:
        import onnxruntime as ort
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImportError("running an ONNX encoder needs onnxruntime: pip install 'sslfeatures[onnx]'") from None
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        so.intra_op_num_threads = int(threads)
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=list(providers or providers_for(device)))


class OrtBackbone:
    """The slice of :class:`~sslfeatures.backbones.Backbone` the encoder's inference path
    calls, served by an onnxruntime session: ``backbone(x, pooling)`` and
    ``forward_tokens(x)`` on normalised ``(N, 3, H, W)`` float tensors."""

    is_vit = True  # no channels_last conversion: the tensor goes to numpy as it is

    def __init__(self, session: Any, pooling: str, num_features: int):
        self.session = session
        self.pooling = pooling
        self.num_features = int(num_features)
        self.outputs = [o.name for o in session.get_outputs()]
        inputs = [i.name for i in session.get_inputs()]
        if inputs != [INPUT_NAME] or EMBEDDING_NAME not in self.outputs:
            raise ValueError(
                f"this ONNX graph has inputs {inputs} and outputs {self.outputs}; an sslfeatures encoder "
                f"graph has input {INPUT_NAME!r} and outputs {EMBEDDING_NAME!r} (+ {TOKENS_NAME!r}). "
                "A classifier exported by sslfeatures loads with sslfeatures.eval.Classifier.load")
        self.has_tokens = TOKENS_NAME in self.outputs

    def _run(self, x: torch.Tensor, names: list[str]) -> list[np.ndarray]:
        arr = np.ascontiguousarray(x.detach().cpu().float().numpy())
        return self.session.run(names, {INPUT_NAME: arr})

    def __call__(self, x: torch.Tensor, pooling: str | None = None) -> torch.Tensor:
        pooling = pooling or self.pooling
        if pooling in ("default", self.pooling):
            return torch.from_numpy(self._run(x, [EMBEDDING_NAME])[0]).float()
        if pooling in ("mean", "gem") and self.has_tokens:
            tokens = self.forward_tokens(x)
            if pooling == "mean":
                return tokens.mean(1)
            return tokens.clamp(min=1e-6).pow(3).mean(1).pow(1 / 3)  # GeM, p = 3, as Backbone.pool
        raise ValueError(
            f"this ONNX encoder was exported with pooling={self.pooling!r}"
            f"{'' if self.has_tokens else ' and without patch tokens'}; pooling={pooling!r} needs a "
            f"re-export: Encoder.export(..., pooling={pooling!r})"
            + ("" if pooling == "cls" or self.has_tokens else " or with patch_tokens=True"))

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        if not self.has_tokens:
            raise ValueError("this ONNX encoder was exported without patch tokens; re-export with "
                             "Encoder.export(..., patch_tokens=True)")
        return torch.from_numpy(self._run(x, [TOKENS_NAME])[0]).float()

    def eval(self) -> OrtBackbone:
        return self

    def parameters(self):
        return iter(())


class OrtEncoder(Encoder):
    """An exported encoder served by onnxruntime, with :class:`~sslfeatures.Encoder`'s
    inference API.

    >>> enc = OrtEncoder.from_pretrained("exported/model_int8.onnx")   # or Encoder.from_pretrained
    >>> enc.embed(["a.png"]).shape
    """

    def __init__(self, onnx_path: str | os.PathLike, config: dict[str, Any], device: str | torch.device | None = None,
                 providers: Sequence[str] | None = None, threads: int | None = None):
        # Encoder.__init__ moves a torch backbone to a device; here the session owns the device
        self.onnx_path = Path(onnx_path)
        self.config = dict(config)
        self.session = make_session(self.onnx_path, device, providers, threads)
        onnx_cfg = self.config.get("onnx", {}) or {}
        pooling = onnx_cfg.get("pooling") or self.config.get("pooling") or "default"
        dim = self.session.get_outputs()[0].shape[-1]
        if not isinstance(dim, int):
            dim = int(onnx_cfg.get("num_features", 0)) or int(self._probe_dim())
        self.backbone = OrtBackbone(self.session, pooling, dim)
        self.device = torch.device("cpu")  # where the batches are assembled; onnxruntime copies them
        self.precision = "fp32"            # no torch autocast around an onnxruntime call
        self.source_dir = self.onnx_path.parent

    def _takes_any_size(self) -> bool:
        return bool((self.config.get("onnx") or {}).get("dynamic_image_size", False))

    def _probe_dim(self) -> int:
        s = self.image_size
        x = np.zeros((1, 3, s, s), np.float32)
        return int(self.session.run([EMBEDDING_NAME], {INPUT_NAME: x})[0].shape[-1])

    @property
    def providers(self) -> list[str]:
        return list(self.session.get_providers())

    def __repr__(self) -> str:
        return (f"OrtEncoder(file={str(self.onnx_path)!r}, backbone={self.config['backbone']['name']!r}, "
                f"dim={self.num_features}, image_size={self.image_size}, providers={self.providers})")

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, revision: str | None = None,  # type: ignore[override]
                        device: str | torch.device | None = None, variant: str = "fp32",
                        cache_dir: str | os.PathLike | None = None, local_files_only: bool | None = None,
                        providers: Sequence[str] | None = None, threads: int | None = None,
                        **_: Any) -> OrtEncoder:
        """Load an ``.onnx`` file (its ``config.json`` beside it), a folder holding one (the
        file of ``variant``: ``fp32`` -> ``model.onnx``, ``int8``, ``fp16``), or a hub id
        (only ``config.json`` and that file are downloaded, at ``revision``)."""
        if variant not in VARIANT_FILES:
            raise ValueError(f"unknown variant {variant!r}; expected one of {list(VARIANT_FILES)}")
        path = Path(name_or_path)
        if not path.exists() and isinstance(name_or_path, str) and len(name_or_path.split("/")) == 2 \
                and not name_or_path.startswith((".", "/", "~")):
            from huggingface_hub import snapshot_download

            if local_files_only is None:
                local_files_only = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
            path = Path(snapshot_download(name_or_path, revision=revision, cache_dir=cache_dir,
                                          local_files_only=local_files_only,
                                          allow_patterns=[CONFIG_NAME, VARIANT_FILES[variant]]))
        if path.is_dir():
            path = path / VARIANT_FILES[variant]
        if not path.exists():
            raise FileNotFoundError(f"{path} not found (an exported folder holds {ONNX_NAME} + {CONFIG_NAME}; "
                                    "write one with Encoder.export(folder, formats=['onnx']))")
        if path.suffix.lower() != ".onnx":
            raise ValueError(f"{path} is not an .onnx file")
        cfg_path = path.parent / CONFIG_NAME
        if not cfg_path.exists():
            raise FileNotFoundError(f"{cfg_path} not found: an ONNX encoder needs the config.json written beside it "
                                    "(preprocessing: image_size, mean, std, crop_pct)")
        config = Encoder._read_config(cfg_path)
        return cls(path, config, device=device, providers=providers, threads=threads)

    def _preprocess(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float().div_(255)
        mean = torch.tensor(self.config["mean"], dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(self.config["std"], dtype=torch.float32).view(1, -1, 1, 1)
        return ((x - mean) / std).contiguous()

    def _not_torch(self, what: str):
        raise TypeError(f"{what} needs the PyTorch weights; an OrtEncoder holds only {self.onnx_path.name}. "
                        "Load the exported folder's model.safetensors with Encoder.from_pretrained instead.")

    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        self._not_torch("save_pretrained")

    def export(self, folder: str | os.PathLike, formats: Sequence[str] = ("safetensors",),
               **kw: Any) -> dict[str, Path]:
        self._not_torch("export")

    def push_to_hub(self, repo_id: str, **kw: Any) -> Any:
        self._not_torch("push_to_hub")

    def onnx_config(self) -> dict[str, Any]:
        """The ``onnx`` section of ``config.json`` (how the file was exported, its parity)."""
        return json.loads(json.dumps(self.config.get("onnx", {})))


__all__ = ["OrtEncoder", "OrtBackbone", "make_session", "providers_for", "VARIANT_FILES"]
