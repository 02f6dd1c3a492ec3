"""Dense contrastive learning — location-level InfoNCE between corresponding locations of
two augmented views, the correspondences being known from the crops (the Dense Object Net
idea of Florence et al. 2018 applied to augmentation correspondences, as in VADeR,
Pinheiro et al. 2020, "Unsupervised Learning of Dense Visual Representations", and
PixPro, Xie et al. 2021; the dense + global mix follows DenseCL, Wang et al. 2021).

Each view's backbone feature map (CNN cells, or ViT patch tokens on their grid) goes
through a dense projection head. Feature cells of one view are sampled (up to
``points_per_image`` per image), their centres are mapped through the two random-resized-
crop transforms into the other view (points outside it are dropped), and the other
view's dense embedding is read there by bilinear interpolation. Each sampled location
must pick its corresponding location among all sampled locations of the batch (the other
locations of the same image and of other images are negatives), in both directions. A
global image-level NT-Xent term (SimCLR's, on the pooled features) is mixed in with
weight ``global_weight``. The run's Encoder is the backbone; its patch features
(``Encoder.patch_features``) are what the dense term trains.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..augment import Views, ops
from ..heads import mlp
from ..losses import dense_info_nce, nt_xent
from .base import Method, MethodConfig, StepInfo, register


def cell_centres(h: int, w: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Normalised (x, y) centres in [-1, 1] (``align_corners=False``) of an h x w grid of
    cells, row-major: (h * w, 2)."""
    ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) * 2 / h - 1
    xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) * 2 / w - 1
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([gx, gy], -1).reshape(-1, 2)


def corresponding_points(points: torch.Tensor, theta_from: torch.Tensor,
                         theta_to: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Map normalised points of one view into another view of the same images.

    ``points``: (B, N, 2) or (N, 2) (x, y) in view A's normalised coordinates; ``theta_*``:
    (B, 2, 3) crop transforms from :func:`sslfeatures.augment.ops.random_resized_crop`
    (``return_params=True``), view -> source image. Returns the points in view B's
    coordinates (B, N, 2) and whether each lies inside view B (B, N).
    """
    theta_from, theta_to = theta_from.float(), theta_to.float()
    if points.ndim == 2:
        points = points.unsqueeze(0).expand(theta_from.shape[0], -1, -1)
    src = torch.einsum("bij,bnj->bni", theta_from[:, :, :2], points.float()) + theta_from[:, None, :, 2]
    inv = torch.linalg.inv(theta_to[:, :, :2])
    out = torch.einsum("bij,bnj->bni", inv, src - theta_to[:, None, :, 2])
    return out, (out.abs() <= 1).all(-1)


@dataclass
class CorrespondenceViews(Views):
    """A :class:`~sslfeatures.augment.Views` recipe that also records each view's crop
    transform (``thetas``, one (B, 2, 3) tensor per view) for the step that follows."""

    thetas: list[torch.Tensor] | None = field(default=None, init=False, repr=False)

    def __call__(self, batch: torch.Tensor, image_size: int) -> list[torch.Tensor]:
        x = batch.float().div_(255.0)
        out, thetas = [], []
        for spec in self.specs:
            for _ in range(spec.count):
                v, theta = ops.random_resized_crop(x, spec.out_size(image_size), spec.scale, spec.ratio,
                                                   spec.hflip, return_params=True)
                if spec.jitter_p > 0 and any(spec.jitter):
                    v = ops.color_jitter(v, *spec.jitter, p=spec.jitter_p)
                v = ops.solarize(ops.gaussian_blur(ops.random_grayscale(v, spec.gray_p), spec.blur_p,
                                                   spec.blur_sigma), spec.solarize_p)
                out.append(ops.normalize(v, self.mean, self.std))
                thetas.append(theta)
        self.thetas = thetas
        return out


@dataclass
class DenseContrastiveConfig(MethodConfig):
    temperature: float = 0.2
    proj_hidden_dim: int = 2048
    proj_dim: int = 128
    points_per_image: int = 64   # sampled locations per image and direction; 0 = every feature cell
    global_weight: float = 0.5   # loss = (1 - w) * dense + w * global NT-Xent


@register("dense_contrastive")
class DenseContrastive(Method):
    paper = ("Dense contrastive learning on augmentation correspondences (Florence et al. 2018; "
             "Pinheiro et al. 2020, VADeR; Wang et al. 2021, DenseCL)")
    Config = DenseContrastiveConfig
    exact_accumulation = False
    accumulation_note = "in-batch negatives (global and dense InfoNCE) per micro-batch"

    def __init__(self, backbone, cfg: DenseContrastiveConfig, views):
        super().__init__(backbone, cfg, CorrespondenceViews(list(views.specs), views.mean, views.std))
        if sum(s.count for s in views.specs) != 2:
            raise ValueError("dense_contrastive needs exactly two views (e.g. views: [{count: 2}])")
        if not 0 <= cfg.global_weight <= 1:
            raise ValueError(f"global_weight must be in [0, 1], got {cfg.global_weight}")
        if cfg.points_per_image < 0:
            raise ValueError(f"points_per_image must be >= 0, got {cfg.points_per_image}")
        dim = backbone.num_features
        # a head whose term has weight 0 is not built (DDP needs every parameter to get a gradient)
        self.projector = mlp(dim, cfg.proj_hidden_dim, cfg.proj_dim, 2) if cfg.global_weight > 0 else None
        self.dense_projector = mlp(dim, cfg.proj_hidden_dim, cfg.proj_dim, 2) if cfg.global_weight < 1 else None

    def _embed(self, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Pooled features (B, D) and the dense embedding map (B, d, h, w) of one view."""
        feats = self.backbone.forward_features(v)
        tokens = self.backbone.tokens_from_features(feats)  # (B, N, D)
        b, n, d = tokens.shape
        if feats.ndim == 4:
            h, w = feats.shape[-2:]
        else:
            h = w = int(round(n ** 0.5))
            if h * w != n:
                raise ValueError(f"cannot lay {n} ViT patch tokens on a square grid; use square views")
        pooled = self.backbone.pool(feats)
        if self.dense_projector is None:
            return pooled, None
        dense = self.dense_projector(tokens.reshape(b * n, d)).reshape(b, h, w, -1).permute(0, 3, 1, 2)
        return pooled, dense

    def _pairs(self, dense_a: torch.Tensor, dense_b: torch.Tensor, theta_a: torch.Tensor,
               theta_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sampled cells of view A, view B's embedding at the same scene points, and validity."""
        b, d, h, w = dense_a.shape
        pts_b, valid = corresponding_points(cell_centres(h, w, dense_a.device), theta_a, theta_b)
        k = h * w if self.cfg.points_per_image == 0 else min(self.cfg.points_per_image, h * w)
        scores = torch.rand(b, h * w, device=dense_a.device).masked_fill(~valid, -1.0)
        idx = scores.topk(k, dim=1).indices  # valid cells first, in random order
        emb_a = dense_a.flatten(2).transpose(1, 2).gather(1, idx.unsqueeze(-1).expand(-1, -1, d))
        where = pts_b.gather(1, idx.unsqueeze(-1).expand(-1, -1, 2)).to(dense_b.dtype)
        emb_b = F.grid_sample(dense_b, where.unsqueeze(1), mode="bilinear", align_corners=False)  # (B, d, 1, k)
        emb_b = emb_b.squeeze(2).transpose(1, 2)
        return emb_a.reshape(b * k, d), emb_b.reshape(b * k, d), valid.gather(1, idx).reshape(-1)

    def training_step(self, views: list[torch.Tensor], info: StepInfo) -> dict[str, torch.Tensor]:
        thetas, self.views.thetas = self.views.thetas, None
        if thetas is None or len(thetas) != len(views) or thetas[0].shape[0] != views[0].shape[0]:
            raise RuntimeError("dense_contrastive needs the crop transforms of its views: make the views with "
                               "the method's own `method.views(batch, image_size)` right before the step")
        (g1, d1), (g2, d2) = self._embed(views[0]), self._embed(views[1])
        t, w = self.cfg.temperature, self.cfg.global_weight
        out: dict[str, torch.Tensor] = {}
        loss = g1.new_zeros((), dtype=torch.float32)
        if self.dense_projector is not None:
            a12, b12, v12 = self._pairs(d1, d2, thetas[0], thetas[1])
            a21, b21, v21 = self._pairs(d2, d1, thetas[1], thetas[0])
            dense = 0.5 * (dense_info_nce(a12, b12, v12, t) + dense_info_nce(a21, b21, v21, t))
            loss = loss + (1 - w) * dense
            out.update(dense_loss=dense.detach(), matched=torch.cat([v12, v21]).float().mean())
        if self.projector is not None:
            glob = nt_xent(self.projector(g1), self.projector(g2), t)
            loss = loss + w * glob
            out["global_loss"] = glob.detach()
        return {"loss": loss, **out}
