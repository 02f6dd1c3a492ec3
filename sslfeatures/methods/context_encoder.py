"""Context encoders — Pathak, Krähenbühl, Donahue, Darrell & Efros 2016, "Context
Encoders: Feature Learning by Inpainting".

The central region of each image (half its side) is filled with the mean colour (zero
after normalisation); the trunk encodes the rest, a channel-wise fully connected layer
spreads information across the whole feature map, and an up-convolutional decoder paints
the centre. The generator's loss is ``lambda_rec * masked L2 + lambda_adv * adversarial``
(0.999 / 0.001): the L2 covers the hole, and a band of ``overlap`` pixels of context
around it with 10x weight, as in the authors' code; a DCGAN discriminator judges real
against painted centres. Generator and discriminator are updated simultaneously with
one optimizer (:func:`~sslfeatures.losses.adversarial_losses`); the discriminator's
learning rate is ``disc_lr_scale`` times the engine's (the authors train the context
encoder at 10x the discriminator's rate). The trunk (the encoder) is what transfers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..engine.optim import param_groups
from ..losses import adversarial_losses, weighted_mse
from .base import Method, MethodConfig, StepInfo, register
from .colorization import feature_map


@dataclass
class ContextEncoderConfig(MethodConfig):
    hole_frac: float = 0.5          # side of the predicted central region / image side
    overlap_frac: float = 0.03125   # band of context around the hole that is also predicted (4 / 128)
    overlap_weight: float = 10.0    # L2 weight of that band relative to the hole
    lambda_rec: float = 0.999
    lambda_adv: float = 0.001
    decoder_dim: int = 512          # channels of the first up-convolution (halved at each stage)
    disc_dim: int = 64              # channels of the discriminator's first convolution
    disc_lr_scale: float = 0.1      # discriminator lr / engine lr


def center_box(image_size: int, hole_frac: float, overlap_frac: float) -> tuple[int, int, int]:
    """``(start, size, overlap)`` in pixels of the predicted central square; the masked
    hole is that square shrunk by ``overlap`` on every side."""
    size = int(round(image_size * hole_frac))
    overlap = int(round(image_size * overlap_frac))
    if size < 4 or size - 2 * overlap < 1:
        raise ValueError(f"hole_frac={hole_frac}, overlap_frac={overlap_frac} leave no hole in a {image_size}px image")
    return (image_size - size) // 2, size, overlap


def mask_center(x: torch.Tensor, start: int, size: int, overlap: int, fill: float = 0.0) -> torch.Tensor:
    """A copy of ``x`` with the hole (the central square minus the overlap band) set to ``fill``."""
    out = x.clone()
    a, b = start + overlap, start + size - overlap
    out[..., a:b, a:b] = fill
    return out


class ChannelwiseFC(nn.Module):
    """Pathak et al.'s channel-wise fully connected layer: every channel's ``h*w`` map is
    mapped to a new ``h*w`` map by its own dense layer (no mixing across channels)."""

    def __init__(self, channels: int, cells: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(channels, cells, cells) / math.sqrt(cells))
        self.bias = nn.Parameter(torch.zeros(channels, cells))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        if h * w != self.weight.shape[1]:
            raise ValueError(f"the channel-wise FC was built for {self.weight.shape[1]} cells, got {h}x{w}")
        y = torch.einsum("bcn,cnm->bcm", x.reshape(b, c, h * w), self.weight) + self.bias
        return y.view(b, c, h, w)


def _up(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.ConvTranspose2d(cin, cout, 4, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(True))


class Decoder(nn.Module):
    """Channel-wise FC + 1x1 conv, then stride-2 up-convolutions up to ``out_size``."""

    def __init__(self, in_dim: int, grid: int, out_size: int, dim: int = 512, out_chans: int = 3):
        super().__init__()
        self.cfc = ChannelwiseFC(in_dim, grid * grid)
        self.mix = nn.Sequential(nn.Dropout(0.5), nn.Conv2d(in_dim, dim, 1), nn.BatchNorm2d(dim), nn.ReLU(True))
        stages = max(0, math.ceil(math.log2(max(1, out_size) / grid)))
        layers, c = [], dim
        for _ in range(stages):
            layers.append(_up(c, max(32, c // 2)))
            c = max(32, c // 2)
        self.up = nn.Sequential(*layers)
        self.out = nn.Conv2d(c, out_chans, 3, padding=1)
        self.out_size = out_size

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        x = self.out(self.up(self.mix(self.cfc(fmap))))
        if x.shape[-1] != self.out_size:
            x = F.interpolate(x, size=self.out_size, mode="bilinear", align_corners=False)
        return x


class Discriminator(nn.Module):
    """DCGAN discriminator (4x4 stride-2 convs, BN, LeakyReLU 0.2) on ``size`` x ``size``
    regions, ending in one logit."""

    def __init__(self, size: int, dim: int = 64, in_chans: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_chans, dim, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        c, s = dim, size // 2
        while s > 4:
            layers += [nn.Conv2d(c, min(8 * dim, 2 * c), 4, 2, 1, bias=False), nn.BatchNorm2d(min(8 * dim, 2 * c)),
                       nn.LeakyReLU(0.2, True)]
            c, s = min(8 * dim, 2 * c), s // 2
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c, 1)
        for m in self.modules():  # DCGAN initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean((2, 3))).squeeze(1)


@register("context_encoder")
class ContextEncoder(Method):
    paper = "Pathak et al. 2016, Context Encoders: Feature Learning by Inpainting"
    Config = ContextEncoderConfig
    exact_accumulation = True
    accumulation_note = "per-image reconstruction and adversarial losses"

    def __init__(self, backbone, cfg: ContextEncoderConfig, views):
        super().__init__(backbone, cfg, views)
        if cfg.lambda_rec < 0 or cfg.lambda_adv < 0 or cfg.lambda_rec + cfg.lambda_adv <= 0:
            raise ValueError("lambda_rec and lambda_adv must be >= 0 and not both 0")
        if cfg.disc_lr_scale <= 0:
            raise ValueError(f"disc_lr_scale must be > 0, got {cfg.disc_lr_scale}")
        size = views.specs[0].out_size(backbone.config["image_size"]) if views.specs else backbone.config["image_size"]
        self.start, self.size, self.overlap = center_box(size, cfg.hole_frac, cfg.overlap_frac)
        was = backbone.training
        backbone.eval()  # a probe forward for the feature-map size must not touch BatchNorm statistics
        with torch.no_grad():
            grid = self._feature_map(torch.zeros(1, 3, size, size)).shape[-1]
        backbone.train(was)
        self.decoder = Decoder(backbone.num_features, grid, self.size, cfg.decoder_dim)
        self.discriminator = Discriminator(self.size, cfg.disc_dim) if cfg.lambda_adv > 0 else None
        w = torch.full((1, 1, self.size, self.size), cfg.overlap_weight)
        o = self.overlap
        w[..., o:self.size - o, o:self.size - o] = 1.0
        self.register_buffer("rec_weight", w, persistent=False)

    def _feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """The trunk's spatial features (B, D, h, w), from CNN maps or ViT patch tokens."""
        return feature_map(self.backbone, self.backbone.forward_features(x))

    def param_groups(self, weight_decay: float) -> list[dict]:
        """The engine's groups, with the discriminator's at ``disc_lr_scale`` times the lr."""
        gen = [m for name, m in self.named_children() if name != "discriminator"]
        groups = param_groups(gen, weight_decay)
        if self.discriminator is not None:
            for g in param_groups(self.discriminator, weight_decay):
                groups.append(dict(g, lr_scale=self.cfg.disc_lr_scale))
        return [g for g in groups if g["params"]]

    def crop_center(self, x: torch.Tensor) -> torch.Tensor:
        s, n = self.start, self.size
        return x[..., s:s + n, s:s + n]

    def inpaint(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(masked input, predicted central region)`` for a normalised batch."""
        masked = mask_center(x, self.start, self.size, self.overlap)
        if not self.backbone.is_vit:
            masked = masked.contiguous(memory_format=torch.channels_last)
        return masked, self.decoder(self._feature_map(masked))

    def training_step(self, views: list[torch.Tensor], info: StepInfo) -> dict[str, torch.Tensor]:
        x = views[0]
        _, pred = self.inpaint(x)
        real = self.crop_center(x)
        rec = weighted_mse(pred, real, self.rec_weight)
        out = {"rec": rec.detach()}
        loss = self.cfg.lambda_rec * rec
        if self.discriminator is not None:
            d_loss, g_adv = adversarial_losses(self.discriminator, real.contiguous(), pred.float())
            loss = loss + self.cfg.lambda_adv * g_adv + d_loss
            out.update(adv=g_adv.detach(), d_loss=d_loss.detach())
        out["loss"] = loss
        return out
