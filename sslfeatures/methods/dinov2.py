"""DINOv2 — Oquab et al. 2024, "DINOv2: Learning Robust Visual Features without Supervision".

Self-distillation with an EMA teacher, as in DINO, plus the pieces DINOv2 adds:

- **DINO loss** on the image-level token: the student sees every crop (global + local),
  the teacher only the global crops; cross-entropy across views.
- **iBOT loss** on patch tokens: a fraction of the global crops (``mask_probability``)
  get BEiT-style block masks covering a ratio drawn in ``mask_ratio``; the student sees
  a learned mask token in place of those patches, the teacher sees the full crop, and the
  student predicts the teacher's distribution of every masked patch.
- **KoLeo** regulariser on the student's image-level features of each global crop.
- **Sinkhorn-Knopp** teacher targets (``centering="sinkhorn_knopp"``, DINOv2's large
  models) or DINO's centring (``"centering"``).

Heads are DINO heads (:class:`~sslfeatures.heads.DINOHead`, trainable weight norm); the
iBOT head is the DINO head unless ``ibot_separate_head``. Works with any timm ViT,
including register tokens (``backbone_kwargs={"registers": 4}``). Not reproduced from the
reference code: layer-wise lr decay, the patch-embedding lr multiplier and the
``sqrt(batch / 1024)`` lr scaling (the engine scales linearly; the recipe's ``base_lr``
equals DINOv2's lr at batch 256).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer

from ..backbones import Backbone
from ..engine.ema import EMA
from ..engine.schedules import cosine, linear_warmup_then_constant
from ..heads import DINOHead
from ..losses import DINOv2Loss, iBOTPatchLoss, koleo_loss
from .base import Method, MethodConfig, StepInfo, register


@dataclass
class DINOv2Config(MethodConfig):
    out_dim: int = 65536
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    head_layers: int = 3
    ibot_separate_head: bool = False
    ibot_out_dim: int = 65536          # used when ibot_separate_head
    dino_loss_weight: float = 1.0
    ibot_loss_weight: float = 1.0
    koleo_loss_weight: float = 0.1
    centering: str = "sinkhorn_knopp"  # or "centering" (DINO's)
    sinkhorn_iterations: int = 3
    n_global_crops: int = 2            # the first views are the global crops
    mask_probability: float = 0.5      # share of global crops that get an iBOT mask
    mask_ratio: tuple[float, float] = (0.1, 0.5)
    student_temp: float = 0.1
    warmup_teacher_temp: float = 0.04
    teacher_temp: float = 0.07
    warmup_teacher_temp_epochs: float = 30
    center_momentum: float = 0.9
    momentum_start: float = 0.992
    momentum_end: float = 1.0
    freeze_last_layer_epochs: float = 1


# -- masking ----------------------------------------------------------------------------------
def block_mask(height: int, width: int, num_masked: int, rng: random.Random, min_patches: int = 4,
               max_patches: int | None = None, aspect: tuple[float, float] = (0.3, 1 / 0.3)) -> torch.Tensor:
    """BEiT's block-wise mask (Bao et al. 2022, Alg. 1), as used by iBOT and DINOv2: add
    random rectangles of ``min_patches``..``max_patches`` patches and aspect ratio in
    ``aspect`` until about ``num_masked`` patches are masked. Returns ``(height, width)``
    bool, True = masked (may hold fewer than ``num_masked`` when no rectangle fits)."""
    mask = torch.zeros(height, width, dtype=torch.bool)
    max_patches = max_patches if max_patches is not None else num_masked
    log_aspect = (math.log(aspect[0]), math.log(aspect[1]))
    count = 0
    while count < num_masked:
        budget = min(num_masked - count, max_patches)
        added = 0
        for _ in range(10):
            area = rng.uniform(min_patches, budget)
            ratio = math.exp(rng.uniform(*log_aspect))
            h, w = int(round(math.sqrt(area * ratio))), int(round(math.sqrt(area / ratio)))
            if 0 < h < height and 0 < w < width:
                top, left = rng.randint(0, height - h), rng.randint(0, width - w)
                block = mask[top:top + h, left:left + w]
                new = h * w - int(block.sum())
                if 0 < new <= budget:
                    block.fill_(True)
                    added = new
                    break
        if added == 0:
            break
        count += added
    return mask


def sample_ibot_masks(n_images: int, grid: tuple[int, int], probability: float,
                      ratio: tuple[float, float], rng: random.Random) -> torch.Tensor:
    """DINOv2's mask collation: ``int(n_images * probability)`` images get a block mask
    whose ratio is drawn from consecutive slices of ``ratio`` (so the batch spans the whole
    range), the others none; the order is shuffled. Returns ``(n_images, H*W)`` bool."""
    h, w = grid
    n = h * w
    n_masked_images = int(n_images * probability)
    edges = torch.linspace(ratio[0], ratio[1], n_masked_images + 1).tolist()
    masks = [block_mask(h, w, int(n * rng.uniform(edges[i], edges[i + 1])), rng, max_patches=max(1, n // 2))
             for i in range(n_masked_images)]
    masks += [torch.zeros(h, w, dtype=torch.bool) for _ in range(n_images - n_masked_images)]
    rng.shuffle(masks)
    return torch.stack(masks).flatten(1)


# -- ViT forward with mask tokens ----------------------------------------------------------------
def require_vit(backbone: Backbone, method: str) -> None:
    if not isinstance(backbone.model, VisionTransformer):
        raise ValueError(f"{method} needs a timm VisionTransformer backbone (vit_*, deit_*; e.g. "
                         f"vit_small_patch16_224), got {backbone.name!r}")


def vit_tokens(backbone: Backbone, x: torch.Tensor, masks: torch.Tensor | None = None,
               mask_token: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pooled (B, D), patch tokens (B, N, D))`` of a timm ViT; where ``masks`` (``(B, N)``
    bool) is True the patch embedding is replaced by ``mask_token`` before the position
    embedding (iBOT / DINOv2). Prefix tokens (class, registers) are dropped from the patch
    tokens; the pooled output is the backbone's pooling (the class token by default)."""
    vit = backbone.model
    t = vit.patch_embed(x)  # (B, h, w, D) with dynamic image size, else (B, N, D)
    if masks is not None:
        t = torch.where(masks.view(*t.shape[:-1], 1), mask_token.to(t.dtype), t)
    t = vit._pos_embed(t)
    t = vit.norm_pre(vit.patch_drop(t))
    t = vit.norm(vit.blocks(t))
    return backbone.pool(t), backbone.tokens_from_features(t)


def dino_head(in_dim: int, out_dim: int, cfg: DINOv2Config) -> DINOHead:
    return DINOHead(in_dim, out_dim, cfg.hidden_dim, cfg.bottleneck_dim, num_layers=cfg.head_layers,
                    norm_last_layer=False)


@register("dinov2")
class DINOv2(Method):
    paper = "Oquab et al. 2024, DINOv2: Learning Robust Visual Features without Supervision"
    Config = DINOv2Config
    exact_accumulation = False
    accumulation_note = "Sinkhorn-Knopp / centring and the KoLeo term use micro-batch statistics"

    def __init__(self, backbone: Backbone, cfg: DINOv2Config, views):
        super().__init__(backbone, cfg, views)
        require_vit(backbone, self.name)
        lo, hi = cfg.mask_ratio
        if not 0.0 <= cfg.mask_probability <= 1.0 or not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"mask_probability must be in [0, 1] and mask_ratio a range within [0, 1], got "
                             f"{cfg.mask_probability} and {cfg.mask_ratio}")
        if cfg.n_global_crops < 2:
            raise ValueError(f"{self.name} needs n_global_crops >= 2 (the DINO loss pairs global crops)")
        n_views = sum(s.count for s in views.specs)
        if n_views < cfg.n_global_crops:
            raise ValueError(f"{self.name}: the views give {n_views} crops per image, fewer than "
                             f"n_global_crops={cfg.n_global_crops}")
        heads = {"dino_head": dino_head(backbone.num_features, cfg.out_dim, cfg)}
        if cfg.ibot_separate_head:
            heads["ibot_head"] = dino_head(backbone.num_features, cfg.ibot_out_dim, cfg)
        self.student = nn.ModuleDict({"backbone": backbone, **heads})
        self.mask_token = nn.Parameter(torch.zeros(1, backbone.num_features))
        ibot_dim = cfg.ibot_out_dim if cfg.ibot_separate_head else cfg.out_dim
        self.dino_loss = DINOv2Loss(cfg.out_dim, cfg.student_temp, cfg.center_momentum, cfg.centering,
                                    cfg.sinkhorn_iterations)
        self.ibot_loss = iBOTPatchLoss(ibot_dim, cfg.student_temp, cfg.center_momentum, cfg.centering,
                                       cfg.sinkhorn_iterations)
        self.build_teacher()

    # -- pieces a subclass (distillation) replaces ----------------------------------------
    def build_teacher(self) -> None:
        self.teacher = EMA(self.student)

    @staticmethod
    def ibot_head(branch: nn.ModuleDict) -> nn.Module:
        return branch["ibot_head"] if "ibot_head" in branch else branch["dino_head"]

    @torch.no_grad()
    def teacher_logits(self, x: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher head outputs for the global crops ``x``: image-level ``(B, K)`` and those of
        the patches selected by ``masks`` ``(M, K')``."""
        branch = self.teacher.module
        pooled, patches = vit_tokens(branch["backbone"], x)
        return branch["dino_head"](pooled), self.ibot_head(branch)(patches[masks])

    def sample_masks(self, n_images: int, grid: tuple[int, int], device) -> tuple[torch.Tensor | None, torch.Tensor]:
        """``(student input masks or None, patches the iBOT loss covers)``, both ``(B, N)`` bool."""
        rng = random.Random(int(torch.randint(0, 2**62, (1,))))  # follows the engine's per-step seed
        masks = sample_ibot_masks(n_images, grid, self.cfg.mask_probability, self.cfg.mask_ratio, rng).to(device)
        return masks, masks

    # -- the step ------------------------------------------------------------------------------
    def _global_crops(self, views: list[torch.Tensor]) -> torch.Tensor:
        ng = self.cfg.n_global_crops
        if len(views) < ng or any(v.shape != views[0].shape for v in views[:ng]):
            raise ValueError(f"{self.name}: the first n_global_crops={ng} views must be crops of one size, got "
                             f"{[tuple(v.shape[-2:]) for v in views]}")
        return torch.cat(views[:ng])

    def _local_pooled(self, views: list[torch.Tensor]) -> list[torch.Tensor]:
        out, start = [], 0
        while start < len(views):  # one forward per run of equal-size crops
            end = start
            while end < len(views) and views[end].shape == views[start].shape:
                end += 1
            out.append(self.student["backbone"](torch.cat(views[start:end])))
            start = end
        return out

    def teacher_temperature(self, info: StepInfo) -> float:
        warmup = int(self.cfg.warmup_teacher_temp_epochs * info.steps_per_epoch)
        return linear_warmup_then_constant(info.step, warmup, self.cfg.warmup_teacher_temp, self.cfg.teacher_temp)

    def training_step(self, views, info):
        cfg = self.cfg
        x = self._global_crops(views)
        p = self.student["backbone"].patch_size
        grid = (x.shape[-2] // p, x.shape[-1] // p)
        input_masks, loss_masks = self.sample_masks(x.shape[0], grid, x.device)
        temp = self.teacher_temperature(info)
        t_cls, t_patch = self.teacher_logits(x, loss_masks)

        s_pooled, s_patches = vit_tokens(self.student["backbone"], x, input_masks, self.mask_token)
        n_views = len(views)
        s_cls = self.student["dino_head"](torch.cat([s_pooled] + self._local_pooled(views[cfg.n_global_crops:])))
        dino = self.dino_loss(list(s_cls.chunk(n_views)), list(t_cls.chunk(cfg.n_global_crops)), temp)
        ibot = self.ibot_loss(self.ibot_head(self.student)(s_patches[loss_masks]), t_patch, loss_masks, temp)
        koleo = sum(koleo_loss(c) for c in s_pooled.chunk(cfg.n_global_crops))
        loss = cfg.dino_loss_weight * dino + cfg.ibot_loss_weight * ibot + cfg.koleo_loss_weight * koleo
        return {"loss": loss, "dino_loss": dino.detach(), "ibot_loss": ibot.detach(),
                "koleo_loss": koleo.detach(), "masked_patches": loss_masks.float().mean(),
                "teacher_temp": torch.tensor(temp)}

    def before_optimizer_step(self, info):
        if info.epoch_float < self.cfg.freeze_last_layer_epochs:
            for name, p in self.student.named_parameters():
                if ".last_layer." in name:
                    p.grad = None

    def after_optimizer_step(self, info):
        m = cosine(info.progress, self.cfg.momentum_start, self.cfg.momentum_end)
        self.teacher.update(self.student, m)

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # the teacher runs without stochastic depth / dropout, as in the paper
        return self

    def encoder_backbone(self):
        return self.teacher.module["backbone"]  # the paper evaluates the teacher
