"""Zero-shot transfer of a self-supervised encoder by LiT (sslfeatures.ZeroShotProbe.fit).

Fashion-MNIST, a 5/5 split of its classes. Text is aligned with the *frozen* image encoder
on the training images of the 5 seen classes only, their captions made from the class name
and CLIP-style templates ("a photo of a {}.", ...); the text tower is the pretrained
sentence encoder all-MiniLM-L6-v2 (frozen, + learned projections: LiT). Reported on the
10,000 test images:

* zero-shot top-1 on the test images of the 5 *unseen* classes, classified among the 5
  unseen class names (chance 20 %);
* top-1 on the seen classes among the 5 seen names (the classes it was aligned on);
* generalised zero-shot (GZSL): every test image among all 10 names; top-1 overall, on
  the seen and unseen images separately, and their harmonic mean H (the usual GZSL figure).

Encoders: by default the SimCLR run pre-trained by ``benchmarks/fashion_mnist.py`` (ResNet-18
at quarter width, 3x3/2 stem, 28 px; any other run with ``--encoders``) and the same backbone at
random initialisation. Splits (``--splits``): even/odd class indices as seen/unseen, the
reverse, and ``sibling-seen``, where the unseen classes have seen relatives. Three LiT seeds each.

    OMP_NUM_THREADS=1 python benchmarks/zero_shot.py [--src ../shared/data/fashion-mnist]
        [--runs benchmarks/out/fashion_mnist] [--encoders simclr,random] [--out benchmarks/out/zero_shot]

Results go to ``<out>/results.jsonl`` (one row per encoder, split and seed) and a summary
table on stdout.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from build_demo_data import load_split  # noqa: E402

from sslfeatures import Encoder, ZeroShotProbe  # noqa: E402
from sslfeatures.data.pairs import CLASS_TEMPLATES  # noqa: E402

NAMES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]
# seen class indices per split. even/odd: no unseen class has a seen class of its kind (even-seen sees no
# footwear, odd-seen no top). sibling-seen: every unseen class but the dress has one (pullover, shirt: t-shirt
# and coat; sandal, ankle boot: sneaker), the usual design of zero-shot splits
SPLITS = {"even-seen": [0, 2, 4, 6, 8], "odd-seen": [1, 3, 5, 7, 9], "sibling-seen": [0, 1, 4, 7, 8]}
TEMPLATES = list(CLASS_TEMPLATES)


def _rgb(x: np.ndarray) -> np.ndarray:
    return np.repeat(x[..., None], 3, axis=-1)


def _encoder(name: str, runs: Path, like: str) -> Encoder:
    """A pre-trained run's encoder, or for ``random`` the backbone of run ``like`` at random init."""
    if name == "random":
        ref = json.loads((runs / f"run_{like}" / "config.json").read_text())["backbone"]
        return Encoder.random_init(ref["name"], image_size=ref["image_size"], stem=ref["stem"], device="cpu",
                                   backbone_kwargs=ref.get("timm_kwargs", {}))
    path = runs / f"run_{name}"
    if not (path / "model.safetensors").exists():
        raise SystemExit(f"{path} has no encoder; run benchmarks/fashion_mnist.py first (or pick --encoders)")
    return Encoder.from_pretrained(path, device="cpu")


def _gzsl(pred: np.ndarray, y: np.ndarray, seen: list[int], unseen: list[int]) -> dict[str, float]:
    s, u = np.isin(y, seen), np.isin(y, unseen)
    acc_s, acc_u = float((pred[s] == y[s]).mean()), float((pred[u] == y[u]).mean())
    return {"gzsl_top1": float((pred == y).mean()), "gzsl_seen": acc_s, "gzsl_unseen": acc_u,
            "gzsl_H": 2 * acc_s * acc_u / max(acc_s + acc_u, 1e-12)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", default=str(ROOT.parent / "shared" / "data" / "fashion-mnist"))
    ap.add_argument("--runs", default=str(ROOT / "benchmarks" / "out" / "fashion_mnist"))
    ap.add_argument("--encoders", default="simclr,random",
                    help="run names under --runs (run_<name>), and 'random': the first one's backbone at random init")
    ap.add_argument("--train-per-class", type=int, default=2000, help="aligning images per seen class")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--tune-text", action="store_true", help="fine-tune MiniLM too (default: frozen, LiT)")
    ap.add_argument("--text-proj", default="learned,locked",
                    help="'learned' (text projection trained) and/or 'locked' (fixed orthogonal; only the image "
                         "projection learns)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "zero_shot"))
    ap.add_argument("--splits", default=",".join(SPLITS), help=f"comma-separated, of {list(SPLITS)}")
    args = ap.parse_args()
    splits = args.splits.split(",")
    unknown = [sp for sp in splits if sp not in SPLITS]
    if unknown:
        ap.error(f"unknown split(s) {unknown}; expected a comma-separated list of {list(SPLITS)}")
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    xtr, ytr = load_split(Path(args.src), "train")
    xte, yte = load_split(Path(args.src), "test")
    machine = f"{platform.machine()}, {torch.get_num_threads()} thread(s), torch {torch.__version__}"
    rows = []
    encoders = args.encoders.split(",")
    like = next((e for e in encoders if e != "random"), "simclr")  # the random baseline's architecture
    for enc_name in encoders:
        enc = _encoder(enc_name, Path(args.runs), like=like)
        t0 = time.perf_counter()
        keep = np.concatenate([np.flatnonzero(ytr == c)[: args.train_per_class] for c in range(10)])
        xk = xtr[keep]
        ftr = enc.embed(_rgb(xk), batch_size=256, progress=False)
        fte = enc.embed(_rgb(xte), batch_size=256, progress=False)
        ytr_k = ytr[keep]
        print(f"[{enc_name}] embedded {len(keep)} + {len(xte)} images in {time.perf_counter() - t0:.0f}s", flush=True)
        for split in splits:
            seen = SPLITS[split]
            unseen = [c for c in range(10) if c not in seen]
            m = np.isin(ytr_k, seen)
            idx = np.flatnonzero(m)
            # every image carries all its class's captions; one is drawn per epoch
            pairs = [(xk[i], tuple(t.format(NAMES[ytr_k[i]]) for t in TEMPLATES)) for i in idx]
            for proj, seed in [(p, s) for p in args.text_proj.split(",") for s in range(args.seeds)]:
                t1 = time.perf_counter()
                probe = ZeroShotProbe.fit(enc, pairs, text_tower="minilm", tune_text=args.tune_text,
                                          features=ftr[idx], epochs=args.epochs, batch_size=256, lr=1e-3,
                                          embed_dim=384 if proj == "locked" else 256, seed=seed, device="cpu",
                                          lock_text_projection=proj == "locked")
                fit_s = time.perf_counter() - t1
                img = probe.backend.text_encoder.project_image(fte)
                u = np.isin(yte, unseen)
                s_ = np.isin(yte, seen)
                zs = probe.classify(None, [NAMES[c] for c in unseen], TEMPLATES, image_embeddings=img[u])
                sn = probe.classify(None, [NAMES[c] for c in seen], TEMPLATES, image_embeddings=img[s_])
                allp = probe.classify(None, NAMES, TEMPLATES, image_embeddings=img)
                row = {"encoder": enc_name, "split": split, "text_proj": proj, "seed": seed,
                       "seen": [NAMES[c] for c in seen],
                       "zero_shot_unseen_top1": zs.top1(np.searchsorted(unseen, yte[u])),
                       "seen_top1": sn.top1(np.searchsorted(seen, yte[s_])),
                       **_gzsl(allp.indices, yte, seen, unseen),
                       "loss_first": probe.history[0]["loss"], "loss_last": probe.history[-1]["loss"],
                       "logit_scale": probe.logit_scale, "fit_seconds": round(fit_s, 1),
                       "pairs": len(pairs), "epochs": args.epochs, "tune_text": args.tune_text, "machine": machine}
                rows.append(row)
                with open(out / "results.jsonl", "a") as fh:
                    fh.write(json.dumps(row) + "\n")
                print(f"[{enc_name} {split} {proj} seed {seed}] unseen zero-shot {row['zero_shot_unseen_top1']:.3f}  "
                      f"seen {row['seen_top1']:.3f}  GZSL all {row['gzsl_top1']:.3f} (S {row['gzsl_seen']:.3f}, "
                      f"U {row['gzsl_unseen']:.3f}, H {row['gzsl_H']:.3f})  loss {row['loss_first']:.3f}->"
                      f"{row['loss_last']:.3f}  {fit_s:.0f}s", flush=True)
    print("\n| encoder | split | text projection | zero-shot top-1, 5 unseen (chance 20%) | seen top-1 (5-way) "
          "| GZSL top-1 (10-way) | GZSL seen / unseen / H |")
    print("|---|---|---|---|---|---|---|")
    for enc_name in encoders:
        for split, proj in [(sp, p) for sp in splits for p in args.text_proj.split(",")]:
            r = [x for x in rows if x["encoder"] == enc_name and x["split"] == split and x["text_proj"] == proj]

            def f(k, r=r):
                return f"{100 * np.mean([x[k] for x in r]):.1f} ± {100 * np.std([x[k] for x in r]):.1f}"

            print(f"| {enc_name} | {split} | {proj} | {f('zero_shot_unseen_top1')} | {f('seen_top1')} | "
                  f"{f('gzsl_top1')} | {100 * np.mean([x['gzsl_seen'] for x in r]):.1f} / "
                  f"{100 * np.mean([x['gzsl_unseen'] for x in r]):.1f}"
                  f" / {100 * np.mean([x['gzsl_H'] for x in r]):.1f} |")
    print(f"\nmachine: {machine}")


if __name__ == "__main__":
    main()
