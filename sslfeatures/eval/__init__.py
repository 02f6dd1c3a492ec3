"""Evaluation of frozen features: weighted k-NN, linear probe, baselines; classifier heads,
few-shot curves, fine-tuning and clustering. The public name is :mod:`sslfeatures.evaluate`."""
from .baselines import raw_pixel_features
from .knn import weighted_knn
from .linear import linear_probe
# downstream (issue 11): classifiers on frozen encoders, few-shot, fine-tuning, clustering
from .labels import labelled_features, resolve_labelled, sample_fraction, sample_per_class, stratified_split
from .classifier import Classifier, expected_calibration_error, fit_classifier
from .fewshot import FewShotCurve, few_shot, few_shot_from_features, plot_few_shot
from .finetune import FinetuneResult, finetune
from .cluster import (ClusterResult, adjusted_rand_index, cluster, cluster_features, clustering_metrics, kmeans,
                      normalized_mutual_info, plot_clusters, project_2d, purity)

__all__ = ["weighted_knn", "linear_probe", "raw_pixel_features"]
__all__ += ["labelled_features", "resolve_labelled", "sample_fraction", "sample_per_class", "stratified_split",
            "Classifier", "expected_calibration_error", "fit_classifier", "FewShotCurve", "few_shot",
            "few_shot_from_features", "plot_few_shot", "FinetuneResult", "finetune", "ClusterResult",
            "adjusted_rand_index", "cluster", "cluster_features", "clustering_metrics", "kmeans",
            "normalized_mutual_info", "plot_clusters", "project_2d", "purity"]
