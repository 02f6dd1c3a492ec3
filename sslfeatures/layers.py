"""Network layers that methods build on, beyond timm's.

:class:`GlobalResponseNorm` is ConvNeXt V2's GRN (Woo et al. 2023, "ConvNeXt V2:
Co-designing and Scaling ConvNets with Masked Autoencoders", Eq. 1-3) as a standalone
layer with an optional *mask*: masked positions are left out of the global (spatial)
aggregation, which makes a dense masked ConvNeXt numerically identical to the sparse one
of the paper. :class:`ConvNeXtV2Block` is the paper's block (FCMAE's decoder).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def global_response_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                         mask: torch.Tensor | None = None, channels_last: bool = True,
                         eps: float = 1e-6) -> torch.Tensor:
    """GRN: ``x + weight * (x * N(x)) + bias`` with ``N(x) = G(x) / mean_c G(x)`` and
    ``G(x)`` the per-channel L2 norm of ``x`` over the spatial positions.

    ``x``: ``(B, H, W, C)`` when ``channels_last`` else ``(B, C, H, W)``. ``mask``: ``1`` =
    masked, broadcastable to ``x`` with a singleton channel dimension (``(B, H, W, 1)`` /
    ``(B, 1, H, W)``); masked positions do not count in ``G(x)``.
    """
    spatial, channel = ((1, 2), -1) if channels_last else ((2, 3), 1)
    if x.ndim != 4:
        raise ValueError(f"GRN expects a 4-D feature map, got shape {tuple(x.shape)}")
    visible = x if mask is None else x * (1.0 - mask.to(x.dtype))
    gx = torch.linalg.vector_norm(visible, ord=2, dim=spatial, keepdim=True)
    nx = gx / (gx.mean(dim=channel, keepdim=True) + eps)
    shape = (1, 1, 1, -1) if channels_last else (1, -1, 1, 1)
    return x + torch.addcmul(bias.view(shape), weight.view(shape), x * nx)


class GlobalResponseNorm(nn.Module):
    """ConvNeXt V2's Global Response Normalisation (see :func:`global_response_norm`).

    ``weight`` (gamma) and ``bias`` (beta) start at zero, so the layer starts as the
    identity. Parameter names match timm's ``GlobalResponseNorm``.
    """

    def __init__(self, dim: int, eps: float = 1e-6, channels_last: bool = True):
        super().__init__()
        self.eps = eps
        self.channels_last = channels_last
        self.weight = nn.Parameter(torch.zeros(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return global_response_norm(x, self.weight, self.bias, mask, self.channels_last, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}, channels_last={self.channels_last}"


class ConvNeXtV2Block(nn.Module):
    """The ConvNeXt V2 block: 7x7 depthwise conv -> LayerNorm -> Linear(4x) -> GELU -> GRN
    -> Linear -> residual, on ``(B, C, H, W)`` maps. ``mask`` (``(B, 1, H, W)``, 1 =
    masked) zeroes masked positions after the depthwise conv and keeps them out of GRN,
    the dense equivalent of the paper's sparse convolution."""

    def __init__(self, dim: int, mlp_ratio: float = 4.0, kernel_size: int = 7):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.dwconv = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, hidden)
        self.grn = GlobalResponseNorm(hidden, channels_last=True)
        self.pwconv2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        shortcut = x
        keep = None if mask is None else 1.0 - mask.to(x.dtype)
        if keep is not None:
            x = x * keep
        x = self.dwconv(x)
        if keep is not None:
            x = x * keep
        x = x.permute(0, 2, 3, 1)
        x = F.gelu(self.pwconv1(self.norm(x)))
        x = self.grn(x, None if mask is None else mask.permute(0, 2, 3, 1))
        x = self.pwconv2(x).permute(0, 3, 1, 2)
        return shortcut + x


__all__ = ["global_response_norm", "GlobalResponseNorm", "ConvNeXtV2Block"]
