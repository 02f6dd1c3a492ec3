"""Similarity search over encoder embeddings: a FAISS index that knows which image each
vector came from and which encoder made it.

>>> index = Index.build(enc, "photos/")           # embeds with progress, keeps id -> path
>>> index.save("photos.index")                    # one file, written atomically
>>> index = Index.load("photos.index")            # reloads the encoder it was built with
>>> index.search("query.jpg", k=10)               # [Hit(path, score), ...]
>>> index.near_duplicates(threshold=0.95)         # [Duplicate(a, b, score), ...]
>>> index.add("new_photos/"); index.remove(["photos/old.jpg"])

**Kinds** (``kind="auto"`` picks by the number of vectors at build time):

- ``"flat"`` (fewer than :data:`FLAT_MAX` vectors): exact search, no training.
- ``"hnsw"`` (up to :data:`HNSW_MAX`): HNSW graph over the raw vectors; high recall at a
  fraction of exact search's cost, but slow to build and 4*D bytes + graph per vector.
- ``"ivfpq"`` (above): inverted file over ``nlist`` k-means cells, product-quantised
  residuals (``pq_m`` bytes per vector), trained on a sample of ``train_size`` vectors, and
  re-ranking of the ``k * k_factor`` best candidates with a second copy of the vectors:
  ``refine="fp16"`` (2*D bytes per vector, the default), ``"sq8"`` (D bytes; coarser: on
  embeddings whose neighbours are very close it caps recall@10 near 0.85), ``"flat"`` (4*D
  bytes, exact) or ``"none"`` (PQ distances only: least memory, lowest recall).

FAISS cannot delete from an HNSW graph or a re-ranked IVF-PQ, so there removed vectors are
hidden at search time and dropped for good when more than a fifth of the index is hidden
(or on :meth:`Index.compact`); flat and plain IVF-PQ indexes delete in place.

The search parameters of the approximate kinds (``ef_search``; ``nprobe``, ``k_factor``)
are tuned at build time to the cheapest that reach ``target_recall`` (recall@10 against
exact search, for a held-out sample of the vectors used as queries); :meth:`Index.tune`
re-tunes them for queries you give.

**Metrics**: ``"cosine"`` (vectors are L2-normalised, the score is the cosine similarity,
higher is closer) and ``"l2"`` (the score is the Euclidean distance, lower is closer).

**File format** (``format_version`` 1): one uncompressed zip archive, replaced atomically
(written to a temporary file in the same folder, fsynced, then renamed over the target, so
a crash mid-save leaves the previous file intact). It holds ``meta.json`` (format name
and version, kind, metric, dimension, parameters, the encoder's config and folder, a probe
embedding that proves a query encoder embeds the same way), ``entries.json`` (``[[id,
path], ...]``), ``hidden.json`` (ids removed but not yet compacted away) and
``index.faiss`` (a standard FAISS file: readable with faiss alone, no torch). An index
written by an older format version is upgraded on load; a newer or unknown one is refused
with the reason.
"""
from __future__ import annotations

import inspect
import json
import logging
import math
import os
import time
import zipfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np

from .utils import atomic_writer

log = logging.getLogger("sslfeatures.index")

INDEX_FORMAT = "sslfeatures.index"
INDEX_FORMAT_VERSION = 1
KINDS = ("flat", "hnsw", "ivfpq")
METRICS = ("cosine", "l2")
REFINE = ("sq8", "fp16", "flat", "none")
FLAT_MAX = 50_000
"""``kind="auto"`` builds an exact index below this many vectors."""
HNSW_MAX = 1_000_000
"""``kind="auto"`` builds HNSW below this many vectors and IVF-PQ from here on."""
COMPACT_FRACTION = 0.2
"""An HNSW index is rebuilt when more than this fraction of its vectors are removed."""
ENCODER_KEYS = ("backbone", "image_size", "mean", "std", "crop_pct", "pooling")
"""Encoder config keys that decide how an image is embedded; they must match at query time."""

# Readers of older format versions: {version: function(meta) -> meta of version + 1}.
_MIGRATIONS: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {}


class IndexFormatError(ValueError):
    """An index file that cannot be read: not an index, corrupt, or from another version."""


class EncoderMismatchError(ValueError):
    """The encoder given for queries does not embed images the way the index was built."""


class Hit(NamedTuple):
    """One search result: the indexed path and its score (cosine similarity or L2 distance)."""

    path: str
    score: float


class Duplicate(NamedTuple):
    """A pair of near-duplicate images (``a`` was indexed before ``b``) and their score."""

    a: str
    b: str
    score: float


@dataclass
class IndexParams:
    """Construction and search parameters; every field can be passed to :meth:`Index.build`.

    ``None`` means "chosen from the data": ``nlist`` ~ 4*sqrt(N) (a power of two),
    ``pq_m`` ~ D/2 (a divisor of D), ``train_size`` = 40 vectors per IVF cell.
    """

    hnsw_m: int = 32
    ef_construction: int = 64
    ef_search: int = 64
    nlist: int | None = None
    pq_m: int | None = None
    nbits: int = 8
    nprobe: int = 16
    refine: str = "fp16"
    k_factor: int = 8
    train_size: int | None = None
    seed: int = 0

    @classmethod
    def from_kwargs(cls, kwargs: dict[str, Any]) -> IndexParams:
        valid = {f.name: f for f in fields(cls)}
        unknown = sorted(set(kwargs) - set(valid))
        if unknown:
            raise TypeError(f"unknown index parameter(s) {unknown}; valid: {sorted(valid)}")
        p = cls(**kwargs)
        p.validate()
        return p

    def validate(self) -> None:
        for name in ("hnsw_m", "ef_construction", "ef_search", "nbits", "nprobe", "k_factor"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        for name in ("nlist", "pq_m", "train_size"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {v!r}")
        if self.nbits > 16:
            raise ValueError(f"nbits must be at most 16, got {self.nbits}")
        if self.refine not in REFINE:
            raise ValueError(f"refine must be one of {REFINE}, got {self.refine!r}")


def _faiss():
    try:
        import faiss
    except ImportError:  # pragma: no cover - faiss is a declared extra
        raise ImportError("similarity search needs faiss: pip install 'sslfeatures[search]' "
                          "(or pip install faiss-cpu)") from None
    return faiss


def choose_kind(n: int) -> str:
    """The index kind ``kind="auto"`` builds for ``n`` vectors."""
    if n < FLAT_MAX:
        return "flat"
    return "hnsw" if n < HNSW_MAX else "ivfpq"


def _default_nlist(n: int) -> int:
    return int(min(65536, max(16, 2 ** round(math.log2(max(1.0, 4 * math.sqrt(n)))))))


def _default_pq_m(d: int) -> int:
    target = max(1, d // 2)  # 2 dimensions per sub-quantizer: D/4 capped recall@10 near 0.93 at 1M
    return max(m for m in range(1, target + 1) if d % m == 0)


def _probe_image(size: int) -> np.ndarray:
    """A fixed, smooth RGB test pattern (analytic, so identical on every platform)."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float64) / max(1, size - 1)
    r = 0.5 + 0.5 * np.sin(2 * np.pi * (1.5 * x + 0.5 * y))
    g = 0.5 + 0.5 * np.cos(2 * np.pi * (0.7 * x - 1.3 * y))
    b = np.clip(1.0 - np.hypot(x - 0.4, y - 0.6) * 1.4, 0, 1)
    return (np.stack([r, g, b], -1) * 255 + 0.5).astype(np.uint8)


def _accepts(fn: Callable, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _call_embed(encoder: Any, items: list, batch_size: int, report: Any = None) -> np.ndarray:
    """``encoder.embed(items)`` for any object with the Encoder interface (torch or ORT);
    ``report`` (a BadFileReport) is passed on when ``embed`` takes one."""
    kw: dict[str, Any] = {}
    if report is not None and _accepts(encoder.embed, "report"):
        kw["report"] = report
    if _accepts(encoder.embed, "batch_size"):
        kw["batch_size"] = batch_size
    if _accepts(encoder.embed, "progress"):
        kw["progress"] = False
    out = np.asarray(encoder.embed(items, **kw), dtype=np.float32)
    if out.ndim != 2 or len(out) != len(items):
        raise ValueError(f"{type(encoder).__name__}.embed returned shape {out.shape} for {len(items)} inputs; "
                         "expected (N, D)")
    return out


def _key(path: str | os.PathLike) -> str:
    """The key an image path is stored under: its absolute path, symlinks not resolved."""
    return os.path.abspath(os.fspath(path))


def _is_vector(q: Any) -> bool:
    return getattr(q, "ndim", None) == 1 and not isinstance(q, (str, bytes))


def _as_matrix(vectors: Any, dim: int | None = None) -> np.ndarray:
    if hasattr(vectors, "detach"):  # a torch tensor
        vectors = vectors.detach().cpu().numpy()
    x = np.asarray(vectors, dtype=np.float32)
    if x.ndim == 1:
        x = x[None]
    if x.ndim != 2:
        raise ValueError(f"expected vectors of shape (N, D), got {x.shape}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"vectors have {x.shape[1]} dimensions, the index has {dim}")
    if not np.isfinite(x).all():
        raise ValueError("vectors contain NaN or infinite values")
    return np.ascontiguousarray(x)


class Index:
    """A FAISS index of embeddings with ``id -> path`` metadata and the encoder that made them.

    Build one with :meth:`build` (images, through an encoder) or :meth:`from_vectors`
    (precomputed embeddings); reload a saved one with :meth:`load`.
    """

    def __init__(self, dim: int, kind: str = "flat", metric: str = "cosine",
                 params: IndexParams | None = None, encoder: Any = None,
                 encoder_path: str | None = None):
        if kind not in KINDS:
            raise ValueError(f"unknown index kind {kind!r}; choose one of {KINDS} (or 'auto' in build)")
        if metric not in METRICS:
            raise ValueError(f"unknown metric {metric!r}; choose one of {METRICS}")
        if not isinstance(dim, (int, np.integer)) or dim < 1:
            raise ValueError(f"dim must be a positive integer, got {dim!r}")
        self.dim, self.kind, self.metric = int(dim), kind, metric
        self.params = params or IndexParams()
        self.params.validate()
        self._faiss_index: Any = None  # created on first add (IVF-PQ needs data to train)
        self._paths: dict[int, str] = {}
        self._ids: dict[str, int] = {}
        self._hidden: set[int] = set()
        self._selector: tuple | None = None
        self._next_id = 0
        self.encoder: Any = None
        self.encoder_path: str | None = encoder_path
        self.encoder_config: dict[str, Any] | None = None
        self._probe: np.ndarray | None = None
        if encoder is not None:
            self.attach_encoder(encoder, check=False)

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def build(cls, encoder: Any, data: str | os.PathLike | Sequence[str | os.PathLike], *,
              kind: str = "auto", metric: str = "cosine", batch_size: int = 64,
              progress: bool | None = None, target_recall: float | None = 0.95,
              encoder_path: str | os.PathLike | None = None, strict: bool = False, **params: Any) -> Index:
        """Embed every image of ``data`` (a folder, searched recursively, or image paths) with
        ``encoder`` and index the embeddings.

        ``encoder`` is an :class:`~sslfeatures.Encoder` (or any object with its ``embed()``
        and ``config``, e.g. the ONNX-runtime encoder), or a path/hub id to load one from;
        its folder is recorded so :meth:`load` can reload it (pass ``encoder_path`` when it
        cannot be inferred). ``kind``: ``"auto"``, ``"flat"``, ``"hnsw"`` or ``"ivfpq"``;
        ``params``: any :class:`IndexParams` field. Unreadable images are skipped, each
        with one warning line, and summarised at the end (``strict=True``: the first one
        raises :class:`~sslfeatures.data.DecodeError` instead). ``target_recall`` tunes the search
        parameters of approximate kinds (``None``: keep the given ones).
        """
        IndexParams.from_kwargs(params)  # fail on a bad parameter before the (long) embedding
        if kind != "auto" and kind not in KINDS:
            raise ValueError(f"unknown index kind {kind!r}; choose 'auto' or one of {KINDS}")
        if metric not in METRICS:
            raise ValueError(f"unknown metric {metric!r}; choose one of {METRICS}")
        encoder, ref = cls._resolve_encoder(encoder, encoder_path)
        paths, x = _embed_inputs(encoder, data, batch_size, progress, strict=strict)
        index = cls.from_vectors(x, paths, kind=kind, metric=metric, target_recall=target_recall,
                                 encoder=encoder, encoder_path=ref, **params)
        return index

    @classmethod
    def from_vectors(cls, vectors: Any, paths: Sequence[str | os.PathLike], *, kind: str = "auto",
                     metric: str = "cosine", target_recall: float | None = 0.95, encoder: Any = None,
                     encoder_path: str | os.PathLike | None = None, **params: Any) -> Index:
        """Index precomputed embeddings ``(N, D)``; ``paths[i]`` names row ``i`` (image paths are
        stored as absolute paths; any other string is kept as given)."""
        x = _as_matrix(vectors)
        if kind == "auto":
            kind = choose_kind(len(x))
        ref = str(encoder_path) if encoder_path is not None else None
        index = cls(x.shape[1], kind=kind, metric=metric, params=IndexParams.from_kwargs(params),
                    encoder_path=ref)
        if encoder is not None:
            index.attach_encoder(encoder, check=False)
        x, keys = index._prepare(x, paths, replace=False)
        ids = np.arange(len(x), dtype=np.int64)
        n_q = min(256, len(x) // 10)
        if target_recall is None or kind == "flat" or n_q < 20:
            if len(x):
                index._insert(x, keys, ids)
            return index
        # tune on held-out vectors: indexed vectors are easy queries for a graph (they are in it)
        held = np.zeros(len(x), bool)
        held[np.random.default_rng(index.params.seed).choice(len(x), n_q, replace=False)] = True
        index._insert(x[~held], [k for k, h in zip(keys, held) if not h], ids[~held])
        index.tune(x[held], target_recall=target_recall, _base=(ids[~held], x[~held]))
        index._insert(x[held], [k for k, h in zip(keys, held) if h], ids[held])
        return index

    @staticmethod
    def _resolve_encoder(encoder: Any, encoder_path: str | os.PathLike | None) -> tuple[Any, str | None]:
        if isinstance(encoder, (str, os.PathLike)):
            from .encoder import Encoder

            ref = os.fspath(encoder)
            return Encoder.from_pretrained(ref), (_key(ref) if os.path.exists(ref) else ref)
        if not (hasattr(encoder, "embed") and hasattr(encoder, "config")):
            raise TypeError(f"encoder must be an Encoder (or have .embed() and .config) or a path, "
                            f"got {type(encoder).__name__}")
        ref = encoder_path
        for attr in ("name_or_path", "onnx_path", "source_dir"):  # where the encoder was loaded from
            if ref is None:
                ref = getattr(encoder, attr, None)
        if ref is not None:
            ref = os.fspath(ref)
            ref = _key(ref) if os.path.exists(ref) else ref
        return encoder, ref

    # -- the encoder ------------------------------------------------------------------------
    def attach_encoder(self, encoder: Any, check: bool = True, min_cosine: float = 0.95) -> None:
        """Use ``encoder`` to embed image queries and added images.

        With ``check`` (the default when an index already has an encoder config), the
        encoder must have the same preprocessing config (:data:`ENCODER_KEYS`) as the one the
        index was built with, and embed a fixed probe image to within ``min_cosine`` of the
        stored probe embedding; otherwise :class:`EncoderMismatchError` says what differs.
        """
        if not (hasattr(encoder, "embed") and hasattr(encoder, "config")):
            raise TypeError(f"encoder must have .embed() and .config, got {type(encoder).__name__}")
        config = dict(encoder.config)
        probe = self._probe_embedding(encoder, config)
        if probe.shape[0] != self.dim:
            raise EncoderMismatchError(f"the encoder embeds to {probe.shape[0]} dimensions, the index holds "
                                       f"{self.dim}-dimensional vectors")
        if check and self.encoder_config is not None:
            diffs = [k for k in ENCODER_KEYS if k in self.encoder_config and k in config
                     and self.encoder_config[k] != config[k]]
            if diffs:
                detail = "; ".join(f"{k}: index {self.encoder_config[k]!r} vs encoder {config[k]!r}" for k in diffs)
                raise EncoderMismatchError(f"the encoder's config differs from the one this index was built "
                                           f"with ({detail}); queries would be embedded differently")
            if self._probe is not None:
                cos = float(np.dot(self._probe, probe) /
                            max(1e-12, float(np.linalg.norm(self._probe) * np.linalg.norm(probe))))
                if cos < min_cosine:
                    raise EncoderMismatchError(
                        f"the encoder embeds the probe image differently from the encoder this index was built "
                        f"with (cosine {cos:.3f} < {min_cosine}): different weights? Pass the encoder the "
                        f"index was built with, or rebuild the index with this one")
        self.encoder = encoder
        if self.encoder_config is None:
            self.encoder_config = {k: v for k, v in config.items() if _jsonable(v)}
        if self._probe is None:
            self._probe = probe

    @staticmethod
    def _probe_embedding(encoder: Any, config: dict[str, Any]) -> np.ndarray:
        size = int(config.get("image_size", 224))
        return _call_embed(encoder, [_probe_image(size)], batch_size=1)[0]

    def _require_encoder(self, what: str) -> Any:
        if self.encoder is None:
            where = f" (built with {self.encoder_path})" if self.encoder_path else ""
            raise ValueError(f"{what} needs an encoder, and this index has none attached{where}: pass "
                             "encoder=... to Index.load (--model on the command line) or call "
                             "index.attach_encoder(enc); embedding vectors can be used directly")
        return self.encoder

    # -- the FAISS structures -----------------------------------------------------------------
    @property
    def _faiss_metric(self) -> int:
        faiss = _faiss()
        return faiss.METRIC_INNER_PRODUCT if self.metric == "cosine" else faiss.METRIC_L2

    def _create(self, x: np.ndarray) -> None:
        """Create (and for IVF-PQ train, on a sample of ``x``) the FAISS index."""
        faiss, p, d = _faiss(), self.params, self.dim
        if self.kind == "flat":
            base = faiss.IndexFlatIP(d) if self.metric == "cosine" else faiss.IndexFlatL2(d)
            self._faiss_index = faiss.IndexIDMap2(base)
        elif self.kind == "hnsw":
            base = faiss.IndexHNSWFlat(d, p.hnsw_m, self._faiss_metric)
            base.hnsw.efConstruction = p.ef_construction
            base.hnsw.efSearch = p.ef_search
            self._faiss_index = faiss.IndexIDMap2(base)
        elif p.refine == "none":
            self._faiss_index = self._train_ivfpq(x)  # IVF stores ids itself and deletes in place
        else:
            store = self._refine_base()
            if not store.is_trained:
                with _blas_for_training(faiss):
                    store.train(self._sample(x))
            refined = faiss.IndexRefine(self._train_ivfpq(x), store)
            refined.k_factor = float(p.k_factor)
            self._faiss_index = faiss.IndexIDMap2(refined)

    def _refine_base(self):
        faiss, d = _faiss(), self.dim
        if self.params.refine == "flat":
            return faiss.IndexFlatIP(d) if self.metric == "cosine" else faiss.IndexFlatL2(d)
        qtype = faiss.ScalarQuantizer.QT_8bit if self.params.refine == "sq8" else faiss.ScalarQuantizer.QT_fp16
        return faiss.IndexScalarQuantizer(d, qtype, self._faiss_metric)

    def _sample(self, x: np.ndarray) -> np.ndarray:
        p = self.params
        size = p.train_size or max(40 * (p.nlist or _default_nlist(len(x))), 2 ** p.nbits * 40)
        if len(x) <= size:
            return x
        rng = np.random.default_rng(p.seed)
        return x[np.sort(rng.choice(len(x), size, replace=False))]

    def _train_ivfpq(self, x: np.ndarray):
        faiss, p, d = _faiss(), self.params, self.dim
        p.nlist = p.nlist or _default_nlist(len(x))
        p.pq_m = p.pq_m or _default_pq_m(d)
        if d % p.pq_m:
            raise ValueError(f"pq_m={p.pq_m} must divide the dimension {d}")
        need = max(p.nlist, 2 ** p.nbits)
        if len(x) < need:
            raise ValueError(f"kind='ivfpq' with nlist={p.nlist}, nbits={p.nbits} needs at least {need} vectors "
                             f"to train, got {len(x)}; use kind='flat' or 'hnsw' for small collections "
                             "(or lower nlist/nbits)")
        quantizer = faiss.IndexFlatIP(d) if self.metric == "cosine" else faiss.IndexFlatL2(d)
        ivf = faiss.IndexIVFPQ(quantizer, d, p.nlist, p.pq_m, p.nbits, self._faiss_metric)
        ivf.cp.seed = p.seed
        ivf.pq.cp.seed = p.seed
        sample = self._sample(x)
        t0 = time.perf_counter()
        with _blas_for_training(faiss):
            ivf.train(sample)
        ivf.nprobe = min(p.nprobe, p.nlist)
        log.info("trained IVF%d,PQ%dx%d on %d vectors in %.1fs", p.nlist, p.pq_m, p.nbits, len(sample),
                 time.perf_counter() - t0)
        return ivf

    @property
    def _hides_removed(self) -> bool:
        """Kinds FAISS cannot delete from: removed ids are hidden, then compacted away."""
        return self.kind == "hnsw" or (self.kind == "ivfpq" and self.params.refine != "none")

    def _ivf(self):
        return _faiss().extract_index_ivf(self._faiss_index)

    def _apply_search_params(self) -> None:
        faiss, p = _faiss(), self.params
        self._selector = None
        if self._faiss_index is None:
            return
        if self.kind == "hnsw":
            faiss.downcast_index(self._faiss_index.index).hnsw.efSearch = p.ef_search
        elif self.kind == "ivfpq":
            ivf = self._ivf()
            ivf.nprobe = min(p.nprobe, ivf.nlist)
            if p.refine != "none":
                faiss.downcast_index(self._faiss_index.index).k_factor = float(p.k_factor)

    # -- size and metadata ---------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._paths)

    def __contains__(self, path: object) -> bool:
        return isinstance(path, (str, os.PathLike)) and self._lookup(path) is not None

    def __repr__(self) -> str:
        extra = ""
        if self.kind == "hnsw":
            extra = f", M={self.params.hnsw_m}, ef_search={self.params.ef_search}"
        elif self.kind == "ivfpq":
            p = self.params
            extra = f", nlist={p.nlist}, pq_m={p.pq_m}, nprobe={p.nprobe}, refine={p.refine!r}"
        return f"Index(kind={self.kind!r}, metric={self.metric!r}, dim={self.dim}, size={len(self)}{extra})"

    def memory_bytes(self) -> int:
        """Bytes the FAISS structures occupy (their serialised size, which tracks their RAM
        footprint closely; metadata not included)."""
        faiss = _faiss()
        total = 0

        def count(chunk: bytes) -> None:
            nonlocal total
            total += len(chunk)

        if self._faiss_index is not None:
            writer = faiss.PyCallbackIOWriter(count)
            faiss.write_index(self._faiss_index, writer)
            del writer
        return total

    @property
    def paths(self) -> list[str]:
        """The indexed paths, in the order they were added."""
        return [self._paths[i] for i in sorted(self._paths)]

    def _lookup(self, path: str | os.PathLike) -> int | None:
        s = os.fspath(path)
        i = self._ids.get(s)
        return i if i is not None else self._ids.get(_key(s))

    def id_of(self, path: str | os.PathLike) -> int:
        """The stable integer id of an indexed path (ids are never reused)."""
        i = self._lookup(path)
        if i is None:
            raise KeyError(f"{os.fspath(path)} is not in the index")
        return i

    def path_of(self, id_: int) -> str:
        """The path indexed under ``id_``."""
        try:
            return self._paths[int(id_)]
        except KeyError:
            raise KeyError(f"no entry with id {id_} in the index") from None

    def check(self) -> None:
        """Verify that the metadata and the FAISS index hold the same ids (raises if not)."""
        faiss = _faiss()
        live = set(self._paths)
        if len(self._ids) != len(self._paths) or any(self._ids.get(p) != i for i, p in self._paths.items()):
            raise IndexFormatError("the path -> id and id -> path tables disagree")
        if self._faiss_index is None:
            if live:
                raise IndexFormatError(f"metadata lists {len(live)} entries but there is no FAISS index")
            return
        if not hasattr(self._faiss_index, "id_map"):  # IVF-PQ without re-ranking stores ids itself
            invlists = self._faiss_index.invlists
            stored: list[np.ndarray] = []
            for lst in range(invlists.nlist):
                n = invlists.list_size(lst)
                if n:
                    stored.append(faiss.rev_swig_ptr(invlists.get_ids(lst), n).copy())
            ids = np.concatenate(stored) if stored else np.zeros(0, np.int64)
        else:
            ids = faiss.vector_to_array(self._faiss_index.id_map)
        present = set(ids.tolist()) - self._hidden
        if len(ids) != len(set(ids.tolist())) or present != live or not self._hidden <= set(ids.tolist()):
            raise IndexFormatError(f"metadata lists {len(live)} entries but the FAISS index holds "
                                   f"{len(present)} visible vectors ({len(live ^ present)} ids differ)")

    # -- adding and removing ---------------------------------------------------------------------
    def add(self, data: str | os.PathLike | Sequence[str | os.PathLike], *, batch_size: int = 64,
            progress: bool | None = None, replace: bool = False, strict: bool = False) -> int:
        """Embed and add the images of ``data`` (a folder or image paths); returns how many
        were added. Paths already in the index are skipped (so adding a folder again only
        embeds its new files) unless ``replace=True``, which re-embeds them. Unreadable images are skipped and
        reported as in :meth:`build` (``strict=True``: the first one raises)."""
        encoder = self._require_encoder("adding images")
        files = _list_inputs(data)
        if not replace:
            files = [f for f in files if self._lookup(f) is None]
        if not files:
            return 0
        paths, x = _embed_inputs(encoder, files, batch_size, progress, strict=strict)
        return self.add_vectors(x, paths, replace=replace)

    def add_vectors(self, vectors: Any, paths: Sequence[str | os.PathLike], replace: bool = False) -> int:
        """Add embeddings ``(N, D)`` named by ``paths``; returns how many were added. A path
        already present raises ``ValueError`` unless ``replace=True``."""
        x, keys = self._prepare(vectors, paths, replace)
        if len(x):
            self._insert(x, keys, np.arange(self._next_id, self._next_id + len(x), dtype=np.int64))
        return len(x)

    def _prepare(self, vectors: Any, paths: Sequence[str | os.PathLike], replace: bool) -> tuple[np.ndarray, list[str]]:
        """Validate vectors and paths, normalise for cosine, drop entries being replaced."""
        x = _as_matrix(vectors, self.dim)
        keys = [self._store_key(p) for p in paths]
        if len(keys) != len(x):
            raise ValueError(f"got {len(x)} vectors but {len(keys)} paths")
        if len(set(keys)) != len(keys):
            raise ValueError("the same path appears more than once in one add")
        present = [k for k in keys if k in self._ids]
        if present and not replace:
            raise ValueError(f"{len(present)} path(s) are already indexed (e.g. {present[0]}); "
                             "pass replace=True to re-index them")
        if present:
            self.remove(present)
        if self.metric == "cosine":
            x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        return x, keys

    def _insert(self, x: np.ndarray, keys: list[str], ids: np.ndarray) -> None:
        """Add prepared vectors under fresh ``ids`` (creating/training the index on first use)."""
        if self._faiss_index is None:
            self._create(x)
            self._apply_search_params()
        self._faiss_index.add_with_ids(x, ids)
        for i, k in zip(ids.tolist(), keys):
            self._paths[i] = k
            self._ids[k] = i
        self._next_id = max(self._next_id, int(ids.max()) + 1)

    @staticmethod
    def _store_key(path: str | os.PathLike) -> str:
        s = os.fspath(path)
        if not isinstance(s, str):
            raise TypeError(f"paths must be strings or path-like, got {type(path).__name__}")
        return _key(s) if (isinstance(path, Path) or os.path.exists(s)) else s

    def remove(self, paths: str | os.PathLike | Iterable[str | os.PathLike], missing_ok: bool = False) -> int:
        """Remove images by path (a folder removes everything indexed below it); returns how
        many were removed. Unknown paths raise ``KeyError`` unless ``missing_ok``."""
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        ids: list[int] = []
        missing: list[str] = []
        for p in paths:
            i = self._lookup(p)
            if i is not None:
                ids.append(i)
                continue
            prefix = _key(p).rstrip(os.sep) + os.sep  # a folder: everything indexed below it
            below = [j for k, j in self._ids.items() if k.startswith(prefix)]
            if below:
                ids.extend(below)
            else:
                missing.append(os.fspath(p))
        if missing and not missing_ok:
            raise KeyError(f"{len(missing)} path(s) not in the index, e.g. {missing[:3]}")
        ids = sorted(set(ids))
        if not ids:
            return 0
        if self._hides_removed:
            self._hidden.update(ids)
            self._selector = None
        else:
            self._faiss_index.remove_ids(np.asarray(ids, dtype=np.int64))
        for i in ids:
            del self._ids[self._paths.pop(i)]
        if self._hides_removed and len(self._hidden) > COMPACT_FRACTION * self._faiss_index.ntotal:
            self.compact()
        return len(ids)

    def compact(self) -> None:
        """Drop removed vectors for good: rebuild the HNSW graph, or re-fill the (already
        trained) IVF-PQ + re-ranking store from the stored vectors. Runs by itself once more
        than :data:`COMPACT_FRACTION` of the index is removed; flat and IVF-PQ without
        re-ranking delete in place and need none."""
        if not self._hides_removed or not self._hidden:
            return
        ids = np.asarray(sorted(self._paths), dtype=np.int64)
        x = self._reconstruct(ids)
        if self.kind == "hnsw":
            self._faiss_index = None
            self._create(x)
            self._apply_search_params()
        else:
            self._faiss_index.reset()  # keeps the trained coarse quantizer and codebooks
        if len(ids):
            self._faiss_index.add_with_ids(x, ids)
        self._hidden.clear()
        self._selector = None
        log.info("compacted the %s index to %d vectors", self.kind, len(ids))

    # -- vectors ------------------------------------------------------------------------------------
    def _reconstruct(self, ids: np.ndarray) -> np.ndarray:
        """Stored vectors for ``ids`` (exact for flat/hnsw and ``refine="flat"``, otherwise the
        quantised approximation)."""
        if len(ids) == 0:
            return np.zeros((0, self.dim), np.float32)
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if hasattr(self._faiss_index, "id_map"):  # IndexIDMap2: flat, HNSW, IVF-PQ + re-ranking store
            return self._faiss_index.reconstruct_batch(ids)
        faiss = _faiss()
        ivf = self._faiss_index
        ivf.set_direct_map_type(faiss.DirectMap.Hashtable)
        try:
            return ivf.reconstruct_batch(ids)
        finally:
            ivf.set_direct_map_type(faiss.DirectMap.NoMap)

    def vectors(self, paths: Sequence[str | os.PathLike] | None = None) -> np.ndarray:
        """Stored vectors ``(N, D)`` (all, in :attr:`paths` order, or of the given paths);
        approximate for ``ivfpq`` unless built with ``refine="flat"``."""
        ids = sorted(self._paths) if paths is None else [self.id_of(p) for p in paths]
        return self._reconstruct(np.asarray(ids, dtype=np.int64))

    # -- search --------------------------------------------------------------------------------------
    def search(self, query: Any, k: int = 10) -> list[Hit] | list[list[Hit]]:
        """The ``k`` nearest indexed images of ``query``, closest first.

        ``query``: an image path, PIL image, image array or tensor (embedded with the
        index's encoder), or an embedding vector (a 1-D array); a list of them returns one
        list of hits per query. Scores are cosine similarities (``metric="cosine"``) or
        Euclidean distances (``"l2"``).
        """
        single = not isinstance(query, (list, tuple))
        queries = [query] if single else list(query)
        if not queries:
            return []
        x = self._embed_queries(queries)
        scores, ids = self.search_vectors(x, k)
        hits = [[Hit(self._paths[int(i)], float(s)) for s, i in zip(srow, irow) if i >= 0]
                for srow, irow in zip(scores, ids)]
        return hits[0] if single else hits

    def _embed_queries(self, queries: list) -> np.ndarray:
        out = np.zeros((len(queries), self.dim), np.float32)
        images = [i for i, q in enumerate(queries) if not _is_vector(q)]
        for i, q in enumerate(queries):
            if _is_vector(q):
                out[i] = _as_matrix(q, self.dim)[0]
        if images:
            enc = self._require_encoder("searching by image")
            out[images] = _as_matrix(_call_embed(enc, [queries[i] for i in images], 64), self.dim)
        return out

    def search_vectors(self, vectors: Any, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """Batched search of embeddings ``(Q, D)``: ``(scores, ids)`` of shape ``(Q, k)``,
        closest first; missing results (fewer than ``k`` entries) have id ``-1``."""
        x = _as_matrix(vectors, self.dim)
        if not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        if self.metric == "cosine":
            x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        kk = int(min(k, len(self)))
        if kk == 0:
            return np.zeros((len(x), k), np.float32), np.full((len(x), k), -1, np.int64)
        d, i = self._faiss_index.search(x, kk, params=self._search_params())
        d = np.sqrt(np.maximum(d, 0)) if self.metric == "l2" else d
        d[i < 0] = np.nan
        if kk < k:
            d = np.pad(d, ((0, 0), (0, k - kk)), constant_values=np.nan)
            i = np.pad(i, ((0, 0), (0, k - kk)), constant_values=-1)
        return d.astype(np.float32), i.astype(np.int64)

    def _search_params(self):
        """Search parameters that hide removed ids (``None`` when nothing is hidden)."""
        if not self._hidden:
            return None
        if self._selector is None:
            faiss = _faiss()
            if self.kind == "hnsw":  # the ID map translates a top-level selector to HNSW's positions
                batch = faiss.IDSelectorBatch(np.asarray(sorted(self._hidden), dtype=np.int64))
                sel = faiss.IDSelectorNot(batch)
                params = faiss.SearchParametersHNSW(sel=sel, efSearch=self.params.ef_search)
                keep: tuple = (batch, sel)
            else:  # IVF-PQ inside IndexRefine sees positions in the ID map: select by position
                id_map = faiss.vector_to_array(self._faiss_index.id_map)
                hidden = np.flatnonzero(np.isin(id_map, np.fromiter(self._hidden, np.int64))).astype(np.int64)
                batch = faiss.IDSelectorBatch(hidden)
                sel = faiss.IDSelectorNot(batch)
                base = faiss.SearchParametersIVF(sel=sel, nprobe=min(self.params.nprobe, self._ivf().nlist))
                params = faiss.IndexRefineSearchParameters(k_factor=float(self.params.k_factor),
                                                           base_index_params=base)
                keep = (batch, sel, base)
            self._selector = (params, keep)  # FAISS does not own these objects: keep them alive
        return self._selector[0]

    def _exact_neighbours(self, q: np.ndarray, base: np.ndarray, k: int) -> np.ndarray:
        """Row indices into ``base`` of the exact ``k`` nearest rows of each ``q`` (numpy)."""
        out = np.empty((len(q), k), np.int64)
        sq = (base ** 2).sum(1) if self.metric == "l2" else None
        for s in range(0, len(q), 256):
            sim = q[s:s + 256] @ base.T
            if sq is not None:
                sim = 2 * sim - sq  # -||q-b||^2 up to a per-row constant
            part = np.argpartition(-sim, k - 1, axis=1)[:, :k]
            order = np.argsort(-np.take_along_axis(sim, part, 1), axis=1, kind="stable")
            out[s:s + 256] = np.take_along_axis(part, order, 1)
        return out

    def tune(self, queries: Any, target_recall: float = 0.95, k: int = 10,
             _base: tuple[np.ndarray, np.ndarray] | None = None) -> dict[str, Any]:
        """Choose the cheapest search parameters (``ef_search``; ``nprobe``, then ``k_factor``)
        that reach ``target_recall`` recall@k against exact search for ``queries`` (a few
        hundred representative query vectors that are not in the index; indexed vectors are
        optimistic queries). Returns the chosen parameters and the recall measured.
        :meth:`build` tunes on a held-out sample of the data."""
        if not 0 < target_recall <= 1:
            raise ValueError(f"target_recall must be in (0, 1], got {target_recall}")
        q = _as_matrix(queries, self.dim)
        if self.metric == "cosine":
            q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        if self.kind == "flat" or len(self) < k or not len(q):
            return {"recall": 1.0}
        if _base is None:
            ids = np.asarray(sorted(self._paths), dtype=np.int64)
            _base = (ids, self._reconstruct(ids))
        ids, base = _base
        truth = [set(row.tolist()) for row in ids[self._exact_neighbours(q, base, k)]]

        def recall(found: np.ndarray) -> float:
            return float(np.mean([len(set(f.tolist()) & t) / k for f, t in zip(found, truth)]))

        p = self.params
        if self.kind == "hnsw":
            for p.ef_search in (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024):
                self._apply_search_params()
                r = recall(self.search_vectors(q, k)[1])
                if r >= target_recall:
                    break
            chosen: dict[str, Any] = {"ef_search": p.ef_search}
        else:
            # nprobe doubles until the target is met or recall stops improving; at each nprobe
            # the re-ranking depth k_factor doubles from 1 to 256
            nlist = self._ivf().nlist
            factors = [2 ** e for e in range(9)] if p.refine != "none" else [p.k_factor]
            best: tuple[float, int, int] = (-1.0, 1, factors[0])
            history: list[float] = []
            for p.nprobe in sorted({min(nlist, 2 ** e) for e in range(17)}):
                scores = []
                for p.k_factor in factors:
                    self._apply_search_params()
                    scores.append(recall(self.search_vectors(q, k)[1]))
                    if scores[-1] >= target_recall:
                        break
                hit = next((i for i, r in enumerate(scores) if r >= target_recall), None)
                if hit is not None:
                    best = (scores[hit], p.nprobe, factors[hit])
                    break
                if scores[-1] > best[0]:
                    best = (scores[-1], p.nprobe, factors[-1])
                history.append(scores[-1])
                if len(history) >= 3 and history[-1] - history[-3] < 0.002:
                    break  # a plateau: more cells do not help (the codes are the limit)
            r, p.nprobe, p.k_factor = best
            self._apply_search_params()
            chosen = {"nprobe": p.nprobe, "k_factor": p.k_factor}
        if r < target_recall:
            hint = {"hnsw": "; a larger hnsw_m / ef_construction raises the ceiling",
                    "ivfpq": "; more PQ bytes (pq_m) or a finer re-ranking store (refine='fp16' or 'flat') "
                             "raise the ceiling"}[self.kind]
            log.warning("recall@%d %.3f is below the target %.2f at the best search parameters %s%s", k, r,
                        target_recall, chosen, hint)
        return dict(chosen, recall=r)

    # -- near-duplicates -------------------------------------------------------------------------------
    def near_duplicates(self, threshold: float = 0.95, k: int = 10, batch_size: int = 4096) -> list[Duplicate]:
        """Pairs of indexed images at least ``threshold`` similar (cosine) or at most
        ``threshold`` apart (L2), most similar first. Each image is compared with its ``k``
        nearest neighbours, so a group of more than ``k + 1`` identical images is found as
        overlapping pairs (see :meth:`duplicate_groups`)."""
        ids = np.asarray(sorted(self._paths), dtype=np.int64)
        pairs: dict[tuple[int, int], float] = {}
        kk = min(k + 1, len(ids))
        for s in range(0, len(ids), batch_size):
            chunk = ids[s:s + batch_size]
            scores, found = self.search_vectors(self._reconstruct(chunk), kk)
            for a, srow, frow in zip(chunk.tolist(), scores, found):
                for sc, b in zip(srow.tolist(), frow.tolist()):
                    if b < 0 or b == a:
                        continue
                    if (sc >= threshold) if self.metric == "cosine" else (sc <= threshold):
                        key = (a, b) if a < b else (b, a)
                        pairs[key] = max(pairs.get(key, sc), sc) if self.metric == "cosine" else min(
                            pairs.get(key, sc), sc)
        out = [Duplicate(self._paths[a], self._paths[b], float(sc)) for (a, b), sc in pairs.items()]
        out.sort(key=lambda d: (-d.score if self.metric == "cosine" else d.score, d.a, d.b))
        return out

    def duplicate_groups(self, threshold: float = 0.95, k: int = 10) -> list[list[str]]:
        """Groups of near-duplicates (connected components of :meth:`near_duplicates` pairs),
        each in indexing order, largest group first: keep the first, review the rest."""
        parent: dict[str, str] = {}

        def find(a: str) -> str:
            while parent.setdefault(a, a) != a:
                parent[a] = parent[parent[a]]
                a = parent[a]
            return a

        for d in self.near_duplicates(threshold, k):
            ra, rb = find(d.a), find(d.b)
            if ra != rb:
                parent[max(ra, rb, key=self._ids.__getitem__)] = min(ra, rb, key=self._ids.__getitem__)
        groups: dict[str, list[str]] = {}
        for p in parent:
            groups.setdefault(find(p), []).append(p)
        out = [sorted(g, key=self._ids.__getitem__) for g in groups.values()]
        return sorted(out, key=lambda g: (-len(g), self._ids[g[0]]))

    # -- persistence ---------------------------------------------------------------------------------
    def _meta(self) -> dict[str, Any]:
        from . import __version__

        return {"format": INDEX_FORMAT, "format_version": INDEX_FORMAT_VERSION, "kind": self.kind,
                "metric": self.metric, "dim": self.dim, "count": len(self), "next_id": self._next_id,
                "params": asdict(self.params),
                "encoder": {"path": self.encoder_path, "config": self.encoder_config,
                            "probe": None if self._probe is None else [float(v) for v in self._probe]},
                "written_by": {"sslfeatures": __version__, "faiss": _faiss().__version__}}

    def save(self, path: str | os.PathLike) -> Path:
        """Write the index to one file, atomically: a crash mid-save leaves any previous file
        at ``path`` intact (the new one is written beside it, then renamed over it)."""
        path = Path(path)
        if path.is_dir():
            raise IsADirectoryError(f"{path} is a folder; an index is saved as one file, e.g. {path / 'photos.index'}")
        with atomic_writer(path) as fh:  # streamed: the index is never held twice in memory
            with zipfile.ZipFile(fh, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
                zf.writestr("meta.json", json.dumps(self._meta(), indent=2, sort_keys=True))
                entries = [[i, self._paths[i]] for i in sorted(self._paths)]
                zf.writestr("entries.json", _json_bytes(entries))
                zf.writestr("hidden.json", json.dumps(sorted(self._hidden)))
                if self._faiss_index is not None:
                    _write_faiss(zf, "index.faiss", self._faiss_index)
        _fsync_dir(path.parent)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, encoder: Any = None, *, load_encoder: bool = True,
             check_encoder: bool = True) -> Index:
        """Read an index written by :meth:`save`.

        ``encoder``: an encoder object (or a path/hub id to load one from) for image queries;
        by default the encoder folder recorded at build time is loaded when it exists
        (``load_encoder=False`` skips it: vector queries, removal and dedup still work). A
        given encoder is checked against the stored config and probe embedding
        (``check_encoder=False`` skips the check).
        """
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"index file not found: {path}")
        if path.is_dir():
            raise IndexFormatError(f"{path} is a folder; an sslfeatures index is one file written by Index.save")
        if not zipfile.is_zipfile(path):
            raise IndexFormatError(f"{path} is not an sslfeatures index (expected the zip archive written by "
                                   "Index.save; a bare FAISS file can be read with faiss.read_index)")
        with zipfile.ZipFile(path) as zf:
            names = set(zf.namelist())
            if "meta.json" not in names:
                raise IndexFormatError(f"{path} is a zip archive without meta.json: not an sslfeatures index")
            try:
                meta = json.loads(zf.read("meta.json"))
            except json.JSONDecodeError as e:
                raise IndexFormatError(f"{path}: meta.json is not valid JSON ({e})") from None
            meta = _upgrade(meta, path)
            try:
                index = cls(int(meta["dim"]), kind=meta["kind"], metric=meta["metric"],
                            params=IndexParams.from_kwargs(meta.get("params", {})),
                            encoder_path=(meta.get("encoder") or {}).get("path"))
            except (KeyError, TypeError, ValueError) as e:
                raise IndexFormatError(f"{path}: invalid meta.json ({e})") from None
            enc_meta = meta.get("encoder") or {}
            index.encoder_config = enc_meta.get("config")
            if enc_meta.get("probe") is not None:
                index._probe = np.asarray(enc_meta["probe"], np.float32)
            index._next_id = int(meta["next_id"])
            for name in ("entries.json", "hidden.json"):
                if name not in names:
                    raise IndexFormatError(f"{path} is incomplete: {name} is missing")
            entries = json.loads(zf.read("entries.json"))
            index._paths = {int(i): p for i, p in entries}
            index._ids = {p: i for i, p in index._paths.items()}
            index._hidden = set(json.loads(zf.read("hidden.json")))
            if "index.faiss" in names:
                index._faiss_index = _read_faiss(zf, "index.faiss", meta, path)
                index._apply_search_params()
        if len(index._paths) != int(meta.get("count", len(index._paths))):
            raise IndexFormatError(f"{path}: meta.json says {meta['count']} entries, entries.json has "
                                   f"{len(index._paths)}")
        try:
            index.check()
        except IndexFormatError as e:
            raise IndexFormatError(f"{path} is corrupt: {e}") from None
        if encoder is not None:
            encoder, _ = cls._resolve_encoder(encoder, None)
            index.attach_encoder(encoder, check=check_encoder)
        elif load_encoder and index.encoder_path:
            index._load_recorded_encoder(path, check_encoder)
        return index

    def _load_recorded_encoder(self, index_path: Path, check: bool) -> None:
        ref = self.encoder_path
        candidates = [ref, os.path.join(index_path.parent, ref)] if not os.path.isabs(ref) else [ref]
        found = next((c for c in candidates if os.path.exists(c)), None)
        if found is None:
            log.warning("the encoder this index was built with (%s) was not found; image queries need "
                        "Index.load(..., encoder=...)", ref)
            return
        from .encoder import Encoder

        self.attach_encoder(Encoder.from_pretrained(found), check=check)


@contextmanager
def _blas_for_training(faiss: Any) -> Iterator[None]:
    """Let k-means use BLAS while training. Recent FAISS only switches to BLAS when
    ``n * d >= 128000``, which the 2-4-dimensional PQ sub-spaces never reach: PQ128 training
    on 40k vectors took 194 CPU-s instead of 12. The global is restored afterwards."""
    old = faiss.cvar.distance_compute_blas_threshold
    faiss.cvar.distance_compute_blas_threshold = 20  # FAISS's long-standing default (a query count)
    try:
        yield
    finally:
        faiss.cvar.distance_compute_blas_threshold = old


def _jsonable(v: Any) -> bool:
    try:
        json.dumps(v)
        return True
    except (TypeError, ValueError):
        return False


def _upgrade(meta: Any, path: Path) -> dict[str, Any]:
    """Check the format name and version; upgrade older versions through ``_MIGRATIONS``."""
    if not isinstance(meta, dict) or meta.get("format") != INDEX_FORMAT:
        raise IndexFormatError(f"{path}: meta.json does not describe an sslfeatures index "
                               f"(format {meta.get('format') if isinstance(meta, dict) else None!r})")
    version = meta.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise IndexFormatError(f"{path}: unknown index format version {version!r} (this sslfeatures reads "
                               f"versions 1 to {INDEX_FORMAT_VERSION})")
    if version > INDEX_FORMAT_VERSION:
        by = (meta.get("written_by") or {}).get("sslfeatures", "a newer release")
        raise IndexFormatError(f"{path} uses index format version {version}, written by sslfeatures {by}; this "
                               f"sslfeatures reads versions up to {INDEX_FORMAT_VERSION}: upgrade sslfeatures "
                               "to load it")
    while version < INDEX_FORMAT_VERSION:
        if version not in _MIGRATIONS:
            raise IndexFormatError(f"{path}: no reader for index format version {version}")
        meta = _MIGRATIONS[version](meta)
        version = meta["format_version"]
    return meta


def _json_bytes(obj: Any) -> bytes:
    """UTF-8 JSON; file names that are not valid Unicode (surrogate-escaped bytes of a
    non-UTF-8 name) are written as ``\\udcXX`` escapes, which ``json.loads`` restores."""
    try:
        return json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(obj, ensure_ascii=True).encode("ascii")


def _write_faiss(zf: zipfile.ZipFile, name: str, index: Any) -> None:
    """Stream a FAISS index into the archive (no full in-memory copy)."""
    faiss = _faiss()
    with zf.open(name, "w", force_zip64=True) as out:
        writer = faiss.PyCallbackIOWriter(out.write)
        faiss.write_index(index, writer)
        del writer


def _read_faiss(zf: zipfile.ZipFile, name: str, meta: dict[str, Any], path: Path) -> Any:
    faiss = _faiss()
    with zf.open(name) as fh:
        try:
            reader = faiss.PyCallbackIOReader(fh.read)
            index = faiss.read_index(reader)
            del reader
        except RuntimeError as e:
            written = (meta.get("written_by") or {}).get("faiss", "unknown")
            raise IndexFormatError(f"{path}: FAISS could not read {name} (written with faiss {written}, this is "
                                   f"faiss {faiss.__version__}): {str(e).splitlines()[0]}") from None
    return index


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


# -- embedding inputs -------------------------------------------------------------------------------
def _list_inputs(data: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Image paths from a folder (recursive, sorted), one image path, or a list of paths."""
    from .data import list_images

    if isinstance(data, (str, os.PathLike)):
        return [_key(p) for p in list_images(data)]
    files = [os.fspath(p) for p in data]
    if not files:
        raise ValueError("no images given")
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} image file(s) not found, e.g. {missing[:3]}")
    return [_key(f) for f in files]


def _embed_inputs(encoder: Any, data: Any, batch_size: int, progress: bool | None,
                  chunk: int = 2048, strict: bool = False) -> tuple[list[str], np.ndarray]:
    """Embed every image of ``data``; unreadable files are skipped with a warning.

    Works with any encoder exposing ``embed(list_of_paths)`` (torch or ONNX runtime). Images
    go in chunks of ``chunk`` with one progress bar; a chunk holding an unreadable file is
    embedded again without the files the encoder reported as unreadable (an encoder whose
    ``embed`` takes no ``report`` has the chunk split in halves until each bad file is
    isolated, about ``2 * log2(chunk)`` extra calls per bad file). Each skipped file is logged on one line and
    a summary follows; ``strict=True`` raises on the first unreadable file instead.
    """
    from tqdm.auto import tqdm

    from .data import BadFileReport
    from .data.decode import DecodeError

    files = _list_inputs(data)
    show = progress if progress is not None else len(files) > 4 * batch_size
    bar = tqdm(total=len(files), desc="indexing", unit="img", disable=not show, leave=False)
    kept: list[str] = []
    parts: list[np.ndarray] = []
    report = BadFileReport(strict=strict)

    def run(part: list[str]) -> None:
        found = BadFileReport(quiet=True)  # what the encoder saw in this part (when it can tell)
        try:
            parts.append(_call_embed(encoder, part, batch_size, report=found))
            kept.extend(part)
        except (DecodeError, OSError, ValueError) as e:
            if strict:
                if isinstance(e, DecodeError):
                    report.add(e.path, e.reason)  # raises, naming the file
                raise
            members = set(part)
            known = {f: r for f, r in found.entries.items() if f in members}
            if known:
                for f, reason in known.items():
                    report.add(f, reason)
                rest = [f for f in part if f not in known]
                if rest:
                    run(rest)
                return
            if len(part) == 1:
                report.add(part[0], getattr(e, "reason", str(e)))
                return
            half = len(part) // 2
            run(part[:half])
            run(part[half:])

    for s in range(0, len(files), chunk):
        run(files[s:s + chunk])
        bar.update(len(files[s:s + chunk]))
    bar.close()
    if len(report):
        log.warning(report.summary())
    if not kept:
        raise ValueError(f"none of the {len(files)} images could be embedded\n{report.summary()}")
    return kept, np.concatenate(parts).astype(np.float32, copy=False)
