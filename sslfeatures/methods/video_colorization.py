"""Video colorization — Vondrick, Shrivastava, Fathi, Guadarrama & Murphy 2018,
"Tracking Emerges by Colorizing Videos".

Trains on a folder of videos: ``Pretrainer("video_colorization").fit("videos/")``. Each
sample is a clip of ``num_references`` reference frames and one target frame
(:mod:`sslfeatures.data.video_clips`). Every frame is turned grayscale (the trunk sees
only the lightness L of CIE Lab) and embedded per location; each target location
attends over all reference locations, ``A_ij = softmax_i(f_i . f_j / T)``, and its colour
is predicted as the attention-weighted sum of the references' colours,
``y_j = sum_i A_ij c_i``. Colours are quantised: k-means with 16 clusters on the ab
values of the first batch (kept in the state dict); the loss is the cross-entropy of
``y_j`` against the target's true colour cluster. Because the only way to get colours
right is to point at the same thing in the reference frames, the learned attention
tracks: :func:`propagate_labels` copies masks, keypoints or colours from annotated
frames to new frames with the same rule. The trunk (an L-input network) is what the
Encoder holds; the small per-location embedding head is the pretext head.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..augment.pretext import ClipViews, kmeans, rgb_to_lab
from ..backbones.lab import LabBackbone
from .base import Method, MethodConfig, StepInfo, register
from .colorization import feature_map


@dataclass
class VideoColorizationConfig(MethodConfig):
    num_references: int = 3          # reference frames before the target
    frame_gap: int = 1               # kept frames between consecutive clip frames
    decode_stride: int = 1           # keep every n-th decoded frame
    max_frames_per_video: int | None = None
    num_colors: int = 16             # k-means clusters of the ab colours
    kmeans_pixels: int = 200_000     # at most this many ab values enter k-means
    embed_dim: int = 64              # per-location embedding (0: attend on the trunk's features directly)
    temperature: float = 1.0         # attention temperature during training


def attention_logits(target: torch.Tensor, refs: torch.Tensor, temperature: float) -> torch.Tensor:
    """Dot-product logits between target locations (B, D, N) and reference locations (B, D, M) -> (B, N, M)."""
    return torch.einsum("bdn,bdm->bnm", target.float(), refs.float()) / temperature


def propagate_labels(ref_feats: torch.Tensor, ref_labels: torch.Tensor, target_feats: torch.Tensor,
                     temperature: float = 1.0, topk: int | None = None) -> torch.Tensor:
    """Copy per-location labels from reference frames to a target frame with the
    colorization attention (Vondrick et al.).

    ``ref_feats`` (B, D, M) — features of all reference locations; ``ref_labels`` (B, K, M)
    — a distribution over K labels (one-hot masks, colours, keypoint heatmaps) at each
    reference location; ``target_feats`` (B, D, N). Returns (B, K, N): for every target
    location the attention-weighted sum of the reference labels. ``topk`` keeps only the
    strongest ``topk`` references per target location (a common refinement at test time).
    """
    logits = attention_logits(target_feats, ref_feats, temperature)
    if topk is not None and topk < logits.shape[-1]:
        kth = logits.topk(topk, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    attn = torch.softmax(logits, dim=-1)
    return torch.einsum("bnm,bkm->bkn", attn, ref_labels.float())


@register("video_colorization")
class VideoColorization(Method):
    paper = "Vondrick et al. 2018, Tracking Emerges by Colorizing Videos"
    Config = VideoColorizationConfig
    exact_accumulation = False
    accumulation_note = "the colour palette is k-means-fit on the first micro-batch"

    @classmethod
    def make_source(cls, data, size: int, cfg: VideoColorizationConfig):
        """The training data: clips of a folder of videos (see :mod:`sslfeatures.data.video_clips`)."""
        from ..data.video_clips import VideoClips

        return VideoClips(data, size=size, num_frames=cfg.num_references + 1, frame_gap=cfg.frame_gap,
                          decode_stride=cfg.decode_stride, max_frames=cfg.max_frames_per_video)

    def __init__(self, backbone, cfg: VideoColorizationConfig, views):
        if cfg.num_references < 1:
            raise ValueError(f"num_references must be >= 1, got {cfg.num_references}")
        if cfg.num_colors < 2:
            raise ValueError(f"num_colors must be >= 2, got {cfg.num_colors}")
        if cfg.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {cfg.temperature}")
        if len(views.specs) != 1 or views.specs[0].count != 1:
            raise ValueError("video_colorization takes one view spec (crop/flip, applied alike to a clip's frames)")
        trunk = LabBackbone.from_backbone(backbone, "L", views.mean, views.std)
        super().__init__(trunk, cfg, ClipViews(views.specs[0], views.mean, views.std))
        d = trunk.num_features
        self.embed = nn.Identity() if cfg.embed_dim == 0 else nn.Sequential(
            nn.Conv2d(d, 256, 1, bias=False), nn.BatchNorm2d(256), nn.ReLU(inplace=True),
            nn.Conv2d(256, cfg.embed_dim, 1))
        self.register_buffer("centroids", torch.zeros(cfg.num_colors, 2))
        self.register_buffer("colors_ready", torch.zeros((), dtype=torch.bool))

    # -- pieces -----------------------------------------------------------------------------
    def embed_lab(self, lab: torch.Tensor) -> torch.Tensor:
        """Per-location embeddings (N, E, h, w) of Lab frames (N, 3, H, W); only L is seen."""
        return self.embed(feature_map(self.backbone, self.backbone.features_from_lab(lab)))

    @torch.no_grad()
    def fit_colors(self, ab: torch.Tensor) -> None:
        """k-means on ab values (N, 2) -> ``centroids`` (seeded; done once, on the first batch)."""
        if len(ab) > self.cfg.kmeans_pixels:
            ab = ab[torch.randperm(len(ab))[: self.cfg.kmeans_pixels].to(ab.device)]
        self.centroids.copy_(kmeans(ab.float(), self.cfg.num_colors, iters=30, seed=0))
        self.colors_ready.fill_(True)

    def quantize(self, ab: torch.Tensor) -> torch.Tensor:
        """Nearest colour cluster of each pixel: (N, 2, h, w) -> (N, h, w) long."""
        n, _, h, w = ab.shape
        flat = ab.permute(0, 2, 3, 1).reshape(-1, 2).float()
        return torch.cdist(flat, self.centroids.float()).argmin(1).view(n, h, w)

    def training_step(self, views: list[torch.Tensor], info: StepInfo) -> dict[str, torch.Tensor]:
        frames = torch.stack(views, 1)                                   # (B, T, 3, S, S) in [0, 1]
        b, t = frames.shape[:2]
        lab = rgb_to_lab(frames.flatten(0, 1))
        emb = self.embed_lab(lab)                                        # (B*T, E, h, w)
        h, w = emb.shape[-2:]
        ab = F.adaptive_avg_pool2d(lab[:, 1:], (h, w))
        if not bool(self.colors_ready):
            self.fit_colors(ab.permute(0, 2, 3, 1).reshape(-1, 2))
        colors = self.quantize(ab).view(b, t, h * w)
        emb = emb.reshape(b, t, emb.shape[1], h * w)
        refs = emb[:, :-1].permute(0, 2, 1, 3).reshape(b, emb.shape[2], -1)   # (B, E, R*h*w)
        ref_colors = F.one_hot(colors[:, :-1].reshape(b, -1), self.cfg.num_colors).transpose(1, 2)  # (B, K, R*h*w)
        pred = propagate_labels(refs, ref_colors, emb[:, -1], self.cfg.temperature)  # (B, K, h*w)
        target = colors[:, -1]
        loss = F.nll_loss(torch.log(pred.clamp(min=1e-8)), target)
        acc = (pred.argmax(1) == target).float().mean()
        return {"loss": loss, "acc": acc.detach()}
