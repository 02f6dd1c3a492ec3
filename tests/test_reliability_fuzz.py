"""Property tests (hypothesis): the preprocessing turns any image-like input into the
documented ``uint8 (3, S, S)`` tensor or a clear ``ValueError``/``TypeError``; the config
and recipe parsers turn any input into a validated config or a ``ConfigError``."""
from __future__ import annotations

import dataclasses
import json
import typing

import numpy as np
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image

from sslfeatures.config import ConfigError, from_dict
from sslfeatures.data import ArrayImages
from sslfeatures.data.decode import pil_to_rgb, pil_to_tensor, resize_center_crop, to_uint8_image
from sslfeatures.encoder import validate_config
from sslfeatures.engine.config import TrainConfig, load_recipe, resolve_config
from sslfeatures.methods import get_method

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

DTYPES = [np.uint8, np.uint16, np.int8, np.int32, np.int64, np.float16, np.float32, np.float64, np.bool_]


@st.composite
def image_arrays(draw):
    """Arrays of any dtype in image-ish and not-so-image-ish shapes, NaN/Inf included."""
    dtype = draw(st.sampled_from(DTYPES))
    h, w = draw(st.integers(0, 40)), draw(st.integers(0, 40))
    layout = draw(st.sampled_from(["hw", "hwc", "chw", "1d", "4d"]))
    c = draw(st.integers(1, 5))
    shape = {"hw": (h, w), "hwc": (h, w, c), "chw": (c, h, w), "1d": (h,), "4d": (1, h, w, c)}[layout]
    if np.issubdtype(dtype, np.floating):
        width = 16 if dtype == np.float16 else 32
        elements = st.floats(-2, 3, width=width) | st.sampled_from([float("nan"), float("inf"), -float("inf")])
    else:
        elements = None
    return draw(arrays(dtype, shape, elements=elements))


def _documented(arr: np.ndarray) -> bool:
    """Does the to_uint8_image docstring promise to accept this array?"""
    a = arr
    if a.ndim == 3 and a.shape[0] in (1, 3, 4) and a.shape[-1] not in (1, 3, 4):
        return False  # CHW is a tensor layout; numpy arrays are HWC
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    ok_shape = a.ndim == 2 or (a.ndim == 3 and a.shape[-1] in (3, 4))
    ok_dtype = a.dtype in (np.uint8, np.uint16, np.bool_) or np.issubdtype(a.dtype, np.floating)
    finite = not np.issubdtype(a.dtype, np.floating) or bool(np.isfinite(a).all())
    return ok_shape and ok_dtype and finite and min(a.shape[:2]) > 0


@FAST
@given(arr=image_arrays(), size=st.integers(1, 24), crop=st.floats(0.5, 1.0))
def test_any_array_gives_the_documented_tensor_or_a_clear_error(arr, size, crop):
    try:
        img = to_uint8_image(arr)
        out = pil_to_tensor(resize_center_crop(img, size, crop))
    except (ValueError, TypeError) as e:
        assert str(e), "an error must say what is wrong"
        assert not _documented(arr), f"documented input refused: {arr.dtype} {arr.shape}: {e}"
        return
    assert out.dtype == torch.uint8 and tuple(out.shape) == (3, size, size)
    assert _documented(arr) or arr.ndim == 3  # (C, H, W)-like arrays may be read as HWC


@FAST
@given(arr=image_arrays(), size=st.integers(1, 24))
def test_a_source_never_raises_on_a_bad_item(arr, size):
    """What training and embedding call: a bad in-memory image is a reason, not a crash."""
    x, index, reason = ArrayImages([arr], size=size)[0]
    assert index == 0
    if x is None:
        assert isinstance(reason, str) and reason
    else:
        assert x.dtype == torch.uint8 and tuple(x.shape) == (3, size, size)


@FAST
@given(t=arrays(np.float32, st.tuples(st.sampled_from([1, 3, 4]), st.integers(1, 20), st.integers(1, 20)),
                elements=st.floats(0, 1, width=32)))
def test_float_tensors_chw(t):
    img = to_uint8_image(torch.from_numpy(t))
    assert img.mode == "RGB" and img.size == (t.shape[2], t.shape[1])


MODES = ["1", "L", "P", "RGB", "RGBA", "CMYK", "YCbCr", "LA", "PA", "I", "I;16", "F", "RGBX", "HSV", "LAB", "La",
         "RGBa"]


@FAST
@given(mode=st.sampled_from(MODES), w=st.integers(1, 30), h=st.integers(1, 30), seed=st.integers(0, 2**16),
       size=st.integers(1, 20))
def test_any_pil_mode_becomes_rgb(mode, w, h, seed, size):
    rng = np.random.default_rng(seed)
    base = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8), "RGB")
    try:
        img = base.convert(mode)
    except ValueError:
        img = Image.new(mode, (w, h))
    if mode == "P" and seed % 2:
        img.info["transparency"] = 0
    rgb = pil_to_rgb(img)
    assert rgb.mode == "RGB" and rgb.size == (w, h)
    assert tuple(pil_to_tensor(resize_center_crop(rgb, size)).shape) == (3, size, size)


# -- config / recipe parser -------------------------------------------------------------------------
JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=10)
TRAIN_KEYS = [f.name for f in dataclasses.fields(TrainConfig)]
HINTS = typing.get_type_hints(TrainConfig)


@st.composite
def config_dicts(draw):
    keys = draw(st.lists(st.sampled_from(TRAIN_KEYS) | st.text(min_size=1, max_size=8), max_size=6, unique=True))
    d = {}
    for k in keys:
        default = getattr(TrainConfig(), k, None)
        d[k] = draw(JSONISH | st.just(default))  # sometimes a valid value, often junk
    return d


def _matches(value, tp) -> bool:
    origin = typing.get_origin(tp)
    if origin is typing.Union or type(tp).__name__ == "UnionType":
        return any(_matches(value, a) for a in typing.get_args(tp))
    if origin is typing.Literal:
        return value in typing.get_args(tp)
    if tp is type(None):
        return value is None
    if origin is tuple:
        return isinstance(value, tuple)
    if tp in (list, dict) or origin in (list, dict):
        return isinstance(value, origin or tp)
    if tp is float:
        return isinstance(value, float)
    return isinstance(value, tp) if isinstance(tp, type) else True


@FAST
@given(d=config_dicts())
def test_config_parser_validates_or_says_why(d):
    try:
        cfg = from_dict(TrainConfig, d, where="recipe")
    except ConfigError as e:
        assert str(e).startswith("recipe") and ("expected" in str(e) or "unknown key" in str(e)), str(e)
        return
    for k in d:  # every accepted value has the declared type
        assert _matches(getattr(cfg, k), HINTS[k]), (k, getattr(cfg, k), HINTS[k])


@FAST
@given(d=config_dicts(), margs=st.dictionaries(st.sampled_from(["temperature", "proj_dim", "junk"]), JSONISH,
                                                 max_size=3))
def test_recipe_files_validate_or_say_why(tmp_path_factory, d, margs):
    d = {k: v for k, v in d.items() if k not in ("method", "method_args")}
    d.update(method="simclr", method_args=margs)
    path = tmp_path_factory.mktemp("r") / "r.yaml"
    path.write_text(yaml.safe_dump(d))
    cls = get_method("simclr").Config
    try:
        resolve_config("simclr", path, {}, cls)
    except ConfigError as e:
        assert "expected" in str(e) or "unknown" in str(e), str(e)


@FAST
@given(text=st.text(max_size=60))
def test_any_yaml_text_is_a_recipe_or_a_config_error(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("y") / "r.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        data = load_recipe(path)
    except ConfigError:
        return
    assert isinstance(data, dict)


GOOD_CONFIG = {"backbone": {"name": "resnet18", "image_size": 16, "stem": "small_s2", "patch_size": None,
                            "pooling": "default", "in_chans": 3, "registers": 0, "timm_kwargs": {}},
               "image_size": 16, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "crop_pct": 1.0,
               "pooling": "default", "method": None, "format_version": 1}


@FAST
@given(key=st.sampled_from(sorted(GOOD_CONFIG) + ["extra", "backbone.name", "backbone.stem"]), value=JSONISH)
def test_encoder_config_json_validates_or_says_why(key, value):
    cfg = json.loads(json.dumps(GOOD_CONFIG))
    if key.startswith("backbone."):
        cfg["backbone"][key.split(".", 1)[1]] = value
    else:
        cfg[key] = value
    try:
        validate_config(cfg, "config.json")
    except ConfigError as e:
        assert str(e).startswith("config.json") and ("expected" in str(e) or "must be" in str(e)
                                                     or "unknown key" in str(e) or "should be" in str(e)), str(e)


def test_the_good_config_passes():
    validate_config(GOOD_CONFIG)
