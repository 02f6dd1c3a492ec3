"""Weights that load in plain timm, without sslfeatures installed.

``model.safetensors`` is the timm model's own state dict (classifier removed), so

    timm.create_model(name, pretrained=True, num_classes=0,
                      pretrained_cfg_overlay=dict(file="model.safetensors", custom_load=False), **model_args)

rebuilds the encoder when ``model_args`` are the arguments sslfeatures passed to timm
(:func:`timm_model_args`); ``custom_load=False`` matters for ViTs, whose default timm tags
load JAX ``.npz`` files through a custom loader that some timm releases apply to any file.
The exported ``config.json`` also carries timm's own keys (``architecture``, ``num_classes``,
``model_args``, ``pretrained_cfg``), so ``timm.create_model("local-dir:exported/", pretrained=True)`` and, once pushed,
``timm.create_model("hf-hub:org/name", pretrained=True)`` work with no arguments.

An architecture sslfeatures changed after timm built it (a small-image ``stem``,
``norm="gn_ws"``, a two-trunk / Lab backbone) cannot be rebuilt by timm:
:func:`timm_compatibility` says so, with the reason.
"""
from __future__ import annotations

import inspect
from typing import Any

import torch


def timm_model_args(backbone: Any) -> dict[str, Any]:
    """The keyword arguments timm needs to rebuild ``backbone``'s architecture (besides
    ``num_classes=0``), or a ``ValueError`` saying why timm cannot."""
    cfg = dict(getattr(backbone, "config", {}) or {})
    if cfg.get("kind") is not None:
        raise ValueError(f"a {cfg['kind']!r} backbone is sslfeatures' own composition of timm models")
    if cfg.get("stem", "default") != "default":
        raise ValueError(f"stem={cfg['stem']!r} replaces timm's stem (timm builds only its own)")
    if cfg.get("norm", "default") != "default":
        raise ValueError(f"norm={cfg['norm']!r} swaps timm's normalisation layers")
    args: dict[str, Any] = dict(cfg.get("timm_kwargs") or {})
    if cfg.get("patch_size") is not None:
        args["patch_size"] = int(cfg["patch_size"])
    if int(cfg.get("in_chans", 3)) != 3:
        args["in_chans"] = int(cfg["in_chans"])
    if getattr(backbone, "is_vit", False):
        args.setdefault("img_size", int(cfg.get("image_size", 224)))
        args.setdefault("dynamic_img_size", True)
    registers = int(cfg.get("registers", 0) or 0)
    if registers:
        params = inspect.signature(type(backbone.model).__init__).parameters
        key = "reg_tokens" if "reg_tokens" in params else "num_reg_tokens"
        args[key] = registers
    return args


def timm_compatibility(backbone: Any) -> tuple[bool, str]:
    """``(True, "")`` when plain timm rebuilds ``backbone`` exactly (same parameter and
    buffer names and shapes), else ``(False, reason)``."""
    import timm

    try:
        args = timm_model_args(backbone)
    except ValueError as e:
        return False, str(e)
    ref = None
    for device in ("meta", "cpu"):  # meta: shapes only, no memory or initialisation cost
        try:
            with torch.device(device):
                ref = timm.create_model(backbone.config["name"], pretrained=False, num_classes=0, **args)
            break
        except Exception as e:  # noqa: BLE001 - any failure means "not rebuildable by timm"
            error = f"timm.create_model failed: {type(e).__name__}: {e}"
    if ref is None:
        return False, error
    mine = {k: tuple(v.shape) for k, v in backbone.model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    if mine != theirs:
        diff = sorted(set(mine.items()) ^ set(theirs.items()))[:4]
        return False, f"timm's {backbone.config['name']} has other tensors, e.g. {diff}"
    return True, ""


def timm_config(backbone: Any, config: dict[str, Any]) -> dict[str, Any]:
    """timm's ``config.json`` keys for ``backbone`` (merged into the exported config), so
    timm's ``local-dir:`` and ``hf-hub:`` loaders rebuild it. Call only when
    :func:`timm_compatibility` is true."""
    size = int(config["image_size"])
    pretrained_cfg = {
        "input_size": [int(backbone.config.get("in_chans", 3)), size, size],
        "fixed_input_size": False,
        "interpolation": "bicubic",
        "crop_pct": float(config.get("crop_pct", 1.0)),
        "crop_mode": "center",
        "mean": [float(m) for m in config["mean"]],
        "std": [float(s) for s in config["std"]],
        "num_classes": 0,
        "license": config.get("license", "apache-2.0"),
        "custom_load": False,  # a plain state dict, never timm's JAX .npz loader
    }
    return {"architecture": backbone.config["name"], "num_classes": 0, "num_features": int(backbone.num_features),
            "model_args": timm_model_args(backbone), "pretrained_cfg": pretrained_cfg}


__all__ = ["timm_model_args", "timm_compatibility", "timm_config"]
