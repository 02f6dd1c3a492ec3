"""Losses shared by the methods (one home each)."""
from .contrastive import info_nce_queue, nt_xent
from .dino import DINOLoss
from .dinov2 import DINOv2Loss, iBOTPatchLoss, koleo_loss, sinkhorn_knopp
from .infonce import info_nce
from .locations import dense_info_nce, location_info_nce
from .regression import masked_mse, neg_cosine
from .redundancy import barlow_twins_loss, off_diagonal, vicreg_loss, vicreg_terms
from .whitening import whiten, wmse_loss

__all__ = ["nt_xent", "info_nce_queue", "DINOLoss", "neg_cosine", "masked_mse"]
__all__ += ["info_nce", "barlow_twins_loss", "vicreg_loss", "vicreg_terms", "off_diagonal", "whiten", "wmse_loss"]
__all__ += ["DINOv2Loss", "iBOTPatchLoss", "koleo_loss", "sinkhorn_knopp"]
__all__ += ["location_info_nce", "dense_info_nce"]
from .pretext import adversarial_losses, soft_cross_entropy, weighted_mse  # noqa: E402

__all__ += ["soft_cross_entropy", "weighted_mse", "adversarial_losses"]
