"""sslfeatures.index: build / search / save / load / add / remove / dedup, the atomic save
under a simulated crash, format-version messages, metadata consistency, encoder checks."""
from __future__ import annotations

import json
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

faiss = pytest.importorskip("faiss")

from sslfeatures import Encoder, Index  # noqa: E402
from sslfeatures import index as index_mod  # noqa: E402
from sslfeatures.cli import main as cli_main  # noqa: E402
from sslfeatures.index import (EncoderMismatchError, IndexFormatError, IndexParams,  # noqa: E402
                               choose_kind)

TINY = dict(image_size=32, stem="small_s2", backbone_kwargs={"channels": [8, 16, 32, 64]}, device="cpu")


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory) -> Path:
    """A tiny ResNet encoder saved as a folder (so an index can record and reload it)."""
    folder = tmp_path_factory.mktemp("encoder")
    Encoder.random_init("resnet18", seed=0, **TINY).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def encoder(encoder_dir) -> Encoder:
    return Encoder.from_pretrained(encoder_dir, device="cpu")


@pytest.fixture(scope="module")
def built(encoder, tiny_images) -> Index:
    return Index.build(encoder, tiny_images, progress=False)


def _clustered(n: int, d: int = 32, centers: int = 20, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centers, d)).astype(np.float32) * 3
    return (c[rng.integers(0, centers, n)] + rng.standard_normal((n, d)).astype(np.float32)).astype(np.float32)


def _exact_ids(x: np.ndarray, q: np.ndarray, k: int, metric: str) -> np.ndarray:
    if metric == "cosine":
        xn = x / np.linalg.norm(x, axis=1, keepdims=True)
        qn = q / np.linalg.norm(q, axis=1, keepdims=True)
        return np.argsort(-(qn @ xn.T), axis=1)[:, :k]
    return np.argsort(((q[:, None] - x[None]) ** 2).sum(-1), axis=1)[:, :k]


# -- build and search ----------------------------------------------------------------------------
def test_build_records_paths_and_finds_each_image_first(built, tiny_images, encoder):
    files = sorted(str(p) for p in tiny_images.rglob("*.png"))
    assert len(built) == len(files) == 48
    assert built.kind == "flat" and built.metric == "cosine" and built.dim == encoder.num_features
    assert built.paths == [os.path.abspath(f) for f in files]
    query = files[7]
    hits = built.search(query, k=5)
    assert len(hits) == 5 and hits[0].path == os.path.abspath(query)
    assert hits[0].score == pytest.approx(1.0, abs=1e-4)
    assert all(hits[i].score >= hits[i + 1].score for i in range(4))
    # the same image as PIL, as an array, and as its embedding vector
    pil = Image.open(query)
    vec = encoder.embed([query])[0]
    for q in (pil, np.asarray(pil), vec):
        assert built.search(q, k=1)[0].path == os.path.abspath(query)
    # a batch of queries gives one list per query
    batch = built.search([files[0], files[1]], k=2)
    assert [b[0].path for b in batch] == [os.path.abspath(files[0]), os.path.abspath(files[1])]


def test_build_matches_exact_numpy_scores(built, encoder):
    x = built.vectors()
    assert x.shape == (48, built.dim)
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
    scores, ids = built.search_vectors(x[:4], k=3)
    exact = x[:4] @ x.T
    order = np.argsort(-exact, axis=1)[:, :3]
    np.testing.assert_array_equal(ids, np.asarray(sorted(built._paths))[order])
    np.testing.assert_allclose(scores, np.take_along_axis(exact, order, 1), atol=1e-5)


@pytest.mark.parametrize("kind,params", [("hnsw", {}), ("ivfpq", dict(nlist=16, pq_m=8, nbits=6))])
@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_approximate_kinds_reach_recall_after_tuning(kind, params, metric):
    data = _clustered(2100)
    x, q = data[:2000], data[2000:]                      # queries from the same distribution, not indexed
    index = Index.from_vectors(x, [f"v{i}" for i in range(len(x))], kind=kind, metric=metric,
                               target_recall=0.95, **params)
    assert index.kind == kind and len(index) == 2000
    truth = _exact_ids(x, q, 10, metric)
    _, ids = index.search_vectors(q, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, truth)])
    assert recall >= 0.9, (kind, metric, recall, index)


def test_l2_scores_are_euclidean_distances():
    x = _clustered(300, d=16)
    index = Index.from_vectors(x, [f"v{i}" for i in range(300)], kind="flat", metric="l2")
    scores, ids = index.search_vectors(x[:5] + 0.5, k=4)
    d = np.linalg.norm(x[ids] - (x[:5] + 0.5)[:, None], axis=-1)
    np.testing.assert_allclose(scores, d, rtol=1e-4, atol=1e-4)
    assert (np.diff(scores, axis=1) >= -1e-6).all()  # closest (smallest distance) first


def test_kind_is_chosen_by_size(monkeypatch):
    assert choose_kind(10) == "flat"
    assert choose_kind(index_mod.FLAT_MAX) == "hnsw"
    assert choose_kind(index_mod.HNSW_MAX) == "ivfpq"
    monkeypatch.setattr(index_mod, "FLAT_MAX", 100)
    x = _clustered(300)
    assert Index.from_vectors(x, [str(i) for i in range(300)], target_recall=None).kind == "hnsw"
    assert Index.from_vectors(x[:50], [str(i) for i in range(50)]).kind == "flat"
    # the override wins
    assert Index.from_vectors(x, [str(i) for i in range(300)], kind="flat").kind == "flat"


def test_clear_errors_for_user_mistakes(built, tmp_path):
    x = _clustered(100)
    names = [str(i) for i in range(100)]
    with pytest.raises(TypeError, match="unknown index parameter.*valid"):
        Index.from_vectors(x, names, kind="hnsw", ef_serch=32)
    with pytest.raises(ValueError, match="unknown index kind"):
        Index.from_vectors(x, names, kind="annoy")
    with pytest.raises(ValueError, match="unknown metric"):
        Index.from_vectors(x, names, metric="dot")
    with pytest.raises(ValueError, match="needs at least 256 vectors"):
        Index.from_vectors(x, names, kind="ivfpq", nlist=4)
    with pytest.raises(ValueError, match="100 vectors but 99 paths"):
        Index.from_vectors(x, names[:99])
    with pytest.raises(ValueError, match="dimensions, the index has"):
        built.search(np.zeros(7, np.float32))
    with pytest.raises(ValueError, match="k must be a positive integer"):
        built.search_vectors(built.vectors()[:1], k=0)
    plain = Index.from_vectors(x, names)
    with pytest.raises(ValueError, match="needs an encoder"):
        plain.search(np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(IsADirectoryError):
        plain.save(tmp_path)


# -- add / remove ----------------------------------------------------------------------------------
def test_add_skips_indexed_paths_and_remove_hides_them(encoder, tiny_images, tmp_path):
    part0 = tiny_images / "part0"
    index = Index.build(encoder, part0, progress=False)
    assert len(index) == 24
    assert index.add(tiny_images, progress=False) == 24       # only part1 is new
    assert index.add(tiny_images, progress=False) == 0        # nothing new
    assert len(index) == 48
    index.check()
    victim = sorted(index.paths)[3]
    vid = index.id_of(victim)
    assert index.remove(victim) == 1
    assert victim not in index and len(index) == 47
    assert all(h.path != victim for h in index.search(victim, k=47))
    with pytest.raises(KeyError, match="not in the index"):
        index.remove(victim)
    assert index.remove([victim], missing_ok=True) == 0
    assert index.remove(tiny_images / "part1") == 24          # a folder removes everything below it
    assert len(index) == 23 and all("part0" in p for p in index.paths)
    # re-adding gets a fresh id: ids are never reused
    assert index.add([victim], progress=False) == 1
    assert index.id_of(victim) != vid
    index.check()


def test_add_vectors_replace():
    x = _clustered(50)
    index = Index.from_vectors(x, [f"v{i}" for i in range(50)])
    with pytest.raises(ValueError, match="already indexed.*replace=True"):
        index.add_vectors(x[:1], ["v0"])
    index.add_vectors(x[10:11], ["v0"], replace=True)
    assert len(index) == 50
    top = index.search(x[10], k=2)
    assert {h.path for h in top} == {"v0", "v10"}
    index.check()


@pytest.mark.parametrize("kind,params", [("hnsw", {}), ("ivfpq", dict(nlist=8, pq_m=8, nbits=6))])
def test_removal_is_hidden_then_compacted(kind, params):
    x = _clustered(400)
    names = [f"v{i}" for i in range(400)]
    index = Index.from_vectors(x, names, kind=kind, target_recall=None, **params)
    ids_before = {n: index.id_of(n) for n in names}
    index.remove(names[:50])                                   # 12.5%: hidden, not yet dropped
    assert index._faiss_index.ntotal == 400 and len(index._hidden) == 50
    _, found = index.search_vectors(x[:50], 10)
    assert not set(found.ravel().tolist()) & {ids_before[n] for n in names[:50]}
    assert (found >= 0).all()                                  # still k results each
    index.remove(names[50:100])                                # 25% > COMPACT_FRACTION: dropped
    assert index._faiss_index.ntotal == 300 and not index._hidden
    assert all(index.id_of(n) == ids_before[n] for n in names[100:])   # ids survive the rebuild
    assert index.search(x[150], k=1)[0].path == "v150"
    index.check()


def test_ivfpq_without_reranking_deletes_in_place():
    x = _clustered(400)
    index = Index.from_vectors(x, [f"v{i}" for i in range(400)], kind="ivfpq", refine="none", nlist=8, pq_m=8,
                               nbits=6, nprobe=8, target_recall=None)
    index.remove([f"v{i}" for i in range(10)])
    assert index._faiss_index.ntotal == 390 and not index._hidden
    _, found = index.search_vectors(x[:10], 5)
    assert not set(found.ravel().tolist()) & set(range(10))
    index.check()


# -- near-duplicates ---------------------------------------------------------------------------------
def test_near_duplicates_finds_copies_and_recompressed_images(encoder, tiny_images, tmp_path):
    folder = tmp_path / "photos"
    shutil.copytree(tiny_images, folder)
    originals = sorted(folder.rglob("*.png"))
    shutil.copy(originals[0], folder / "copy_of_0.png")
    Image.open(originals[5]).save(folder / "recompressed_5.jpg", quality=90)
    index = Index.build(encoder, folder, progress=False)
    dups = index.near_duplicates(threshold=0.97)
    pairs = {frozenset((Path(d.a).name, Path(d.b).name)) for d in dups}
    assert frozenset((originals[0].name, "copy_of_0.png")) in pairs
    assert frozenset((originals[5].name, "recompressed_5.jpg")) in pairs
    exact = [d for d in dups if {Path(d.a).name, Path(d.b).name} == {originals[0].name, "copy_of_0.png"}][0]
    assert exact.score == pytest.approx(1.0, abs=1e-4)
    assert all(d.score >= 0.97 for d in dups)
    assert [d.score for d in dups] == sorted((d.score for d in dups), reverse=True)
    # groups: connected pairs, the first-indexed image first
    groups = index.duplicate_groups(threshold=0.9999)
    group = next(g for g in groups if any(p.endswith("copy_of_0.png") for p in g))
    assert {originals[0].name, "copy_of_0.png"} <= {os.path.basename(p) for p in group}
    assert group[0] == min(group, key=index.id_of)
    assert all(len(groups[i]) >= len(groups[i + 1]) for i in range(len(groups) - 1))


# -- save / load -------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,params", [("flat", {}), ("hnsw", {}), ("ivfpq", dict(nlist=8, pq_m=4, nbits=6))])
def test_save_load_roundtrip_keeps_vectors_and_metadata(kind, params, tmp_path):
    x = _clustered(600, d=16)
    names = [f"item/{i}" for i in range(600)]
    index = Index.from_vectors(x, names, kind=kind, **params)
    index.remove(names[:10])
    path = index.save(tmp_path / "v.index")
    back = Index.load(path)
    assert (back.kind, back.metric, back.dim, len(back)) == (kind, "cosine", 16, 590)
    assert back.paths == index.paths and back.params == index.params
    assert all(back.id_of(n) == index.id_of(n) for n in names[10:])
    s1, i1 = index.search_vectors(x[:40], 5)
    s2, i2 = back.search_vectors(x[:40], 5)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_allclose(s1, s2, atol=1e-6)
    assert back.add_vectors(x[:10], names[:10]) == 10 and len(back) == 600
    back.check()
    with zipfile.ZipFile(path) as zf:
        meta = json.loads(zf.read("meta.json"))
    assert meta["format"] == "sslfeatures.index" and meta["format_version"] == index_mod.INDEX_FORMAT_VERSION
    assert meta["count"] == 590 and meta["written_by"]["faiss"] == faiss.__version__


@pytest.mark.parametrize("kind,params,metric", [("flat", {}, "cosine"), ("hnsw", {}, "l2"),
                                                 ("ivfpq", dict(nlist=8, pq_m=4, nbits=6), "cosine")])
def test_torch_free_kit_searches_a_saved_index_like_index_search(kind, params, metric, tmp_path):
    """export/sslfeatures_runtime.py (faiss + numpy only) reads an Index.save file, search
    parameters and removed-but-hidden entries included, and returns Index.search's hits."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "sslfeatures_runtime", Path(__file__).resolve().parents[1] / "export" / "sslfeatures_runtime.py")
    kit = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(kit)
    x = _clustered(600, d=16)
    names = [f"item/{i}" for i in range(600)]
    index = Index.from_vectors(x, names, kind=kind, metric=metric, **params)
    index.remove(names[:20])
    path = index.save(tmp_path / "v.index")
    saved = kit.FaissIndex.load(path)
    assert isinstance(saved, kit.SavedIndex) and len(saved) == 580 and saved.metric == metric
    q = x[:40] + 0.01
    want = [index.search(v, k=5) for v in q]
    got = saved.search(q, k=5)
    for w, g in zip(want, got):
        assert [h.path for h in w] == [p for p, _ in g]
        np.testing.assert_allclose([h.score for h in w], [s for _, s in g], atol=1e-5)
    assert not {p for row in got for p, _ in row} & set(names[:20])
    with pytest.raises(ValueError, match="not an sslfeatures index"):
        (tmp_path / "junk.index").write_bytes(b"junk")
        kit.FaissIndex.load(tmp_path / "junk.index")


def test_load_reloads_the_recorded_encoder(encoder_dir, tiny_images, tmp_path):
    index = Index.build(str(encoder_dir), tiny_images, progress=False)
    assert index.encoder_path == os.path.abspath(encoder_dir)
    path = index.save(tmp_path / "photos.index")
    back = Index.load(path)
    assert back.encoder is not None and back.encoder_config["image_size"] == 32
    query = sorted(tiny_images.rglob("*.png"))[11]
    assert back.search(query, k=1)[0].path == os.path.abspath(query)
    # without the encoder: vector search still works, image search says what is missing
    bare = Index.load(path, load_encoder=False)
    assert bare.search(back.vectors([query])[0], k=1)[0].path == os.path.abspath(query)
    with pytest.raises(ValueError, match="needs an encoder.*encoder="):
        bare.search(query)


def test_encoder_mismatch_is_refused(built, tmp_path):
    path = built.save(tmp_path / "photos.index")
    other = Encoder.random_init("resnet18", seed=1, **TINY)                   # same config, other weights
    with pytest.raises(EncoderMismatchError, match="probe image"):
        Index.load(path, encoder=other)
    bigger = Encoder.random_init("resnet18", seed=0, **dict(TINY, image_size=48))
    with pytest.raises(EncoderMismatchError, match="image_size"):
        Index.load(path, encoder=bigger)
    wider = Encoder.random_init("resnet18", seed=0, **dict(TINY, backbone_kwargs={"channels": [8, 16, 32, 96]}))
    with pytest.raises(EncoderMismatchError, match="96 dimensions"):
        Index.load(path, encoder=wider)
    assert Index.load(path, encoder=other, check_encoder=False).encoder is other


def test_save_is_atomic_under_a_crash(monkeypatch, tmp_path):
    x = _clustered(200)
    index = Index.from_vectors(x[:100], [f"v{i}" for i in range(100)])
    path = index.save(tmp_path / "v.index")
    before = path.read_bytes()
    index.add_vectors(x[100:], [f"v{i}" for i in range(100, 200)])

    def crash(zf, name, faiss_index):
        with zf.open(name, "w") as fh:
            fh.write(b"\0" * 1000)              # part of the file is written ...
        raise OSError("disk full")                # ... then the process dies

    monkeypatch.setattr(index_mod, "_write_faiss", crash)
    with pytest.raises(OSError, match="disk full"):
        index.save(path)
    assert path.read_bytes() == before            # the previous index is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.index"]   # no temporary file left
    assert len(Index.load(path)) == 100
    monkeypatch.undo()
    index.save(path)
    assert len(Index.load(path)) == 200


def _rewrite(path: Path, out: Path, meta_update: dict | None = None, drop: str | None = None,
             replace: dict[str, bytes] | None = None) -> Path:
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(out, "w") as dst:
        for name in src.namelist():
            if name == drop:
                continue
            data = src.read(name)
            if name == "meta.json" and meta_update:
                data = json.dumps({**json.loads(data), **meta_update}).encode()
            if replace and name in replace:
                data = replace[name]
            dst.writestr(name, data)
    return out


def test_format_version_and_corrupt_files_say_why(tmp_path):
    x = _clustered(60)
    path = Index.from_vectors(x, [f"v{i}" for i in range(60)]).save(tmp_path / "v.index")
    future = _rewrite(path, tmp_path / "future.index", {"format_version": 99, "written_by": {"sslfeatures": "9.0"}})
    with pytest.raises(IndexFormatError, match=r"format version 99.*sslfeatures 9\.0.*up to 1.*upgrade"):
        Index.load(future)
    with pytest.raises(IndexFormatError, match="unknown index format version 'x'"):
        Index.load(_rewrite(path, tmp_path / "odd.index", {"format_version": "x"}))
    with pytest.raises(IndexFormatError, match="does not describe an sslfeatures index"):
        Index.load(_rewrite(path, tmp_path / "other.index", {"format": "something-else"}))
    with pytest.raises(IndexFormatError, match="without meta.json"):
        Index.load(_rewrite(path, tmp_path / "nometa.index", drop="meta.json"))
    raw = tmp_path / "raw.faiss"
    faiss.write_index(faiss.IndexFlatL2(4), str(raw))
    with pytest.raises(IndexFormatError, match="not an sslfeatures index.*faiss.read_index"):
        Index.load(raw)
    with pytest.raises(FileNotFoundError):
        Index.load(tmp_path / "missing.index")
    # metadata out of step with the vectors
    entries = json.loads(zipfile.ZipFile(path).read("entries.json"))
    short = _rewrite(path, tmp_path / "short.index", {"count": 59},
                     replace={"entries.json": json.dumps(entries[:-1]).encode()})
    with pytest.raises(IndexFormatError, match="corrupt.*59 entries.*60"):
        Index.load(short)
    with pytest.raises(IndexFormatError, match="FAISS could not read index.faiss"):
        Index.load(_rewrite(path, tmp_path / "bad.index", replace={"index.faiss": b"garbage"}))


def test_older_format_versions_are_upgraded(monkeypatch, tmp_path):
    x = _clustered(30)
    path = Index.from_vectors(x, [f"v{i}" for i in range(30)]).save(tmp_path / "v.index")
    monkeypatch.setattr(index_mod, "INDEX_FORMAT_VERSION", 2)
    with pytest.raises(IndexFormatError, match="no reader for index format version 1"):
        Index.load(path)
    monkeypatch.setitem(index_mod._MIGRATIONS, 1, lambda m: {**m, "format_version": 2})
    assert len(Index.load(path)) == 30


# -- inputs -----------------------------------------------------------------------------------------
def test_unreadable_files_are_skipped(encoder, tiny_images, tmp_path, caplog):
    folder = tmp_path / "mixed"
    shutil.copytree(tiny_images / "part0", folder)
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    index = Index.build(encoder, folder, progress=False)
    assert len(index) == 24 and str(folder / "broken.png") not in index
    assert "broken.png" in caplog.text


class _NumpyEncoder:
    """A torch-free encoder with the duck-typed interface Index relies on (as the
    onnxruntime encoder has): ``embed(list_of_images) -> (N, D)`` and ``config``."""

    config = {"backbone": {"name": "colour-histogram"}, "image_size": 16, "mean": [0, 0, 0], "std": [1, 1, 1]}

    def embed(self, items, batch_size=64):
        out = []
        for it in items:
            img = Image.open(it) if isinstance(it, (str, os.PathLike)) else (
                Image.fromarray(it) if isinstance(it, np.ndarray) else it)
            a = np.asarray(img.convert("RGB").resize((16, 16)), np.float32) / 255
            out.append(np.concatenate([a.mean((0, 1)), a.std((0, 1)), a[::4, ::4].mean(-1).ravel()]))
        return np.stack(out)


def test_duck_typed_encoder_without_torch_api(tiny_images, tmp_path):
    enc = _NumpyEncoder()
    index = Index.build(enc, tiny_images, progress=False, encoder_path="histogram-encoder")
    query = sorted(tiny_images.rglob("*.png"))[20]
    assert index.search(str(query), k=1)[0].path == os.path.abspath(query)
    path = index.save(tmp_path / "h.index")
    back = Index.load(path, encoder=enc)
    assert back.encoder_path == "histogram-encoder"
    assert back.search(str(query), k=1)[0].path == os.path.abspath(query)


def test_onnx_runtime_encoder(encoder, encoder_dir, tiny_images, tmp_path):
    pytest.importorskip("onnxruntime")
    export = pytest.importorskip("sslfeatures.export")
    files = export.export_encoder(encoder, tmp_path / "exported", formats=["onnx"], card=False, dynamic_size=False,
                                  check_images=sorted(tiny_images.rglob("*.png"))[:2], n_check=2)
    ort = Encoder.from_pretrained(files["onnx"])
    assert type(ort).__name__ == "OrtEncoder"
    index = Index.build(ort, tiny_images, progress=False)
    assert index.encoder_path == os.path.abspath(files["onnx"])
    path = index.save(tmp_path / "ort.index")
    back = Index.load(path)                                       # reloads the ONNX encoder
    assert type(back.encoder).__name__ == "OrtEncoder"
    torch_index = Index.load(path, encoder=encoder)               # the torch encoder passes the probe check
    query = sorted(tiny_images.rglob("*.png"))[30]
    via_ort, via_torch = back.search(query, k=3), torch_index.search(query, k=3)
    assert via_ort[0].path == via_torch[0].path == os.path.abspath(query)
    np.testing.assert_allclose([h.score for h in via_ort], [h.score for h in via_torch], atol=1e-3)


# -- command line ---------------------------------------------------------------------------------------
def test_cli_index_build_add_search_dedup_remove(encoder_dir, tiny_images, tmp_path, capsys):
    out = tmp_path / "photos.index"
    assert cli_main(["index", "build", "--model", str(encoder_dir), "--data", str(tiny_images / "part0"),
                     "--out", str(out), "--set", "seed=3"]) == 0
    built = json.loads(capsys.readouterr().out)
    assert built["entries"] == 24 and built["kind"] == "flat"
    assert cli_main(["index", "add", "--index", str(out), "--data", str(tiny_images)]) == 0
    assert json.loads(capsys.readouterr().out)["added"] == 24
    query = str(sorted((tiny_images / "part1").glob("*.png"))[2])
    assert cli_main(["index", "search", "--index", str(out), "--query", query, "--k", "3"]) == 0
    hits = json.loads(capsys.readouterr().out)[query]
    assert len(hits) == 3 and hits[0]["path"] == os.path.abspath(query)
    assert cli_main(["index", "dedup", "--index", str(out), "--threshold", "0.999", "--groups",
                     "--out", str(tmp_path / "dups.json")]) == 0
    capsys.readouterr()
    assert json.loads((tmp_path / "dups.json").read_text()) == Index.load(out).duplicate_groups(0.999)
    assert cli_main(["index", "dedup", "--index", str(out), "--threshold", "0.999"]) == 0
    pairs = json.loads(capsys.readouterr().out)
    assert pairs and all(p["score"] >= 0.999 and p["a"] != p["b"] for p in pairs)
    assert cli_main(["index", "remove", "--index", str(out), "--paths", query]) == 0
    assert json.loads(capsys.readouterr().out)["entries"] == 47
    assert cli_main(["index", "remove", "--index", str(out), "--paths", query]) == 2
    assert "--missing-ok" in capsys.readouterr().err
    assert cli_main(["index", "build", "--model", str(encoder_dir), "--data", str(tiny_images),
                     "--out", str(tmp_path / "x.index"), "--set", "nlist=oops"]) == 2
    assert "nlist must be a positive integer" in capsys.readouterr().err


def test_index_params_validation():
    with pytest.raises(ValueError, match="refine must be one of"):
        IndexParams.from_kwargs({"refine": "pq"})
    with pytest.raises(ValueError, match="ef_search must be a positive integer"):
        IndexParams.from_kwargs({"ef_search": 0})
