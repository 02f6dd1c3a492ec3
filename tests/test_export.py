"""Export and deployment: ONNX parity across backbone families (dynamic and fixed shapes,
ViT position-embedding resampling), fp16/int8 variants, the onnxruntime-backed Encoder,
plain-timm loading without sslfeatures, the hub round trip offline, the model card, the CLI,
and the never-unpickle rule."""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from sslfeatures import Encoder  # noqa: E402
from sslfeatures.cli import main  # noqa: E402
from sslfeatures.encoder import UnsafeFileError  # noqa: E402
from sslfeatures.export import (OrtEncoder, ParityError, Tolerance, compare, make_session,  # noqa: E402
                                parity_batch, providers_for)

FAMILIES = {
    # name: (timm name, Encoder.random_init kwargs); all tiny, 32 px
    "resnet": ("resnet18", dict(backbone_kwargs={"layers": [1, 1, 1, 1], "channels": [16, 32, 64, 128]})),
    "vit": ("vit_tiny_patch16_224", dict(patch_size=8, backbone_kwargs={"depth": 1})),
    "vit_registers": ("vit_tiny_patch16_224", dict(patch_size=8, backbone_kwargs={"depth": 1, "registers": 4})),
    "convnextv2": ("convnextv2_atto", dict(backbone_kwargs={"depths": (1, 1, 1, 1)})),
    "efficientnet": ("test_efficientnet", {}),
}
LOOSE_INT8 = {"int8": Tolerance(max_rel_error=None, min_cosine=0.5)}  # random-init nets: measured, not asserted


def _encoder(family: str, seed: int = 0) -> Encoder:
    name, kw = FAMILIES[family]
    return Encoder.random_init(name, image_size=32, seed=seed, precision="fp32", **kw)


def _torch_out(enc: Encoder, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        t = torch.from_numpy(x)
        feats = enc.backbone.forward_features(t)
        return enc.backbone.pool(feats).numpy(), enc.backbone.tokens_from_features(feats).numpy()


@pytest.fixture(scope="module")
def exports(tmp_path_factory, tiny_images, labelled_images):
    """Each family exported once (safetensors + fp32 ONNX with patch tokens); the ResNet
    also with its fp16 and int8 variants and their k-NN cost."""
    out = {}
    for family in FAMILIES:
        enc = _encoder(family)
        folder = tmp_path_factory.mktemp(f"export_{family}")
        extra = dict(quantize=["fp16", "int8"], calibration=tiny_images, calibration_size=16,
                     tolerances=LOOSE_INT8, knn=labelled_images) if family == "resnet" else {}
        files = enc.export(folder, formats=["safetensors", "onnx"], patch_tokens=True, check_images=tiny_images,
                           **extra)
        out[family] = (enc, folder, files)
    return out


@pytest.mark.parametrize("family", list(FAMILIES))
def test_onnx_parity_dynamic_batch_and_size(exports, family, tiny_images):
    enc, folder, files = exports[family]
    cfg = json.loads((folder / "config.json").read_text())["onnx"]
    assert cfg["exporter"] == "torch.export" and cfg["dynamic_batch"] and cfg["dynamic_image_size"], cfg
    report = json.loads(files["report"].read_text())
    assert report["parity"] and all(p["passed"] for p in report["parity"])
    sess = make_session(files["onnx"], device="cpu")
    assert [d for d in sess.get_inputs()[0].shape] == ["batch", 3, "height", "width"]
    # independently of the export's own check: batch 1, 3 and a non-square size on real images
    for n, size in ((1, 32), (3, 32), (3, (48, 64))):
        x = parity_batch(enc, tiny_images, n, size)
        emb, tokens = sess.run(["embedding", "patch_tokens"], {"images": x})
        ref_emb, ref_tokens = _torch_out(enc, x)
        assert emb.shape == ref_emb.shape == (n, enc.num_features)
        assert tokens.shape == ref_tokens.shape and tokens.shape[1] > 0
        for got, ref in ((emb, ref_emb), (tokens, ref_tokens)):
            rep = compare(ref, got)
            assert rep.max_rel_error < 1e-3 and rep.min_cosine > 0.9999, (family, size, str(rep))
    if family.startswith("vit"):  # 48x64 px = 6x8 patches: the position embedding was resampled in the graph
        assert tokens.shape[1] == 6 * 8


def test_ort_encoder_has_the_encoder_api(exports, tiny_images, photos):
    enc, folder, files = exports["vit_registers"]
    ort = Encoder.from_pretrained(files["onnx"])
    assert isinstance(ort, OrtEncoder) and ort.providers == ["CPUExecutionProvider"]
    assert ort.num_features == enc.num_features and ort.image_size == 32
    a, b = ort.embed(tiny_images), enc.embed(tiny_images)
    assert a.shape == b.shape == (48, enc.num_features) and np.abs(a - b).max() < 1e-4
    assert np.abs(ort.embed(photos[:2]) - enc.embed(photos[:2])).max() < 1e-4   # arrays of any size
    assert np.abs(ort.patch_features(photos[0]) - enc.patch_features(photos[0])).max() < 1e-4
    assert np.abs(ort.embed(photos[0], pooling="mean") - enc.embed(photos[0], pooling="mean")).max() < 1e-4
    with pytest.raises(ValueError, match="pooling='cls' needs a re-export"):
        ort.embed(photos[0], pooling="cls")
    big = Encoder.from_pretrained(files["onnx"], image_size=48)  # a dynamic-size graph takes a test resolution
    enc.image_size = 48
    try:
        assert np.abs(big.embed(tiny_images) - enc.embed(tiny_images)).max() < 1e-4
    finally:
        enc.image_size = 32
    paths, feats = ort.embed_folder(tiny_images)
    assert len(paths) == 48 and feats.shape == (48, enc.num_features)
    with pytest.raises(TypeError, match="needs the PyTorch weights"):
        ort.export(folder / "again")
    # a folder with model.onnx + config.json and no safetensors loads as ORT too
    (folder / "model.safetensors").rename(folder / "weights.moved")
    try:
        assert isinstance(Encoder.from_pretrained(folder), OrtEncoder)
    finally:
        (folder / "weights.moved").rename(folder / "model.safetensors")
    assert providers_for("cpu") == ["CPUExecutionProvider"]
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        assert providers_for(None) == ["CPUExecutionProvider"]
        with pytest.raises(ValueError, match="onnxruntime-gpu"):
            providers_for("cuda")


def test_onnx_graph_of_another_kind_is_refused(tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, ["n", 4])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 4])
    graph = helper.make_graph([helper.make_node("Identity", ["images"], ["logits"])], "clf", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "model.onnx")
    _encoder("resnet").save_pretrained(tmp_path / "cfg")
    (tmp_path / "config.json").write_text((tmp_path / "cfg" / "config.json").read_text())
    with pytest.raises(ValueError, match="Classifier.load"):
        Encoder.from_pretrained(tmp_path / "model.onnx")


def test_fixed_size_export_is_explicit(tmp_path, tiny_images):
    enc = _encoder("vit")
    files = enc.export(tmp_path, formats=["onnx"], dynamic_size=False, check_images=tiny_images)
    cfg = json.loads((tmp_path / "config.json").read_text())["onnx"]
    assert cfg["dynamic_image_size"] is False and cfg["dynamic_batch"] and cfg["note"] == "fixed size requested"
    sess = make_session(files["onnx"], device="cpu")
    assert sess.get_inputs()[0].shape == ["batch", 3, 32, 32]
    x = parity_batch(enc, tiny_images, 2)
    assert compare(_torch_out(enc, x)[0], sess.run(["embedding"], {"images": x})[0]).min_cosine > 0.9999
    with pytest.raises(Exception, match="(?i)dimension|shape"):
        sess.run(["embedding"], {"images": parity_batch(enc, tiny_images, 2, 48)})
    assert "fixed image size 32" in (tmp_path / "README.md").read_text()
    with pytest.raises(ValueError, match="takes a fixed input size"):
        Encoder.from_pretrained(files["onnx"], image_size=48)


def test_fp16_int8_variants_and_their_knn_cost(exports, tiny_images):
    enc, folder, files = exports["resnet"]
    report = json.loads(files["report"].read_text())
    worst = json.loads(files["config"].read_text())["onnx"]["parity"]
    print("parity (worst per variant):", worst)
    print("k-NN top-1:", {k: v["top1"] for k, v in report["knn"].items() if isinstance(v, dict)})
    assert set(worst) == {"fp32", "fp16", "int8"}
    assert worst["fp16"]["min_cosine"] > 0.999 and worst["int8"]["min_cosine"] > 0.5
    assert 0 < worst["fp16"]["max_abs_error"] and 0 < worst["int8"]["max_abs_error"]  # really reduced precision
    x = parity_batch(enc, tiny_images, 4)
    for key in ("onnx_fp16", "onnx_int8"):
        ort = Encoder.from_pretrained(files[key])
        out = ort.embed(tiny_images)
        assert out.shape == (48, enc.num_features) and out.dtype == np.float32 and np.isfinite(out).all()
        assert ort.backbone(torch.from_numpy(x)).shape == (4, enc.num_features)
    knn = report["knn"]
    for key in ("torch", "onnx", "onnx_fp16", "onnx_int8"):
        assert 0.0 <= knn[key]["top1"] <= 1.0
    assert knn["onnx"]["top1_change"] == 0.0  # fp32 ONNX classifies exactly as PyTorch
    card = files["card"].read_text()
    assert "k-NN top-1" in card and "onnx_int8" in card
    assert json.loads((folder / "eval_results.json").read_text())["knn"]["torch"] == knn["torch"]


def test_export_fails_loudly_and_explains(tmp_path, tiny_images):
    enc = _encoder("resnet")
    with pytest.raises(ParityError, match="parity check failed.*cosine"):
        enc.export(tmp_path / "a", formats=["onnx"], dynamic_size=False, tolerances={"fp32": Tolerance(None, 1.5)})
    assert not (tmp_path / "a" / "model.onnx").exists()  # a file that failed its check is not left behind
    with pytest.raises(ValueError, match="calibration='folder/'"):
        enc.export(tmp_path / "b", formats=["onnx"], quantize="int8")
    with pytest.raises(ValueError, match="add 'onnx' to formats"):
        enc.export(tmp_path / "c", formats=["safetensors"], quantize="fp16")
    with pytest.raises(ValueError, match="unknown quantize option 'int4'"):
        enc.export(tmp_path / "d", formats=["onnx"], quantize="int4")
    with pytest.raises(ValueError, match="no images found"):
        (tmp_path / "empty").mkdir()
        enc.export(tmp_path / "e", formats=["onnx"], quantize="int8", calibration=tmp_path / "empty")


def test_parity_measures_and_judges():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((6, 16)).astype(np.float32)
    same = compare(ref, ref.copy())
    assert same.max_abs_error == 0 and same.min_cosine == pytest.approx(1.0) and same.passed
    flipped = ref.copy()
    flipped[2] *= -1  # one row pointing the other way
    rep = compare(ref, flipped, "int8")
    assert rep.min_cosine == pytest.approx(-1.0) and rep.mean_cosine == pytest.approx(4 / 6) and not rep.passed
    assert not compare(ref, np.full_like(ref, np.nan)).passed
    zeros = np.zeros((2, 4), np.float32)
    assert compare(zeros, zeros).passed and not compare(zeros, zeros + 1).passed
    with pytest.raises(ParityError, match="shape"):
        compare(ref, ref[:, :8])
    from sslfeatures.export import check_parity

    with pytest.raises(ParityError, match="mean cosine >= 0.95"):
        check_parity(ref, flipped, "int8")
    assert check_parity(ref, flipped, "int8", tolerance=Tolerance(None, -1.0)).passed


_TIMM_ONLY = r"""
import json, sys
sys.modules["sslfeatures"] = None          # any import of sslfeatures fails from here on
try:
    import sslfeatures
    raise SystemExit("sslfeatures is importable")
except ImportError:
    pass
import numpy as np, timm, torch
for folder in sys.argv[1:]:
    cfg = json.load(open(folder + "/config.json"))
    model = timm.create_model(cfg["architecture"], pretrained=True, num_classes=0,
                              pretrained_cfg_overlay=dict(file=folder + "/model.safetensors", custom_load=False),
                              **cfg["model_args"]).eval()
    local = timm.create_model("local-dir:" + folder, pretrained=True).eval()
    x = torch.from_numpy(np.load(folder + "/x.npy"))
    with torch.no_grad():
        np.save(folder + "/timm.npy", model(x).numpy())
        np.save(folder + "/local.npy", local(x).numpy())
    print("loaded", type(model).__name__, "sslfeatures imported:",
          any(m.startswith("sslfeatures") and sys.modules[m] is not None for m in sys.modules))
"""


def test_weights_load_in_plain_timm_without_sslfeatures(exports, tiny_images):
    families = ["resnet", "vit_registers"]
    for family in families:
        enc, folder, _ = exports[family]
        np.save(folder / "x.npy", parity_batch(enc, tiny_images, 3))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([sys.executable, "-c", _TIMM_ONLY, *(str(exports[f][1]) for f in families)],
                         capture_output=True, text=True, cwd=exports["resnet"][1],
                         env={**env, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.count("sslfeatures imported: False") == 2, res.stdout
    for family in families:
        enc, folder, _ = exports[family]
        ref = _torch_out(enc, np.load(folder / "x.npy"))[0]
        assert np.abs(np.load(folder / "timm.npy") - ref).max() < 1e-5
        assert np.abs(np.load(folder / "local.npy") - ref).max() < 1e-5


def test_small_stem_below_the_stride_exports_dynamic_but_not_for_timm(tmp_path):
    # 28 px with a stride-2 stem: smaller than timm's nominal total stride (32)
    enc = Encoder.random_init("resnet18", image_size=28, stem="small_s2", precision="fp32",
                              backbone_kwargs={"channels": [16, 32, 64, 128], "layers": [1, 1, 1, 1]})
    files = enc.export(tmp_path, formats=["safetensors", "onnx"])
    report = json.loads(files["report"].read_text())
    assert report["onnx"]["dynamic_image_size"] is True, report["onnx"]["note"]
    assert report["timm_compatible"] is False and "stem='small_s2'" in report["timm_note"]
    assert "architecture" not in json.loads(files["config"].read_text())
    assert "do not load in plain timm" in files["card"].read_text()


class LocalHub:
    """huggingface_hub.HfApi's upload surface, writing commits into a local hub cache laid
    out as huggingface_hub keeps it (models--org--name/{refs,snapshots}), so that
    ``from_pretrained(repo_id, revision=...)`` resolves them offline."""

    def __init__(self, cache: Path):
        self.cache, self.calls, self.n = cache, [], 0

    def create_repo(self, repo_id, repo_type="model", private=None, exist_ok=False):
        self.calls.append(("create_repo", repo_id, exist_ok))
        (self.cache / f"models--{repo_id.replace('/', '--')}" / "refs").mkdir(parents=True, exist_ok=True)

    def create_branch(self, repo_id, branch, repo_type="model", exist_ok=False):
        self.calls.append(("create_branch", repo_id, branch))

    def upload_folder(self, repo_id, folder_path, repo_type="model", revision=None, commit_message="",
                      create_pr=False):
        import shutil
        from types import SimpleNamespace

        self.n += 1
        oid = f"{self.n:040x}"
        repo = self.cache / f"models--{repo_id.replace('/', '--')}"
        shutil.copytree(folder_path, repo / "snapshots" / oid)
        (repo / "refs" / (revision or "main")).write_text(oid)
        self.calls.append(("upload_folder", repo_id, sorted(os.listdir(folder_path)), revision, commit_message))
        return SimpleNamespace(oid=oid, commit_message=commit_message)


def test_push_to_hub_round_trip_offline_with_revision_pinning(tmp_path, monkeypatch, tiny_images):
    hub = LocalHub(tmp_path / "hub")
    first, second = _encoder("resnet", seed=1), _encoder("resnet", seed=2)
    c1 = first.push_to_hub("acme/enc", api=hub, data_description="48 crops of scikit-image photos")
    c2 = second.push_to_hub("acme/enc", api=hub, formats=["safetensors", "onnx"], check_images=tiny_images,
                            dynamic_size=False)
    assert hub.calls[0] == ("create_repo", "acme/enc", True)
    uploaded = hub.calls[1][2]
    assert {"model.safetensors", "config.json", "README.md", "export_report.json"} <= set(uploaded)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    x = np.full((32, 32, 3), 100, np.uint8)
    latest = Encoder.from_pretrained("acme/enc", cache_dir=tmp_path / "hub")
    pinned = Encoder.from_pretrained("acme/enc", revision=c1.oid, cache_dir=tmp_path / "hub")
    assert np.array_equal(latest.embed(x), second.embed(x)) and np.array_equal(pinned.embed(x), first.embed(x))
    assert not np.allclose(latest.embed(x), pinned.embed(x))
    ort = OrtEncoder.from_pretrained("acme/enc", revision=c2.oid, cache_dir=tmp_path / "hub")
    assert np.abs(ort.embed(x) - second.embed(x)).max() < 1e-4
    card = (tmp_path / "hub" / "models--acme--enc" / "snapshots" / c1.oid / "README.md").read_text()
    assert "48 crops of scikit-image photos" in card and "hf-hub:acme/enc" in card
    # a branch is created for a non-main revision, and the commit goes there
    first.push_to_hub("acme/enc", api=hub, revision="v1")
    assert ("create_branch", "acme/enc", "v1") in hub.calls and hub.calls[-1][3] == "v1"
    with pytest.raises(ValueError, match="org/name"):
        first.push_to_hub("no-slash", api=hub)


def test_model_card_reads_the_run_folder(tmp_path):
    enc = _encoder("resnet")
    run = tmp_path / "run"
    enc.save_pretrained(run)
    cfg = json.loads((run / "config.json").read_text())
    cfg.update(method="simclr", paper="Chen et al. 2020, A Simple Framework for Contrastive Learning")
    (run / "config.json").write_text(json.dumps(cfg))
    (run / "train_config.json").write_text(json.dumps({"epochs": 7, "batch_size": 64, "optimizer": "lars"}))
    (run / "metrics.csv").write_text("step,epoch,loss\n10,0.5,5.1\n20,1.0,4.25\n")
    (run / "eval_results.json").write_text(json.dumps({"knn": {"torch": {"top1": 0.8125, "top5": 0.99}}}))
    files = Encoder.from_pretrained(run).export(tmp_path / "out", license="cc-by-4.0")
    card = files["card"].read_text()
    for text in ("license: cc-by-4.0", "# resnet18 pre-trained with simclr", "Chen et al. 2020", "| epochs | 7 |",
                 "20 / 4.25", "0.8125", "pretrained_cfg_overlay", "Not recorded by the run"):
        assert text in card, text


def test_cli_export_maps_flags_onto_the_api(tmp_path, monkeypatch):
    _encoder("resnet").save_pretrained(tmp_path / "run")
    seen = {}

    def fake_export(self, folder, formats=("safetensors",), quantize=None, **kw):
        seen.update(folder=folder, formats=formats, quantize=quantize, **kw)
        return {"onnx": Path(folder) / "model.onnx"}

    monkeypatch.setattr(Encoder, "export", fake_export)
    out = str(tmp_path / "exp")
    assert main(["export", str(tmp_path / "run"), "--safetensors", "--int8", "--fp16", "--out", out,
                 "--calibration", "cal/", "--patch-tokens", "--knn-train", "tr", "--knn-test", "te"]) == 0
    assert seen["formats"] == ["safetensors", "onnx"] and seen["quantize"] == ["int8", "fp16"]
    assert seen["calibration"] == "cal/" and seen["patch_tokens"] and seen["knn"] == ("tr", "te")
    assert seen["dynamic_size"] == "auto" and seen["folder"] == out
    assert main(["export", "--model", str(tmp_path / "run"), "--fixed-size", "--out", out]) == 0
    assert seen["formats"] == ["safetensors"] and seen["quantize"] is None and seen["dynamic_size"] is False
    assert main(["export", "--out", out]) == 2                        # no RUN
    assert main(["export", str(tmp_path / "run"), "--knn-train", "tr", "--out", out]) == 2


def test_cli_export_end_to_end(tmp_path):
    _encoder("resnet").save_pretrained(tmp_path / "run")
    out = tmp_path / "exp"
    assert main(["export", str(tmp_path / "run"), "--out", str(out), "--license", "mit"]) == 0
    assert {"model.safetensors", "config.json", "README.md", "export_report.json"} <= set(os.listdir(out))
    assert "license: mit" in (out / "README.md").read_text()


class _Boom:
    """A pickle that runs code when loaded: it creates a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_from_pretrained_never_unpickles_a_malicious_file(tmp_path):
    enc = _encoder("resnet")
    enc.save_pretrained(tmp_path / "e")
    marker = tmp_path / "pwned"
    for name in ("weights.bin", "weights.pt", "weights.pth", "weights.ckpt"):
        with open(tmp_path / "e" / name, "wb") as fh:
            pickle.dump(_Boom(marker), fh)
        with pytest.raises(UnsafeFileError, match="never unpickles files by default.*allow_pickle=True"):
            Encoder.from_pretrained(tmp_path / "e" / name)
        assert not marker.exists()
    # opting in loads tensors only: the payload is still refused, and nothing ran
    with pytest.raises(pickle.UnpicklingError):
        Encoder.from_pretrained(tmp_path / "e" / "weights.pt", allow_pickle=True)
    assert not marker.exists()
