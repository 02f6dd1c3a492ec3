"""The torch-free deployment kit (top-level ``export/``): its pre-processing is
sslfeatures' own, byte for byte, and it embeds and searches in a virtual environment that
has onnxruntime, numpy, Pillow and faiss-cpu and no torch."""
from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sslfeatures import Encoder
from sslfeatures.data import ImageFolder

KIT = Path(__file__).resolve().parents[1] / "export"
OFFLINE_MARKERS = ("Could not find a version", "No matching distribution", "NewConnectionError",
                   "Failed to establish a new connection", "Temporary failure in name resolution",
                   "Network is unreachable", "ConnectionError", "ReadTimeoutError", "ProxyError")


def _kit_module():
    spec = importlib.util.spec_from_file_location("sslfeatures_runtime", KIT / "sslfeatures_runtime.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["OMP_NUM_THREADS"] = "1"
    return env


@pytest.fixture(scope="session")
def kit_python(tmp_path_factory) -> Path:
    """A plain virtual environment (no system site-packages, so no torch) with the kit's
    requirements installed from the package registry; kept between runs under the user
    cache (keyed by requirements.txt and the Python version), or at $SSLFEATURES_KIT_VENV."""
    reqs = (KIT / "requirements.txt").read_text()
    key = hashlib.sha256(f"{reqs}{sys.version}".encode()).hexdigest()[:12]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sslfeatures-tests"
    venv = Path(os.environ.get("SSLFEATURES_KIT_VENV", cache / f"kit-venv-{key}"))
    python = venv / "bin" / "python"
    ready = venv / ".ready"
    if ready.exists() and python.exists():
        return python
    shutil.rmtree(venv, ignore_errors=True)
    venv.parent.mkdir(parents=True, exist_ok=True)
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", str(venv)], check=True, env=_clean_env(), timeout=300)
    res = subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", "-r",
                          str(KIT / "requirements.txt")], capture_output=True, text=True, env=_clean_env(),
                         timeout=900)
    if res.returncode != 0:
        shutil.rmtree(venv, ignore_errors=True)
        out = res.stdout + res.stderr
        if any(m in out for m in OFFLINE_MARKERS):
            pytest.skip(f"pip cannot reach the package registry to build the torch-free venv: {out[-500:]}")
        raise RuntimeError(f"pip install of the kit's requirements failed:\n{out[-3000:]}")
    ready.write_text(reqs)
    return python


def _run_kit(python: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**_clean_env(), "PYTHONPATH": str(KIT)}
    return subprocess.run([str(python), *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def _odd_images(root: Path, photos: list[np.ndarray]) -> Path:
    """Real photos stored the awkward ways users have them."""
    root.mkdir()
    a, b = photos[0], photos[1]
    Image.fromarray(a).save(root / "rgb.png")
    Image.fromarray(b).convert("L").save(root / "gray.jpg", quality=90)
    rgba = Image.fromarray(a).convert("RGBA")
    rgba.putalpha(Image.fromarray((np.arange(a.shape[1])[None, :] % 256).repeat(a.shape[0], 0).astype(np.uint8)))
    rgba.save(root / "alpha.png")
    Image.fromarray(b).convert("P", palette=Image.ADAPTIVE).save(root / "palette.gif")
    Image.fromarray(np.asarray(Image.fromarray(a).convert("L"), np.uint16) * 257).save(root / "sixteen.png")
    Image.fromarray(a).convert("CMYK").save(root / "cmyk.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees
    Image.fromarray(b[:200, :300]).save(root / "exif.jpg", exif=exif.tobytes())
    Image.fromarray(a[:20, :30]).save(root / "tiny.png")  # upscaled (bicubic path)
    return root


@pytest.mark.parametrize("size,crop_pct", [(32, 1.0), (56, 0.875)])
def test_kit_preprocessing_is_sslfeatures_preprocessing(tmp_path, photos, size, crop_pct):
    kit = _kit_module()
    folder = _odd_images(tmp_path / "imgs", photos)
    src = ImageFolder(folder, size=size, crop_pct=crop_pct)
    for i, path in enumerate(src.files):
        ref = src[i][0].permute(1, 2, 0).numpy()
        got = kit.load_and_crop(path, size, crop_pct)
        assert got.dtype == np.uint8 and got.shape == (size, size, 3)
        assert np.array_equal(got, ref), path.name
    enc = Encoder.random_init("resnet18", image_size=size, backbone_kwargs={"layers": [1, 1, 1, 1]})
    enc.config["crop_pct"] = crop_pct
    batch = np.stack([kit.load_and_crop(p, size, crop_pct) for p in src.files])
    import torch

    ref = enc._preprocess(torch.from_numpy(batch).permute(0, 3, 1, 2)).float().cpu().numpy()
    got = kit.normalise(batch, enc.config["mean"], enc.config["std"])
    assert np.array_equal(got, ref)
    with pytest.raises(kit.DecodeError, match="empty file"):
        (tmp_path / "empty.png").write_bytes(b"")
        kit.load_and_crop(tmp_path / "empty.png", size)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_images):
    enc = Encoder.random_init("resnet18", image_size=32, precision="fp32",
                              backbone_kwargs={"layers": [1, 1, 1, 1], "channels": [16, 32, 64, 128]})
    folder = tmp_path_factory.mktemp("kit_export")
    enc.export(folder, formats=["onnx"], quantize="int8", calibration=tiny_images, calibration_size=16,
               tolerances={"int8": __import__("sslfeatures.export", fromlist=["Tolerance"]).Tolerance(None, 0.5)})
    return enc, folder


def test_kit_runs_without_torch_and_matches_sslfeatures(kit_python, exported, tiny_images, tmp_path):
    enc, folder = exported
    probe = _run_kit(kit_python, "-c", "import importlib.util as u; print(u.find_spec('torch'), "
                     "u.find_spec('sslfeatures'))", cwd=tmp_path)
    assert probe.returncode == 0 and probe.stdout.split() == ["None", "None"], probe.stdout + probe.stderr
    res = _run_kit(kit_python, "-c", "import torch", cwd=tmp_path)
    assert res.returncode != 0 and "No module named 'torch'" in res.stderr
    # the command line: embed a folder, index it, query it
    res = _run_kit(kit_python, "-m", "sslfeatures_runtime", "embed", str(folder), str(tiny_images),
                   "--out", str(tmp_path / "feats.npy"), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    paths = (tmp_path / "feats.paths.txt").read_text().split()
    ref_paths, ref = enc.embed_folder(tiny_images)
    assert paths == [str(p) for p in ref_paths]
    feats = np.load(tmp_path / "feats.npy")
    assert feats.shape == ref.shape and np.abs(feats - ref).max() < 1e-4
    res = _run_kit(kit_python, "-m", "sslfeatures_runtime", "index", str(folder), str(tiny_images),
                   "--out", str(tmp_path / "index"), cwd=tmp_path)
    assert res.returncode == 0 and json.loads(res.stdout)["vectors"] == 48, res.stderr
    queries = [str(p) for p in ref_paths[:3]]
    res = _run_kit(kit_python, "-m", "sslfeatures_runtime", "--variant", "int8", "query", str(folder),
                   str(tmp_path / "index"), *queries, "--k", "3", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    hits = [json.loads(line) for line in res.stdout.splitlines()]
    assert [h["query"] for h in hits] == queries
    for h in hits:  # int8 query against the fp32 index: each photo still finds itself first
        assert len(h["hits"]) == 3 and h["hits"][0]["id"] == h["query"] and h["hits"][0]["score"] > 0.9
    # an index saved by sslfeatures' Index (HNSW, one entry removed) answers the same in the kit
    from sslfeatures import Index

    index = Index.from_vectors(ref, [str(p) for p in ref_paths], kind="hnsw")
    index.remove([str(ref_paths[1])])
    index.save(tmp_path / "photos.index")
    res = _run_kit(kit_python, "-m", "sslfeatures_runtime", "query", str(folder), str(tmp_path / "photos.index"),
                   *queries, "--k", "4", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    for line, q in zip(res.stdout.splitlines(), queries):
        got = json.loads(line)["hits"]
        want = index.search(ref[[str(p) for p in ref_paths].index(q)], k=4)
        assert [h["id"] for h in got] == [h.path for h in want]
        assert np.allclose([h["score"] for h in got], [h.score for h in want], atol=1e-4)
    # the Python API, with an unreadable file in the folder
    bad = tmp_path / "with_bad"
    shutil.copytree(tiny_images, bad)
    (bad / "broken.jpg").write_bytes(b"not an image")
    script = io.StringIO()
    script.write(
        "import json, sys, numpy as np\n"
        "from sslfeatures_runtime import OnnxEncoder, FaissIndex\n"
        f"enc = OnnxEncoder({str(folder)!r}, device='cpu')\n"
        f"paths, feats, skipped = enc.embed_folder({str(bad)!r}, batch_size=20)\n"
        "index = FaissIndex.build(feats, paths, metric='l2')\n"
        "top = index.search(enc.embed([str(paths[5])]), k=1)[0][0]\n"
        "print(json.dumps({'n': len(paths), 'dim': enc.num_features, 'skipped': skipped, 'top': top}))\n")
    res = _run_kit(kit_python, "-c", script.getvalue(), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["n"] == 48 and out["dim"] == enc.num_features
    assert list(out["skipped"]) == [str(bad / "broken.jpg")] and "not a recognised image format" in \
        out["skipped"][str(bad / "broken.jpg")]
    assert out["top"][0].endswith(ref_paths[5].name) and out["top"][1] < 1e-6
