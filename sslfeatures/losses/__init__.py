"""Losses shared by the methods (one home each)."""
from .contrastive import info_nce_queue, nt_xent
from .dino import DINOLoss
from .regression import masked_mse, neg_cosine

__all__ = ["nt_xent", "info_nce_queue", "DINOLoss", "neg_cosine", "masked_mse"]
