"""Downstream benchmark on Fashion-MNIST: few-shot curves, linear / MLP probes, label-fraction
fine-tuning vs training from scratch, k-means clustering, and concept generalisation.

    python benchmarks/downstream.py --run demo_out/run              # an existing SimCLR run folder
    python benchmarks/downstream.py                                 # pre-trains a quick SimCLR first
    python benchmarks/downstream.py --run demo_out/run --parts fewshot probes cluster
    python benchmarks/downstream.py --data full --src ../shared/data/fashion-mnist --run runs/simclr

Parts (``--parts``, default all):

* ``fewshot``: CoG-style curves, 1..128 labelled images per class (logistic regression on
  l2-normalised frozen features, mean ± std over 5 seeds) for the pre-trained encoder, raw
  pixels and the same backbone at random init.
* ``probes``: linear probe (``linear_probe``, the protocol of RESULTS.md §1) and the
  ``Classifier`` heads (linear and MLP, early stopping on 10 % of train) on all labels.
* ``finetune``: end-to-end fine-tuning on 1 % and 10 % of the labels (class-balanced), the
  MAE/BEiT recipe (layer-wise lr decay 0.75, drop path 0.1, label smoothing 0.1, no
  mixup), against the same backbone trained from scratch on the same labels and recipe.
* ``cluster``: k-means (k = 10) NMI / ARI / purity of test-set features, and t-SNE pictures.
* ``cog``: concept generalisation. Two SimCLR encoders with the same settings and the same
  number of steps: one pre-trained (without labels) on the images of the 5 *seen* classes
  only, one on an equal number of images from all 10 classes; both then get few-shot
  curves on the 5 *unseen* classes (and, for reference, on the 5 seen ones).

``--data demo`` (default) uses the embedded 10,000 / 2,000 split shipped in the package;
``--data full`` the 60,000 / 10,000 idx files in ``--src``. Results go to
``<work>/results.json`` (one key per part) and pictures next to it; the script prints the
markdown tables that go into benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from build_demo_data import load_split  # noqa: E402

from sslfeatures import Encoder, Pretrainer  # noqa: E402
from sslfeatures.data.demo import FASHION_MNIST_CLASSES, load_demo_arrays, write_image_folders  # noqa: E402
from sslfeatures.eval import (Classifier, cluster_features, few_shot_from_features, linear_probe,  # noqa: E402
                              plot_clusters, plot_few_shot, project_2d, raw_pixel_features)

# the settings of examples/demo.py (SimCLR, half-width ResNet-18 with a 3x3/2 stem, 28 px)
SIMCLR = dict(backbone="resnet18", stem="small_s2", backbone_kwargs={"channels": [32, 64, 128, 256]},
              image_size=28, batch_size=128, lr=1.0, temperature=0.5, warmup_epochs=0.5, num_workers=0,
              views=[{"scale": [0.2, 1.0], "count": 2}], progress=False)
SHOTS = [1, 2, 4, 8, 16, 32, 64, 128]
SEEN, UNSEEN = [0, 1, 2, 3, 4], [5, 6, 7, 8, 9]


def arrays(kind: str, src: Path) -> dict[str, np.ndarray]:
    if kind == "demo":
        return load_demo_arrays()
    xtr, ytr = load_split(src, "train")
    xte, yte = load_split(src, "test")
    return {"x_train": xtr, "y_train": ytr, "x_test": xte, "y_test": yte}


def features(enc: Encoder | str, folders: dict[str, Path], cache: Path | None = None):
    """(xtr, ytr, xte, yte) of the labelled train/test folders (``"raw"``: pixels), read
    from / written to the ``cache`` .npz when given."""
    if cache is not None and cache.exists():
        with np.load(cache) as z:
            return z["xtr"], z["ytr"], z["xte"], z["yte"]
    out = _features(enc, folders)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache, xtr=out[0], ytr=out[1], xte=out[2], yte=out[3])
    return out


def _features(enc: Encoder | str, folders: dict[str, Path]):
    if enc == "raw":
        xtr, ytr, _ = raw_pixel_features(folders["train"])
        xte, yte, _ = raw_pixel_features(folders["test"])
    else:
        xtr, ytr, _ = enc.embed_labelled(folders["train"], batch_size=256, progress=False)
        xte, yte, _ = enc.embed_labelled(folders["test"], batch_size=256, progress=False)
    return xtr, ytr, xte, yte


def curve_table(curves: dict, shots: list[int]) -> str:
    head = "| features | " + " | ".join(str(n) for n in shots) + " |"
    rows = [head, "|---|" + "---|" * len(shots)]
    for name, c in curves.items():
        cells = {n: f"{m:.3f} ± {s:.3f}" for n, m, s in zip(c.shots, c.mean, c.std)}
        rows.append(f"| {name} | " + " | ".join(cells.get(n, "—") for n in shots) + " |")
    return "\n".join(rows)


def pretrain(data: np.ndarray, out: Path, epochs: float, seed: int = 0) -> Encoder:
    t0, c0 = time.perf_counter(), time.process_time()
    run = Pretrainer("simclr", epochs=epochs, seed=seed, **SIMCLR).fit(list(data), output_dir=out, overwrite=True)
    print(f"  pre-trained SimCLR on {len(data)} images: {run.steps} steps, "
          f"{(time.perf_counter() - t0) / 60:.1f} wall min, {(time.process_time() - c0) / 60:.1f} CPU min", flush=True)
    return Encoder.from_pretrained(run.output_dir)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", help="pre-trained encoder (run/exported folder); default: pre-train SimCLR")
    ap.add_argument("--pretrain-epochs", type=float, default=6, help="epochs of the default SimCLR pre-training")
    ap.add_argument("--data", choices=["demo", "full"], default="demo")
    ap.add_argument("--src", default="../shared/data/fashion-mnist")
    ap.add_argument("--work", default="benchmarks/out/downstream")
    ap.add_argument("--parts", nargs="+", default=["fewshot", "probes", "finetune", "cluster", "cog"])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.01, 0.1])
    ap.add_argument("--ft-epochs", type=int, nargs="+", default=[60, 15],
                    help="fine-tuning epochs for each of --fractions")
    ap.add_argument("--ft-batch", type=int, default=32)
    ap.add_argument("--ft-lr", type=float, default=5e-4)
    ap.add_argument("--cog-epochs", type=float, default=4, help="SimCLR epochs over 5,000 images per CoG encoder")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    res_path = work / "results.json"
    results = json.loads(res_path.read_text()) if res_path.exists() else {}
    results["machine"] = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                          f"{args.threads} thread(s), torch {torch.__version__}")

    def save(part: str, value) -> None:
        results[part] = value
        res_path.write_text(json.dumps(results, indent=2))

    a = arrays(args.data, Path(args.src))
    folders = write_image_folders(work / f"data_{args.data}", a["x_train"], a["y_train"], a["x_test"], a["y_test"])
    t_all = time.perf_counter()
    if args.run:
        enc = Encoder.from_pretrained(args.run)
        enc_name = f"{enc.method or 'encoder'} ({Path(args.run).name})"
    else:
        print("pre-training SimCLR (examples/demo.py settings)", flush=True)
        enc = pretrain(a["x_train"], work / "run_simclr", args.pretrain_epochs)
        enc_name = "simclr"
    bb = enc.config["backbone"]
    rnd = Encoder.random_init(bb["name"], image_size=enc.image_size, stem=bb.get("stem", "default"),
                              patch_size=bb.get("patch_size"), backbone_kwargs=bb.get("timm_kwargs") or {})
    feats = {}
    if {"fewshot", "probes", "cluster"} & set(args.parts):
        # cached per data set and encoder weights (the file's path and modification time)
        weights = Path(args.run) / "model.safetensors" if args.run else work / "run_simclr" / "model.safetensors"
        tag = hashlib.sha1(f"{weights.resolve()}:{weights.stat().st_mtime_ns}".encode()).hexdigest()[:12] \
            if weights.exists() else None
        for name, e, key in ((enc_name, enc, tag and f"encoder_{tag}"), ("raw pixels", "raw", "raw"),
                             ("random init", rnd, tag and f"random_init_{tag}")):
            feats[name] = features(e, folders, work / "features" / f"{args.data}_{key}.npz" if key else None)

    if "fewshot" in args.parts:
        t0 = time.perf_counter()
        curves = {name: few_shot_from_features(*f, shots=SHOTS, seeds=args.seeds) for name, f in feats.items()}
        plot_few_shot(curves, work / "fewshot.png", title=f"Fashion-MNIST ({args.data}) few-shot top-1")
        save("fewshot", {k: c.to_dict() for k, c in curves.items()})
        print(f"\n## few-shot (logistic regression, {args.seeds} seeds; {time.perf_counter() - t0:.0f} s)\n")
        print(curve_table(curves, SHOTS), flush=True)

    if "probes" in args.parts:
        t0 = time.perf_counter()
        rows = {}
        for name, (xtr, ytr, xte, yte) in feats.items():
            row = {"linear_probe": linear_probe(xtr, ytr, xte, yte)["top1"]}
            for head in ("linear", "mlp"):
                clf = Classifier.fit_features(None, xtr, ytr, FASHION_MNIST_CLASSES, head=head)  # features only
                logits = clf.logits_from_features(xte)
                row[f"classifier_{head}"] = float((logits.argmax(1) == yte).mean())
                row[f"classifier_{head}_epochs"] = clf.metrics["epochs_run"]
            rows[name] = row
        save("probes", rows)
        print(f"\n## probes on all {len(feats[enc_name][1])} labels ({time.perf_counter() - t0:.0f} s)\n")
        print("| features | linear probe (RESULTS §1 protocol) | Classifier linear | Classifier MLP |")
        print("|---|---|---|---|")
        for name, r in rows.items():
            print(f"| {name} | {r['linear_probe']:.4f} | {r['classifier_linear']:.4f} | {r['classifier_mlp']:.4f} |")

    if "cluster" in args.parts:
        t0 = time.perf_counter()
        rows = {}
        for name, (_, _, xte, yte) in feats.items():
            r = cluster_features(xte, yte, n_clusters=10, classes=FASHION_MNIST_CLASSES)
            rows[name] = r.to_dict()
            if name != "random init":
                slug = name.split(" ")[0].replace("(", "")
                coords = project_2d(xte, "tsne")
                plot_clusters(coords, yte, work / f"tsne_{slug}.png", FASHION_MNIST_CLASSES,
                              f"t-SNE of {name} (test set; k-means NMI {r.nmi:.3f})")
        save("cluster", rows)
        print(f"\n## k-means on the {len(feats[enc_name][3])} test images, k = 10 ({time.perf_counter() - t0:.0f} s)\n")
        print("| features | NMI | ARI | purity |\n|---|---|---|---|")
        for name, r in rows.items():
            print(f"| {name} | {r['nmi']:.4f} | {r['ari']:.4f} | {r['purity']:.4f} |")

    if "finetune" in args.parts:
        if len(args.ft_epochs) != len(args.fractions):
            raise SystemExit("--ft-epochs needs one value per --fractions value")
        rows = results.get("finetune", {}) if isinstance(results.get("finetune"), dict) else {}
        for frac, epochs in zip(args.fractions, args.ft_epochs):
            for scratch in (False, True):
                key = f"{frac:g} {'scratch' if scratch else 'pretrained'}"
                t0, c0 = time.perf_counter(), time.process_time()
                ft = enc.finetune(folders["train"], label_fraction=frac, epochs=epochs, batch_size=args.ft_batch,
                                  lr=args.ft_lr, test=folders["test"], from_scratch=scratch)
                rows[key] = {"label_fraction": frac, "from_scratch": scratch, "n_labelled": ft.n_labelled,
                             "test_top1": ft.test_top1, "epochs": epochs, "steps": ft.config["steps"],
                             "lr": ft.config["lr"], "layer_decay": ft.config["layer_decay"],
                             "wall_s": round(time.perf_counter() - t0, 1),
                             "cpu_s": round(time.process_time() - c0, 1)}
                print(f"  fine-tune {key}: {ft.n_labelled} labels, top-1 {ft.test_top1:.4f} "
                      f"({rows[key]['wall_s']:.0f} s)", flush=True)
                save("finetune", rows)
        print("\n## fine-tuning vs from scratch\n")
        print("| labels | images | pre-trained + fine-tuned | same backbone from scratch |\n|---|---|---|---|")
        for frac in args.fractions:
            p, s = rows.get(f"{frac:g} pretrained"), rows.get(f"{frac:g} scratch")
            if p and s:
                print(f"| {frac:.0%} | {p['n_labelled']} | {p['test_top1']:.4f} | {s['test_top1']:.4f} |")

    if "cog" in args.parts:
        t0 = time.perf_counter()
        xtr, ytr = a["x_train"], a["y_train"]
        seen_imgs = xtr[np.isin(ytr, SEEN)]
        per_class = len(seen_imgs) // 10
        rng = np.random.default_rng(0)
        all_idx = np.sort(np.concatenate([rng.permutation(np.flatnonzero(ytr == c))[:per_class] for c in range(10)]))
        print(f"\nCoG: pre-training on {len(seen_imgs)} images of classes {SEEN} vs {len(all_idx)} of all 10",
              flush=True)
        encs = {"SimCLR on 5 seen classes": pretrain(seen_imgs, work / "run_cog_seen", args.cog_epochs),
                "SimCLR on all 10 classes": pretrain(xtr[all_idx], work / "run_cog_all", args.cog_epochs),
                "random init": rnd, "raw pixels": "raw"}
        out = {}
        for split, classes in (("unseen", UNSEEN), ("seen", SEEN)):
            tr, te = np.isin(a["y_train"], classes), np.isin(a["y_test"], classes)
            relabel = np.full(10, -1)
            relabel[classes] = np.arange(len(classes))
            sub = write_image_folders(work / f"data_{args.data}_{split}", a["x_train"][tr], relabel[a["y_train"][tr]],
                                      a["x_test"][te], relabel[a["y_test"][te]],
                                      classes=[FASHION_MNIST_CLASSES[c] for c in classes])
            curves = {}
            for name, e in encs.items():
                f = features(e, sub)
                curves[name] = few_shot_from_features(*f, shots=SHOTS, seeds=args.seeds)
            plot_few_shot(curves, work / f"cog_{split}.png", title=f"few-shot on the 5 {split} classes")
            out[split] = {k: c.to_dict() for k, c in curves.items()}
            print(f"\n## concept generalisation: few-shot on the 5 {split} classes {classes}\n")
            print(curve_table(curves, SHOTS), flush=True)
        out["minutes"] = round((time.perf_counter() - t0) / 60, 1)
        save("cog", out)
    print(f"\ntotal {(time.perf_counter() - t_all) / 60:.1f} min; results in {res_path}")


if __name__ == "__main__":
    main()
