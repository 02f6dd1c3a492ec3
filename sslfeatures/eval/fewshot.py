"""Few-shot curves: accuracy with ``n`` labelled images per class, over several seeds.

The protocol of CoG (Sariyildiz et al. 2021, *Concept Generalization in Visual
Representation Learning*): for every ``n`` in ``shots`` and every seed, draw ``n`` training
images of each class (class-balanced, seeded, nested across ``n``: see
:func:`~sslfeatures.eval.labels.sample_per_class`), train a classifier on their frozen
features and measure top-1 on the whole test set; report mean ± std over the seeds.

>>> curve = few_shot(enc, "labelled/train", test="labelled/test", shots=[1, 2, 4, 8, 16])
>>> print(curve.table()); curve.plot("fewshot.png")
>>> plot_few_shot({"SimCLR": curve, "raw pixels": few_shot("raw", ...)}, "compare.png")

Classifiers: ``"logistic"`` (CoG's: multinomial logistic regression on l2-normalised
features, L-BFGS from zero, L2 penalty ``l2``), ``"centroid"`` (nearest class mean,
cosine) or ``"knn"`` (weighted k-NN of :func:`~sslfeatures.eval.weighted_knn`). CoG tunes
the penalty on a validation split per ``n``; here it is one value for the whole curve:
the default ``1e-5`` is weak (unit-norm features need large weights), which on the
Fashion-MNIST demo split costs nothing at 1 shot and is worth 3-6 points at 128 shots
over ``1e-3`` (benchmarks/RESULTS.md).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .knn import weighted_knn
from .labels import labelled_features, sample_per_class, stratified_split

log = logging.getLogger("sslfeatures")

DEFAULT_SHOTS = (1, 2, 4, 8, 16, 32, 64, 128)
FEW_SHOT_CLASSIFIERS = ("logistic", "centroid", "knn")


def fit_logistic(x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float = 1e-5,
                 max_iter: int = 200) -> torch.nn.Linear:
    """Multinomial logistic regression by full-batch L-BFGS: minimises mean cross-entropy
    + ``l2 / 2 * ||W||^2`` (bias unpenalised). Deterministic for given inputs."""
    lin = torch.nn.Linear(x.shape[1], num_classes)
    torch.nn.init.zeros_(lin.weight)
    torch.nn.init.zeros_(lin.bias)
    opt = torch.optim.LBFGS(lin.parameters(), lr=1.0, max_iter=max_iter, history_size=20,
                            line_search_fn="strong_wolfe", tolerance_grad=1e-6, tolerance_change=1e-9)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(lin(x), y) + 0.5 * l2 * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return lin


def _predict(xtr: torch.Tensor, ytr: torch.Tensor, xte: torch.Tensor, num_classes: int, classifier: str,
             l2: float) -> torch.Tensor:
    if classifier == "logistic":
        with torch.no_grad():
            return fit_logistic(xtr, ytr, num_classes, l2)(xte).argmax(1)
    if classifier == "centroid":
        protos = torch.zeros(num_classes, xtr.shape[1]).index_add_(0, ytr, xtr)
        return (xte @ F.normalize(protos, dim=1).T).argmax(1)
    raise ValueError(f"unknown few-shot classifier {classifier!r}; expected one of {FEW_SHOT_CLASSIFIERS}")


@dataclass
class FewShotCurve:
    """Top-1 accuracy per number of shots (rows) and seed (columns)."""

    shots: list[int]
    accuracies: np.ndarray                     # (len(shots), seeds)
    seeds: list[int]
    classifier: str = "logistic"
    classes: list[str] = field(default_factory=list)
    n_test: int = 0
    skipped: list[int] = field(default_factory=list)

    @property
    def mean(self) -> np.ndarray:
        return self.accuracies.mean(1)

    @property
    def std(self) -> np.ndarray:
        """Standard deviation over seeds (``ddof=1``; 0 for a single seed)."""
        if self.accuracies.shape[1] < 2:
            return np.zeros(len(self.shots))
        return self.accuracies.std(1, ddof=1)

    def to_dict(self) -> dict[str, Any]:
        return {"shots": list(self.shots), "mean": self.mean.tolist(), "std": self.std.tolist(),
                "accuracies": self.accuracies.tolist(), "seeds": list(self.seeds), "classifier": self.classifier,
                "classes": list(self.classes), "n_test": self.n_test, "skipped": list(self.skipped)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FewShotCurve:
        return cls(list(d["shots"]), np.asarray(d["accuracies"], dtype=np.float64), list(d["seeds"]),
                   d.get("classifier", "logistic"), list(d.get("classes", [])), int(d.get("n_test", 0)),
                   list(d.get("skipped", [])))

    def table(self, name: str = "top-1") -> str:
        """A markdown row per shot: ``| n | mean ± std |``."""
        rows = [f"| shots per class | {name} (mean ± std over {len(self.seeds)} seeds) |", "|---|---|"]
        rows += [f"| {n} | {m:.4f} ± {s:.4f} |" for n, m, s in zip(self.shots, self.mean, self.std)]
        return "\n".join(rows)

    def plot(self, path: str | os.PathLike, label: str = "encoder", title: str | None = None) -> Path:
        return plot_few_shot({label: self}, path, title=title)


def few_shot_from_features(train_features: np.ndarray, train_labels: Sequence[int], test_features: np.ndarray,
                           test_labels: Sequence[int], shots: Sequence[int] = DEFAULT_SHOTS,
                           seeds: int | Sequence[int] = 5, classifier: str = "logistic", l2: float = 1e-5,
                           k: int = 20, classes: Sequence[str] | None = None) -> FewShotCurve:
    """The few-shot curve of precomputed features (see the module docstring).

    Features are l2-normalised. ``shots`` larger than the smallest class are dropped with
    a warning (and listed in ``curve.skipped``); ``seeds`` is a count or explicit seeds.
    """
    if classifier not in FEW_SHOT_CLASSIFIERS:
        raise ValueError(f"unknown few-shot classifier {classifier!r}; expected one of {FEW_SHOT_CLASSIFIERS}")
    xtr = F.normalize(torch.as_tensor(np.asarray(train_features), dtype=torch.float32), dim=1)
    xte = F.normalize(torch.as_tensor(np.asarray(test_features), dtype=torch.float32), dim=1)
    ytr = torch.as_tensor(np.asarray(train_labels), dtype=torch.long)
    yte = torch.as_tensor(np.asarray(test_labels), dtype=torch.long)
    if len(xtr) != len(ytr) or len(xte) != len(yte):
        raise ValueError("features and labels differ in length")
    seed_list = list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
    if not seed_list:
        raise ValueError("seeds must be a positive count or a non-empty list of seeds")
    shots = sorted({int(n) for n in shots})
    if not shots or shots[0] < 1:
        raise ValueError(f"shots must be positive integers, got {shots}")
    c = int(max(int(ytr.max()), int(yte.max()))) + 1
    smallest = int(np.bincount(ytr.numpy(), minlength=c)[np.unique(ytr.numpy())].min())
    skipped = [n for n in shots if n > smallest]
    shots = [n for n in shots if n <= smallest]
    if skipped:
        log.warning("few-shot: %s shots per class skipped (the smallest class has %d training images)",
                    skipped, smallest)
    if not shots:
        raise ValueError(f"every requested shot count exceeds the smallest class ({smallest} images)")
    acc = np.zeros((len(shots), len(seed_list)))
    for i, n in enumerate(shots):
        for j, seed in enumerate(seed_list):
            idx = torch.as_tensor(sample_per_class(ytr.numpy(), n, seed))
            if classifier == "knn":
                res = weighted_knn(xtr[idx], ytr[idx], xte, yte, k=min(k, len(idx)), num_classes=c)
                acc[i, j] = res["top1"]
            else:
                pred = _predict(xtr[idx], ytr[idx], xte, c, classifier, l2)
                acc[i, j] = (pred == yte).float().mean().item()
    return FewShotCurve(shots, acc, seed_list, classifier, list(classes or []), int(len(yte)), skipped)


def few_shot(encoder: Any, train: Any, test: Any = None, shots: Sequence[int] = DEFAULT_SHOTS,
             seeds: int | Sequence[int] = 5, classifier: str = "logistic", l2: float = 1e-5,
             test_fraction: float = 0.2, batch_size: int = 128, **kwargs: Any) -> FewShotCurve:
    """Few-shot curve of an encoder (or ``"raw"`` for raw pixels) on labelled data.

    ``train`` and ``test`` are labelled folders (or ``(images, labels)`` pairs). Without
    ``test``, ``test_fraction`` of every class of ``train`` is held out (seed 0, the same
    for every shot and seed) and the shots are drawn from the rest.
    """
    xtr, ytr, classes = labelled_features(encoder, train, batch_size=batch_size)
    if test is None:
        keep, held = stratified_split(ytr, test_fraction, seed=0)
        if not len(held):
            raise ValueError("no test images: pass test=, or a test_fraction > 0 with >= 2 images per class")
        xtr, ytr, xte, yte = xtr[keep], ytr[keep], xtr[held], ytr[held]
    else:
        xte, yte, classes_te = labelled_features(encoder, test, batch_size=batch_size)
        if classes_te != classes:
            raise ValueError(f"train and test have different classes: {classes} vs {classes_te}")
    return few_shot_from_features(xtr, ytr, xte, yte, shots=shots, seeds=seeds, classifier=classifier, l2=l2,
                                  classes=classes, **kwargs)


def plot_few_shot(curves: Mapping[str, FewShotCurve], path: str | os.PathLike, title: str | None = None) -> Path:
    """Mean top-1 against shots per class (log2 axis) with a ± std band, one line per curve."""
    from ..plots import _plt

    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=110)
    for i, (name, curve) in enumerate(curves.items()):
        x, m, s = np.asarray(curve.shots), curve.mean, curve.std
        ax.plot(x, m, marker="o", ms=4, color=f"C{i}", label=name)
        ax.fill_between(x, m - s, m + s, color=f"C{i}", alpha=0.2, lw=0)
    ax.set_xscale("log", base=2)
    all_shots = sorted({n for c in curves.values() for n in c.shots})
    ax.set_xticks(all_shots)
    ax.set_xticklabels([str(n) for n in all_shots])
    ax.set_xlabel("labelled images per class")
    ax.set_ylabel("test top-1")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    first = next(iter(curves.values()), None)
    seeds = len(first.seeds) if first is not None else 0
    ax.set_title(title or f"few-shot top-1 ({first.classifier if first else ''}, mean ± std over {seeds} seeds)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


__all__ = ["few_shot", "few_shot_from_features", "FewShotCurve", "plot_few_shot", "fit_logistic",
           "DEFAULT_SHOTS", "FEW_SHOT_CLASSIFIERS"]
