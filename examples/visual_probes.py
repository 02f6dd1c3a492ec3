"""Visual probes of encoders pre-trained here on real photos (scikit-image's sample photos),
and two numbers against an exactly known object mask.

A tiny ViT (ViT-Tiny width, 4 blocks, 8 px patches, 64 px input) is pre-trained with DINO
and another with MAE on random crops of the photos, for a few CPU minutes each. Written to
``--out``:

* ``attention.png`` / ``attention_mask.png`` — DINO's last-block CLS-to-patch attention of
  every head over the image, and the masks keeping 60 % of each head's attention mass
  (top: the DINO encoder; bottom: the same ViT at random initialisation);
* ``pca.png`` — PCA of patch features to RGB, background removed by thresholding the first
  component (the DINOv2 figure), DINO vs random init;
* ``recon.png`` — MAE reconstructions at mask ratios 0.5 / 0.75 / 0.9 (image, masked input,
  visible + predicted patches, prediction);
* ``neighbors.png`` — nearest neighbours (DINO features) of held-out crops among the
  training crops, framed green when they come from the same photo;
* ``tsne.png`` — t-SNE of held-out crops' embeddings, coloured by source photo;
* ``metrics.json`` — the numbers: on composites whose object mask is exact (a real photo's
  pixels cut out in the shape of scikit-image's ``horse`` silhouette and pasted onto another
  photo/texture at a random place and scale), the IoU of the 60 %-mass attention mask
  (heads averaged, and the best head) with the object mask, and the fraction of the
  PCA-foreground that lies on the object (and its IoU), for DINO vs random init.

    OMP_NUM_THREADS=1 python examples/visual_probes.py --out probes_out [--dino-steps 800] [--mae-steps 600]

Budgets are small by default: the pictures show a briefly trained tiny model, not DINO's.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sslfeatures import Encoder, Pretrainer
from sslfeatures.viz import (attention_maps, load_method, mae_reconstruction, mask_iou, mask_precision,
                             nearest_neighbors, neighbor_grid, pca_rgb, plot_tsne, reconstruction_grid, save_png,
                             threshold_mass, tsne)

SIZE = 64
VIT = dict(backbone="vit_tiny_patch16_224", patch_size=8, image_size=SIZE, backbone_kwargs={"depth": 4},
           precision="fp32", num_workers=0, progress=False, device="cpu")
COLOUR = ["astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field", "retina"]
GRAY = ["camera", "coins", "brick", "grass", "gravel", "moon", "clock"]
# DINO's settings for the tiny ViT (also used by benchmarks/dino_attention_pilot.py)
DINO = dict(lr=5e-4, warmup_epochs=1, out_dim=1024, hidden_dim=512, bottleneck_dim=128, warmup_teacher_temp_epochs=2,
            freeze_last_layer_epochs=0, momentum_start=0.99, weight_decay_end=0.1, clip_grad=3.0,
            views=[{"scale": [0.3, 1.0], "blur_p": 1.0}, {"scale": [0.3, 1.0], "blur_p": 0.1, "solarize_p": 0.2},
                   {"scale": [0.08, 0.3], "size_frac": 0.5, "count": 4}])
OBJECTS = ["chelsea", "coffee", "astronaut", "rocket", "immunohistochemistry"]     # textures cut out as the object
BACKGROUNDS = ["grass", "gravel", "brick", "hubble_deep_field", "retina", "moon"]  # and what they are pasted on


def photos() -> dict[str, np.ndarray]:
    from skimage import data

    out = {}
    for name in COLOUR + GRAY:
        try:
            img = getattr(data, name)()
        except Exception:  # noqa: BLE001 - some photos are fetched at run time; skip those offline
            continue
        out[name] = np.ascontiguousarray(np.stack([img] * 3, -1) if img.ndim == 2 else img[..., :3]).astype(np.uint8)
    return out


def crops(pics: dict[str, np.ndarray], n: int, size: int,
          rng: np.random.Generator) -> tuple[list[np.ndarray], list[str]]:
    names, out = list(pics), []
    labels = []
    for k in range(n):
        name = names[k % len(names)]
        pil = Image.fromarray(pics[name])
        w, h = pil.size
        s = int(min(w, h) * rng.uniform(0.3, 0.9))
        x0, y0 = rng.integers(0, w - s + 1), rng.integers(0, h - s + 1)
        out.append(np.asarray(pil.crop((x0, y0, x0 + s, y0 + s)).resize((size, size), Image.BICUBIC)))
        labels.append(name)
    return out, labels


def composites(pics: dict[str, np.ndarray], n: int, rng: np.random.Generator, size: int = SIZE
               ) -> list[tuple[np.ndarray, np.ndarray]]:
    """``n`` (image, exact object mask) pairs: a horse-shaped cut-out of one photo pasted on another."""
    from skimage import data

    horse = ~data.horse()  # True on the horse
    ys, xs = np.nonzero(horse)
    horse = horse[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    objs = [o for o in OBJECTS if o in pics]
    bgs = [b for b in BACKGROUNDS if b in pics]
    out = []
    for i in range(n):
        bg_pil = Image.fromarray(pics[bgs[i % len(bgs)]])
        w, h = bg_pil.size
        s = int(min(w, h) * rng.uniform(0.4, 0.9))
        x0, y0 = rng.integers(0, w - s + 1), rng.integers(0, h - s + 1)
        canvas = np.asarray(bg_pil.crop((x0, y0, x0 + s, y0 + s)).resize((size, size), Image.BICUBIC)).copy()
        ow = int(size * rng.uniform(0.6, 0.95))
        oh = max(4, int(ow * horse.shape[0] / horse.shape[1]))
        shape = np.asarray(Image.fromarray(horse.astype(np.uint8) * 255).resize((ow, oh), Image.NEAREST)) > 127
        if rng.random() < 0.5:
            shape = shape[:, ::-1]
        src = Image.fromarray(pics[objs[i % len(objs)]])
        sw, sh = src.size
        c = int(min(sw, sh) * rng.uniform(0.4, 0.8))
        cx, cy = rng.integers(0, sw - c + 1), rng.integers(0, sh - c + 1)
        tex = np.asarray(src.crop((cx, cy, cx + c, cy + c)).resize((ow, oh), Image.BICUBIC))
        px, py = rng.integers(0, size - ow + 1), rng.integers(0, size - oh + 1)
        mask = np.zeros((size, size), bool)
        mask[py:py + oh, px:px + ow] = shape
        region = canvas[py:py + oh, px:px + ow]
        region[shape] = tex[shape]
        out.append((canvas, mask))
    return out


def pretrain(method: str, data: list[np.ndarray], steps: int, batch: int, out: Path, **kw) -> Path:
    epochs = max(1, math.ceil(steps * batch / len(data)))
    t0 = time.perf_counter()
    run = Pretrainer(method, epochs=epochs, batch_size=batch, **VIT, **kw).fit(
        data, output_dir=out / "runs" / method, overwrite=True, max_steps=steps)
    losses = [m["loss"] for m in run.metrics if "loss" in m]
    print(f"{method}: {run.steps} steps in {time.perf_counter() - t0:.0f}s, loss {losses[0]:.3f} -> {losses[-1]:.3f}",
          flush=True)
    return run.output_dir


def mask_numbers(enc: Encoder, comps: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
    iou_mean, iou_best, iou_heads, prec_pca, iou_pca, fg_frac = [], [], [], [], [], []
    for img, mask in comps:
        maps = attention_maps(enc, img)                       # (heads, h, w)
        per_head = [mask_iou(m, mask) for m in threshold_mass(maps, 0.6)]
        iou_heads.append(float(np.mean(per_head)))
        iou_best.append(max(per_head))
        iou_mean.append(mask_iou(threshold_mass(maps.mean(0), 0.6), mask))
        _, fg = pca_rgb(enc, img)
        prec_pca.append(mask_precision(fg, mask))
        iou_pca.append(mask_iou(fg, mask))
        fg_frac.append(float(fg.mean()))
    return {"attention_iou_mean_of_heads": float(np.mean(iou_mean)),
            "attention_iou_per_head": float(np.mean(iou_heads)),
            "attention_iou_best_head": float(np.mean(iou_best)), "pca_foreground_on_object": float(np.mean(prec_pca)),
            "pca_foreground_iou": float(np.mean(iou_pca)), "pca_foreground_fraction": float(np.mean(fg_frac)),
            "object_fraction": float(np.mean([m.mean() for _, m in comps])), "images": len(comps)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="probes_out")
    ap.add_argument("--dino-steps", type=int, default=800)
    ap.add_argument("--mae-steps", type=int, default=600)
    ap.add_argument("--crops", type=int, default=1024, help="training crops of the photos")
    ap.add_argument("--composites", type=int, default=48, help="images with an exact object mask for the numbers")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    pics = photos()
    train, _ = crops(pics, args.crops, 96, rng)
    held, held_labels = crops(pics, 8 * len(pics), 96, rng)
    comps = composites(pics, args.composites, rng)

    dino_dir = pretrain("dino", train, args.dino_steps, 32, out, **DINO)
    mae_dir = pretrain("mae", train, args.mae_steps, 32, out, lr=1.5e-3, warmup_epochs=1, decoder_dim=128,
                       decoder_depth=2, decoder_heads=4, mask_ratio=0.75,
                       views=[{"scale": [0.3, 1.0], "jitter_p": 0.0, "gray_p": 0.0, "blur_p": 0.0}])
    dino = Encoder.from_pretrained(dino_dir, device="cpu")
    rand = Encoder.random_init("vit_tiny_patch16_224", image_size=SIZE, patch_size=8, seed=args.seed, device="cpu",
                               backbone_kwargs={"depth": 4})

    # pictures: two photos and two composites
    shown = [np.asarray(Image.fromarray(pics[n]).resize((SIZE, SIZE), Image.BICUBIC)) if n in pics else None
             for n in ("chelsea", "astronaut")]
    shown = [s for s in shown if s is not None] + [c for c, _ in comps[:2]]
    for enc_name, enc in (("dino", dino), ("random_init", rand)):
        att_rows, mask_rows, pca_rows = [], [], []
        for img in shown:
            maps = attention_maps(enc, img)
            norm = maps / maps.max(axis=(1, 2), keepdims=True)
            up = lambda a: np.asarray(Image.fromarray((a * 255).astype(np.uint8)).resize((SIZE, SIZE), Image.NEAREST))  # noqa: E731
            att_rows.append(np.concatenate([img] + [np.stack([up(m)] * 3, -1) for m in norm], axis=1))
            masks = threshold_mass(maps, 0.6)
            mask_rows.append(np.concatenate([img] + [(img * np.asarray(Image.fromarray(m.astype(np.uint8) * 255)
                                                      .resize((SIZE, SIZE), Image.NEAREST))[..., None].astype(bool))
                                                     .astype(np.uint8) for m in masks], axis=1))
            rgb, fg = pca_rgb(enc, img)
            pca_rows.append(np.concatenate([img, np.asarray(Image.fromarray((rgb * 255).astype(np.uint8))
                                                            .resize((SIZE, SIZE), Image.NEAREST))], axis=1))
        save_png(np.concatenate(att_rows, 0), out / f"attention_{enc_name}.png")
        save_png(np.concatenate(mask_rows, 0), out / f"attention_mask_{enc_name}.png")
        save_png(np.concatenate(pca_rows, 0), out / f"pca_{enc_name}.png")

    mae = load_method(mae_dir)
    recon = [mae_reconstruction(mae, shown[0], r, seed=args.seed) for r in (0.5, 0.75, 0.9)]
    save_png(reconstruction_grid(recon), out / "recon.png")

    q = np.arange(0, len(held), max(1, len(held) // 6))[:6]
    feats_train = dino.embed(train)
    feats_held = dino.embed(held)
    idx, _ = nearest_neighbors(dino, None, None, k=6, query_features=feats_held[q], gallery_features=feats_held)
    save_png(neighbor_grid([held[i] for i in q], held, idx, size=48, query_labels=[held_labels[i] for i in q],
                           gallery_labels=held_labels), out / "neighbors.png")
    plot_tsne(tsne(feats_held, held_labels), held_labels, out / "tsne.png",
              title="t-SNE of DINO features (held-out crops)")

    t0 = time.perf_counter()
    metrics = {"dino": mask_numbers(dino, comps), "random_init": mask_numbers(rand, comps),
               "mae_masked_mse": {str(r): x["mse"] for r, x in zip((0.5, 0.75, 0.9), recon)},
               "settings": {"dino_steps": args.dino_steps, "mae_steps": args.mae_steps, "crops": args.crops,
                            "image_size": SIZE, "backbone": "ViT-Tiny width, 4 blocks, patch 8",
                            "train_features": list(feats_train.shape)}}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(json.dumps({k: metrics[k] for k in ("dino", "random_init", "mae_masked_mse")}, indent=1))
    print(f"wrote pictures and metrics.json to {out} ({time.perf_counter() - t0:.0f}s for the numbers)")


if __name__ == "__main__":
    main()
