"""Similarity-search benchmark (issue 6), in one run:

1. Retrieval precision@10 on real images: Fashion-MNIST test queries (the embedded demo
   split, 2,000) against the train set (10,000), same class = relevant; a pre-trained
   encoder (``--run``, or SimCLR pre-trained here for ``--epochs``) beside the same
   backbone at random init and raw pixels. Search goes through :class:`sslfeatures.Index`.
2. ANN speed and quality at ``--sizes`` (default 100k and 1M) vectors: build time, memory,
   queries/s and recall@10 of each index kind against exact numpy search (batched matmul +
   argpartition) on the same thread. The vectors are drawn from a Gaussian mixture *fitted
   to the pre-trained encoder's real embeddings* (256 components on the 12,000 L2-normalised
   demo embeddings, each a mean + its top-16 principal directions + isotropic residual), so
   they have the encoder's dimension and the low intrinsic dimension of real embeddings;
   queries are fresh draws from the same mixture (not in the index).

    python benchmarks/search.py --run demo_out/run          # the `make demo` run
    python benchmarks/search.py --epochs 2                  # pre-train SimCLR here first
    python benchmarks/search.py --sizes 100000 --kinds flat hnsw ivfpq

Every timing is measured on one thread (``--threads``); queries/s are given per CPU-second
of this process (robust to other load on the machine) and per wall-second. Writes
``benchmarks/out/search/results.json`` and prints the markdown tables of RESULTS.md.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
from demo import DEMO  # noqa: E402  (the `make demo` SimCLR settings for 28 px)

from sslfeatures import Encoder, Index, Pretrainer  # noqa: E402
from sslfeatures.data.demo import load_demo_arrays, write_demo_folders  # noqa: E402
from sslfeatures.utils import cpu_model  # noqa: E402


class Timer:
    """Wall-clock and process CPU seconds of a block."""

    def __enter__(self) -> Timer:
        self.w0, self.c0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.wall = time.perf_counter() - self.w0
        self.cpu = time.process_time() - self.c0


# -- 1. retrieval precision on real images -------------------------------------------------------
def precision_at_k(train: np.ndarray, ytr: np.ndarray, test: np.ndarray, yte: np.ndarray, k: int = 10,
                   ) -> dict[str, float]:
    """Fraction of the k nearest train images (cosine, exact Index) sharing the query's class."""
    index = Index.from_vectors(train, [f"train/{i}" for i in range(len(train))], kind="flat")
    _, ids = index.search_vectors(test, k)  # ids are the train rows: from_vectors numbers them in order
    same = ytr[ids] == yte[:, None]
    return {"p@10": float(same.mean()), "p@1": float(same[:, 0].mean())}


def embed(enc: Encoder, images: np.ndarray) -> np.ndarray:
    return enc.embed(images, batch_size=256, progress=False)


# -- 2. synthetic vectors --------------------------------------------------------------------------
class MixtureSampler:
    """A Gaussian mixture fitted to real embeddings: per k-means cell its mean, top-``rank``
    principal directions (with their standard deviations) and an isotropic residual."""

    def __init__(self, real: np.ndarray, components: int = 256, rank: int = 16, seed: int = 0):
        import faiss

        x = real / np.linalg.norm(real, axis=1, keepdims=True)
        d = x.shape[1]
        km = faiss.Kmeans(d, components, niter=20, seed=seed, verbose=False)
        km.train(x.astype(np.float32))
        _, lab = km.index.search(x.astype(np.float32), 1)
        self.parts: list[tuple[np.ndarray, np.ndarray, float]] = []
        weights = []
        for c in range(components):
            m = x[lab[:, 0] == c]
            if len(m) < rank + 2:
                continue
            mu = m.mean(0)
            _, s, vt = np.linalg.svd(m - mu, full_matrices=False)
            sd = s / np.sqrt(len(m) - 1)
            resid = float(np.sqrt(max((sd[rank:] ** 2).sum() / max(1, d - rank), 1e-10)))
            self.parts.append((mu.astype(np.float32), (vt[:rank] * sd[:rank, None]).astype(np.float32), resid))
            weights.append(len(m))
        self.weights = np.asarray(weights, float) / sum(weights)
        self.dim = d

    def sample(self, n: int, rng: np.random.Generator, chunk: int = 200_000) -> np.ndarray:
        out = np.empty((n, self.dim), np.float32)
        for s in range(0, n, chunk):
            m = min(chunk, n - s)
            counts = rng.multinomial(m, self.weights)
            rows = []
            for (mu, basis, resid), cnt in zip(self.parts, counts):
                if cnt:
                    z = rng.standard_normal((cnt, basis.shape[0]), dtype=np.float32)
                    rows.append(mu + z @ basis + resid * rng.standard_normal((cnt, self.dim), dtype=np.float32))
            block = np.concatenate(rows)
            rng.shuffle(block)
            out[s:s + m] = block / np.linalg.norm(block, axis=1, keepdims=True)
        return out


def exact_search(x: np.ndarray, q: np.ndarray, k: int = 10, chunk: int = 32) -> np.ndarray:
    """Exact cosine top-k by numpy: batched matmul + argpartition (the baseline)."""
    out = np.empty((len(q), k), np.int64)
    for s in range(0, len(q), chunk):
        sim = q[s:s + chunk] @ x.T
        part = np.argpartition(-sim, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(sim, part, 1), axis=1)
        out[s:s + chunk] = np.take_along_axis(part, order, 1)
    return out


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    k = truth.shape[1]
    return float(np.mean([len(set(f[:k].tolist()) & set(t.tolist())) / k for f, t in zip(found, truth)]))


def ann_rows(sampler: MixtureSampler, sizes: list[int], kinds: list[str], n_queries: int, hnsw_max: int,
             params: dict[str, dict], seed: int) -> list[dict]:
    rows = []
    for n in sizes:
        rng = np.random.default_rng(seed + n)
        with Timer() as t:
            x = sampler.sample(n, rng)
            q = sampler.sample(n_queries, rng)
        print(f"[{n:,}] sampled {x.shape} in {t.wall:.1f}s", flush=True)
        with Timer() as t:
            truth = exact_search(x, q)
        exact = {"size": n, "kind": "exact numpy", "build_s": 0.0, "memory_mb": x.nbytes / 2**20,
                 "qps_cpu": n_queries / t.cpu, "qps_wall": n_queries / t.wall, "recall@10": 1.0, "params": "-"}
        rows.append(exact)
        print(json.dumps(exact), flush=True)
        keys = [f"v{i}" for i in range(n)]
        for kind in kinds:
            if kind == "hnsw" and n > hnsw_max:
                print(f"[{n:,}] hnsw skipped (--hnsw-max {hnsw_max:,})", flush=True)
                continue
            with Timer() as tb:
                index = Index.from_vectors(x, keys, kind=kind, target_recall=0.95, **params.get(kind, {}))
            with Timer() as ts:
                _, found = index.search_vectors(q, 10)
            p = index.params
            desc = {"flat": "-",
                    "hnsw": f"M={p.hnsw_m}, efC={p.ef_construction}, ef_search={p.ef_search} (tuned)",
                    "ivfpq": f"nlist={p.nlist}, PQ{p.pq_m}x{p.nbits}, refine={p.refine}, nprobe={p.nprobe}, "
                             f"k_factor={p.k_factor} (tuned)"}[kind]
            row = {"size": n, "kind": kind, "build_s": tb.wall, "build_cpu_s": tb.cpu,
                   "memory_mb": index.memory_bytes() / 2**20, "qps_cpu": n_queries / ts.cpu,
                   "qps_wall": n_queries / ts.wall, "recall@10": recall_at_k(found, truth), "params": desc}
            row["speedup_cpu"] = row["qps_cpu"] / exact["qps_cpu"]
            rows.append(row)
            print(json.dumps(row), flush=True)
            del index
            gc.collect()
        del x
        gc.collect()
    return rows


def machine() -> str:
    cpu = cpu_model()
    load = os.getloadavg()
    return (f"{cpu}, {os.cpu_count()} cores, load average {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f} at the end, "
            f"Python {platform.python_version()}, torch {torch.__version__}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", help="a pre-trained run/exported encoder folder (default: pre-train SimCLR here)")
    ap.add_argument("--epochs", type=int, default=2, help="SimCLR epochs on the 10k demo images when no --run")
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--kinds", nargs="+", default=["flat", "hnsw", "ivfpq"], choices=["flat", "hnsw", "ivfpq"])
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--hnsw-max", dest="hnsw_max", type=int, default=1_000_000,
                    help="skip HNSW above this size (its build is the slow part on few cores)")
    ap.add_argument("--hnsw", default="{}", help='JSON of HNSW parameters, e.g. \'{"hnsw_m": 16}\'')
    ap.add_argument("--ivfpq", default="{}", help='JSON of IVF-PQ parameters, e.g. \'{"nlist": 2048}\'')
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/out/search")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    import faiss

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    arrays = load_demo_arrays()
    if args.run:
        run_dir = Path(args.run)
        encoder_note = f"--run {args.run}"
    else:
        folders = write_demo_folders(out / "data")
        with Timer() as t:
            run = Pretrainer("simclr", epochs=args.epochs, **DEMO).fit(
                folders["unlabeled"], output_dir=out / "run", overwrite=True)
        run_dir = run.output_dir
        encoder_note = f"SimCLR pre-trained here: {args.epochs} epochs, {run.steps} steps, {t.wall / 60:.1f} min"
    enc = Encoder.from_pretrained(run_dir, device="cpu")
    rnd = Encoder.random_init(DEMO["backbone"], image_size=DEMO["image_size"], stem=DEMO["stem"],
                              backbone_kwargs=DEMO["backbone_kwargs"], device="cpu")

    xtr, xte = arrays["x_train"], arrays["x_test"]
    ytr, yte = arrays["y_train"], arrays["y_test"]
    feats = {}
    precision = []
    for name, model in (("pre-trained (SimCLR)", enc), ("random init", rnd)):
        with Timer() as t:
            ftr, fte = embed(model, xtr), embed(model, xte)
        feats[name] = (ftr, fte)
        precision.append({"row": name, "dim": ftr.shape[1], **precision_at_k(ftr, ytr, fte, yte),
                          "embed_img_per_s": (len(xtr) + len(xte)) / t.wall})
        print(json.dumps(precision[-1]), flush=True)
    raw_tr = xtr.reshape(len(xtr), -1).astype(np.float32)
    raw_te = xte.reshape(len(xte), -1).astype(np.float32)
    precision.append({"row": "raw pixels", "dim": raw_tr.shape[1], **precision_at_k(raw_tr, ytr, raw_te, yte)})
    print(json.dumps(precision[-1]), flush=True)

    real = np.concatenate(feats["pre-trained (SimCLR)"])
    sampler = MixtureSampler(real, seed=args.seed)
    ann = ann_rows(sampler, args.sizes, args.kinds, args.queries, args.hnsw_max,
                   {"hnsw": json.loads(args.hnsw), "ivfpq": json.loads(args.ivfpq)}, args.seed)

    result = {"machine": machine(), "threads": args.threads, "encoder": encoder_note, "faiss": faiss.__version__,
              "precision": precision, "ann": ann, "minutes": (time.perf_counter() - t_start) / 60,
              "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")

    print(f"\n{result['machine']}; {args.threads} thread(s); faiss {faiss.__version__}; encoder: {encoder_note}; "
          f"total {result['minutes']:.1f} min, peak RSS {result['peak_rss_gb']:.1f} GB\n")
    print("| encoder | dim | precision@10 | precision@1 |\n|---|---|---|---|")
    for r in precision:
        print(f"| {r['row']} | {r['dim']} | {r['p@10']:.4f} | {r['p@1']:.4f} |")
    print("\n| vectors | index | parameters | build s (CPU s) | memory MB | QPS (CPU) | QPS (wall) | "
          "recall@10 | speed-up vs exact (CPU) |\n|---|---|---|---|---|---|---|---|---|")
    for r in ann:
        build = "-" if r["kind"] == "exact numpy" else f"{r['build_s']:.1f} ({r['build_cpu_s']:.1f})"
        speed = f"{r['speedup_cpu']:.1f}x" if "speedup_cpu" in r else "1x"
        print(f"| {r['size']:,} | {r['kind']} | {r['params']} | {build} | {r['memory_mb']:.0f} | "
              f"{r['qps_cpu']:,.0f} | {r['qps_wall']:,.0f} | {r['recall@10']:.4f} | {speed} |")


if __name__ == "__main__":
    main()
