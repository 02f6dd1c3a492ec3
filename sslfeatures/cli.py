"""``sslfeatures`` command line: a thin layer over the Python API.

    sslfeatures methods
    sslfeatures pretrain --method simclr --data images/ --backbone resnet18 --image-size 32 --epochs 20
    sslfeatures embed --model runs/simclr-.../ --data images/ --out feats.npy
    sslfeatures knn --model runs/simclr-.../ --train labelled/train --test labelled/test
    sslfeatures linear --model ... --train ... --test ...
    sslfeatures export --model runs/simclr-.../ --out exported/
    sslfeatures demo-data --out demo_data/
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

import yaml


def _parse_set(items: Sequence[str]) -> dict[str, Any]:
    out = {}
    for item in items or []:
        if "=" not in item:
            raise SystemExit(f"--set expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip().replace("-", "_")] = yaml.safe_load(v)
    return out


def _cmd_methods(args) -> int:
    from .engine.config import load_recipe
    from .methods import get_method, list_methods

    for name in list_methods():
        r = load_recipe(name)
        print(f"{name:10s} {r.get('backbone', ''):24s} {get_method(name).paper}")
    return 0


def _cmd_pretrain(args) -> int:
    from .engine import Pretrainer

    overrides = _parse_set(args.set)
    for key in ("epochs", "batch_size", "image_size", "lr", "precision", "seed", "stem", "patch_size", "device"):
        val = getattr(args, key)
        if val is not None:
            overrides[key] = val
    p = Pretrainer(args.method, backbone=args.backbone, recipe=args.recipe, **overrides)
    run = p.fit(args.data, output_dir=args.out, resume=args.resume, overwrite=args.overwrite,
                max_steps=args.max_steps)
    print(json.dumps({"output_dir": str(run.output_dir), "steps": run.steps, "final_loss": run.final_loss,
                      "minutes": round(run.seconds / 60, 2), "bad_files": len(run.bad_files)}, indent=2))
    return 0


def _load(model: str):
    from .encoder import Encoder

    return Encoder.from_pretrained(model)


def _cmd_embed(args) -> int:
    import numpy as np

    enc = _load(args.model)
    data = args.data
    if len(data) == 1 and Path(data[0]).is_dir():
        paths, feats = enc.embed_folder(data[0], batch_size=args.batch_size, pooling=args.pooling)
    else:
        paths, feats = data, enc.embed(data, batch_size=args.batch_size, pooling=args.pooling)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(out, feats)
    out.with_suffix(".paths.txt").write_text("".join(f"{p}\n" for p in paths))
    print(f"wrote {out} {feats.shape} and {out.with_suffix('.paths.txt')}")
    return 0


def _features(args):
    from .eval import raw_pixel_features

    if args.model == "raw":
        xtr, ytr, _ = raw_pixel_features(args.train)
        xte, yte, _ = raw_pixel_features(args.test)
        return xtr, ytr, xte, yte
    enc = _load(args.model)
    xtr, ytr, _ = enc.embed_labelled(args.train)
    xte, yte, _ = enc.embed_labelled(args.test)
    return xtr, ytr, xte, yte


def _cmd_knn(args) -> int:
    from .eval import weighted_knn

    res = weighted_knn(*_features(args), k=args.k, temperature=args.temperature)
    print(json.dumps(res, indent=2))
    return 0


def _cmd_linear(args) -> int:
    from .eval import linear_probe

    print(json.dumps(linear_probe(*_features(args), epochs=args.epochs), indent=2))
    return 0


def _cmd_export(args) -> int:
    enc = _load(args.model)
    files = enc.export(args.out, formats=["safetensors"])
    print(json.dumps({k: str(v) for k, v in files.items()}, indent=2))
    return 0


def _cmd_demo_data(args) -> int:
    from .data.demo import write_demo_folders

    print(json.dumps({k: str(v) for k, v in write_demo_folders(args.out).items()}, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="sslfeatures", description="Self-supervised visual representation learning")
    ap.add_argument("-v", "--verbose", action="store_true")
    sub = ap.add_subparsers(dest="command", required=True)

    sub.add_parser("methods", help="list the available methods").set_defaults(fn=_cmd_methods)

    p = sub.add_parser("pretrain", help="pre-train an encoder on a folder of unlabeled images")
    p.add_argument("--method", required=True)
    p.add_argument("--data", required=True, help="folder of images (searched recursively)")
    p.add_argument("--backbone", help="timm model name (default: the recipe's)")
    p.add_argument("--recipe", help="a recipe YAML to use instead of the method's default")
    p.add_argument("--out", help="run folder (default runs/<method>-<time>)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", dest="batch_size", type=int)
    p.add_argument("--image-size", dest="image_size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--seed", type=int)
    p.add_argument("--stem", choices=["default", "small", "small_s2"])
    p.add_argument("--patch-size", dest="patch_size", type=int)
    p.add_argument("--device")
    p.add_argument("--max-steps", dest="max_steps", type=int)
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--overwrite", action="store_true", help="start again in an existing --out")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="any recipe or method option, e.g. --set temperature=0.2 warmup_epochs=1")
    p.set_defaults(fn=_cmd_pretrain)

    p = sub.add_parser("embed", help="embed images with a pre-trained encoder")
    p.add_argument("--model", required=True, help="run/exported folder, .safetensors file or hub id")
    p.add_argument("--data", required=True, nargs="+", help="a folder or image files")
    p.add_argument("--out", required=True, help="output .npy (paths go to <out>.paths.txt)")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=64)
    p.add_argument("--pooling", choices=["default", "cls", "mean", "gem"])
    p.set_defaults(fn=_cmd_embed)

    for name, fn, help_ in (("knn", _cmd_knn, "weighted k-NN top-1 on labelled folders"),
                            ("linear", _cmd_linear, "linear probe on labelled folders")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("--model", required=True, help="encoder to evaluate, or 'raw' for raw pixels")
        p.add_argument("--train", required=True, help="labelled folder: train/<class>/<image>")
        p.add_argument("--test", required=True)
        if name == "knn":
            p.add_argument("--k", type=int, default=20)
            p.add_argument("--temperature", type=float, default=0.07)
        else:
            p.add_argument("--epochs", type=int, default=60)
        p.set_defaults(fn=fn)

    p = sub.add_parser("export", help="export an encoder (safetensors + config.json), verified on reload")
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.set_defaults(fn=_cmd_export)

    p = sub.add_parser("demo-data", help="write the embedded Fashion-MNIST demo set as image folders")
    p.add_argument("--out", default="demo_data")
    p.set_defaults(fn=_cmd_demo_data)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    try:
        return args.fn(args)
    except (FileNotFoundError, FileExistsError, ValueError, TypeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
