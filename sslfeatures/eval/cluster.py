"""Clustering quality of frozen features: k-means, then NMI / ARI / purity against the
labels, and a 2-D picture (t-SNE; UMAP when ``umap-learn`` is installed; PCA).

>>> res = cluster(enc, "labelled/")            # k = number of classes
>>> res.nmi, res.ari, res.purity
>>> cluster(enc, "labelled/", picture="tsne.png")

k-means (k-means++ seeding, Lloyd iterations, best of ``n_init`` restarts by inertia) runs
in torch on l2-normalised features by default (the usual choice for self-supervised
embeddings, whose norm carries little meaning). The metrics are computed from the
contingency table: NMI with the arithmetic-mean normalisation (scikit-learn's default),
the adjusted Rand index of Hubert & Arabie (1985), and purity (each cluster votes for its
majority class).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .labels import labelled_features

log = logging.getLogger("sslfeatures")

PROJECTIONS = ("tsne", "umap", "pca")


def contingency(labels_true: Sequence[int], labels_pred: Sequence[int]) -> np.ndarray:
    """Counts ``(n_classes, n_clusters)`` of items per (true class, cluster) pair."""
    t, p = np.asarray(labels_true), np.asarray(labels_pred)
    if t.shape != p.shape or t.ndim != 1:
        raise ValueError(f"labels must be two 1-D arrays of the same length, got {t.shape} and {p.shape}")
    _, ti = np.unique(t, return_inverse=True)
    _, pi = np.unique(p, return_inverse=True)
    table = np.zeros((ti.max() + 1, pi.max() + 1), dtype=np.int64)
    np.add.at(table, (ti, pi), 1)
    return table


def _entropy(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def normalized_mutual_info(labels_true: Sequence[int], labels_pred: Sequence[int]) -> float:
    """NMI = MI / mean(H(true), H(pred)) (arithmetic normalisation); 1.0 when both are a single cluster."""
    table = contingency(labels_true, labels_pred).astype(np.float64)
    n = table.sum()
    a, b = table.sum(1), table.sum(0)
    ha, hb = _entropy(a), _entropy(b)
    if ha == 0 and hb == 0:
        return 1.0
    nz = table > 0
    mi = float((table[nz] / n * np.log(table[nz] * n / np.outer(a, b)[nz])).sum())
    denom = (ha + hb) / 2
    return float(min(max(mi / denom, 0.0), 1.0)) if denom > 0 else 0.0


def adjusted_rand_index(labels_true: Sequence[int], labels_pred: Sequence[int]) -> float:
    """Rand index adjusted for chance: 1 for identical partitions, ~0 for random ones."""
    table = contingency(labels_true, labels_pred).astype(np.float64)
    comb2 = lambda v: v * (v - 1) / 2  # noqa: E731
    n = table.sum()
    sum_ij = comb2(table).sum()
    sum_a, sum_b = comb2(table.sum(1)).sum(), comb2(table.sum(0)).sum()
    expected = sum_a * sum_b / comb2(n) if n > 1 else 0.0
    max_index = (sum_a + sum_b) / 2
    if max_index == expected:  # both partitions trivial (all-in-one or all singletons)
        return 1.0
    return float((sum_ij - expected) / (max_index - expected))


def purity(labels_true: Sequence[int], labels_pred: Sequence[int]) -> float:
    """Share of items whose cluster's majority class is their own class."""
    table = contingency(labels_true, labels_pred)
    return float(table.max(0).sum() / table.sum())


def clustering_metrics(labels_true: Sequence[int], labels_pred: Sequence[int]) -> dict[str, float]:
    """``{"nmi", "ari", "purity"}`` of a clustering against the true labels."""
    return {"nmi": normalized_mutual_info(labels_true, labels_pred),
            "ari": adjusted_rand_index(labels_true, labels_pred), "purity": purity(labels_true, labels_pred)}


def _kmeans_pp(x: torch.Tensor, k: int, g: torch.Generator) -> torch.Tensor:
    n = len(x)
    centers = [x[torch.randint(n, (1,), generator=g)].squeeze(0)]
    d2 = ((x - centers[0]) ** 2).sum(1)
    for _ in range(1, k):
        total = d2.sum()
        if total <= 0:  # fewer distinct points than clusters
            i = torch.randint(n, (1,), generator=g)
        else:
            i = torch.multinomial(d2 / total, 1, generator=g)
        centers.append(x[i].squeeze(0))
        d2 = torch.minimum(d2, ((x - centers[-1]) ** 2).sum(1))
    return torch.stack(centers)


def kmeans(features: np.ndarray | torch.Tensor, k: int, n_init: int = 10, max_iter: int = 300,
           tol: float = 1e-6, seed: int = 0) -> tuple[np.ndarray, np.ndarray, float]:
    """k-means (k-means++ seeding, Lloyd iterations): ``(assignments, centres, inertia)``
    of the best of ``n_init`` seeded restarts."""
    x = torch.as_tensor(np.asarray(features), dtype=torch.float64)
    if x.ndim != 2:
        raise ValueError(f"features must be (N, D), got {tuple(x.shape)}")
    if not 1 <= k <= len(x):
        raise ValueError(f"k must be between 1 and the number of items ({len(x)}), got {k}")
    best: tuple[float, torch.Tensor, torch.Tensor] | None = None
    x2 = (x * x).sum(1, keepdim=True)
    for run in range(n_init):
        g = torch.Generator().manual_seed(seed * 1000 + run)
        c = _kmeans_pp(x, k, g)
        prev = None
        for _ in range(max_iter):
            d = x2 - 2 * x @ c.T + (c * c).sum(1)[None]
            assign = d.argmin(1)
            counts = torch.bincount(assign, minlength=k)
            sums = torch.zeros_like(c).index_add_(0, assign, x)
            empty = counts == 0
            new_c = torch.where(empty[:, None], c, sums / counts.clamp(min=1)[:, None].to(x.dtype))
            if empty.any():  # re-seed empty clusters at the points farthest from their centre
                far = d.gather(1, assign[:, None]).squeeze(1).argsort(descending=True)
                new_c[empty] = x[far[: int(empty.sum())]]
            shift = ((new_c - c) ** 2).sum().item()
            c = new_c
            if prev is not None and torch.equal(assign, prev) or shift <= tol:
                break
            prev = assign
        d = x2 - 2 * x @ c.T + (c * c).sum(1)[None]
        dmin, assign = d.min(1)
        inertia = float(dmin.clamp(min=0).sum())
        if best is None or inertia < best[0]:
            best = (inertia, assign, c)
    inertia, assign, c = best
    return assign.numpy(), c.float().numpy(), inertia


@dataclass
class ClusterResult:
    """k-means clustering quality against the labels."""

    nmi: float
    ari: float
    purity: float
    n_clusters: int
    assignments: np.ndarray = field(repr=False)
    labels: np.ndarray = field(repr=False)
    classes: list[str] = field(default_factory=list, repr=False)
    inertia: float = 0.0
    picture: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"nmi": self.nmi, "ari": self.ari, "purity": self.purity, "n_clusters": self.n_clusters,
                "n": int(len(self.labels)), "inertia": self.inertia,
                "picture": str(self.picture) if self.picture else None}


def cluster_features(features: np.ndarray, labels: Sequence[int], n_clusters: int | None = None,
                     normalize: bool = True, n_init: int = 10, seed: int = 0,
                     classes: Sequence[str] | None = None) -> ClusterResult:
    """k-means on precomputed features (``n_clusters`` defaults to the number of classes)."""
    y = np.asarray(labels, dtype=np.int64)
    x = torch.as_tensor(np.asarray(features), dtype=torch.float32)
    if len(x) != len(y):
        raise ValueError(f"{len(x)} features but {len(y)} labels")
    if normalize:
        x = F.normalize(x, dim=1)
    k = int(n_clusters or len(np.unique(y)))
    assign, _, inertia = kmeans(x, k, n_init=n_init, seed=seed)
    m = clustering_metrics(y, assign)
    return ClusterResult(m["nmi"], m["ari"], m["purity"], k, assign, y, list(classes or []), inertia)


def project_2d(features: np.ndarray, method: str = "tsne", seed: int = 0, normalize: bool = True) -> np.ndarray:
    """2-D coordinates of ``features`` by t-SNE (scikit-learn), UMAP (umap-learn) or PCA."""
    if method not in PROJECTIONS:
        raise ValueError(f"unknown projection {method!r}; expected one of {PROJECTIONS}")
    x = torch.as_tensor(np.asarray(features), dtype=torch.float32)
    if normalize:
        x = F.normalize(x, dim=1)
    if method == "pca":
        xc = x - x.mean(0)
        _, _, v = torch.linalg.svd(xc, full_matrices=False)
        return (xc @ v[:2].T).numpy()
    if method == "umap":
        try:
            import umap
        except ImportError:
            raise ImportError("method='umap' needs umap-learn (pip install umap-learn); "
                              "method='tsne' (scikit-learn) or 'pca' work without it") from None
        return umap.UMAP(n_components=2, random_state=seed).fit_transform(x.numpy())
    try:
        from sklearn.manifold import TSNE
    except ImportError:
        raise ImportError("method='tsne' needs scikit-learn (pip install scikit-learn); "
                          "method='pca' works without it") from None
    perplexity = float(min(30.0, max(2.0, (len(x) - 1) / 3)))
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x.numpy())


def plot_clusters(coords: np.ndarray, labels: Sequence[int], path: str | os.PathLike,
                  classes: Sequence[str] | None = None, title: str = "") -> Path:
    """Scatter of 2-D coordinates coloured by class."""
    from ..plots import _plt

    plt = _plt()
    y = np.asarray(labels)
    fig, ax = plt.subplots(figsize=(6.5, 5.5), dpi=110)
    cmap = plt.get_cmap("tab10" if y.max() < 10 else "tab20")
    for c in np.unique(y):
        pts = coords[y == c]
        name = classes[c] if classes is not None and c < len(classes) else str(c)
        ax.scatter(pts[:, 0], pts[:, 1], s=4, alpha=0.7, color=cmap(int(c) % cmap.N), label=name)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title)
    ax.legend(markerscale=3, fontsize=7, loc="best", frameon=True)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def cluster(encoder: Any, data: Any, labels: Sequence[Any] | None = None, n_clusters: int | None = None,
            normalize: bool = True, n_init: int = 10, seed: int = 0, picture: str | os.PathLike | None = None,
            projection: str = "tsne", max_points: int = 5000, batch_size: int = 128) -> ClusterResult:
    """k-means NMI / ARI / purity of an encoder's features (or ``"raw"`` pixels) on labelled
    data; with ``picture``, also a 2-D ``projection`` (t-SNE, UMAP or PCA) coloured by class
    of at most ``max_points`` items (a seeded subsample)."""
    x, y, classes = labelled_features(encoder, data, labels, batch_size=batch_size)
    res = cluster_features(x, y, n_clusters, normalize, n_init, seed, classes)
    if picture is not None:
        idx = np.arange(len(x))
        if len(idx) > max_points:
            idx = np.sort(np.random.default_rng(seed).choice(len(x), max_points, replace=False))
        coords = project_2d(x[idx], projection, seed, normalize)
        name = "raw pixels" if isinstance(encoder, str) else (encoder.method or "encoder")
        res.picture = plot_clusters(coords, y[idx], picture, classes,
                                    f"{projection.upper()} of {name} features (k-means NMI {res.nmi:.3f})")
    return res


__all__ = ["cluster", "cluster_features", "ClusterResult", "kmeans", "clustering_metrics",
           "normalized_mutual_info", "adjusted_rand_index", "purity", "contingency", "project_2d",
           "plot_clusters", "PROJECTIONS"]
