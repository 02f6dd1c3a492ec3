"""Batched image augmentations with per-sample random parameters.

Every op takes a float batch ``x`` of shape (B, 3, H, W) in [0, 1] on any device and
returns a batch of the same kind; random parameters are drawn per sample (from torch's
global RNG, which the engine seeds per step, so runs are reproducible and resumable) and
applied with a handful of batched tensor ops: no per-image Python loop, no PIL.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_LUMA = (0.299, 0.587, 0.114)


def _rand(n: int, device, lo: float = 0.0, hi: float = 1.0) -> torch.Tensor:
    return torch.rand(n).to(device) * (hi - lo) + lo


def _bcast(v: torch.Tensor) -> torch.Tensor:
    return v.view(-1, 1, 1, 1)


def random_resized_crop(x: torch.Tensor, size: int | tuple[int, int], scale=(0.08, 1.0),
                        ratio=(3 / 4, 4 / 3), hflip_p: float = 0.5,
                        return_params: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """torchvision's RandomResizedCrop + RandomHorizontalFlip, for a whole batch at once.

    Each sample gets its own crop box (area fraction in ``scale``, log-uniform aspect in
    ``ratio``, clamped inside the image) and flip; all crops are resampled to ``size`` by
    one bilinear ``grid_sample``.

    With ``return_params=True`` it returns ``(crops, theta)``: ``theta`` (B, 2, 3) maps a
    crop's normalised coordinates ``(u, v)`` in [-1, 1] (``align_corners=False``) to the
    source image's, ``theta @ [u, v, 1]`` (flip and box included), so pixel
    correspondences between two crops of one image can be computed (dense methods).
    """
    b, _, h, w = x.shape
    out_h, out_w = (size, size) if isinstance(size, int) else size
    area = torch.empty(b).uniform_(*scale)
    log_r = torch.empty(b).uniform_(math.log(ratio[0]), math.log(ratio[1]))
    r = torch.exp(log_r)
    cw = torch.sqrt(area * r).clamp(max=1.0)  # crop width as a fraction of the image
    ch = torch.sqrt(area / r).clamp(max=1.0)
    cx = torch.rand(b) * (1 - cw) + cw / 2  # centre in [0, 1]
    cy = torch.rand(b) * (1 - ch) + ch / 2
    flip = torch.where(torch.rand(b) < hflip_p, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = cw * flip
    theta[:, 0, 2] = cx * 2 - 1
    theta[:, 1, 1] = ch
    theta[:, 1, 2] = cy * 2 - 1
    theta = theta.to(device=x.device, dtype=x.dtype)
    grid = F.affine_grid(theta, [b, x.shape[1], out_h, out_w], align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    return (out, theta) if return_params else out


def grayscale(x: torch.Tensor) -> torch.Tensor:
    w = x.new_tensor(_LUMA).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def color_jitter(x: torch.Tensor, brightness: float = 0.4, contrast: float = 0.4,
                 saturation: float = 0.2, hue: float = 0.1, p: float = 0.8) -> torch.Tensor:
    """Brightness, contrast, saturation and hue jitter (torchvision's ranges), applied with
    probability ``p`` per sample, in that fixed order. Hue is rotated in YIQ space (a
    per-sample 3x3 matrix), which is torchvision's HSV hue shift up to second-order terms.
    """
    b, dev = x.shape[0], x.device
    on = _bcast((torch.rand(b) < p).to(dev, x.dtype))
    out = x
    if brightness > 0:
        f = _bcast(_rand(b, dev, max(0.0, 1 - brightness), 1 + brightness).to(x.dtype))
        out = (out * f).clamp(0, 1)
    if contrast > 0:
        f = _bcast(_rand(b, dev, max(0.0, 1 - contrast), 1 + contrast).to(x.dtype))
        mean = grayscale(out).mean(dim=(1, 2, 3), keepdim=True)
        out = ((out - mean) * f + mean).clamp(0, 1)
    if saturation > 0:
        f = _bcast(_rand(b, dev, max(0.0, 1 - saturation), 1 + saturation).to(x.dtype))
        g = grayscale(out)
        out = ((out - g) * f + g).clamp(0, 1)
    if hue > 0:
        ang = torch.empty(b).uniform_(-hue, hue) * 2 * math.pi
        cos, sin = torch.cos(ang), torch.sin(ang)
        to_yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
        to_rgb = torch.linalg.inv(to_yiq)
        rot = torch.zeros(b, 3, 3)
        rot[:, 0, 0] = 1
        rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = cos, -sin, sin, cos
        m = (to_rgb @ rot @ to_yiq).to(dev, x.dtype)  # (B, 3, 3)
        out = torch.einsum("bij,bjhw->bihw", m, out).clamp(0, 1)
    return torch.lerp(x, out, on)


def random_grayscale(x: torch.Tensor, p: float = 0.2) -> torch.Tensor:
    if p <= 0:
        return x
    on = _bcast((torch.rand(x.shape[0]) < p).to(x.device, x.dtype))
    return torch.lerp(x, grayscale(x).expand_as(x), on)


def gaussian_blur(x: torch.Tensor, p: float = 0.5, sigma=(0.1, 2.0), kernel_frac: float = 0.1,
                  ref_size: int = 224) -> torch.Tensor:
    """Gaussian blur with a per-sample sigma, applied with probability ``p``.

    ``sigma`` is given for a ``ref_size`` image (SimCLR: kernel 10% of the side, sigma in
    [0.1, 2.0] at 224 px) and scaled to the batch's resolution. Separable, as two grouped
    convolutions over the whole batch.
    """
    if p <= 0:
        return x
    b, c, h, w = x.shape
    scale = h / ref_size
    k = max(3, int(round(kernel_frac * h)) | 1)
    sig = torch.empty(b).uniform_(*sigma) * scale
    sig = sig.clamp(min=1e-3)
    r = torch.arange(k, dtype=torch.float32) - k // 2
    ker = torch.exp(-(r[None] ** 2) / (2 * sig[:, None] ** 2))
    ker = ker / ker.sum(1, keepdim=True)  # (B, k)
    ker = ker.to(x.device, x.dtype).repeat_interleave(c, 0)  # (B*C, k)
    y = x.reshape(1, b * c, h, w)
    y = F.pad(y, (k // 2, k // 2, 0, 0), mode="reflect")
    y = F.conv2d(y, ker.view(b * c, 1, 1, k), groups=b * c)
    y = F.pad(y, (0, 0, k // 2, k // 2), mode="reflect")
    y = F.conv2d(y, ker.view(b * c, 1, k, 1), groups=b * c).view(b, c, h, w)
    on = _bcast((torch.rand(b) < p).to(x.device, x.dtype))
    return torch.lerp(x, y, on)


def solarize(x: torch.Tensor, p: float = 0.2, threshold: float = 0.5) -> torch.Tensor:
    if p <= 0:
        return x
    on = (torch.rand(x.shape[0]) < p).to(x.device).view(-1, 1, 1, 1)
    return torch.where(on & (x >= threshold), 1.0 - x, x)


def normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    m = x.new_tensor(mean).view(1, -1, 1, 1)
    s = x.new_tensor(std).view(1, -1, 1, 1)
    return (x - m) / s
