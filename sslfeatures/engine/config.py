"""The run configuration: a recipe (``recipes/<method>.yaml``) plus overrides."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from ..config import ConfigError, from_dict, to_dict


@dataclass
class TrainConfig:
    """Everything the engine needs besides the method's own hyper-parameters."""

    method: str = "simclr"
    paper: str = ""
    backbone: str = "resnet18"
    backbone_kwargs: dict = field(default_factory=dict)
    stem: str = "default"
    patch_size: int | None = None
    pooling: str = "default"
    image_size: int = 224
    epochs: int | float = 100       # may be fractional (2.5): the run takes epochs x steps per epoch steps, rounded
    batch_size: int = 256
    optimizer: str = "adamw"
    base_lr: float = 1e-3          # scaled by batch_size * world_size / 256
    lr: float | None = None        # absolute lr; overrides base_lr when set
    min_lr: float = 0.0
    warmup_epochs: float = 10
    weight_decay: float = 0.05
    weight_decay_end: float | None = None  # cosine schedule of weight decay (DINO)
    momentum: float = 0.9
    betas: tuple[float, float] = (0.9, 0.999)
    clip_grad: float | None = None
    precision: str = "auto"
    channels_last: bool = True
    seed: int = 0
    checkpoint_every: int = 500     # steps (plus every epoch end)
    log_every: int = 10
    num_workers: int | None = None
    cache_bytes: int = 4 << 30
    device: str = "auto"
    progress: bool = True
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    views: list = field(default_factory=list)
    method_args: dict = field(default_factory=dict)
    strict: bool = False            # True: the first unreadable image stops the run (default: skip + report)
    on_nonfinite: Literal["raise", "skip"] = "raise"  # a NaN/Inf loss or gradient: stop, or skip that batch
    # -- scaling out (see the README's "Scaling out" and sslfeatures/engine/scale.py) ------------
    accumulate_steps: int = 1       # micro-batches per optimizer step: effective batch = batch_size x world x this
    sync_bn: bool | None = None     # SyncBatchNorm across processes; None: on when world_size > 1 and the model has BN
    strategy: Literal["ddp", "fsdp"] = "ddp"  # fsdp: shard parameters/gradients/optimizer state (large ViTs)
    grad_checkpointing: bool = False  # recompute ViT blocks in backward (activation memory for compute)
    compile: bool = False           # torch.compile the backbone
    dist_timeout: float = 1800.0    # seconds a process-group collective may wait for a peer before failing


def recipe_path(method: str) -> Path:
    return Path(str(resources.files("sslfeatures.recipes"))) / f"{method}.yaml"


def load_recipe(method_or_path: str | Path) -> dict[str, Any]:
    p = Path(method_or_path)
    if p.suffix in (".yaml", ".yml"):
        if not p.exists():
            raise FileNotFoundError(f"recipe not found: {p}")
    else:
        p = recipe_path(str(method_or_path))
        if not p.exists():
            return {"method": str(method_or_path)}
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p} is not valid YAML: {' '.join(str(e).split())}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: a recipe must be a mapping of keys to values, got {type(data).__name__}")
    return data


def recipe_variants() -> dict[str, str]:
    """Shipped recipes whose name is not a method's: ``{recipe name: the method it configures}``
    (``byol_gn_ws`` -> ``byol``)."""
    from ..methods import list_methods

    methods = set(list_methods())
    out = {}
    for p in sorted(recipe_path("x").parent.glob("*.yaml")):
        if p.stem in methods:
            continue
        try:
            target = load_recipe(p).get("method")
        except (ConfigError, OSError):
            continue
        if isinstance(target, str) and target in methods:
            out[p.stem] = target
    return out


def resolve_method(name: str, recipe: str | Path | None = None) -> tuple[type, str | Path | None]:
    """The method class and recipe of ``Pretrainer(name, recipe=...)``: a registered method name,
    or the name of a shipped recipe variant (``"byol_gn_ws"`` = ``"byol"`` with
    ``recipes/byol_gn_ws.yaml``). An unknown name lists both."""
    from ..methods import get_method, list_methods

    key = str(name).lower().replace("-", "_")
    if key in list_methods():
        return get_method(key), recipe
    variants = recipe_variants()
    if key in variants:
        if recipe is not None:
            raise ConfigError(f"{name!r} already names a recipe (recipes/{key}.yaml, method {variants[key]!r}); "
                              f"pass Pretrainer({key!r}) or Pretrainer({variants[key]!r}, recipe={str(recipe)!r}), "
                              "not a variant name and recipe= together")
        return get_method(variants[key]), key
    extra = "; recipe variants: " + ", ".join(f"{k} ({v})" for k, v in variants.items()) if variants else ""
    raise ValueError(f"unknown method {name!r}; available methods: {', '.join(list_methods())}{extra}")


def resolve_config(method: str, recipe: str | Path | None, overrides: dict[str, Any],
                   method_config_cls: type) -> tuple[TrainConfig, Any]:
    """Recipe -> overrides -> validated (TrainConfig, method Config).

    Override keys may be any TrainConfig field or any field of the method's Config (those
    go to ``method_args``); anything else is an error listing the valid keys.
    """
    data = load_recipe(recipe if recipe is not None else method)
    data.setdefault("method", method)
    method_keys = {f.name for f in dataclasses.fields(method_config_cls)}
    train_keys = {f.name for f in dataclasses.fields(TrainConfig)}
    if not isinstance(data.get("method_args") or {}, dict):
        raise ConfigError(f"recipe[{method}].method_args: expected a mapping, got {data['method_args']!r}")
    margs = dict(data.get("method_args") or {})
    clash = method_keys & train_keys
    if clash:
        raise ConfigError(f"method {method!r} reuses engine option names {sorted(clash)}; rename them")
    for k, v in overrides.items():
        if v is None and k in train_keys and k not in ("lr", "patch_size", "weight_decay_end", "clip_grad",
                                                        "num_workers"):
            continue
        if k in train_keys and k != "method_args":
            data[k] = v
        elif k in method_keys:
            margs[k] = v
        elif k == "method_args":
            margs.update(v or {})
        else:
            raise ConfigError(
                f"unknown option {k!r} for method {method!r}; engine options: {sorted(train_keys)}; "
                f"method options: {sorted(method_keys)}")
    data["method_args"] = margs
    where = f"recipe[{recipe if recipe is not None else method}]"
    tcfg = from_dict(TrainConfig, data, where=where)
    mcfg = from_dict(method_config_cls, margs, where=f"{where}.method_args")
    from ..augment.views import ViewSpec

    for i, view in enumerate(tcfg.views):  # each view: known options of the right types
        if not isinstance(view, ViewSpec):
            try:
                ViewSpec.from_dict(view)
            except ConfigError as e:
                raise ConfigError(f"{where}.views[{i}]: {e}") from None
    return tcfg, mcfg


__all__ = ["TrainConfig", "load_recipe", "resolve_config", "recipe_path", "to_dict"]
