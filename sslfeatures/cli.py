"""``sslfeatures`` command line: a thin layer over the Python API.

    sslfeatures methods
    sslfeatures pretrain --method simclr --data images/ --backbone resnet18 --image-size 32 --epochs 20
    sslfeatures embed --model runs/simclr-.../ --data images/ --out feats.npy
    sslfeatures knn --model runs/simclr-.../ --train labelled/train --test labelled/test
    sslfeatures linear --model ... --train ... --test ...
    sslfeatures export --model runs/simclr-.../ --out exported/
    sslfeatures export runs/simclr-.../ --safetensors --onnx --int8 --fp16 --calibration images/ --out exported/
    sslfeatures demo-data --out demo_data/
    sslfeatures classify fit --model runs/simclr-.../ --data labelled/train --out clf/ --head mlp --onnx
    sslfeatures classify predict --model clf/ --data images/
    sslfeatures eval fewshot --model runs/simclr-.../ --train labelled/train --test labelled/test --plot fs.png
    sslfeatures eval cluster --model raw --data labelled/test --picture tsne.png
    sslfeatures propagate clip.mp4 --model runs/dino-.../ --first-mask 00000.png --out masks/ --gt gt_masks/
    sslfeatures index build --model runs/simclr-.../ --data photos/ --out photos.index
    sslfeatures index search --index photos.index --query q.jpg --k 10
    sslfeatures index dedup --index photos.index --threshold 0.95 --groups
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from collections.abc import Sequence
from typing import Any

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
    from .engine.config import load_recipe, recipe_variants
    from .methods import get_method, list_methods

    for name in list_methods():
        r = load_recipe(name)
        print(f"{name:10s} {r.get('backbone', ''):24s} {get_method(name).paper}")
    for name, method in recipe_variants().items():
        r = load_recipe(name)
        print(f"{name:10s} {r.get('backbone', ''):24s} {r.get('paper') or get_method(method).paper} "
              f"(recipe variant of {method})")
    return 0


def _cmd_pretrain(args) -> int:
    from .engine import Pretrainer

    overrides = _parse_set(args.set)
    for key in ("epochs", "batch_size", "image_size", "lr", "precision", "seed", "stem", "patch_size", "device",
                "accumulate_steps", "sync_bn", "strategy", "grad_checkpointing", "compile"):
        val = getattr(args, key)
        if val is not None:
            overrides[key] = val
    p = Pretrainer(args.method, backbone=args.backbone, recipe=args.recipe, **overrides)
    run = p.fit(args.data, output_dir=args.out, resume=args.resume, overwrite=args.overwrite,
                max_steps=args.max_steps)
    print(json.dumps({"output_dir": str(run.output_dir), "steps": run.steps, "final_loss": run.final_loss,
                      "minutes": round(run.seconds / 60, 2), "bad_files": len(run.bad_files)}, indent=2))
    return 0


def _cmd_shard(args) -> int:
    from .data import BadFileReport
    from .data.shards import write_shards

    report = BadFileReport()
    paths = write_shards(args.folder, args.out, max_count=args.max_count, prefix=args.prefix,
                         shuffle=not args.no_shuffle, seed=args.seed, report=report)
    n = json.loads((Path(args.out) / "shards.json").read_text())["samples"]
    last = paths[-1].name
    print(json.dumps({"shards": len(paths), "samples": n, "skipped": len(report),
                      "pattern": str(Path(args.out) / f"{args.prefix}-{{000000..{last[-10:-4]}}}.tar")}, indent=2))
    return 0


def _load(model: str, image_size: int | None = None):
    from .encoder import Encoder

    return Encoder.from_pretrained(model, image_size=image_size)


def _cmd_embed(args) -> int:
    import numpy as np

    enc = _load(args.model, args.image_size)
    data = args.data
    if len(data) == 1 and Path(data[0]).is_dir():
        paths, feats = enc.embed_folder(data[0], batch_size=args.batch_size, pooling=args.pooling,
                                        last_blocks=args.last_blocks)
    else:
        paths, feats = data, enc.embed(data, batch_size=args.batch_size, pooling=args.pooling,
                                       last_blocks=args.last_blocks)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(out, feats)
    import os  # file names are written back as the bytes they are on disk (not every name is UTF-8)

    out.with_suffix(".paths.txt").write_bytes(b"".join(os.fsencode(p) + b"\n" for p in paths))
    print(f"wrote {out} {feats.shape} and {out.with_suffix('.paths.txt')}")
    return 0


def _add_feature_options(p: argparse.ArgumentParser) -> None:
    """Which frozen features: pooling, the last N blocks, and the input resolution."""
    p.add_argument("--pooling", choices=["default", "cls", "mean", "gem"])
    p.add_argument("--last-blocks", dest="last_blocks", type=int, default=1,
                   help="features of the last N blocks/stages concatenated (DINO's ViT linear eval: 4)")
    p.add_argument("--image-size", dest="image_size", type=int,
                   help="input resolution (default: the encoder's); a test resolution above the training "
                        "one often helps after random-resized-crop training (FixRes)")


def _features(args):
    from .eval import raw_pixel_features

    if args.model == "raw":
        xtr, ytr, _ = raw_pixel_features(args.train)
        xte, yte, _ = raw_pixel_features(args.test)
        return xtr, ytr, xte, yte
    enc = _load(args.model, args.image_size)
    kw = dict(last_blocks=args.last_blocks, pooling=args.pooling)
    xtr, ytr, _ = enc.embed_labelled(args.train, **kw)
    xte, yte, _ = enc.embed_labelled(args.test, **kw)
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
    model = args.run or args.model
    if not model:
        raise ValueError("export needs the encoder to export: sslfeatures export RUN --out DIR")
    formats = [f for f, on in (("safetensors", args.safetensors), ("onnx", args.onnx)) if on] or ["safetensors"]
    quantize = [q for q, on in (("int8", args.int8), ("fp16", args.fp16)) if on]
    if quantize and "onnx" not in formats:
        formats.append("onnx")  # the variants are made from the float32 ONNX file
    knn = (args.knn_train, args.knn_test) if args.knn_train or args.knn_test else None
    if knn is not None and not all(knn):
        raise ValueError("--knn-train and --knn-test go together")
    enc = _load(model)
    files = enc.export(args.out, formats=formats, quantize=quantize or None, calibration=args.calibration,
                       patch_tokens=args.patch_tokens, dynamic_size=False if args.fixed_size else "auto",
                       knn=knn, data_description=args.data_description, license=args.license)
    print(json.dumps({k: str(v) for k, v in files.items()}, indent=2))
    return 0


def _cmd_demo_data(args) -> int:
    from .data.demo import write_demo_folders

    print(json.dumps({k: str(v) for k, v in write_demo_folders(args.out).items()}, indent=2))
    return 0


# -- downstream: classify fit|finetune|predict, eval knn|linear|fewshot|cluster -------------------
def _cmd_classify_fit(args) -> int:
    from .eval import Classifier

    enc = _load(args.model)
    clf = Classifier.fit(enc, args.data, head=args.head, val_fraction=args.val_fraction, epochs=args.epochs,
                         patience=args.patience, lr=args.lr, weight_decay=args.weight_decay,
                         hidden_dim=args.hidden_dim, seed=args.seed)
    return _finish_classifier(clf, args)


def _cmd_classify_finetune(args) -> int:
    res = _load(args.model).finetune(args.data, label_fraction=args.label_fraction, epochs=args.epochs,
                                     batch_size=args.batch_size, lr=args.lr, layer_decay=args.layer_decay,
                                     drop_path=args.drop_path, from_scratch=args.from_scratch,
                                     val_fraction=args.val_fraction, seed=args.seed, progress=True)
    return _finish_classifier(res.classifier, args, {"finetune": {k: v for k, v in res.to_dict().items()
                                                                 if k != "history"}})


def _finish_classifier(clf, args, extra: dict | None = None) -> int:
    clf.save(args.out)
    out = {"output_dir": str(args.out), "classes": clf.classes, "metrics": clf.metrics, **(extra or {})}
    if args.test:
        out["test"] = clf.evaluate(args.test)
    if args.onnx:
        out["onnx"] = str(clf.export(args.out, formats=["onnx"])["onnx"])
        out["onnx_parity"] = clf.last_export_parity
    print(json.dumps(out, indent=2))
    return 0


def _cmd_classify_predict(args) -> int:
    import numpy as np

    from .eval import Classifier

    clf = Classifier.load(args.model)
    data = args.data
    if len(data) == 1 and Path(data[0]).is_dir():
        paths, feats = clf.encoder.embed_folder(data[0], batch_size=args.batch_size)
    else:
        paths, feats = data, clf.encoder.embed(data, batch_size=args.batch_size)
    probs = clf.proba_from_features(feats)
    k = max(1, min(args.top_k, clf.num_classes))
    rows = []
    for path, p in zip(paths, probs):
        top = np.argsort(-p)[:k]
        rows.append({"path": str(path), "label": clf.classes[top[0]], "prob": round(float(p[top[0]]), 6),
                     "top": [[clf.classes[i], round(float(p[i]), 6)] for i in top]})
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
        print(f"wrote {len(rows)} predictions to {args.out}")
    else:
        sys.stdout.write(text)
    return 0


def _encoder_or_raw(model: str):
    return "raw" if model == "raw" else _load(model)


def _cmd_eval_fewshot(args) -> int:
    from .eval import few_shot

    curve = few_shot(_encoder_or_raw(args.model), args.train, test=args.test, shots=args.shots, seeds=args.seeds,
                     classifier=args.classifier)
    if args.plot:
        curve.plot(args.plot, label=Path(args.model).name or args.model)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(curve.to_dict(), indent=2))
    print(curve.table())
    return 0


def _cmd_eval_cluster(args) -> int:
    from .eval import cluster

    res = cluster(_encoder_or_raw(args.model), args.data, n_clusters=args.k, seed=args.seed,
                  picture=args.picture, projection=args.projection)
    print(json.dumps(res.to_dict(), indent=2))
    return 0


def _add_downstream_commands(sub) -> None:
    p = sub.add_parser("classify", help="classifiers on frozen or fine-tuned encoders")
    csub = p.add_subparsers(dest="classify_command", required=True)
    for name, help_ in (("fit", "train a linear/MLP head on a frozen encoder's features"),
                        ("finetune", "fine-tune the encoder end to end (MAE/BEiT recipe) on a label fraction")):
        q = csub.add_parser(name, help=help_)
        q.add_argument("--model", required=True, help="run/exported folder, .safetensors file or hub id")
        q.add_argument("--data", required=True, help="labelled folder: root/<class>/<image>")
        q.add_argument("--out", required=True, help="classifier folder to write")
        q.add_argument("--test", help="labelled folder to report top-1 / NLL / ECE on")
        q.add_argument("--onnx", action="store_true", help="also export encoder + head as one ONNX graph")
        q.add_argument("--val-fraction", dest="val_fraction", type=float, default=0.1 if name == "fit" else 0.0)
        q.add_argument("--lr", type=float)
        q.add_argument("--seed", type=int, default=0)
        if name == "fit":
            q.add_argument("--head", choices=["linear", "mlp"], default="linear")
            q.add_argument("--epochs", type=int, default=200)
            q.add_argument("--patience", type=int, default=20)
            q.add_argument("--weight-decay", dest="weight_decay", type=float, nargs="+", default=[1e-4])
            q.add_argument("--hidden-dim", dest="hidden_dim", type=int)
            q.set_defaults(fn=_cmd_classify_fit)
        else:
            q.add_argument("--label-fraction", dest="label_fraction", type=float, default=1.0)
            q.add_argument("--epochs", type=int, default=50)
            q.add_argument("--batch-size", dest="batch_size", type=int, default=64)
            q.add_argument("--layer-decay", dest="layer_decay", type=float)
            q.add_argument("--drop-path", dest="drop_path", type=float, default=0.1)
            q.add_argument("--from-scratch", dest="from_scratch", action="store_true",
                           help="same architecture from random init (the baseline)")
            q.set_defaults(fn=_cmd_classify_finetune)
    q = csub.add_parser("predict", help="class predictions (JSON lines) for images or a folder")
    q.add_argument("--model", required=True, help="classifier folder written by 'classify fit'")
    q.add_argument("--data", required=True, nargs="+", help="a folder or image files")
    q.add_argument("--top-k", dest="top_k", type=int, default=1)
    q.add_argument("--batch-size", dest="batch_size", type=int, default=64)
    q.add_argument("--out", help="write the JSON lines here instead of stdout")
    q.set_defaults(fn=_cmd_classify_predict)

    p = sub.add_parser("eval", help="evaluate an encoder: knn, linear, fewshot, cluster")
    esub = p.add_subparsers(dest="eval_command", required=True)
    for name, fn in (("knn", _cmd_knn), ("linear", _cmd_linear), ("fewshot", _cmd_eval_fewshot)):
        q = esub.add_parser(name, help={"knn": "weighted k-NN top-1", "linear": "linear probe top-1",
                                        "fewshot": "few-shot curve (n per class, several seeds)"}[name])
        q.add_argument("--model", required=True, help="encoder to evaluate, or 'raw' for raw pixels")
        q.add_argument("--train", required=True, help="labelled folder: train/<class>/<image>")
        q.add_argument("--test", required=name != "fewshot",
                       help="labelled folder" + (" (default: hold out 20%% of --train)" if name == "fewshot" else ""))
        if name == "knn":
            q.add_argument("--k", type=int, default=20)
            q.add_argument("--temperature", type=float, default=0.07)
        elif name == "linear":
            q.add_argument("--epochs", type=int, default=60)
        else:
            q.add_argument("--shots", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128])
            q.add_argument("--seeds", type=int, default=5)
            q.add_argument("--classifier", choices=["logistic", "centroid", "knn"], default="logistic")
            q.add_argument("--plot", help="PNG of the curve")
            q.add_argument("--out", help="JSON of the curve")
        if name != "fewshot":
            _add_feature_options(q)
        q.set_defaults(fn=fn)
    q = esub.add_parser("cluster", help="k-means NMI / ARI / purity, and a t-SNE picture")
    q.add_argument("--model", required=True, help="encoder to evaluate, or 'raw' for raw pixels")
    q.add_argument("--data", required=True, help="labelled folder: root/<class>/<image>")
    q.add_argument("--k", type=int, help="number of clusters (default: number of classes)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--picture", help="PNG of a 2-D projection coloured by class")
    q.add_argument("--projection", choices=["tsne", "umap", "pca"], default="tsne")
    q.set_defaults(fn=_cmd_eval_cluster)


# -- video: propagate ------------------------------------------------------------------------------
def _cmd_propagate(args) -> int:
    import numpy as np

    keypoints = None
    if args.keypoints:
        try:
            keypoints = np.array([[float(v) for v in p.split(",")] for p in args.keypoints], np.float32)
        except ValueError:
            raise ValueError(f"--keypoints expects x,y pairs such as 120,80 64.5,200; got {args.keypoints}") from None
        if keypoints.ndim != 2 or keypoints.shape[1] != 2:
            raise ValueError(f"--keypoints expects x,y pairs such as 120,80 64.5,200; got {args.keypoints}")
    if args.first_mask is None and keypoints is None:
        raise ValueError("give --first-mask and/or --keypoints")
    layer = None if args.layer == "last" else ("auto" if args.layer == "auto" else int(args.layer))
    res = _load(args.model).propagate_masks(
        args.video, first_mask=args.first_mask, keypoints=keypoints, n_last_frames=args.n_last_frames,
        topk=args.topk, size_mask_neighborhood=args.neighborhood, temperature=args.temperature,
        resolution=None if args.resolution == 0 else args.resolution, layer=layer, output_stride=args.output_stride,
        max_side=args.max_side, stride=args.stride, max_frames=args.max_frames, out=args.out,
        overlay_format=None if args.overlay == "none" else args.overlay, progress=True)
    out: dict[str, Any] = {"out": str(args.out), "frames": len(res), "objects": [i for i in res.object_ids if i],
                           "seconds": round(res.seconds, 2), "frames_per_second": round(res.frames_per_second, 3)}
    if args.gt:
        out["scores"] = {k: round(v, 4) for k, v in res.evaluate(args.gt).to_dict().items()}
    print(json.dumps(out, indent=2))
    return 0


def _add_video_commands(sub) -> None:
    p = sub.add_parser("propagate", help="propagate a first-frame mask (and/or keypoints) through a video "
                                         "with DINO's label propagation on frozen patch features")
    p.add_argument("video", help="video file (mp4/avi/webm/gif/...) or folder of frames")
    p.add_argument("--model", required=True, help="encoder: run/exported folder, .safetensors, .onnx or hub id")
    p.add_argument("--first-mask", dest="first_mask",
                   help="the first frame's mask: DAVIS palette PNG, label map, binary or colour mask")
    p.add_argument("--keypoints", nargs="+", metavar="X,Y", help="first-frame points to track, e.g. 120,80 64,200")
    p.add_argument("--out", required=True, help="folder for one palette PNG per frame + the overlay video")
    p.add_argument("--gt", help="folder of ground-truth masks: print J&F (DAVIS measures)")
    p.add_argument("--overlay", choices=["gif", "mp4", "webm", "none"], default="gif")
    p.add_argument("--n-last-frames", dest="n_last_frames", type=int, default=7)
    p.add_argument("--topk", type=int, default=5)
    p.add_argument("--neighborhood", type=int, default=12, help="size_mask_neighborhood, in patches (0: off)")
    p.add_argument("--temperature", type=float, default=0.1)
    p.add_argument("--resolution", type=int, default=480, help="short side of the network input (0: as decoded)")
    p.add_argument("--layer", default="auto", help="'auto', 'last' or a forward_intermediates index")
    p.add_argument("--output-stride", dest="output_stride", type=int, help="run a CNN dilated to this stride")
    p.add_argument("--max-side", dest="max_side", type=int, help="downscale decoded frames to this longer side")
    p.add_argument("--stride", type=int, default=1, help="keep every n-th frame")
    p.add_argument("--max-frames", dest="max_frames", type=int)
    p.set_defaults(fn=_cmd_propagate)


# -- similarity search: index build|add|remove|search|dedup ----------------------------------------
def _open_index(args):
    from .index import Index

    return Index.load(args.index, encoder=args.model, load_encoder=getattr(args, "needs_encoder", True))


def _cmd_index_build(args) -> int:
    from .index import Index

    data = args.data[0] if len(args.data) == 1 else args.data
    index = Index.build(args.model, data, kind=args.kind, metric=args.metric, batch_size=args.batch_size,
                        progress=True, target_recall=args.target_recall, **_parse_set(args.set))
    index.save(args.out)
    print(json.dumps({"index": str(args.out), "entries": len(index), "kind": index.kind, "metric": index.metric,
                      "dim": index.dim}, indent=2))
    return 0


def _cmd_index_add(args) -> int:
    index = _open_index(args)
    data = args.data[0] if len(args.data) == 1 else args.data
    added = index.add(data, batch_size=args.batch_size, progress=True, replace=args.replace)
    index.save(args.index)
    print(json.dumps({"index": str(args.index), "added": added, "entries": len(index)}, indent=2))
    return 0


def _cmd_index_remove(args) -> int:
    index = _open_index(args)
    try:
        removed = index.remove(args.paths, missing_ok=args.missing_ok)
    except KeyError as e:
        raise ValueError(f"{e.args[0]} (pass --missing-ok to ignore)") from None
    index.save(args.index)
    print(json.dumps({"index": str(args.index), "removed": removed, "entries": len(index)}, indent=2))
    return 0


def _cmd_index_search(args) -> int:
    index = _open_index(args)
    hits = index.search(list(args.query), k=args.k)
    print(json.dumps({q: [{"path": h.path, "score": round(h.score, 6)} for h in row]
                      for q, row in zip(args.query, hits)}, indent=2))
    return 0


def _cmd_index_dedup(args) -> int:
    index = _open_index(args)
    if args.groups:
        out: Any = index.duplicate_groups(args.threshold, k=args.k)
    else:
        out = [{"a": d.a, "b": d.b, "score": round(d.score, 6)}
               for d in index.near_duplicates(args.threshold, k=args.k)]
    text = json.dumps(out, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
        print(json.dumps({"out": args.out, "found": len(out)}))
    else:
        print(text)
    return 0


def _add_index_commands(sub) -> None:
    from .index import KINDS, METRICS

    p = sub.add_parser("index", help="similarity search: build, update and query a FAISS index of images")
    isub = p.add_subparsers(dest="index_command", required=True)
    q = isub.add_parser("build", help="embed a folder (or image files) and write an index file")
    q.add_argument("--model", required=True, help="encoder: run/exported folder, .safetensors, .onnx or hub id")
    q.add_argument("--data", required=True, nargs="+", help="a folder (searched recursively) or image files")
    q.add_argument("--out", required=True, help="index file to write, e.g. photos.index")
    q.add_argument("--kind", choices=["auto", *KINDS], default="auto",
                   help="auto: flat (exact) for small sets, HNSW for medium, IVF-PQ for large")
    q.add_argument("--metric", choices=list(METRICS), default="cosine")
    q.add_argument("--batch-size", dest="batch_size", type=int, default=64)
    q.add_argument("--target-recall", dest="target_recall", type=float, default=0.95,
                   help="tune the approximate kinds' search parameters to this recall@10")
    q.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="index parameters, e.g. --set hnsw_m=48 ef_search=128 nlist=4096 pq_m=64 refine=fp16")
    q.set_defaults(fn=_cmd_index_build)
    for name, fn, help_ in (("add", _cmd_index_add, "embed and add new images (already indexed paths are skipped)"),
                            ("remove", _cmd_index_remove, "remove images (or everything below a folder)"),
                            ("search", _cmd_index_search, "the k nearest indexed images of query images"),
                            ("dedup", _cmd_index_dedup, "near-duplicate pairs (or groups) in the index")):
        q = isub.add_parser(name, help=help_)
        q.add_argument("--index", required=True, help="index file written by 'index build'")
        q.add_argument("--model", help="encoder for the queries/new images (default: the one the index was built with)")
        if name == "add":
            q.add_argument("--data", required=True, nargs="+", help="a folder or image files")
            q.add_argument("--batch-size", dest="batch_size", type=int, default=64)
            q.add_argument("--replace", action="store_true", help="re-embed paths that are already indexed")
        elif name == "remove":
            q.add_argument("--paths", required=True, nargs="+", help="indexed paths or folders")
            q.add_argument("--missing-ok", dest="missing_ok", action="store_true")
            q.set_defaults(needs_encoder=False)
        elif name == "search":
            q.add_argument("--query", required=True, nargs="+", help="query image file(s)")
            q.add_argument("--k", type=int, default=10)
        else:
            q.add_argument("--threshold", type=float, default=0.95,
                           help="cosine similarity at least (metric cosine) / L2 distance at most (metric l2)")
            q.add_argument("--k", type=int, default=10, help="neighbours examined per image")
            q.add_argument("--groups", action="store_true", help="print groups of duplicates instead of pairs")
            q.add_argument("--out", help="write the JSON here instead of printing it")
            q.set_defaults(needs_encoder=False)
        q.set_defaults(fn=fn)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="sslfeatures", description="Self-supervised visual representation learning")
    ap.add_argument("-v", "--verbose", action="store_true")
    sub = ap.add_subparsers(dest="command", required=True)

    sub.add_parser("methods", help="list the available methods").set_defaults(fn=_cmd_methods)

    p = sub.add_parser("pretrain", help="pre-train an encoder on a folder of unlabeled images")
    p.add_argument("--method", required=True)
    p.add_argument("--data", required=True, help="folder of images (searched recursively); for image-text "
                   "methods (clip): images with same-named .txt captions, or a CSV of path,caption")
    p.add_argument("--backbone", help="timm model name (default: the recipe's)")
    p.add_argument("--recipe", help="a recipe YAML to use instead of the method's default")
    p.add_argument("--out", help="run folder (default runs/<method>-<time>)")
    p.add_argument("--epochs", type=float, help="passes over the data; may be fractional (2.5)")
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
    p.add_argument("--accumulate-steps", dest="accumulate_steps", type=int,
                   help="micro-batches per optimizer step (effective batch = batch size x processes x this)")
    p.add_argument("--sync-bn", dest="sync_bn", action=argparse.BooleanOptionalAction, default=None,
                   help="BatchNorm statistics over all processes (default: on with several processes)")
    p.add_argument("--strategy", choices=["ddp", "fsdp"], help="data parallel (default) or fully sharded")
    p.add_argument("--grad-checkpointing", dest="grad_checkpointing", action="store_true", default=None,
                   help="recompute ViT blocks in backward to save activation memory")
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile the backbone")
    p.set_defaults(fn=_cmd_pretrain)

    p = sub.add_parser("shard", help="write WebDataset tar shards from a folder of images")
    p.add_argument("folder", help="folder of images (searched recursively)")
    p.add_argument("--out", required=True, help="folder for <prefix>-000000.tar ... and shards.json")
    p.add_argument("--max-count", dest="max_count", type=int, default=1000, help="images per shard")
    p.add_argument("--prefix", default="train")
    p.add_argument("--no-shuffle", dest="no_shuffle", action="store_true",
                   help="keep the sorted file order (default: a seeded shuffle, so each shard is a random sample)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=_cmd_shard)

    p = sub.add_parser("embed", help="embed images with a pre-trained encoder")
    p.add_argument("--model", required=True, help="run/exported folder, .safetensors file or hub id")
    p.add_argument("--data", required=True, nargs="+", help="a folder or image files")
    p.add_argument("--out", required=True, help="output .npy (paths go to <out>.paths.txt)")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=64)
    _add_feature_options(p)
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
        _add_feature_options(p)
        p.set_defaults(fn=fn)

    p = sub.add_parser("export", help="export an encoder (safetensors, ONNX, int8/fp16), every file verified")
    p.add_argument("run", nargs="?", help="run/exported folder, .safetensors file or hub id")
    p.add_argument("--model", help="same as RUN")
    p.add_argument("--out", required=True)
    p.add_argument("--safetensors", action="store_true", help="model.safetensors + config.json (the default)")
    p.add_argument("--onnx", action="store_true", help="model.onnx, parity-checked against PyTorch")
    p.add_argument("--int8", action="store_true", help="model_int8.onnx (static, calibrated on --calibration)")
    p.add_argument("--fp16", action="store_true", help="model_fp16.onnx")
    p.add_argument("--calibration", help="folder of images to calibrate int8 on (and check parity with)")
    p.add_argument("--patch-tokens", dest="patch_tokens", action="store_true", help="ONNX patch_tokens output")
    p.add_argument("--fixed-size", dest="fixed_size", action="store_true", help="ONNX at the training size only")
    p.add_argument("--knn-train", dest="knn_train", help="labelled folder: k-NN top-1 of every variant")
    p.add_argument("--knn-test", dest="knn_test")
    p.add_argument("--data-description", dest="data_description", help="training data, for the model card")
    p.add_argument("--license", default="apache-2.0", help="licence of the weights, for the model card")
    p.set_defaults(fn=_cmd_export)

    p = sub.add_parser("demo-data", help="write the embedded Fashion-MNIST demo set as image folders")
    p.add_argument("--out", default="demo_data")
    p.set_defaults(fn=_cmd_demo_data)
    _add_downstream_commands(sub)
    _add_video_commands(sub)
    _add_index_commands(sub)
    from .viz import add_viz_commands  # sslfeatures viz attention|pca|tsne

    add_viz_commands(sub)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    try:
        return args.fn(args)
    except (OSError, ValueError, TypeError, ArithmeticError, RuntimeError) as exc:
        # expected failures (missing/unreadable files, bad config, a full disk, a non-finite loss, an
        # undecodable video in strict use) end with one line naming the cause, not a traceback
        if args.verbose:
            raise
        from .data.decode import DecodeError

        hint = " (run with -v for the traceback)" if type(exc) is RuntimeError or not isinstance(
            exc, (OSError, ValueError, TypeError, ArithmeticError, DecodeError)) else ""
        print(f"error: {' '.join(str(exc).splitlines())}{hint}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
