"""``sslfeatures.evaluate``: the public face of the evaluation package (:mod:`sslfeatures.eval`).

Every downstream use of a frozen encoder, one call each:

>>> import sslfeatures
>>> sslfeatures.evaluate.knn(enc, "labelled/train", "labelled/test")          # weighted k-NN
>>> sslfeatures.evaluate.linear(enc, "labelled/train", "labelled/test")       # linear probe
>>> clf = sslfeatures.evaluate.fit_classifier(enc, "labelled/", head="mlp")   # = enc.fit_classifier
>>> curve = sslfeatures.evaluate.few_shot(enc, "labelled/train", test="labelled/test",
...                                       shots=[1, 2, 4, 8, 16, 32, 64, 128])
>>> ft = sslfeatures.evaluate.finetune(enc, "labelled/train", label_fraction=0.01, test=...)
>>> sslfeatures.evaluate.cluster(enc, "labelled/", picture="tsne.png")      # NMI / ARI / purity

Pass ``"raw"`` instead of an encoder to :func:`knn`, :func:`linear`, :func:`few_shot` or
:func:`cluster` for the raw-pixel baseline. The feature-level functions
(``weighted_knn``, ``linear_probe``, ``few_shot_from_features``, ``cluster_features``) take
precomputed features instead.
"""
from __future__ import annotations

from typing import Any

from .eval import (Classifier, ClusterResult, FewShotCurve, FinetuneResult, adjusted_rand_index, cluster,
                   cluster_features, clustering_metrics, expected_calibration_error, few_shot,
                   few_shot_from_features, finetune, fit_classifier, kmeans, labelled_features, linear_probe,
                   normalized_mutual_info, plot_clusters, plot_few_shot, project_2d, purity, raw_pixel_features,
                   sample_fraction, sample_per_class, stratified_split, weighted_knn)


def _pair(encoder: Any, train: Any, test: Any, batch_size: int):
    xtr, ytr, classes = labelled_features(encoder, train, batch_size=batch_size)
    xte, yte, classes_te = labelled_features(encoder, test, batch_size=batch_size)
    if classes != classes_te:
        raise ValueError(f"train and test have different classes: {classes} vs {classes_te}")
    return xtr, ytr, xte, yte, len(classes)


def knn(encoder: Any, train: Any, test: Any, k: int = 20, temperature: float = 0.07,
        batch_size: int = 128) -> dict[str, float]:
    """DINO's weighted k-NN top-1/top-5 of an encoder (or ``"raw"``) on labelled train/test data."""
    xtr, ytr, xte, yte, c = _pair(encoder, train, test, batch_size)
    return weighted_knn(xtr, ytr, xte, yte, k=k, temperature=temperature, num_classes=c)


def linear(encoder: Any, train: Any, test: Any, epochs: int = 60, batch_size: int = 128) -> dict[str, float]:
    """Linear-probe top-1 of an encoder (or ``"raw"``) on labelled train/test data."""
    xtr, ytr, xte, yte, _ = _pair(encoder, train, test, batch_size)
    return linear_probe(xtr, ytr, xte, yte, epochs=epochs)


__all__ = ["knn", "linear", "fit_classifier", "Classifier", "few_shot", "few_shot_from_features", "FewShotCurve",
           "plot_few_shot", "finetune", "FinetuneResult", "cluster", "cluster_features", "ClusterResult",
           "clustering_metrics", "normalized_mutual_info", "adjusted_rand_index", "purity", "kmeans",
           "project_2d", "plot_clusters", "expected_calibration_error", "weighted_knn", "linear_probe",
           "raw_pixel_features", "labelled_features", "sample_per_class", "sample_fraction", "stratified_split"]
