"""k-NN and linear probe on features with a known answer, and the raw-pixel baseline."""
from __future__ import annotations

import numpy as np

from sslfeatures import Encoder
from sslfeatures.eval import linear_probe, raw_pixel_features, weighted_knn


def _clusters(n, seed):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(4, 16)) * 3
    y = rng.integers(0, 4, n)
    return centers[y] + rng.normal(size=(n, 16)), y


def test_knn_and_linear_on_separable_clusters():
    xtr, ytr = _clusters(400, 0)
    xte, yte = _clusters(100, 0)
    assert weighted_knn(xtr, ytr, xte, yte)["top1"] > 0.95
    assert linear_probe(xtr, ytr, xte, yte, epochs=20)["top1"] > 0.95
    # shuffled labels: chance level
    rng = np.random.default_rng(1)
    assert weighted_knn(xtr, rng.permutation(ytr), xte, yte)["top1"] < 0.5


def test_knn_weighting_matches_a_hand_count():
    xtr = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    ytr = np.array([0, 0, 1])
    res = weighted_knn(xtr, ytr, np.array([[0.2, 1.0]]), np.array([1]), k=3, temperature=0.07)
    assert res["top1"] == 1.0


def test_encoder_evaluations_on_labelled_folders(labelled_images):
    train, test = labelled_images
    enc = Encoder.random_init("resnet18", image_size=32, stem="small_s2",
                              backbone_kwargs={"channels": [16, 32, 64, 128]})
    res = enc.evaluate_knn(train, test)
    assert 0.0 <= res["top1"] <= 1.0 and res["k"] == 20
    assert 0.0 <= enc.evaluate_linear(train, test, epochs=5)["top1"] <= 1.0
    x, y, classes = raw_pixel_features(train)
    assert x.shape == (32, 48 * 48) and len(classes) == 4
