"""Classifiers on frozen encoders: a linear or MLP head trained on cached features.

>>> clf = enc.fit_classifier("labelled/", head="mlp")       # or Classifier.fit(enc, ...)
>>> clf.predict(["a.png", pil_image])                        # class names
>>> clf.predict_proba(images)                                # (N, C) calibrated probabilities
>>> clf.save("clf/"); Classifier.load("clf/")                # safetensors + json
>>> clf.export("out/", formats=["onnx"])                     # encoder + head in one ONNX graph

The encoder embeds the labelled images once; the head then trains on those cached
features in memory (AdamW, cosine schedule), with early stopping on the validation loss of
a held-out, class-stratified split. The same split then fits one temperature (Guo et al.
2017, *On Calibration of Modern Neural Networks*) so that ``predict_proba`` is calibrated;
the expected calibration error before and after is kept in ``clf.metrics``.

Features are standardised (mean and standard deviation of the training features, the
latter floored at a tenth of its median so near-constant dimensions are not blown up)
inside the head, so a saved or exported classifier needs nothing but images.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import math
import os
from pathlib import Path
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..heads import mlp
from .labels import labelled_features, stratified_split

log = logging.getLogger("sslfeatures")

HEADS = ("linear", "mlp")
HEAD_WEIGHTS = "head.safetensors"
CLASSIFIER_CONFIG = "classifier.json"
ONNX_NAME = "model.onnx"
ONNX_INPUT = "images"
ONNX_OUTPUTS = ("embedding", "logits", "probs")  # embedding first: the export/ kit reads it
FORMAT_VERSION = 1


class FeatureNorm(nn.Module):
    """``(x - mean) / std`` with fixed (buffer) statistics."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).clone())
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).clamp(min=1e-6).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def build_head(kind: str, in_dim: int, num_classes: int, hidden_dim: int | None = None,
               mean: torch.Tensor | None = None, std: torch.Tensor | None = None) -> nn.Sequential:
    """``FeatureNorm`` followed by a linear layer (``"linear"``) or a 2-layer MLP
    (``"mlp"``: Linear-BN-ReLU-Linear, :func:`sslfeatures.heads.mlp`)."""
    if kind not in HEADS:
        raise ValueError(f"unknown head {kind!r}; expected one of {HEADS}")
    if num_classes < 2:
        raise ValueError(f"a classifier needs at least 2 classes, got {num_classes}")
    mean = torch.zeros(in_dim) if mean is None else mean
    std = torch.ones(in_dim) if std is None else std
    if kind == "linear":
        return nn.Sequential(FeatureNorm(mean, std), nn.Linear(in_dim, num_classes))
    return nn.Sequential(FeatureNorm(mean, std), mlp(in_dim, hidden_dim or max(256, in_dim), num_classes, 2))


def expected_calibration_error(probs: np.ndarray | torch.Tensor, labels: Sequence[int] | torch.Tensor,
                               bins: int = 15) -> float:
    """ECE: mean |accuracy - confidence| over ``bins`` equal-width confidence bins, weighted
    by the share of samples in each (Naeini et al. 2015; Guo et al. 2017)."""
    p = torch.as_tensor(np.asarray(probs), dtype=torch.float64)
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    conf, pred = p.max(1)
    correct = (pred == y).double()
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (conf > lo) & (conf <= hi)
        if inside.any():
            ece += inside.double().mean().item() * abs(correct[inside].mean().item() - conf[inside].mean().item())
    return float(ece)


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, max_iter: int = 100) -> float:
    """The temperature ``T > 0`` minimising the NLL of ``softmax(logits / T)`` (L-BFGS on log T)."""
    logits, labels = logits.detach().float(), labels.detach().long()
    log_t = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-9, tolerance_change=1e-12)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    opt.step(closure)
    t = float(log_t.detach().exp())
    if not math.isfinite(t):  # degenerate validation set (e.g. all logits equal)
        return 1.0
    return min(max(t, 1e-2), 1e2)


def calibrate_on(logits: torch.Tensor, labels: torch.Tensor, fit: bool = True) -> tuple[float, dict[str, Any]]:
    """Temperature scaling on a held-out split: ``(temperature, metrics)`` with the split's
    top-1 and its ECE before and after. When every held-out image is classified correctly
    the NLL keeps falling as ``T -> 0`` (the split says nothing about over-confidence), so
    the temperature stays 1."""
    logits, labels = logits.detach().float().cpu(), labels.detach().long().cpu()
    m: dict[str, Any] = {"val_top1": (logits.argmax(1) == labels).float().mean().item(),
                         "val_ece_uncalibrated": expected_calibration_error(logits.softmax(1), labels)}
    if not fit:
        return 1.0, m
    if m["val_top1"] == 1.0:
        m["calibration"] = "skipped: every held-out image is classified correctly"
        return 1.0, m
    if len(labels) < 50:
        log.warning("calibrating on only %d held-out images: the temperature is a rough estimate", len(labels))
    t = fit_temperature(logits, labels)
    m["calibration"] = f"temperature scaling on {len(labels)} held-out images"
    m["val_ece"] = expected_calibration_error((logits / t).softmax(1), labels)
    return t, m


def _evaluate_head(head: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    head.eval()
    with torch.no_grad():
        logits = head(x)
        return F.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item()


def train_head(x: torch.Tensor, y: torch.Tensor, head: nn.Module, x_val: torch.Tensor | None = None,
               y_val: torch.Tensor | None = None, epochs: int = 200, patience: int = 20, lr: float = 1e-3,
               weight_decay: float = 1e-4, batch_size: int = 256, seed: int = 0) -> tuple[nn.Module, list[dict]]:
    """Train ``head`` on in-memory features (AdamW, cosine schedule). With a validation set,
    stop after ``patience`` epochs without a lower validation loss and return the best head."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = max(1, math.ceil(len(x) / batch_size))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * steps_per_epoch)
    use_val = x_val is not None and len(x_val) > 0
    best, best_state, bad, history = math.inf, None, 0, []
    for epoch in range(epochs):
        head.train()
        perm = torch.randperm(len(x), generator=g)
        total = 0.0
        for s in range(0, len(x), batch_size):
            i = perm[s:s + batch_size]
            if len(i) < 2 and len(x) >= 2:  # BatchNorm cannot train on one sample
                i = perm[-2:]
            loss = F.cross_entropy(head(x[i]), y[i])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(i)
        row = {"epoch": epoch + 1, "train_loss": total / len(x)}
        if use_val:
            row["val_loss"], row["val_top1"] = _evaluate_head(head, x_val, y_val)
            if row["val_loss"] < best - 1e-6:
                best, best_state, bad = row["val_loss"], copy.deepcopy(head.state_dict()), 0
            else:
                bad += 1
        history.append(row)
        if use_val and bad >= patience:
            break
    if best_state is not None:
        head.load_state_dict(best_state)
    head.eval()
    return head, history


class _ClassifierGraph(nn.Module):
    """Backbone + head + temperature in one module: what the ONNX graph holds
    (``images -> (embedding, logits, probs)``)."""

    def __init__(self, backbone: nn.Module, head: nn.Module, temperature: float, pooling: str | None):
        super().__init__()
        self.backbone, self.head = backbone, head
        self.pooling = pooling
        self.register_buffer("inv_temperature", torch.tensor(1.0 / temperature, dtype=torch.float32))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        emb = self.backbone(images, self.pooling)
        logits = self.head(emb)
        return emb, logits, torch.softmax(logits * self.inv_temperature, dim=-1)


def export_onnx(module: nn.Module, example: torch.Tensor, path: str | os.PathLike,
                input_name: str = ONNX_INPUT, output_names: Sequence[str] = ONNX_OUTPUTS,
                opset: int = 18) -> Path:
    """Export ``module`` (one image-batch input, dynamic batch) to one self-contained ONNX
    file: the ``torch.export`` exporter first, the TorchScript one if that fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = module.eval()
    try:
        # the exporter prints progress lines on stdout: keep them out of a CLI's JSON output
        with contextlib.redirect_stdout(io.StringIO()):
            torch.onnx.export(module, (example,), str(path), input_names=[input_name],
                              output_names=list(output_names), dynamo=True, external_data=False,
                              opset_version=opset, verbose=False,
                              dynamic_shapes={input_name: {0: torch.export.Dim("batch", min=1, max=65536)}})
    except Exception as exc:  # noqa: BLE001 - fall back to the older exporter, with the reason logged
        log.info("torch.export-based ONNX export failed (%s: %s); using the TorchScript exporter",
                 type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, (example,), str(path), input_names=[input_name],
                              output_names=list(output_names), dynamo=False, opset_version=opset,
                              dynamic_axes={n: {0: "batch"} for n in [input_name, *output_names]})
    return path


class Classifier:
    """A frozen :class:`~sslfeatures.Encoder` with a trained head and its class names.

    Build one with :meth:`fit` (or ``Encoder.fit_classifier``), or :meth:`load` a saved one.
    ``temperature`` divides the logits before the softmax in :meth:`predict_proba`.
    ``encoder`` may be ``None`` for a head on precomputed features (see :meth:`fit_features`).
    """

    def __init__(self, encoder: Any, head: nn.Module, classes: Sequence[str], head_kind: str = "linear",
                 temperature: float = 1.0, hidden_dim: int | None = None, metrics: dict[str, Any] | None = None):
        if len(classes) < 2:
            raise ValueError("a classifier needs at least 2 classes")
        self.encoder = encoder
        self.device = encoder.device if encoder is not None else torch.device("cpu")
        self.head = head.eval().to(self.device)
        self.classes = [str(c) for c in classes]
        self.head_kind = head_kind
        self.temperature = float(temperature)
        self.hidden_dim = hidden_dim
        self.metrics: dict[str, Any] = dict(metrics or {})

    def __repr__(self) -> str:
        return (f"Classifier(head={self.head_kind!r}, classes={len(self.classes)}, "
                f"temperature={self.temperature:.3f}, encoder={self.encoder!r})")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def _encoder(self) -> Any:
        if self.encoder is None:
            raise ValueError("this classifier has no encoder (it was fitted on features alone): use "
                             "logits_from_features / proba_from_features, or fit it with an Encoder")
        return self.encoder

    # -- training -------------------------------------------------------------------------
    @classmethod
    def fit(cls, encoder: Any, data: Any, labels: Sequence[Any] | None = None, head: str = "linear",
            classes: Sequence[str] | None = None, val_fraction: float = 0.1, epochs: int = 200,
            patience: int = 20, lr: float | None = None, weight_decay: float | Sequence[float] = 1e-4,
            hidden_dim: int | None = None, batch_size: int = 256, calibrate: bool = True, seed: int = 0,
            embed_batch_size: int = 128) -> Classifier:
        """Embed ``data`` once with the frozen ``encoder`` and train a head on the features.

        Parameters
        ----------
        data: a labelled folder (``root/<class>/<image>``), or images with ``labels``
            (class names or integers; ``classes`` fixes the names' order).
        head: ``"linear"`` or ``"mlp"`` (Linear-BN-ReLU-Linear, ``hidden_dim`` wide,
            default ``max(256, D)``).
        val_fraction: share of every class held out for early stopping and temperature
            calibration (0 turns both off: fixed ``epochs``, temperature 1).
        lr: AdamW learning rate; default 1e-2 (linear) / 1e-3 (MLP), on standardised features.
        weight_decay: one value, or several to choose from by validation loss.
        """
        x, y, names = labelled_features(encoder, data, labels, classes, batch_size=embed_batch_size)
        return cls.fit_features(encoder, x, y, names, head=head, val_fraction=val_fraction, epochs=epochs,
                                patience=patience, lr=lr, weight_decay=weight_decay, hidden_dim=hidden_dim,
                                batch_size=batch_size, calibrate=calibrate, seed=seed)

    @classmethod
    def fit_features(cls, encoder: Any, features: np.ndarray, labels: Sequence[int], classes: Sequence[str],
                     head: str = "linear", val_fraction: float = 0.1, epochs: int = 200, patience: int = 20,
                     lr: float | None = None, weight_decay: float | Sequence[float] = 1e-4,
                     hidden_dim: int | None = None, batch_size: int = 256, calibrate: bool = True,
                     seed: int = 0) -> Classifier:
        """:meth:`fit` on features already computed by ``encoder`` (``(N, D)``, labels ``0..C-1``).

        ``encoder=None`` gives a head on features alone (e.g. raw pixels): it predicts from
        features (:meth:`proba_from_features`) but cannot take images, be saved or exported."""
        if head not in HEADS:
            raise ValueError(f"unknown head {head!r}; expected one of {HEADS}")
        x = torch.as_tensor(np.asarray(features), dtype=torch.float32)
        y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
        if x.ndim != 2 or len(x) != len(y):
            raise ValueError(f"features must be (N, D) with one label each; got {tuple(x.shape)} and {len(y)} labels")
        c = len(classes)
        present = torch.unique(y)
        if len(present) < 2:
            raise ValueError(f"training a classifier needs images of at least 2 classes; got only {present.tolist()}")
        if int(y.max()) >= c:
            raise ValueError(f"label {int(y.max())} is out of range for {c} classes")
        tr, va = stratified_split(y.numpy(), val_fraction, seed) if val_fraction > 0 else (np.arange(len(y)), [])
        tr, va = torch.as_tensor(tr, dtype=torch.long), torch.as_tensor(np.asarray(va), dtype=torch.long)
        if val_fraction > 0 and len(va) == 0:
            log.warning("too few images per class to hold out a validation split: training %d epochs "
                        "without early stopping or calibration", epochs)
        xtr, ytr, xva, yva = x[tr], y[tr], x[va], y[va]
        mean, std = xtr.mean(0), (xtr.std(0) if len(xtr) > 1 else torch.ones(x.shape[1]))
        # dims (nearly) constant on the training images (dead units, few samples) are not
        # blown up: their scale is floored at a tenth of the median scale
        floor = 0.1 * float(std.median()) if float(std.median()) > 0 else 1.0
        std = std.clamp(min=floor)
        lr = lr if lr is not None else (1e-2 if head == "linear" else 1e-3)
        if head == "mlp":
            hidden_dim = int(hidden_dim or max(256, x.shape[1]))
        wds = [float(weight_decay)] if isinstance(weight_decay, (int, float)) else [float(w) for w in weight_decay]
        if not wds:
            raise ValueError("weight_decay must be a number or a non-empty sequence of numbers")
        best = None
        for wd in wds:
            torch.manual_seed(seed)
            h = build_head(head, x.shape[1], c, hidden_dim, mean, std)
            h, hist = train_head(xtr, ytr, h, xva, yva, epochs=epochs, patience=patience, lr=lr,
                                 weight_decay=wd, batch_size=batch_size, seed=seed)
            score = _evaluate_head(h, xva, yva)[0] if len(va) else 0.0
            if best is None or score < best[0]:
                best = (score, wd, h, hist)
        _, wd, h, hist = best
        metrics: dict[str, Any] = {"n_train": int(len(tr)), "n_val": int(len(va)), "weight_decay": wd,
                                   "epochs_run": len(hist), "train_loss": hist[-1]["train_loss"]}
        temperature = 1.0
        if len(va):
            with torch.no_grad():
                logits = h(xva)
            metrics["best_epoch"] = int(min(hist, key=lambda r: r["val_loss"])["epoch"])
            temperature, cal = calibrate_on(logits, yva, fit=calibrate)
            metrics.update(cal)
        metrics["temperature"] = temperature
        return cls(encoder, h, classes, head_kind=head, temperature=temperature,
                   hidden_dim=hidden_dim if head == "mlp" else None, metrics=metrics)

    # -- inference ------------------------------------------------------------------------
    def logits_from_features(self, features: np.ndarray | torch.Tensor) -> np.ndarray:
        """Uncalibrated logits ``(N, C)`` of features computed by this classifier's encoder."""
        x = torch.as_tensor(np.asarray(features), dtype=torch.float32, device=self.device)
        with torch.no_grad():
            return self.head.eval()(x).float().cpu().numpy()

    def proba_from_features(self, features: np.ndarray | torch.Tensor) -> np.ndarray:
        """Calibrated probabilities ``(N, C)`` of precomputed features."""
        logits = torch.from_numpy(self.logits_from_features(features))
        return (logits / self.temperature).softmax(1).numpy()

    def logits(self, images: Any, batch_size: int = 64) -> np.ndarray:
        """Uncalibrated logits ``(N, C)`` for anything ``Encoder.embed`` takes."""
        return self.logits_from_features(self._encoder().embed(images, batch_size=batch_size))

    def predict_proba(self, images: Any, batch_size: int = 64) -> np.ndarray:
        """Calibrated class probabilities ``(N, C)`` (columns in the order of ``classes``)."""
        return self.proba_from_features(self._encoder().embed(images, batch_size=batch_size))

    def predict(self, images: Any, batch_size: int = 64) -> list[str]:
        """The most probable class name for each image (paths, PIL images, arrays, tensors)."""
        return [self.classes[i] for i in self.logits(images, batch_size).argmax(1)]

    def evaluate(self, data: Any, labels: Sequence[Any] | None = None, batch_size: int = 128) -> dict[str, float]:
        """Top-1, NLL and ECE on labelled data whose classes match this classifier's."""
        x, y, names = labelled_features(self._encoder(), data, labels, self.classes if labels is not None else None,
                                        batch_size=batch_size)
        if list(names) != self.classes:
            raise ValueError(f"the evaluation data has classes {names}, the classifier {self.classes}")
        logits = torch.from_numpy(self.logits_from_features(x))
        yt = torch.as_tensor(y)
        probs = (logits / self.temperature).softmax(1)
        k = min(5, self.num_classes)
        return {"top1": (logits.argmax(1) == yt).float().mean().item(),
                "top5": (logits.topk(k, 1).indices == yt[:, None]).any(1).float().mean().item(),
                "nll": F.cross_entropy(logits / self.temperature, yt).item(),
                "ece": expected_calibration_error(probs, yt), "n": int(len(yt))}

    # -- persistence ----------------------------------------------------------------------
    def _config(self) -> dict[str, Any]:
        return {"format_version": FORMAT_VERSION, "head": self.head_kind, "hidden_dim": self.hidden_dim,
                "num_features": int(self.head[0].mean.numel()), "classes": self.classes,
                "id2label": {str(i): c for i, c in enumerate(self.classes)},
                "temperature": self.temperature,
                "pooling": None if self.encoder is None else self.encoder.config.get("pooling", "default"),
                "metrics": self.metrics}

    def save(self, folder: str | os.PathLike) -> Path:
        """Write the encoder (``model.safetensors`` + ``config.json``), the head
        (``head.safetensors``) and ``classifier.json`` (classes, temperature, head shape)."""
        from safetensors.torch import save

        from ..utils import atomic_write_bytes, atomic_write_json

        folder = Path(folder)
        self._encoder().save_pretrained(folder)
        state = {k: v.detach().cpu().contiguous().clone() for k, v in self.head.state_dict().items()}
        atomic_write_bytes(folder / HEAD_WEIGHTS, save(state, metadata={"format": "pt", "head": self.head_kind}))
        atomic_write_json(folder / CLASSIFIER_CONFIG, self._config())
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike, device: str | torch.device | None = None,
             precision: str = "auto") -> Classifier:
        """Load a folder written by :meth:`save`."""
        from safetensors.torch import load_file

        from ..encoder import Encoder

        folder = Path(folder)
        cfg_path = folder / CLASSIFIER_CONFIG
        if not cfg_path.exists():
            raise FileNotFoundError(f"{cfg_path} not found: a classifier folder holds {CLASSIFIER_CONFIG}, "
                                    f"{HEAD_WEIGHTS} and the encoder's files (see Classifier.save)")
        try:
            cfg = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{cfg_path} is not valid JSON: {e}") from None
        for key in ("head", "classes", "num_features"):
            if key not in cfg:
                raise ValueError(f"{cfg_path}: missing key {key!r}")
        enc = Encoder.from_pretrained(folder, device=device, precision=precision)
        if enc.num_features != cfg["num_features"]:
            raise ValueError(f"{folder}: the encoder gives {enc.num_features}-d features, the head expects "
                             f"{cfg['num_features']}")
        head = build_head(cfg["head"], cfg["num_features"], len(cfg["classes"]), cfg.get("hidden_dim"))
        state = load_file(str(folder / HEAD_WEIGHTS))
        missing, unexpected = head.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"{folder / HEAD_WEIGHTS} does not match a {cfg['head']!r} head: missing "
                             f"{list(missing)[:5]}, unexpected {list(unexpected)[:5]}")
        return cls(enc, head, cfg["classes"], head_kind=cfg["head"], temperature=cfg.get("temperature", 1.0),
                   hidden_dim=cfg.get("hidden_dim"), metrics=cfg.get("metrics"))

    # -- export ---------------------------------------------------------------------------
    def graph(self) -> nn.Module:
        """A CPU fp32 copy of encoder + head: ``images (N, 3, S, S) normalised -> (logits, probs)``."""
        backbone = copy.deepcopy(self._encoder().backbone).cpu().float().eval()
        backbone.to(memory_format=torch.contiguous_format)
        head = copy.deepcopy(self.head).cpu().float().eval()
        return _ClassifierGraph(backbone, head, self.temperature, self.encoder.config.get("pooling")).eval()

    def export(self, folder: str | os.PathLike, formats: Sequence[str] = ("onnx",),
               check_images: Any = None, atol: float = 1e-4, rtol: float = 1e-3) -> dict[str, Path]:
        """Export the classifier; every file written is loaded back and checked.

        ``"onnx"``: ``model.onnx``, ONE graph of encoder + head with input ``images``
        (float32 ``(N, 3, S, S)``, normalised with the ``mean``/``std`` of ``config.json``)
        and outputs ``embedding`` (the frozen features), ``logits`` and ``probs``
        (calibrated softmax), so the torch-free ``export/`` kit's ``OnnxEncoder`` opens it
        as it is (``kit.session.run(["probs"], {"images": kit.preprocess(files)})``), beside
        ``config.json``
        (the encoder's preprocessing) and ``classifier.json`` (class names, temperature,
        input/output names, and the parity measured here). The graph is run in
        onnxruntime on ``check_images`` (default: a seeded random batch) and compared
        with PyTorch; an error above ``atol + rtol * |logit|`` fails the export.
        ``"safetensors"``: :meth:`save`, reloaded and compared.
        """
        folder = Path(folder)
        out: dict[str, Path] = {}
        for fmt in formats:
            if fmt == "safetensors":
                self.save(folder)
                back = Classifier.load(folder, device="cpu")
                for k, v in back.head.state_dict().items():
                    if not torch.equal(v.cpu(), self.head.state_dict()[k].cpu()):
                        raise RuntimeError(f"export check failed: head tensor {k} differs after reload")
                out["safetensors"] = folder / HEAD_WEIGHTS
            elif fmt == "onnx":
                out["onnx"] = self._export_onnx(folder, check_images, atol, rtol)
            else:
                raise ValueError(f"unknown export format {fmt!r}; supported: 'onnx', 'safetensors'")
        return out

    def _check_batch(self, check_images: Any) -> torch.Tensor:
        if check_images is None:
            g = torch.Generator().manual_seed(0)
            return torch.randn(3, 3, self.encoder.image_size, self.encoder.image_size, generator=g)
        src, _ = self.encoder._source(check_images)
        from ..data import iterate

        batches = [self.encoder._preprocess(x).float().cpu() for x, _ in iterate(src, batch_size=64, num_workers=0)]
        if not batches:
            raise ValueError("none of check_images could be decoded")
        return torch.cat(batches).contiguous()

    def _export_onnx(self, folder: Path, check_images: Any, atol: float, rtol: float) -> Path:
        try:
            import onnxruntime as ort
        except ImportError:  # pragma: no cover - depends on the environment
            raise ImportError("ONNX export needs onnx, onnxscript and onnxruntime: "
                              "pip install 'sslfeatures[onnx]'") from None
        from ..utils import atomic_write_json

        folder.mkdir(parents=True, exist_ok=True)
        graph = self.graph()
        x = self._check_batch(check_images)
        example = x[:2] if len(x) >= 2 else torch.cat([x, x])
        path = export_onnx(graph, example, folder / ONNX_NAME)
        with torch.no_grad():
            ref_emb, ref_logits, ref_probs = (t.numpy() for t in graph(x))
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        names = [o.name for o in sess.get_outputs()]
        if [i.name for i in sess.get_inputs()] != [ONNX_INPUT] or names != list(ONNX_OUTPUTS):
            raise RuntimeError(f"exported graph has inputs {[i.name for i in sess.get_inputs()]} and outputs "
                               f"{names}; expected [{ONNX_INPUT!r}] and {list(ONNX_OUTPUTS)}")
        got_emb, got_logits, got_probs = sess.run(list(ONNX_OUTPUTS), {ONNX_INPUT: x.numpy()})
        one = sess.run(["logits"], {ONNX_INPUT: x[:1].numpy()})[0]  # batch size 1 works too
        err_logits = float(np.abs(got_logits - ref_logits).max())
        err_probs = float(np.abs(got_probs - ref_probs).max())
        err_one = float(np.abs(one - ref_logits[:1]).max())
        err_emb = float(np.abs(got_emb - ref_emb).max())
        tol = atol + rtol * float(np.abs(ref_logits).max())
        tol_emb = atol + rtol * float(np.abs(ref_emb).max())
        parity = {"max_abs_embedding": err_emb, "max_abs_logits": err_logits, "max_abs_probs": err_probs,
                  "max_abs_batch1": err_one,
                  "tolerance": tol, "n_images": int(len(x)),
                  "same_top1": bool((got_logits.argmax(1) == ref_logits.argmax(1)).all())}
        if max(err_logits, err_one) > tol or err_probs > max(atol, 1e-4) or err_emb > tol_emb:
            raise RuntimeError(f"ONNX parity check failed for {path}: {parity}")
        log.info("ONNX classifier %s: max |logits - torch| = %.2e, max |probs - torch| = %.2e",
                 path, err_logits, err_probs)
        atomic_write_json(folder / "config.json", self.encoder.config)
        cfg = self._config()
        cfg.update({"onnx": {"file": ONNX_NAME, "input": ONNX_INPUT, "outputs": list(ONNX_OUTPUTS),
                             "input_shape": ["batch", 3, self.encoder.image_size, self.encoder.image_size],
                             "input_dtype": "float32",
                             "preprocessing": {"image_size": self.encoder.image_size,
                                               "crop_pct": float(self.encoder.config.get("crop_pct", 1.0)),
                                               "mean": list(self.encoder.config["mean"]),
                                               "std": list(self.encoder.config["std"]),
                                               "resize": "shorter side to round(image_size / crop_pct) "
                                                         "(bicubic up, bilinear down), centre crop",
                                               "input_range": "RGB scaled to [0, 1], then (x - mean) / std"},
                             "parity": parity}})
        atomic_write_json(folder / CLASSIFIER_CONFIG, cfg)
        self.last_export_parity = parity
        return path


def fit_classifier(encoder: Any, data: Any, head: str = "linear", **kwargs: Any) -> Classifier:
    """Function form of :meth:`Classifier.fit` (``Encoder.fit_classifier`` calls this)."""
    return Classifier.fit(encoder, data, head=head, **kwargs)


__all__ = ["Classifier", "fit_classifier", "build_head", "train_head", "fit_temperature", "calibrate_on",
           "expected_calibration_error", "export_onnx", "FeatureNorm", "HEADS"]
