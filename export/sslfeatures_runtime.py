"""Torch-free runtime for an encoder exported by sslfeatures: onnxruntime + numpy + Pillow
(+ faiss-cpu for search). One file: copy it next to your service.

    from sslfeatures_runtime import OnnxEncoder, FaissIndex

    enc = OnnxEncoder("exported/")                  # model.onnx + config.json (variant="int8" / "fp16")
    paths, feats = enc.embed_folder("catalogue/")   # (N, D) float32, unreadable files skipped
    index = FaissIndex.build(feats, paths)          # cosine similarity (inner product of unit vectors)
    index.save("catalogue.index/")
    hits = FaissIndex.load("catalogue.index/").search(enc.embed(["query.jpg"]), k=5)

Command line::

    python sslfeatures_runtime.py embed exported/ images/ --out feats.npy
    python sslfeatures_runtime.py index exported/ catalogue/ --out catalogue.index/
    python sslfeatures_runtime.py query exported/ catalogue.index/ query.jpg --k 5

Pre-processing is sslfeatures' own (``sslfeatures/data/decode.py`` and
``Encoder._preprocess``), rewritten without torch: EXIF orientation; transparency
composited on white; 16-bit / float images rescaled to 8 bits; grayscale and CMYK to RGB;
first frame of multi-frame files; shorter side resized to ``round(image_size / crop_pct)``
(bicubic up, bilinear down), centre crop; ``/255``; ``(x - mean) / std`` in float32.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageOps

__version__ = "0.1.0"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
CONFIG_NAME = "config.json"
VARIANT_FILES = {"fp32": "model.onnx", "int8": "model_int8.onnx", "fp16": "model_fp16.onnx"}
INPUT_NAME = "images"
EMBEDDING_NAME = "embedding"


class DecodeError(RuntimeError):
    """A file that could not be decoded as an image; ``str(err)`` says why."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path, self.reason = str(path), reason
        super().__init__(f"{self.path}: {reason}")


# -- decoding (as sslfeatures/data/decode.py) ---------------------------------------------------
def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        if img.mode.startswith("I;16"):
            arr = arr / 65535.0 * 255.0
        elif hi > 255 or lo < 0:
            arr = (arr - lo) / max(hi - lo, 1e-12) * 255.0
        elif img.mode == "F" and hi <= 1.0:
            arr = arr * 255.0
        img = Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), mode="L")
    if img.mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        img = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img)
    if img.mode != "RGB":
        img = img.convert("RGB")
    return img


def pil_to_rgb(img: Image.Image) -> Image.Image:
    """Upright 8-bit RGB (EXIF orientation applied)."""
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # broken EXIF block: keep the pixels as stored
        pass
    return _to_rgb(img)


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open ``path`` as upright 8-bit RGB, or raise :class:`DecodeError` with the reason."""
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.seek(0)
                img.load()
                return pil_to_rgb(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DecodeError(path, f"image too large (decompression-bomb guard): {exc}") from None
    except FileNotFoundError:
        raise DecodeError(path, "file not found") from None
    except PermissionError:
        raise DecodeError(path, "permission denied") from None
    except IsADirectoryError:
        raise DecodeError(path, "is a directory") from None
    except Image.UnidentifiedImageError:
        size = path.stat().st_size if path.exists() else 0
        raise DecodeError(path, "empty file" if size == 0 else "not a recognised image format") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise DecodeError(path, f"corrupt or truncated image ({exc})") from None


def to_image(obj: Any) -> Image.Image:
    """A path, PIL image or numpy array (HW, HWC or CHW with C in 1/3/4; uint8, uint16,
    bool or float in [0, 1]) as an RGB PIL image."""
    if isinstance(obj, (str, os.PathLike)):
        return load_image(obj)
    if isinstance(obj, Image.Image):
        return pil_to_rgb(obj)
    if isinstance(obj, np.ndarray):
        arr = obj
        if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
            arr = arr.transpose(1, 2, 0)  # CHW
        if arr.ndim == 3 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
            raise ValueError(f"cannot interpret an array of shape {tuple(obj.shape)} as an image: expected "
                             "(H, W), (H, W, C) or (C, H, W) with C in 1, 3, 4")
        if arr.dtype == np.uint8:
            pass
        elif arr.dtype == np.uint16:
            arr = (arr.astype(np.float64) / 257.0 + 0.5).astype(np.uint8)
        elif np.issubdtype(arr.dtype, np.floating):
            if not np.isfinite(arr).all():
                raise ValueError("image array contains NaN or Inf")
            arr = (np.clip(arr, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
        elif arr.dtype == np.bool_:
            arr = arr.astype(np.uint8) * 255
        else:
            raise ValueError(f"unsupported image dtype {arr.dtype}; use uint8, uint16 or float in [0, 1]")
        return _to_rgb(Image.fromarray(np.ascontiguousarray(arr)))
    raise TypeError(f"cannot embed an object of type {type(obj).__name__}: pass a path, PIL image or numpy array")


def resize_center_crop(img: Image.Image, size: int, crop_pct: float = 1.0) -> Image.Image:
    """Resize the shorter side to ``size / crop_pct`` and centre-crop ``size x size``."""
    scale_to = int(round(size / crop_pct))
    w, h = img.size
    if (w, h) != (scale_to, scale_to) or scale_to != size:
        s = scale_to / min(w, h)
        nw, nh = max(size, int(round(w * s))), max(size, int(round(h * s)))
        if (nw, nh) != (w, h):
            img = img.resize((nw, nh), Image.BICUBIC if s > 1 else Image.BILINEAR, reducing_gap=None)
        left, top = (nw - size) // 2, (nh - size) // 2
        img = img.crop((left, top, left + size, top + size))
    return img


def load_and_crop(image: Any, size: int, crop_pct: float = 1.0) -> np.ndarray:
    """One image (path, PIL image or array) decoded, resized and centre-cropped as
    sslfeatures does: ``(size, size, 3)`` uint8."""
    return np.asarray(resize_center_crop(to_image(image), size, crop_pct), dtype=np.uint8)


def normalise(batch: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """``(N, S, S, 3)`` uint8 -> ``(N, 3, S, S)`` float32: ``/255``, then ``(x - mean) / std``."""
    x = batch.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255)
    m = np.asarray(mean, np.float32).reshape(1, -1, 1, 1)
    s = np.asarray(std, np.float32).reshape(1, -1, 1, 1)
    return np.ascontiguousarray((x - m) / s)


def list_images(root: str | os.PathLike) -> list[Path]:
    """Every image file below ``root`` (recursive, sorted; hidden files and symlink loops skipped)."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"image folder not found: {root}")
    if root.is_file():
        return [root]
    files, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen:
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        files += [Path(dirpath) / n for n in filenames
                  if not n.startswith(".") and n.lower().endswith(IMAGE_EXTENSIONS)]
    if not files:
        raise ValueError(f"no images found in {root} (looked for {', '.join(IMAGE_EXTENSIONS)} recursively)")
    return sorted(files)


# -- the encoder ----------------------------------------------------------------------------------
def _providers(device: str) -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device == "cuda" and "CUDAExecutionProvider" not in available:
        raise ValueError(f"device='cuda' but onnxruntime has no CUDA provider (available: {available}); "
                         "install onnxruntime-gpu")
    if device not in ("auto", "cuda"):
        raise ValueError(f"unknown device {device!r}; use 'auto', 'cpu' or 'cuda'")
    cuda = "CUDAExecutionProvider" in available
    return ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"]


class OnnxEncoder:
    """An ONNX encoder written by ``Encoder.export`` and its ``config.json``.

    ``path``: the export folder (``variant`` picks ``model.onnx`` / ``model_int8.onnx`` /
    ``model_fp16.onnx``) or an ``.onnx`` file with ``config.json`` beside it. ``device``:
    ``"auto"`` (CUDA when onnxruntime-gpu sees a GPU, else CPU), ``"cpu"`` or ``"cuda"``.
    """

    def __init__(self, path: str | os.PathLike, variant: str = "fp32", device: str = "auto",
                 threads: int | None = None):
        import onnxruntime as ort

        if variant not in VARIANT_FILES:
            raise ValueError(f"unknown variant {variant!r}; expected one of {list(VARIANT_FILES)}")
        path = Path(path)
        self.onnx_path = path / VARIANT_FILES[variant] if path.is_dir() else path
        if not self.onnx_path.exists():
            raise FileNotFoundError(f"{self.onnx_path} not found")
        cfg_path = self.onnx_path.parent / CONFIG_NAME
        if not cfg_path.exists():
            raise FileNotFoundError(f"{cfg_path} not found: the exported config.json must sit beside the .onnx file")
        self.config: dict[str, Any] = json.loads(cfg_path.read_text())
        for key in ("image_size", "mean", "std"):
            if key not in self.config:
                raise ValueError(f"{cfg_path}: missing key {key!r} (is it an sslfeatures export?)")
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        if threads:
            so.intra_op_num_threads = int(threads)
        self.session = ort.InferenceSession(str(self.onnx_path), so, providers=_providers(device))
        inputs = [i.name for i in self.session.get_inputs()]
        outputs = [o.name for o in self.session.get_outputs()]
        if inputs != [INPUT_NAME] or EMBEDDING_NAME not in outputs:
            raise ValueError(f"{self.onnx_path} has inputs {inputs} and outputs {outputs}; an sslfeatures "
                             f"encoder has input {INPUT_NAME!r} and output {EMBEDDING_NAME!r}")

    @property
    def image_size(self) -> int:
        return int(self.config["image_size"])

    @property
    def crop_pct(self) -> float:
        return float(self.config.get("crop_pct", 1.0))

    @property
    def num_features(self) -> int:
        dim = self.session.get_outputs()[0].shape[-1]
        return int(dim) if isinstance(dim, int) else int(self.config.get("num_features", 0))

    def __repr__(self) -> str:
        return (f"OnnxEncoder({str(self.onnx_path)!r}, image_size={self.image_size}, "
                f"providers={self.session.get_providers()})")

    def to_uint8(self, image: Any) -> np.ndarray:
        """One image, decoded, resized and centre-cropped: ``(S, S, 3)`` uint8."""
        return load_and_crop(image, self.image_size, self.crop_pct)

    def preprocess(self, images: Sequence[Any]) -> np.ndarray:
        """Images -> the network's input ``(N, 3, S, S)`` float32, normalised."""
        return normalise(np.stack([self.to_uint8(im) for im in images]), self.config["mean"], self.config["std"])

    def run(self, x: np.ndarray) -> np.ndarray:
        """The embedding of pre-processed images ``(N, 3, S, S)``."""
        return self.session.run([EMBEDDING_NAME], {INPUT_NAME: np.ascontiguousarray(x, dtype=np.float32)})[0]

    def embed(self, images: Any, batch_size: int = 64) -> np.ndarray:
        """``(N, D)`` float32 embeddings of paths, PIL images or arrays (or one of them);
        an unreadable file raises :class:`DecodeError`."""
        if isinstance(images, (str, os.PathLike, Image.Image)) or (isinstance(images, np.ndarray) and images.ndim <= 3):
            images = [images]
        images = list(images)
        if not images:
            raise ValueError("no images given")
        outs = [self.run(self.preprocess(images[i:i + batch_size])) for i in range(0, len(images), batch_size)]
        return np.concatenate(outs).astype(np.float32, copy=False)

    def embed_folder(self, folder: str | os.PathLike, batch_size: int = 64
                     ) -> tuple[list[Path], np.ndarray, dict[str, str]]:
        """``(paths, embeddings, skipped)`` for every image below ``folder``; files that
        cannot be decoded are skipped and returned in ``skipped`` (path -> reason)."""
        paths, outs, skipped, batch, batch_paths = [], [], {}, [], []
        files = list_images(folder)
        for i, f in enumerate(files):
            try:
                batch.append(self.to_uint8(f))
                batch_paths.append(f)
            except DecodeError as err:
                skipped[str(f)] = err.reason
                print(f"skipping unreadable image {f}: {err.reason}", file=sys.stderr)
            if batch and (len(batch) == batch_size or i == len(files) - 1):
                outs.append(self.run(normalise(np.stack(batch), self.config["mean"], self.config["std"])))
                paths += batch_paths
                batch, batch_paths = [], []
        if not outs:
            raise ValueError(f"no image in {folder} could be decoded")
        return paths, np.concatenate(outs).astype(np.float32, copy=False), skipped


# -- search ------------------------------------------------------------------------------------------
class FaissIndex:
    """Exact nearest-neighbour search over embeddings with FAISS, keeping an id per vector.

    ``metric="cosine"`` (default): vectors are L2-normalised and searched by inner product
    (scores are cosine similarities, higher is closer); ``"l2"``: squared Euclidean
    distances (lower is closer).
    """

    METRICS = ("cosine", "l2")

    def __init__(self, dim: int, metric: str = "cosine"):
        import faiss

        if metric not in self.METRICS:
            raise ValueError(f"unknown metric {metric!r}; expected one of {self.METRICS}")
        self.dim, self.metric = int(dim), metric
        self.index = faiss.IndexFlatIP(self.dim) if metric == "cosine" else faiss.IndexFlatL2(self.dim)
        self.ids: list[str] = []

    def _prep(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(np.atleast_2d(np.asarray(x, dtype=np.float32)))
        if x.shape[1] != self.dim:
            raise ValueError(f"vectors have dimension {x.shape[1]}, the index {self.dim}")
        if self.metric == "cosine":
            x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        return np.ascontiguousarray(x, dtype=np.float32)

    def add(self, vectors: np.ndarray, ids: Iterable[Any] | None = None) -> FaissIndex:
        x = self._prep(vectors)
        ids = [str(i) for i in ids] if ids is not None else [str(len(self.ids) + i) for i in range(len(x))]
        if len(ids) != len(x):
            raise ValueError(f"{len(x)} vectors but {len(ids)} ids")
        self.index.add(x)
        self.ids += ids
        return self

    @classmethod
    def build(cls, vectors: np.ndarray, ids: Iterable[Any] | None = None, metric: str = "cosine") -> FaissIndex:
        vectors = np.atleast_2d(np.asarray(vectors, dtype=np.float32))
        return cls(vectors.shape[1], metric).add(vectors, ids)

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def search(self, queries: np.ndarray, k: int = 5) -> list[list[tuple[str, float]]]:
        """For each query, its ``k`` nearest ``(id, score)`` pairs, best first."""
        if len(self) == 0:
            raise ValueError("the index is empty")
        scores, idx = self.index.search(self._prep(queries), min(int(k), len(self)))
        return [[(self.ids[j], float(s)) for j, s in zip(row_i, row_s) if j >= 0] for row_i, row_s in zip(idx, scores)]

    def save(self, folder: str | os.PathLike) -> Path:
        """``folder/index.faiss`` + ``folder/ids.json``."""
        import faiss

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        faiss.write_index(self.index, str(folder / "index.faiss"))
        (folder / "ids.json").write_text(json.dumps({"metric": self.metric, "dim": self.dim, "ids": self.ids}))
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike) -> FaissIndex | SavedIndex:
        """A folder written by :meth:`save`, or a ``.index`` file written by sslfeatures'
        ``Index.save`` (then a :class:`SavedIndex`, which searches the same way)."""
        import faiss

        folder = Path(folder)
        if folder.is_file():
            return SavedIndex.load(folder)
        if not (folder / "ids.json").exists():
            raise FileNotFoundError(f"{folder}: neither an sslfeatures .index file nor a folder with ids.json")
        meta = json.loads((folder / "ids.json").read_text())
        out = cls(meta["dim"], meta["metric"])
        out.index = faiss.read_index(str(folder / "index.faiss"))
        out.ids = list(meta["ids"])
        if len(out.ids) != out.index.ntotal:
            raise ValueError(f"{folder}: {out.index.ntotal} vectors but {len(out.ids)} ids")
        return out


class SavedIndex:
    """An index written by ``sslfeatures.Index.save`` (one zip file: ``meta.json``,
    ``entries.json``, ``hidden.json``, ``index.faiss``), searched with FAISS and numpy only.

    It applies the saved search parameters (HNSW ``ef_search``; IVF-PQ ``nprobe`` and the
    re-ranking ``k_factor``), normalises queries for ``metric="cosine"``, reports Euclidean
    distances for ``"l2"`` and leaves out entries removed but not yet compacted away, so its
    hits are the ones ``Index.search`` returns for the same query vectors.
    """

    FORMAT = "sslfeatures.index"

    def __init__(self, index: Any, meta: dict[str, Any], paths: dict[int, str], hidden: set[int]):
        self.index, self.meta, self.paths, self.hidden = index, meta, paths, hidden
        self.dim, self.metric, self.kind = int(meta["dim"]), str(meta["metric"]), str(meta["kind"])
        self.encoder_config: dict[str, Any] = (meta.get("encoder") or {}).get("config") or {}

    @classmethod
    def load(cls, path: str | os.PathLike) -> SavedIndex:
        import zipfile

        import faiss

        path = Path(path)
        if not zipfile.is_zipfile(path):
            raise ValueError(f"{path} is not an sslfeatures index (expected the zip archive Index.save writes)")
        with zipfile.ZipFile(path) as zf:
            names = set(zf.namelist())
            missing = {"meta.json", "entries.json", "hidden.json"} - names
            if missing:
                raise ValueError(f"{path}: not an sslfeatures index (missing {', '.join(sorted(missing))})")
            meta = json.loads(zf.read("meta.json"))
            if meta.get("format") != cls.FORMAT:
                raise ValueError(f"{path}: format {meta.get('format')!r}, expected {cls.FORMAT!r}")
            if int(meta.get("format_version", 0)) > 1:
                raise ValueError(f"{path}: index format version {meta['format_version']} is newer than this kit "
                                 "reads (1); update export/sslfeatures_runtime.py")
            paths = {int(i): str(p) for i, p in json.loads(zf.read("entries.json"))}
            hidden = {int(i) for i in json.loads(zf.read("hidden.json"))}
            if "index.faiss" not in names:
                raise ValueError(f"{path}: the index holds no vectors")
            index = faiss.deserialize_index(np.frombuffer(zf.read("index.faiss"), dtype=np.uint8))
        out = cls(index, meta, paths, hidden)
        out._apply_search_params()
        if out.index.ntotal - len(hidden) != len(paths):
            raise ValueError(f"{path}: {out.index.ntotal} vectors, {len(hidden)} removed, but {len(paths)} entries")
        return out

    def _apply_search_params(self) -> None:
        import faiss

        p = self.meta.get("params") or {}
        if self.kind == "hnsw":
            faiss.downcast_index(self.index.index).hnsw.efSearch = int(p.get("ef_search", 64))
        elif self.kind == "ivfpq":
            ivf = faiss.extract_index_ivf(self.index)
            ivf.nprobe = min(int(p.get("nprobe", 16)), ivf.nlist)
            inner = faiss.downcast_index(self.index.index)
            if hasattr(inner, "k_factor"):
                inner.k_factor = float(p.get("k_factor", 8))

    def __len__(self) -> int:
        return len(self.paths)

    def _params(self) -> Any:
        """FAISS search parameters that skip removed entries, as ``Index.search`` builds them
        (``None`` when nothing is hidden)."""
        if not self.hidden:
            return None
        if getattr(self, "_cached_params", None) is None:
            import faiss

            p = self.meta.get("params") or {}
            if self.kind == "hnsw":  # the ID map passes a top-level selector down in id space
                batch = faiss.IDSelectorBatch(np.asarray(sorted(self.hidden), dtype=np.int64))
                sel = faiss.IDSelectorNot(batch)
                params = faiss.SearchParametersHNSW(sel=sel, efSearch=int(p.get("ef_search", 64)))
                keep: tuple = (batch, sel)
            else:  # IVF-PQ inside the re-ranking index sees positions in the ID map
                id_map = faiss.vector_to_array(self.index.id_map)
                pos = np.flatnonzero(np.isin(id_map, np.fromiter(self.hidden, np.int64))).astype(np.int64)
                batch = faiss.IDSelectorBatch(pos)
                sel = faiss.IDSelectorNot(batch)
                ivf = faiss.extract_index_ivf(self.index)
                base = faiss.SearchParametersIVF(sel=sel, nprobe=min(int(p.get("nprobe", 16)), ivf.nlist))
                params = faiss.IndexRefineSearchParameters(k_factor=float(p.get("k_factor", 8)),
                                                           base_index_params=base)
                keep = (batch, sel, base)
            self._cached_params = (params, keep)  # FAISS does not own these objects: keep them alive
        return self._cached_params[0]

    def search(self, queries: np.ndarray, k: int = 5) -> list[list[tuple[str, float]]]:
        """For each query vector, its ``k`` nearest ``(path, score)`` pairs, best first
        (cosine similarity, or Euclidean distance for ``metric="l2"``)."""
        x = np.ascontiguousarray(np.atleast_2d(np.asarray(queries, dtype=np.float32)))
        if x.shape[1] != self.dim:
            raise ValueError(f"vectors have dimension {x.shape[1]}, the index {self.dim}")
        if not len(self):
            raise ValueError("the index is empty")
        if self.metric == "cosine":
            x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        k = min(int(k), len(self))
        d, ids = self.index.search(x, k, params=self._params())
        if self.metric == "l2":
            d = np.sqrt(np.maximum(d, 0))
        out = []
        for drow, irow in zip(d, ids):
            hits = [(self.paths[int(i)], float(s)) for s, i in zip(drow, irow) if i >= 0 and int(i) not in self.hidden]
            out.append(hits[:k])
        return out


# -- command line ------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="sslfeatures_runtime", description="Embed and search with an exported encoder")
    ap.add_argument("--variant", choices=list(VARIANT_FILES), default="fp32")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("embed", help="embed a folder or files to .npy (+ .paths.txt)")
    p.add_argument("model")
    p.add_argument("images", nargs="+")
    p.add_argument("--out", required=True)
    p = sub.add_parser("index", help="embed a folder into a FAISS index")
    p.add_argument("model")
    p.add_argument("images")
    p.add_argument("--out", required=True)
    p.add_argument("--metric", choices=list(FaissIndex.METRICS), default="cosine")
    p = sub.add_parser("query", help="nearest images of each query image (JSON lines)")
    p.add_argument("model")
    p.add_argument("index", help="a folder written by the index command, or a .index file from sslfeatures")
    p.add_argument("images", nargs="+")
    p.add_argument("--k", type=int, default=5)
    args = ap.parse_args(argv)
    try:
        enc = OnnxEncoder(args.model, variant=args.variant, device=args.device)
        if args.command == "embed":
            if len(args.images) == 1 and Path(args.images[0]).is_dir():
                paths, feats, _ = enc.embed_folder(args.images[0])
            else:
                paths, feats = args.images, enc.embed(args.images)
            out = Path(args.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            np.save(out, feats)
            out.with_suffix(".paths.txt").write_text("".join(f"{p}\n" for p in paths))
            print(json.dumps({"out": str(out), "shape": list(feats.shape)}))
        elif args.command == "index":
            paths, feats, skipped = enc.embed_folder(args.images)
            FaissIndex.build(feats, paths, args.metric).save(args.out)
            print(json.dumps({"out": args.out, "vectors": len(paths), "skipped": len(skipped)}))
        else:
            index = FaissIndex.load(args.index)
            for path, hits in zip(args.images, index.search(enc.embed(args.images), args.k)):
                print(json.dumps({"query": path, "hits": [{"id": i, "score": round(s, 6)} for i, s in hits]}))
    except (FileNotFoundError, ValueError, DecodeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
