"""The DAVIS video-object-segmentation measures (J, F, J&F) and the DAVIS mask format.

Definitions follow the DAVIS benchmark (Perazzi et al. 2016; Pont-Tuset et al. 2017) and
its reference evaluation code (``davis2017-evaluation``, semi-supervised task):

* **J** (region similarity): the Jaccard index ``|M ∩ G| / |M ∪ G|`` of the predicted and
  ground-truth masks of one object in one frame; 1 when both are empty.
* **F** (contour accuracy): the F-measure of boundary precision and recall. Boundaries are
  the one-pixel-wide maps of :func:`seg2bmap` (boundary pixels offset half a pixel towards
  the origin). A boundary pixel counts as matched when a boundary pixel of the other mask
  lies within a disk of radius ``ceil(0.008 * image diagonal)`` pixels (``bound_th``;
  a value >= 1 is a radius in pixels). Empty-boundary conventions follow the benchmark:
  both empty → P = R = 1; prediction empty → P = 1, R = 0; ground truth empty → P = 0, R = 1.
* Per object and sequence: **mean** of the per-frame values, **recall** (fraction of frames
  with a value > 0.5) and **decay** (mean of the first quarter of the frames minus the mean
  of the last quarter, four bins as in the benchmark). The first and last frames are left
  out, as in the semi-supervised benchmark (the first one is given).
* Overall: means over objects; **J&F** = (J-mean + F-mean) / 2.

Object ids are the values of the label masks (DAVIS palette PNGs store them as palette
indices; 0 is background). Objects are those of the ground truth's first frame (ids
``1..max``); 255 is treated as background, exactly as the benchmark's loader does.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

DEFAULT_BOUND_TH = 0.008
MASK_EXTENSIONS = (".png", ".bmp", ".tif", ".tiff", ".gif")


# -- the DAVIS palette and label-mask files ---------------------------------------------------
def davis_palette(n: int = 256) -> np.ndarray:
    """The palette of DAVIS annotations (the PASCAL VOC colour map): ``(n, 3) uint8``;
    index 0 is black, 1 is (128, 0, 0), 2 is (0, 128, 0), 3 is (128, 128, 0), ..."""
    pal = np.zeros((n, 3), np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal[i] = (r, g, b)
    return pal


def write_label_png(path: str | os.PathLike, labels: np.ndarray, palette: np.ndarray | None = None) -> Path:
    """Save an ``(H, W)`` label map (values 0..255) as an indexed PNG with the DAVIS palette."""
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"a label map is (H, W); got shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() > 255):
        raise ValueError("label values must lie in 0..255 to be stored in a palette PNG")
    img = Image.fromarray(labels.astype(np.uint8), mode="P")
    img.putpalette((davis_palette() if palette is None else np.asarray(palette, np.uint8)).ravel().tolist())
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="PNG", optimize=False)
    return path


def label_png_bytes(labels: np.ndarray) -> bytes:
    """The bytes of :func:`write_label_png`'s file, in memory (a compact store for masks)."""
    import io

    buf = io.BytesIO()
    img = Image.fromarray(np.asarray(labels, np.uint8), mode="P")
    img.putpalette(davis_palette().ravel().tolist())
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def to_label_map(obj: Any) -> np.ndarray:
    """Turn a mask in any common form into an ``(H, W) uint8`` label map (0 = background).

    * a palette (``P``) PNG or image: its palette indices (the DAVIS format);
    * a binary mask (bool array, mode ``1``, or a grayscale image/array whose only values
      are 0 and 255): 0 and 1;
    * a grayscale image or integer array: its values (must lie in 0..255);
    * an RGB(A) image or ``(H, W, 3|4)`` array of colours: black is 0, the other colours
      become 1..K in the order of the DAVIS palette when they are palette colours, otherwise
      in sorted colour order.
    """
    if isinstance(obj, (str, os.PathLike)):
        path = Path(obj)
        if not path.exists():
            raise FileNotFoundError(f"mask not found: {path}")
        with Image.open(path) as img:
            img.load()
            return to_label_map(img)
    if isinstance(obj, Image.Image):
        if obj.mode == "P":
            return np.asarray(obj, dtype=np.uint8).copy()
        if obj.mode == "1":
            return np.asarray(obj, dtype=np.uint8)
        if obj.mode in ("RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"):
            return to_label_map(np.asarray(obj.convert("RGB")))
        if obj.mode == "LA":
            obj = obj.convert("L")
        obj = np.asarray(obj)
    if isinstance(obj, torch.Tensor):
        obj = obj.detach().cpu().numpy()
    arr = np.asarray(obj)
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        return _colours_to_labels(arr[..., :3])
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim != 2:
        raise ValueError(f"a mask must be (H, W) labels or (H, W, 3) colours; got shape {arr.shape}")
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8)
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr)):
            raise ValueError("a float mask must hold whole-number labels (or pass a bool/uint8 mask)")
    values = np.unique(arr)
    if values.size and (values[0] < 0 or values[-1] > 255):
        raise ValueError(f"mask labels must lie in 0..255, got {values[0]}..{values[-1]}")
    if values.size == 2 and values[0] == 0 and values[1] == 255:
        return (arr > 0).astype(np.uint8)  # a binary mask stored as 0/255
    return arr.astype(np.uint8)


def _colours_to_labels(rgb: np.ndarray) -> np.ndarray:
    rgb = np.asarray(rgb, dtype=np.uint8)
    flat = rgb.reshape(-1, 3)
    colours, inverse = np.unique(flat, axis=0, return_inverse=True)
    pal = {tuple(int(v) for v in c): i for i, c in enumerate(davis_palette())}
    ids = [pal.get(tuple(int(v) for v in c)) for c in colours]
    if all(i is not None for i in ids):
        lut = np.asarray(ids, np.uint8)
    else:
        if len(colours) > 256:
            raise ValueError(f"an RGB mask with {len(colours)} colours cannot be a label map (at most 256)")
        lut = np.zeros(len(colours), np.uint8)
        k = 1
        for i, c in enumerate(colours):
            if c.any():
                lut[i] = k
                k += 1
    return lut[inverse.reshape(-1)].reshape(rgb.shape[:2])


def read_label_folder(folder: str | os.PathLike) -> tuple[list[str], list[Path]]:
    """The mask files of a folder (sorted by name) and their stems."""
    from .io import _natural_key

    folder = Path(folder)
    if not folder.is_dir():
        raise NotADirectoryError(f"mask folder not found: {folder}")
    files = sorted((p for p in folder.iterdir() if p.suffix.lower() in MASK_EXTENSIONS and not p.name.startswith(".")),
                   key=_natural_key)
    if not files:
        raise ValueError(f"no mask images in {folder} (looked for {', '.join(MASK_EXTENSIONS)})")
    return [p.stem for p in files], files


# -- per-frame measures ---------------------------------------------------------------------------
def jaccard(gt: np.ndarray, pred: np.ndarray, void: np.ndarray | None = None) -> float:
    """Region similarity J of two binary masks (1.0 when both are empty)."""
    gt, pred = np.asarray(gt, bool), np.asarray(pred, bool)
    if gt.shape != pred.shape:
        raise ValueError(f"ground truth {gt.shape} and prediction {pred.shape} differ in shape")
    keep = ~np.asarray(void, bool) if void is not None else True
    inter = np.count_nonzero(gt & pred & keep)
    union = np.count_nonzero((gt | pred) & keep)
    return 1.0 if union == 0 else inter / union


def seg2bmap(seg: np.ndarray) -> np.ndarray:
    """One-pixel-wide boundary map of a binary mask, as the DAVIS benchmark computes it: a
    pixel is on the boundary when it differs from its east, south or south-east neighbour
    (the last row/column compare with east/south only; the corner pixel is never set)."""
    seg = np.asarray(seg, bool)
    if seg.ndim != 2:
        raise ValueError(f"seg2bmap needs a 2-D mask, got shape {seg.shape}")
    e = np.zeros_like(seg)
    s = np.zeros_like(seg)
    se = np.zeros_like(seg)
    e[:, :-1] = seg[:, 1:]
    s[:-1, :] = seg[1:, :]
    se[:-1, :-1] = seg[1:, 1:]
    b = (seg ^ e) | (seg ^ s) | (seg ^ se)
    b[-1, :] = seg[-1, :] ^ e[-1, :]
    b[:, -1] = seg[:, -1] ^ s[:, -1]
    b[-1, -1] = False
    return b


def boundary_radius(shape: Sequence[int], bound_th: float = DEFAULT_BOUND_TH) -> int:
    """The matching tolerance in pixels: ``bound_th`` itself when >= 1, else
    ``ceil(bound_th * image diagonal)`` (8 px for 480x854 frames)."""
    if bound_th <= 0:
        raise ValueError(f"bound_th must be > 0, got {bound_th}")
    return int(bound_th) if bound_th >= 1 else int(math.ceil(bound_th * math.hypot(shape[0], shape[1])))


def _disk(radius: int) -> torch.Tensor:
    r = torch.arange(-radius, radius + 1)
    return ((r[:, None] ** 2 + r[None, :] ** 2) <= radius ** 2).float()


def _dilate(maps: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation of ``(N, H, W)`` maps by a disk of ``radius`` (zero outside the image)."""
    if radius == 0:
        return maps.astype(bool)
    x = torch.from_numpy(np.ascontiguousarray(maps, dtype=np.float32))[:, None]
    k = _disk(radius)[None, None]
    return (F.conv2d(x, k, padding=radius)[:, 0] > 0.5).numpy()


def boundary_precision_recall(gt: np.ndarray, pred: np.ndarray, void: np.ndarray | None = None,
                              bound_th: float = DEFAULT_BOUND_TH) -> tuple[float, float]:
    """Boundary precision and recall of ``pred`` against ``gt`` (binary masks)."""
    gt, pred = np.asarray(gt, bool), np.asarray(pred, bool)
    if gt.shape != pred.shape:
        raise ValueError(f"ground truth {gt.shape} and prediction {pred.shape} differ in shape")
    if void is not None:
        keep = ~np.asarray(void, bool)
        gt, pred = gt & keep, pred & keep
    radius = boundary_radius(gt.shape, bound_th)
    fg_b, gt_b = seg2bmap(pred), seg2bmap(gt)
    n_fg, n_gt = int(fg_b.sum()), int(gt_b.sum())
    if n_fg == 0 and n_gt == 0:
        return 1.0, 1.0
    if n_fg == 0:
        return 1.0, 0.0
    if n_gt == 0:
        return 0.0, 1.0
    fg_dil, gt_dil = _dilate(np.stack([fg_b, gt_b]), radius)
    precision = np.count_nonzero(fg_b & gt_dil) / n_fg
    recall = np.count_nonzero(gt_b & fg_dil) / n_gt
    return float(precision), float(recall)


def f_measure(gt: np.ndarray, pred: np.ndarray, void: np.ndarray | None = None,
              bound_th: float = DEFAULT_BOUND_TH) -> float:
    """Contour accuracy F of two binary masks (see the module docstring)."""
    p, r = boundary_precision_recall(gt, pred, void, bound_th)
    return 0.0 if p + r == 0 else 2 * p * r / (p + r)


def db_statistics(per_frame: Sequence[float]) -> tuple[float, float, float]:
    """``(mean, recall, decay)`` of one object's per-frame values, as the benchmark computes
    them (NaNs ignored; decay over four overlapping quarter bins)."""
    v = np.asarray(per_frame, dtype=np.float64)
    if v.size == 0:
        return float("nan"), float("nan"), float("nan")
    with np.errstate(invalid="ignore"):
        finite = v[~np.isnan(v)]
        mean = float(finite.mean()) if finite.size else float("nan")
        recall = float((finite > 0.5).mean()) if finite.size else float("nan")
    ids = (np.round(np.linspace(1, len(v), 5) + 1e-10) - 1).astype(int)
    bins = [v[ids[i]: ids[i + 1] + 1] for i in range(4)]
    first, last = bins[0][~np.isnan(bins[0])], bins[3][~np.isnan(bins[3])]
    decay = float(first.mean() - last.mean()) if first.size and last.size else float("nan")
    return mean, recall, decay


# -- whole sequences -------------------------------------------------------------------------------
@dataclass
class JFScores:
    """J&F of one sequence (or a set of them): overall figures, per object, per frame.

    ``per_frame_j``/``per_frame_f`` are ``(objects, frames)`` arrays over the evaluated
    frames; ``per_object`` maps an object id to its J/F mean, recall and decay.
    """

    j_mean: float
    j_recall: float
    j_decay: float
    f_mean: float
    f_recall: float
    f_decay: float
    per_object: dict[int, dict[str, float]] = field(default_factory=dict)
    per_frame_j: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    per_frame_f: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    frames: list[str] = field(default_factory=list)

    @property
    def jf_mean(self) -> float:
        return (self.j_mean + self.f_mean) / 2

    def to_dict(self) -> dict[str, float]:
        """The benchmark's summary columns: ``J&F-Mean, J-Mean, J-Recall, J-Decay, F-Mean, ...``."""
        return {"J&F-Mean": self.jf_mean, "J-Mean": self.j_mean, "J-Recall": self.j_recall,
                "J-Decay": self.j_decay, "F-Mean": self.f_mean, "F-Recall": self.f_recall,
                "F-Decay": self.f_decay}

    def __getitem__(self, key: str) -> float:
        return self.to_dict()[key]

    def __str__(self) -> str:
        head = "  ".join(f"{k:>9s}" for k in self.to_dict())
        row = "  ".join(f"{v:9.3f}" for v in self.to_dict().values())
        lines = [head, row]
        if len(self.per_object) > 1:
            lines.append("per object: " + ", ".join(
                f"{k}: J {v['J-Mean']:.3f} F {v['F-Mean']:.3f}" for k, v in self.per_object.items()))
        return "\n".join(lines)


def evaluate_sequence(pred: Iterable[Any], gt: Iterable[Any], bound_th: float = DEFAULT_BOUND_TH,
                      skip_first_last: bool = True, frame_names: Sequence[str] | None = None) -> JFScores:
    """J and F of predicted label maps against ground-truth label maps of one video.

    Args:
        pred, gt: iterables of ``(H, W)`` label maps (0 = background, ids 1..K), frame by
            frame and of equal length; anything :func:`to_label_map` reads is accepted
            (arrays, PIL images, file paths). They are read one frame at a time.
        bound_th: boundary tolerance (fraction of the diagonal, or pixels if >= 1).
        skip_first_last: leave out the first and the last frame, as the semi-supervised
            benchmark does (the first one is the given mask).
        frame_names: names reported in :attr:`JFScores.frames` (default ``00000, 00001, ...``).

    Objects are the ids ``1..max`` of the first ground-truth frame; a prediction holding an
    id above that is an error, a missing object scores J = F = 0 where it exists.
    """
    j_cols: list[np.ndarray] = []
    f_cols: list[np.ndarray] = []
    pred_max: list[int] = []
    n_obj = 0
    pred_it, gt_it = iter(pred), iter(gt)
    i = 0
    while True:
        g_raw = next(gt_it, None)
        p_raw = next(pred_it, None)
        if g_raw is None and p_raw is None:
            break
        if g_raw is None or p_raw is None:
            raise ValueError(f"the prediction and the ground truth differ in length (one ends at frame {i})")
        g, p = to_label_map(g_raw), to_label_map(p_raw)
        if g.shape != p.shape:
            raise ValueError(f"frame {i}: ground truth {g.shape} and prediction {p.shape} differ in shape")
        g = np.where(g == 255, 0, g)
        if i == 0:
            n_obj = int(g.max())
            if n_obj == 0:
                raise ValueError("the first ground-truth frame holds no object (all background)")
        pred_max.append(int(p.max()))
        j_cols.append(np.array([jaccard(g == k, p == k) for k in range(1, n_obj + 1)]))
        f_cols.append(np.array([f_measure(g == k, p == k, bound_th=bound_th) for k in range(1, n_obj + 1)]))
        i += 1
    if i == 0:
        raise ValueError("no frames to evaluate")
    names = list(frame_names) if frame_names is not None else [f"{t:05d}" for t in range(i)]
    if len(names) != i:
        raise ValueError(f"{len(names)} frame names for {i} frames")
    keep = list(range(i))
    if skip_first_last:
        if i < 3:
            raise ValueError("the benchmark leaves out the first and last frames: give >= 3 frames "
                             "or pass skip_first_last=False")
        keep = keep[1:-1]
    too_high = max(pred_max[t] for t in keep)
    if too_high > n_obj:
        raise ValueError(f"the prediction holds object id {too_high} but the ground truth has only "
                         f"{n_obj} object(s)")
    j = np.stack([j_cols[t] for t in keep], 1)
    f = np.stack([f_cols[t] for t in keep], 1)
    return _summarise(j, f, list(range(1, n_obj + 1)), [names[t] for t in keep])


def _summarise(j: np.ndarray, f: np.ndarray, ids: list[int], frames: list[str]) -> JFScores:
    per_object: dict[int, dict[str, float]] = {}
    js, fs = [], []
    for k, oid in enumerate(ids):
        jm, jr, jd = db_statistics(j[k])
        fm, fr, fd = db_statistics(f[k])
        per_object[oid] = {"J-Mean": jm, "J-Recall": jr, "J-Decay": jd, "F-Mean": fm, "F-Recall": fr, "F-Decay": fd}
        js.append((jm, jr, jd))
        fs.append((fm, fr, fd))
    jm, jr, jd = (float(np.nanmean(c)) for c in zip(*js))
    fm, fr, fd = (float(np.nanmean(c)) for c in zip(*fs))
    return JFScores(jm, jr, jd, fm, fr, fd, per_object, j, f, frames)


def evaluate_folders(pred_folder: str | os.PathLike, gt_folder: str | os.PathLike,
                     bound_th: float = DEFAULT_BOUND_TH, skip_first_last: bool = True) -> JFScores:
    """J&F of a folder of predicted masks against a folder of ground-truth masks (DAVIS
    layout: one PNG per frame). Frames are matched by file name; every ground-truth frame
    needs a prediction."""
    gt_names, gt_files = read_label_folder(gt_folder)
    pred_names, pred_files = read_label_folder(pred_folder)
    by_name = dict(zip(pred_names, pred_files))
    missing = [n for n in gt_names if n not in by_name]
    if missing:
        raise ValueError(f"{len(missing)} ground-truth frame(s) have no prediction in {pred_folder}, e.g. "
                         f"{missing[:3]}")
    return evaluate_sequence((by_name[n] for n in gt_names), gt_files, bound_th, skip_first_last, gt_names)


__all__ = ["DEFAULT_BOUND_TH", "JFScores", "boundary_precision_recall", "boundary_radius", "davis_palette",
           "db_statistics", "evaluate_folders", "evaluate_sequence", "f_measure", "jaccard", "label_png_bytes",
           "read_label_folder", "seg2bmap", "to_label_map", "write_label_png"]
