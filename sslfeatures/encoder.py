"""The frozen encoder a user ships: backbone + preprocessing, saved in the HF-hub layout.

``model.safetensors`` holds the backbone's timm state dict, ``config.json`` the
architecture and preprocessing. ``Encoder.from_pretrained`` takes a run folder, an
exported folder, a ``.safetensors`` file or a hub id; it never unpickles a file unless the
caller opts in with ``allow_pickle=True`` (and even then only tensors, ``weights_only``).
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from .backbones import Backbone, backbone_from_config
from .data import ArrayImages, BadFileReport, ImageFolder, LabelledImageFolder, iterate
from .data.decode import DecodeError
from .utils import autocast, resolve_device, resolve_precision

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # downstream types; their modules are imported lazily by the methods below
    from .eval.classifier import Classifier
    from .eval.finetune import FinetuneResult

log = logging.getLogger("sslfeatures")

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
FORMAT_VERSION = 1


# config.json: every key an encoder folder may hold (sslfeatures' own + timm's export keys), with its type
CONFIG_SCHEMA: dict[str, tuple[Any, bool]] = {  # key -> (type, required)
    "backbone": (dict, True), "image_size": (int, True), "mean": (tuple[float, float, float], True),
    "std": (tuple[float, float, float], True), "crop_pct": (float, False), "pooling": (str, False),
    "method": (str | None, False), "paper": (str | None, False), "format_version": (int, False),
    "num_features": (int, False), "license": (str | None, False), "onnx": (dict, False),
    # written by Encoder.export for timm's loaders
    "architecture": (str, False), "num_classes": (int, False), "model_args": (dict, False),
    "pretrained_cfg": (dict, False),
}
BACKBONE_SCHEMA: dict[str, tuple[Any, bool]] = {
    "name": (str, True), "image_size": (int, False), "stem": (str, False), "patch_size": (int | None, False),
    "pooling": (str, False), "in_chans": (int, False), "registers": (int, False), "timm_kwargs": (dict, False),
    "kind": (str | None, False), "norm": (str, False), "norm_groups": (int, False),
    # Lab-input backbones (kind "lab" / "split_brain": colorization, split-brain, video colorization)
    "lab_channels": (str, False), "input_mean": (list, False), "input_std": (list, False),
}


def _check_schema(cfg: dict[str, Any], schema: dict[str, tuple[Any, bool]], where: str, allow_unknown: bool) -> None:
    from .config import ConfigError, _check, _fmt

    for key, (typ, required) in schema.items():
        if key not in cfg:
            if required:
                raise ConfigError(f"{where}: missing key {key!r} (expected {_fmt(typ)})")
            continue
        try:
            _check(cfg[key], typ, key)
        except ConfigError as e:
            raise ConfigError(f"{where}: {key!r} should be {_fmt(typ)}, got {cfg[key]!r} ({e})") from None
    unknown = sorted(set(cfg) - set(schema))
    if unknown and not allow_unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; an encoder config.json holds only "
                          f"{sorted(schema)} (was it written by another tool or edited by hand?)")


def validate_config(cfg: Any, where: str = "config.json") -> None:
    """Check an encoder ``config.json`` against :data:`CONFIG_SCHEMA`: a missing or unknown
    key, or a value of the wrong type, raises :class:`~sslfeatures.config.ConfigError`
    (a ``ValueError``) saying what was expected."""
    from .config import ConfigError

    if not isinstance(cfg, dict):
        raise ConfigError(f"{where}: expected a JSON object, got {type(cfg).__name__}")
    _check_schema(cfg, CONFIG_SCHEMA, where, allow_unknown=False)
    bb = cfg["backbone"]
    # a Lab / two-trunk backbone ("kind") carries its own extra keys, checked by its from_config
    _check_schema(bb, BACKBONE_SCHEMA, f"{where}: backbone", allow_unknown=bb.get("kind") is not None)
    if cfg["image_size"] < 1:
        raise ConfigError(f"{where}: image_size must be a positive integer, got {cfg['image_size']}")
    if not 0 < float(cfg.get("crop_pct", 1.0)) <= 1:
        raise ConfigError(f"{where}: crop_pct must be in (0, 1], got {cfg['crop_pct']}")
    if any(float(v) <= 0 for v in cfg["std"]):
        raise ConfigError(f"{where}: std values must be > 0, got {cfg['std']}")


class UnsafeFileError(ValueError):
    """A pickle-based weights file was refused (pass ``allow_pickle=True`` to opt in)."""


def _is_commit(revision: str) -> bool:
    """A full 40-hex-digit commit id (branches and tags can move; a commit cannot)."""
    return len(revision) == 40 and all(c in "0123456789abcdef" for c in revision.lower())


def _is_hub_id(s: str) -> bool:
    parts = s.split("/")
    return len(parts) == 2 and all(parts) and not s.startswith((".", "/", "~"))


class Encoder:
    """A frozen backbone with its preprocessing.

    >>> enc = Encoder.from_pretrained("runs/simclr-20260101-000000")
    >>> enc.embed(["a.png", "b.png"]).shape   # (2, D) float32
    """

    def __init__(self, backbone: Backbone, config: dict[str, Any], device: str | torch.device | None = None,
                 precision: str = "auto"):
        self.backbone = backbone.eval()
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        self.config = dict(config)
        self.config.setdefault("format_version", FORMAT_VERSION)
        self.device = resolve_device(device)
        self.precision = precision
        self.source_dir: Path | None = None  # the folder it was loaded from (export reads the run's metrics)
        self.hub_revision: str | None = None  # the commit a hub download resolved to (pin it with revision=)
        self.backbone.to(self.device)
        if not self.backbone.is_vit:
            self.backbone.to(memory_format=torch.channels_last)

    # -- properties ---------------------------------------------------------------------
    @property
    def image_size(self) -> int:
        """The input resolution images are resized (and centre-cropped) to before the backbone."""
        return int(self.config["image_size"])

    @image_size.setter
    def image_size(self, size: int) -> None:
        # a test resolution above the training one often helps after random-resized-crop training
        # (FixRes, Touvron et al. 2019); the new size is saved with the encoder and exported
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
            raise ValueError(f"image_size must be a positive integer, got {size!r}")
        if int(size) != self.image_size and not self._takes_any_size():
            raise ValueError(f"{self.config['backbone']['name']} takes a fixed input size; image_size stays "
                             f"{self.image_size}")
        self.config["image_size"] = int(size)

    def _takes_any_size(self) -> bool:
        return not self.backbone.is_vit or bool(getattr(self.backbone.model, "dynamic_img_size", True))

    @property
    def num_features(self) -> int:
        return self.backbone.num_features

    @property
    def method(self) -> str | None:
        return self.config.get("method")

    def __repr__(self) -> str:
        bb = self.config["backbone"]
        return (f"Encoder(backbone={bb['name']!r}, dim={self.num_features}, image_size={self.image_size}, "
                f"method={self.method!r}, device={self.device})")

    # -- construction --------------------------------------------------------------------
    @classmethod
    def random_init(cls, backbone: str, image_size: int = 224, seed: int = 0, **kwargs: Any) -> Encoder:
        """The same architecture at random initialisation (the usual floor for comparisons)."""
        torch.manual_seed(seed)
        bkw = {k: kwargs.pop(k) for k in ("stem", "patch_size", "pooling") if k in kwargs}
        bb = Backbone(backbone, image_size=image_size, **bkw, **kwargs.pop("backbone_kwargs", {}))
        cfg = {"backbone": bb.config, "image_size": image_size, "mean": [0.485, 0.456, 0.406],
               "std": [0.229, 0.224, 0.225], "crop_pct": 1.0, "pooling": bb.pooling, "method": None}
        return cls(bb, cfg, **kwargs)

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, revision: str | None = None,
                        device: str | torch.device | None = None, precision: str = "auto",
                        cache_dir: str | os.PathLike | None = None, local_files_only: bool | None = None,
                        allow_pickle: bool = False, image_size: int | None = None) -> Encoder:
        """Load from a run/exported folder, a ``.safetensors`` file, or a hub id
        (``"org/name"``, optionally at ``revision``; downloaded through huggingface-hub).
        ``image_size`` overrides the saved input resolution (see :attr:`image_size`).
        An ``.onnx`` file, or a folder holding ``model.onnx`` + ``config.json`` and no
        ``model.safetensors``, gives an onnxruntime-backed
        :class:`~sslfeatures.export.OrtEncoder` with the same inference API."""
        path = Path(name_or_path)
        hub_commit: str | None = None
        if path.suffix.lower() == ".onnx" or (path.is_dir() and not (path / WEIGHTS_NAME).exists()
                                              and (path / "model.onnx").exists()):
            from .export.runtime import OrtEncoder

            enc = OrtEncoder.from_pretrained(path, device=None if device is None else str(device))
            if image_size is not None:
                enc.image_size = image_size
            return enc
        if path.exists():
            folder = path if path.is_dir() else path.parent
            weights = path if path.is_file() else folder / WEIGHTS_NAME
        elif isinstance(name_or_path, str) and _is_hub_id(name_or_path):
            folder = cls._download(name_or_path, revision, cache_dir, local_files_only)
            weights = folder / WEIGHTS_NAME
            hub_commit = folder.name  # snapshot folders are named by their commit
        else:
            raise FileNotFoundError(
                f"{name_or_path!s} is neither an existing file/folder nor a hub id of the form 'org/name'")
        cfg_path = folder / CONFIG_NAME
        if not cfg_path.exists():
            raise FileNotFoundError(f"{cfg_path} not found: an encoder folder holds {CONFIG_NAME} and {WEIGHTS_NAME}")
        config = cls._read_config(cfg_path)
        if not weights.exists() and (folder / "pytorch_model.bin").exists():
            weights = folder / "pytorch_model.bin"  # a folder that only ships a pickle
        if weights.suffix.lower() in PICKLE_SUFFIXES:
            if not allow_pickle:
                raise UnsafeFileError(
                    f"{weights} is a pickle-based file; sslfeatures never unpickles files by default "
                    "because unpickling can run arbitrary code. Convert it to safetensors, or pass "
                    "allow_pickle=True if you trust its source (tensors only are then loaded).")
            state = torch.load(weights, map_location="cpu", weights_only=True)
        else:
            if not weights.exists():
                raise FileNotFoundError(f"{weights} not found")
            state = load_file(str(weights))
        bb = backbone_from_config(config["backbone"])
        missing, unexpected = bb.model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"{weights} does not match {config['backbone']['name']}: missing "
                             f"{list(missing)[:5]}, unexpected {list(unexpected)[:5]}")
        enc = cls(bb, config, device=device, precision=precision)
        enc.source_dir = folder
        enc.hub_revision = hub_commit
        if image_size is not None:
            enc.image_size = image_size
        return enc

    @staticmethod
    def _read_config(path: Path) -> dict[str, Any]:
        try:
            cfg = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
        validate_config(cfg, str(path))
        return cfg

    @staticmethod
    def _download(repo_id: str, revision: str | None, cache_dir, local_files_only) -> Path:
        try:
            from huggingface_hub import snapshot_download
        except ImportError:  # pragma: no cover
            raise ImportError("loading from a hub id needs huggingface-hub: pip install huggingface-hub") from None
        if local_files_only is None:
            local_files_only = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        p = Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only,
                                   allow_patterns=[CONFIG_NAME, WEIGHTS_NAME, "README.md"]))
        if revision is None or not _is_commit(revision):
            # a branch or tag can move: what loads today may differ tomorrow. Say which commit this was.
            log.warning("%s was loaded at %s, which resolved to commit %s; pin it with "
                        "Encoder.from_pretrained(%r, revision=%r) so a later push cannot change what you load",
                        repo_id, f"revision {revision!r}" if revision else "its default branch", p.name, repo_id,
                        p.name)
        return p

    # -- saving ----------------------------------------------------------------------------
    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        """Write ``model.safetensors`` + ``config.json`` (atomically) into ``folder``."""
        from . import utils

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        meta = {"format": "pt", "backbone": self.config["backbone"]["name"]}
        with utils.atomic_writer(folder / WEIGHTS_NAME) as fh:  # tensor by tensor, no copy of the whole model
            utils.write_safetensors(fh, self.backbone.model.state_dict(), meta)
        utils.atomic_write_json(folder / CONFIG_NAME, self.config)
        return folder

    def export(self, folder: str | os.PathLike, formats: Sequence[str] = ("safetensors",),
               quantize: str | Sequence[str] | None = None, **kwargs: Any) -> dict[str, Path]:
        """Export the encoder; every file written is loaded back and checked.

        ``formats``: ``"safetensors"`` (+ ``config.json``, loadable by plain timm) and/or
        ``"onnx"`` (parity-checked against PyTorch on real images); ``quantize``: ``"int8"``
        (calibrated on ``calibration="folder/"``) and/or ``"fp16"`` ONNX variants. A model
        card (``README.md``) and ``export_report.json`` are written beside them. Options:
        :func:`sslfeatures.export.export_encoder` (``patch_tokens``, ``dynamic_size``,
        ``knn=(train, test)``, ``data_description``, ``license``, ...)."""
        from .export import export_encoder

        return export_encoder(self, folder, formats=formats, quantize=quantize, **kwargs)

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> Any:
        """Export (verified, with the model card) and upload to the hub repository
        ``repo_id`` as one commit; see :func:`sslfeatures.export.push_to_hub`."""
        from .export import push_to_hub

        return push_to_hub(self, repo_id, **kwargs)

    # -- inference ---------------------------------------------------------------------------
    def _source(self, inputs: Any) -> tuple[Any, bool]:
        size, crop = self.image_size, float(self.config.get("crop_pct", 1.0))
        if isinstance(inputs, (str, os.PathLike)) and Path(inputs).is_dir():
            return ImageFolder(inputs, size=size, crop_pct=crop), True
        if isinstance(inputs, (str, os.PathLike)) or not isinstance(inputs, (list, tuple, np.ndarray, torch.Tensor)):
            inputs = [inputs]
        elif isinstance(inputs, (np.ndarray, torch.Tensor)) and inputs.ndim <= 3 and not (
                inputs.ndim == 3 and inputs.shape[0] not in (1, 3, 4) and inputs.shape[-1] not in (1, 3, 4)):
            inputs = [inputs]
        return ArrayImages(inputs, size=size, crop_pct=crop), False

    def _preprocess(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True).float().div_(255)
        mean = torch.tensor(self.config["mean"], device=self.device).view(1, -1, 1, 1)
        std = torch.tensor(self.config["std"], device=self.device).view(1, -1, 1, 1)
        x = (x - mean) / std
        if not self.backbone.is_vit:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    @torch.no_grad()
    def _forward_all(self, src, fn, batch_size: int, num_workers: int | None, progress: bool | None,
                     report: BadFileReport, desc: str = "embedding") -> tuple[np.ndarray, np.ndarray]:
        """Decode ``src`` in batches and apply ``fn`` to each preprocessed batch."""
        from tqdm.auto import tqdm

        nw = num_workers if num_workers is not None else (0 if len(src) <= batch_size else None)
        amp = resolve_precision(self.precision, self.device)
        # the output is allocated once and filled batch by batch: peak memory is the result
        # plus a few batches in flight, whatever the number of images
        out: np.ndarray | None = None
        kept = np.empty(len(src), np.int64)
        pos = 0
        show = progress if progress is not None else len(src) > 4 * batch_size
        bar = tqdm(total=len(src), desc=desc, unit="img", disable=not show, leave=False)
        for x, idx in iterate(src, batch_size=batch_size, num_workers=nw, report=report):
            with autocast(self.device, amp):
                y = fn(self._preprocess(x)).float().cpu().numpy()
            if out is None:
                out = np.empty((len(src),) + y.shape[1:], np.float32)
            out[pos:pos + len(y)] = y
            kept[pos:pos + len(y)] = idx.numpy()
            pos += len(y)
            bar.update(len(idx))
        bar.close()
        if out is None:
            return np.zeros((0, 0), np.float32), np.zeros(0, np.int64)
        return out[:pos], kept[:pos]

    def _run(self, inputs: Any, fn, batch_size: int, num_workers: int | None, progress: bool | None,
             strict: bool, report: BadFileReport | None):
        src, is_folder = self._source(inputs)
        report = report if report is not None else BadFileReport(strict=strict and is_folder)  # strict: fail fast
        feats, idx = self._forward_all(src, fn, batch_size, num_workers, progress, report)
        n_bad = len(report)
        if n_bad and (strict or not is_folder):
            first = next(iter(report.entries.items()))
            raise DecodeError(first[0], first[1] + (f" (and {n_bad - 1} more)" if n_bad > 1 else ""))
        if n_bad:
            log.warning(report.summary())
        if not len(idx):
            raise ValueError("no image could be embedded")
        return feats, idx, src

    def _embed_fn(self, pooling: str | None, last_blocks: int = 1):
        """The batch -> embedding function of ``embed``: ``pooling`` (default the config's) of the
        last block, or of each of the ``last_blocks`` last blocks/stages, concatenated."""
        pooling = pooling or self.config.get("pooling", "default")
        if last_blocks == 1:
            return lambda x: self.backbone(x, pooling)
        if not isinstance(self.backbone, Backbone):
            raise ValueError(f"last_blocks={last_blocks} needs a PyTorch timm backbone; this encoder's "
                             f"{type(self.backbone).__name__} gives its last output only")
        return lambda x: self.backbone(x, pooling, last_blocks=last_blocks)

    def embed(self, inputs: Any, batch_size: int = 64, pooling: str | None = None,
              num_workers: int | None = None, progress: bool | None = None, strict: bool = False,
              report: BadFileReport | None = None, last_blocks: int = 1) -> np.ndarray:
        """Pooled embeddings ``(N, D) float32`` for paths, PIL images, arrays, tensors, a list
        of them, or a folder (recursive, sorted; unreadable files there are skipped and
        reported, elsewhere they raise :class:`DecodeError`).

        ``last_blocks=n``: the pooled outputs of the last ``n`` blocks (ViT, final norm
        applied) or stages (CNN) concatenated, ``(N, sum of their widths)``: the multi-block
        features of DINO's and DINOv2's linear evaluation of ViTs (``n_last_blocks=4``)."""
        fn = self._embed_fn(pooling, last_blocks)
        feats, _, _ = self._run(inputs, fn, batch_size, num_workers, progress, strict, report)
        return feats

    def embed_folder(self, folder: str | os.PathLike, batch_size: int = 64, pooling: str | None = None,
                     **kw: Any) -> tuple[list[Path], np.ndarray]:
        """``(paths, embeddings)`` for every decodable image below ``folder``."""
        feats, idx, src = self._run(folder, self._embed_fn(pooling, kw.get("last_blocks", 1)), batch_size,
                                    kw.get("num_workers"), kw.get("progress"), False, kw.get("report"))
        return [src.files[i] for i in idx], feats

    def patch_features(self, inputs: Any, batch_size: int = 32, **kw: Any) -> np.ndarray:
        """Patch-level features ``(N, T, D)``: ViT patch tokens (prefix and register tokens
        dropped) or CNN feature-map cells in row-major order."""
        feats, _, _ = self._run(inputs, self.backbone.forward_tokens, batch_size, kw.get("num_workers"),
                                kw.get("progress"), kw.get("strict", False), kw.get("report"))
        return feats

    def embed_labelled(self, folder: str | os.PathLike, batch_size: int = 128, **kw: Any):
        """``(features, labels, classes)`` of a labelled folder (class = sub-folder); ``pooling``
        and ``last_blocks`` as in :meth:`embed`."""
        src = LabelledImageFolder(folder, size=self.image_size, crop_pct=float(self.config.get("crop_pct", 1.0)))
        fn = self._embed_fn(kw.get("pooling"), kw.get("last_blocks", 1))
        report = kw["report"] if kw.get("report") is not None else BadFileReport()
        feats, idx = self._forward_all(src, fn, batch_size, kw.get("num_workers"),
                                       kw.get("progress", len(src) > 2000), report, f"embedding {Path(folder).name}")
        if len(report):
            log.warning(report.summary())
        if not len(idx):
            raise ValueError(f"no image in {folder} could be decoded\n{report.summary()}")
        return feats, src.labels[idx], src.classes

    # -- evaluation ----------------------------------------------------------------------------
    def evaluate_knn(self, train: str | os.PathLike, test: str | os.PathLike, k: int = 20,
                     temperature: float = 0.07, **kw: Any) -> dict[str, float]:
        """DINO's weighted k-NN top-1/top-5 on two labelled folders."""
        from .eval import weighted_knn

        xtr, ytr, classes = self.embed_labelled(train, **kw)
        xte, yte, classes_te = self.embed_labelled(test, **kw)
        if classes != classes_te:
            raise ValueError(f"train and test folders have different classes: {classes} vs {classes_te}")
        return weighted_knn(xtr, ytr, xte, yte, k=k, temperature=temperature, num_classes=len(classes))

    def evaluate_linear(self, train: str | os.PathLike, test: str | os.PathLike, **kw: Any) -> dict[str, float]:
        """Linear-probe top-1 on two labelled folders (frozen features)."""
        from .eval import linear_probe

        epochs = kw.pop("epochs", 60)
        xtr, ytr, _ = self.embed_labelled(train, **kw)
        xte, yte, _ = self.embed_labelled(test, **kw)
        return linear_probe(xtr, ytr, xte, yte, epochs=epochs)

    # -- downstream (sslfeatures.evaluate) ------------------------------------------------------
    def fit_classifier(self, data: Any, head: str = "linear", **kw: Any) -> Classifier:
        """A linear or MLP head on this frozen encoder's features, with early stopping and
        calibrated probabilities; see :meth:`sslfeatures.eval.classifier.Classifier.fit`."""
        from .eval.classifier import Classifier

        return Classifier.fit(self, data, head=head, **kw)

    def finetune(self, data: Any, label_fraction: float = 1.0, **kw: Any) -> FinetuneResult:
        """End-to-end fine-tuning (MAE/BEiT recipe: layer-wise lr decay, drop path) on a
        class-balanced ``label_fraction`` of ``data``; see :func:`sslfeatures.eval.finetune.finetune`."""
        from .eval.finetune import finetune

        return finetune(self, data, label_fraction=label_fraction, **kw)

    # -- video (sslfeatures.video) ----------------------------------------------------------------
    def propagate_masks(self, video: Any, first_mask: Any = None, **opts: Any) -> Any:
        """Propagate the first frame's mask (a DAVIS palette PNG, label map or binary mask)
        through ``video`` (a file, a folder of frames or a ``(T, H, W, 3)`` array) with
        DINO's label propagation on this encoder's patch features; ``keypoints=(K, 2)``
        tracks points too. Returns a :class:`~sslfeatures.video.PropagationResult`
        (``.save(dir)``, ``.evaluate(gt_folder)``); options:
        :func:`sslfeatures.video.propagate_masks`."""
        from .video.propagate import propagate_masks

        return propagate_masks(self, video, first_mask=first_mask, **opts)
