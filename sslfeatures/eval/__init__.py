"""Evaluation of frozen features: weighted k-NN, linear probe, baselines."""
from .baselines import raw_pixel_features
from .knn import weighted_knn
from .linear import linear_probe

__all__ = ["weighted_knn", "linear_probe", "raw_pixel_features"]
