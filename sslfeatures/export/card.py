"""The model card (``README.md`` in the Hugging Face layout) of an exported encoder.

Everything in it is read from what the export knows: the encoder's ``config.json``
(method, paper, backbone, preprocessing), the run folder it came from (``train_config.json``,
``metrics.csv``, ``bad_files.txt``, ``eval_results.json``), the export itself (files, parity
figures, k-NN per variant) and what the caller passes (a description of the training
data, the licence). A field nothing knows is said to be unknown, never invented.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

EVAL_RESULTS_NAME = "eval_results.json"


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        obj = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return obj if isinstance(obj, dict) else None


def _last_metrics(path: Path) -> dict[str, str]:
    """The last training row (step, epoch, loss, images/s) of a run's ``metrics.csv``."""
    try:
        with open(path, newline="") as fh:
            rows = [r for r in csv.DictReader(fh) if r.get("loss")]
    except OSError:
        return {}
    return rows[-1] if rows else {}


def run_knn_results(source_dir: str | Path | None) -> dict[str, Any] | None:
    """k-NN figures stored beside an encoder (``eval_results.json``: ``{"knn": {...}}``)."""
    if source_dir is None:
        return None
    res = _read_json(Path(source_dir) / EVAL_RESULTS_NAME)
    knn = (res or {}).get("knn")
    return knn if isinstance(knn, dict) else None


def _fmt(x: Any, digits: int = 4) -> str:
    if isinstance(x, float):
        return f"{x:.{digits}f}" if abs(x) >= 1e-3 or x == 0 else f"{x:.2e}"
    return str(x)


def model_card(config: dict[str, Any], *, source_dir: str | Path | None = None, files: dict[str, Any] | None = None,
               parity: list[dict[str, Any]] | None = None, knn: dict[str, Any] | None = None,
               data_description: str | None = None, license: str = "apache-2.0",
               repo_id: str | None = None, timm_args: dict[str, Any] | None = None,
               timm_note: str = "") -> str:
    """The card's Markdown text (with the hub's YAML header).

    ``knn``: ``{"torch": {"top1": ...}, "onnx_int8": {...}, "train": ..., "test": ...}``
    as measured by the export, or the run's ``eval_results.json`` when ``None``.
    ``timm_args``: the ``model_args`` plain timm needs (``None`` when timm cannot rebuild
    the backbone; ``timm_note`` then says why).
    """
    bb = config["backbone"]
    name, method = bb["name"], config.get("method") or "random init"
    src = Path(source_dir) if source_dir is not None else None
    train_cfg = _read_json(src / "train_config.json") if src else None
    last = _last_metrics(src / "metrics.csv") if src else {}
    knn = knn if knn is not None else run_knn_results(src)
    files = files or {}
    tags = ["sslfeatures", "self-supervised", "image-feature-extraction"]
    tags += [config["method"].replace("_", "-")] if config.get("method") else []
    tags += ["timm"] if timm_args is not None else []
    lines = ["---", f"license: {license}", "library_name: sslfeatures", "pipeline_tag: image-feature-extraction",
             "tags:"] + [f"- {t}" for t in tags] + ["---", ""]
    outputs = f"a {config.get('num_features', 'D')}-d embedding" + (
        " (and patch tokens)" if (config.get("onnx") or {}).get("patch_tokens") else "")
    if config.get("method"):
        lines += [f"# {name} pre-trained with {method}", "",
                  f"A frozen image encoder pre-trained **without labels** with sslfeatures (method `{method}`"
                  f"{', ' + config['paper'] if config.get('paper') else ''}). It maps an RGB image to {outputs}.", ""]
    else:
        lines += [f"# {name}, random initialisation", "",
                  f"A frozen image encoder at **random initialisation** (not pre-trained: a baseline). It maps an "
                  f"RGB image to {outputs}.", ""]

    lines += ["## Model", "", "| | |", "|---|---|", f"| method | `{method}` |"]
    if config.get("paper"):
        lines.append(f"| paper | {config['paper']} |")
    arch = ", ".join(f"{k}={v!r}" for k, v in bb.items() if k not in ("name",) and v not in (None, {}, 0, "default"))
    lines += [f"| backbone | timm `{name}` ({arch}) |",
              f"| input | {config['image_size']} x {config['image_size']} RGB |",
              f"| preprocessing | shorter side to round({config['image_size']} / crop_pct), centre crop, "
              f"/255, mean {config['mean']}, std {config['std']} (crop_pct {config.get('crop_pct', 1.0)}) |",
              f"| pooling | `{config.get('pooling', 'default')}` |", ""]

    lines += ["## Training data", ""]
    lines.append(data_description or "Not recorded by the run (pass `data_description=` to `Encoder.export` "
                                     "or `push_to_hub` to describe it).")
    lines.append("")
    if train_cfg:
        keys = ("epochs", "batch_size", "image_size", "optimizer", "lr", "base_lr", "weight_decay", "precision", "seed")
        lines += ["## Training", "", "| setting | value |", "|---|---|"]
        lines += [f"| {k} | {train_cfg[k]} |" for k in keys if train_cfg.get(k) is not None]
        if train_cfg.get("method_args"):
            lines.append(f"| method_args | `{json.dumps(train_cfg['method_args'], sort_keys=True)}` |")
        if last:
            lines.append(f"| final step / loss | {last.get('step')} / {last.get('loss')} |")
        bad = src / "bad_files.txt" if src else None
        if bad is not None and bad.exists():
            n_bad = sum(1 for ln in bad.read_text().splitlines() if ln.strip())
            lines.append(f"| files skipped (undecodable) | {n_bad} |")
        lines.append("")

    lines += ["## Evaluation", ""]
    if knn:
        lines.append("Weighted k-NN (k=20, T=0.07, cosine) on frozen embeddings"
                     + (f": train `{knn['train']}`, test `{knn['test']}`" if knn.get("train") else "") + ".")
        lines += ["", "| model | k-NN top-1 | k-NN top-5 |", "|---|---|---|"]
        for variant, res in knn.items():
            if isinstance(res, dict) and "top1" in res:
                lines.append(f"| {variant} | {_fmt(res['top1'])} | {_fmt(res.get('top5', ''))} |")
    else:
        lines.append("No k-NN figures were recorded with this encoder (`Encoder.export(..., knn=(train, test))` "
                     "measures them).")
    lines.append("")

    if files:
        lines += ["## Files", "", "| file | what |", "|---|---|"]
        what = {"safetensors": "PyTorch weights (timm state dict)", "onnx": "ONNX, float32",
                "onnx_fp16": "ONNX, float16 weights/activations, float32 I/O",
                "onnx_int8": "ONNX, int8 static quantization (QDQ), float32 I/O",
                "config": "architecture + preprocessing", "report": "export checks (parity, k-NN)"}
        for key, path in files.items():
            lines.append(f"| `{Path(path).name}` | {what.get(key, key)} |")
        lines.append("")
    if parity:
        lines += ["Every file was loaded back after writing; the ONNX files were run in onnxruntime on real "
                  "images and compared with PyTorch:", "",
                  "| variant | output | input | max abs error | min cosine |", "|---|---|---|---|---|"]
        for p in parity:
            lines.append(f"| {p['variant']} | {p['output']} | {'x'.join(str(s) for s in p['input_shape'])} | "
                         f"{_fmt(p['max_abs_error'])} | {p['min_cosine']:.6f} |")
        lines.append("")
        onnx_cfg = config.get("onnx") or {}
        if onnx_cfg:
            lines.append("ONNX input `images` (N, 3, H, W) float32, normalised; dynamic batch; "
                         + ("dynamic image size." if onnx_cfg.get("dynamic_image_size") else
                            f"fixed image size {config['image_size']} ({onnx_cfg.get('note', '')}).")
                         + " Outputs: " + ", ".join(f"`{o}`" for o in onnx_cfg.get("outputs", [])) + ".")
            lines.append("")

    where = repo_id or "path/to/exported"
    lines += ["## Usage", "", "```python", "from sslfeatures import Encoder", "",
              f"enc = Encoder.from_pretrained({where!r})",
              "feats = enc.embed([\"a.jpg\", \"b.jpg\"])   # (2, D) float32"]
    if files.get("onnx"):
        if repo_id:
            lines += ["from sslfeatures.export import OrtEncoder",
                      f"ort = OrtEncoder.from_pretrained({repo_id!r}, variant='fp32')   # or 'int8', 'fp16'"]
        else:
            lines += [f"ort = Encoder.from_pretrained({where + '/model.onnx'!r})   # onnxruntime inside"]
        lines.append("feats = ort.embed([\"a.jpg\"])")
    lines += ["```", ""]
    if timm_args is not None:
        args = "".join(f", {k}={v!r}" for k, v in timm_args.items())
        lines += ["Plain timm, no sslfeatures needed:", "", "```python", "import timm", "",
                  f"model = timm.create_model({name!r}, pretrained=True, num_classes=0{args},",
                  "                          pretrained_cfg_overlay=dict(file='model.safetensors', custom_load=False))",
                  (f"model = timm.create_model('hf-hub:{repo_id}', pretrained=True)   # same model"
                   if repo_id else "model = timm.create_model('local-dir:path/to/exported', pretrained=True)   # same"),
                  "```", ""]
    else:
        lines += [f"These weights do not load in plain timm: {timm_note or 'the architecture differs from timm'}.", ""]
    if files.get("onnx"):
        lines += ["Without PyTorch: the `export/` kit of sslfeatures (onnxruntime + numpy + Pillow + faiss-cpu) "
                  "preprocesses exactly as above, embeds and builds a FAISS index.", ""]

    lines += ["## Licence", "",
              f"The weights are released under `{license}`. The licence of the images they were trained on "
              "applies to any use of the weights as well; check it before redistributing.", ""]
    return "\n".join(lines)


def write_model_card(folder: str | Path, config: dict[str, Any], **kwargs: Any) -> Path:
    """Write :func:`model_card` to ``folder/README.md`` (atomically)."""
    from ..utils import atomic_write_bytes

    path = Path(folder) / "README.md"
    atomic_write_bytes(path, model_card(config, **kwargs).encode())
    return path


__all__ = ["model_card", "write_model_card", "run_knn_results", "EVAL_RESULTS_NAME"]
