"""Batched, on-device augmentations and the view recipes methods ask for."""
from . import ops
from .masking import random_patch_mask
from .views import IMAGENET_MEAN, IMAGENET_STD, Views, ViewSpec

__all__ = ["ops", "random_patch_mask", "Views", "ViewSpec", "IMAGENET_MEAN", "IMAGENET_STD"]
