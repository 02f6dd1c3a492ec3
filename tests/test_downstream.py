"""Downstream evaluations: classifier heads on frozen encoders (train, predict, calibrate,
save/load, one-graph ONNX export checked in onnxruntime), seeded class-balanced few-shot
sampling and curves, clustering metrics against scikit-learn and hand counts, fine-tuning,
and the CLI commands."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import sslfeatures
from sslfeatures import Encoder
from sslfeatures.cli import main
from sslfeatures.eval import (Classifier, adjusted_rand_index, cluster_features, clustering_metrics,
                              few_shot_from_features, kmeans, normalized_mutual_info, purity, sample_fraction,
                              sample_per_class, stratified_split)
from sslfeatures.eval.classifier import expected_calibration_error, fit_temperature
from sslfeatures.eval.finetune import _layer_decay_groups, _Net

TINY = dict(stem="small_s2", backbone_kwargs={"channels": [8, 16, 32, 64]})


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """These tests run many tiny ops (heads, L-BFGS): one thread is faster than two, and
    does not stall when the cores are shared."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def encoder() -> Encoder:
    return Encoder.random_init("resnet18", image_size=32, device="cpu", precision="fp32", **TINY)


@pytest.fixture(scope="module")
def linear_clf(encoder, labelled_images) -> Classifier:
    return encoder.fit_classifier(labelled_images[0], head="linear", val_fraction=0.25, epochs=100)


def _blobs(n_per_class: int, seed: int, classes: int = 4, dim: int = 16, spread: float = 1.0):
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(123).normal(size=(classes, dim)) * 4
    y = np.repeat(np.arange(classes), n_per_class)
    return (centres[y] + spread * rng.normal(size=(len(y), dim))).astype(np.float32), y


# -- sampling ------------------------------------------------------------------------------
def test_few_shot_sampling_is_seeded_class_balanced_and_nested():
    y = np.array([0] * 20 + [1] * 7 + [2] * 12 + [3] * 5)
    a = sample_per_class(y, 4, seed=3)
    assert np.array_equal(a, sample_per_class(y, 4, seed=3))            # seeded
    assert np.bincount(y[a]).tolist() == [4, 4, 4, 4]                     # class-balanced
    assert len(np.unique(a)) == len(a)                                    # no repeats
    assert not np.array_equal(a, sample_per_class(y, 4, seed=4))          # seeds differ
    assert set(sample_per_class(y, 2, seed=3)) <= set(a)                  # nested over shots
    with pytest.raises(ValueError, match="only"):
        sample_per_class(y, 6, seed=0)                                    # class 3 has 5
    f = sample_fraction(y, 0.5, seed=1)
    assert np.bincount(y[f]).tolist() == [10, 4, 6, 2]                    # round(0.5 * n), per class
    assert set(sample_fraction(y, 0.1, seed=1)) <= set(f)
    assert np.bincount(y[sample_fraction(y, 0.01, seed=1)]).tolist() == [1, 1, 1, 1]   # >= 1 per class
    keep, held = stratified_split(y, 0.2, seed=0)
    assert sorted(np.concatenate([keep, held]).tolist()) == list(range(len(y)))
    assert np.bincount(y[held]).tolist() == [4, 1, 2, 1]


# -- few-shot curves -----------------------------------------------------------------------
def test_few_shot_curve_on_known_features(tmp_path):
    xtr, ytr = _blobs(40, 0, spread=3.0)
    xte, yte = _blobs(50, 1, spread=3.0)
    curve = few_shot_from_features(xtr, ytr, xte, yte, shots=[1, 4, 32, 64], seeds=3)
    assert curve.shots == [1, 4, 32] and curve.skipped == [64]            # 64 > 40 per class
    assert curve.accuracies.shape == (3, 3)
    assert curve.mean[-1] > 0.9 and curve.mean[-1] >= curve.mean[0]       # more shots, better
    assert curve.std[0] > 0                                               # seeds do differ at 1 shot
    again = few_shot_from_features(xtr, ytr, xte, yte, shots=[1, 4, 32], seeds=3)
    assert np.array_equal(curve.accuracies, again.accuracies)             # reproducible
    shuffled = few_shot_from_features(xtr, np.random.default_rng(0).permutation(ytr), xte, yte, shots=[32], seeds=2)
    assert shuffled.mean[0] < 0.6                                         # shuffled labels: near chance
    for clf in ("centroid", "knn"):
        assert few_shot_from_features(xtr, ytr, xte, yte, shots=[8], seeds=2, classifier=clf).mean[0] > 0.8
    assert curve.plot(tmp_path / "fs.png").stat().st_size > 1000
    assert "| 32 |" in curve.table()


def test_few_shot_on_a_labelled_folder(encoder, labelled_images):
    train, test = labelled_images
    curve = sslfeatures.evaluate.few_shot(encoder, train, test=test, shots=[1, 2, 8], seeds=2)
    assert curve.n_test == 12 and curve.classes == ["class_0", "class_1", "class_2", "class_3"]
    raw = sslfeatures.evaluate.few_shot("raw", train, shots=[1, 4], seeds=2)   # held-out 20 % of train
    assert raw.n_test == 8 and np.all((raw.mean >= 0) & (raw.mean <= 1))


# -- clustering ----------------------------------------------------------------------------
def test_clustering_metrics_by_hand_and_against_sklearn():
    t, p = [0, 0, 1, 1], [0, 0, 0, 1]
    assert purity(t, p) == pytest.approx(0.75)               # cluster 0 -> class 0 (2), cluster 1 -> class 1 (1)
    # ARI by hand: sum C(n_ij,2) = 1, rows 1 + 1, columns 3 + 0, C(4,2) = 6
    exp = 2 * 3 / 6
    assert adjusted_rand_index(t, p) == pytest.approx((1 - exp) / ((2 + 3) / 2 - exp))
    assert clustering_metrics([0, 0, 1, 1], [1, 1, 0, 0]) == {"nmi": 1.0, "ari": 1.0, "purity": 1.0}
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    for _ in range(5):
        a, b = rng.integers(0, 5, 200), rng.integers(0, 7, 200)
        b[:100] = a[:100]
        assert normalized_mutual_info(a, b) == pytest.approx(metrics.normalized_mutual_info_score(a, b), abs=1e-10)
        assert adjusted_rand_index(a, b) == pytest.approx(metrics.adjusted_rand_score(a, b), abs=1e-10)


def test_kmeans_recovers_separated_blobs_and_is_seeded():
    x, y = _blobs(30, 0, spread=0.3)
    res = cluster_features(x, y, normalize=False)
    assert res.n_clusters == 4 and res.nmi == pytest.approx(1.0) and res.purity == 1.0
    a1, _, i1 = kmeans(x, 3, n_init=2, seed=5)
    a2, _, i2 = kmeans(x, 3, n_init=2, seed=5)
    assert np.array_equal(a1, a2) and i1 == i2
    noise = np.random.default_rng(1).normal(size=(120, 16))
    assert cluster_features(noise, y).nmi < 0.2                           # no structure, low NMI


def test_cluster_on_a_folder_with_picture(encoder, labelled_images, tmp_path):
    res = sslfeatures.evaluate.cluster(encoder, labelled_images[0], picture=tmp_path / "p.png", projection="pca")
    assert 0 <= res.nmi <= 1 and -1 <= res.ari <= 1 and 0.25 <= res.purity <= 1
    assert res.picture.stat().st_size > 1000 and len(res.assignments) == 32


# -- classifier heads ----------------------------------------------------------------------
def test_linear_and_mlp_heads_train_and_predict_on_real_images(encoder, linear_clf, labelled_images, photos):
    train, test = labelled_images
    assert linear_clf.classes == ["class_0", "class_1", "class_2", "class_3"]
    assert linear_clf.metrics["n_train"] == 24 and linear_clf.metrics["n_val"] == 8
    # the four classes are crops of four different photos: a head on frozen features separates them
    assert linear_clf.evaluate(train)["top1"] >= 0.9
    res = linear_clf.evaluate(test)
    assert res["top1"] >= 0.5 and res["n"] == 12
    mlp = encoder.fit_classifier(train, head="mlp", hidden_dim=64, val_fraction=0.25, epochs=60)
    assert mlp.head_kind == "mlp" and mlp.evaluate(train)["top1"] >= 0.9
    files = sorted(test.rglob("*.jpg"))
    preds = linear_clf.predict(files)
    assert np.mean([p == f.parent.name for p, f in zip(preds, files)]) == pytest.approx(res["top1"])
    pil = Image.open(files[0])
    probs = linear_clf.predict_proba([str(files[0]), pil, np.asarray(pil)])  # path, PIL, array: same answer
    assert probs.shape == (3, 4) and np.allclose(probs.sum(1), 1, atol=1e-5)
    assert np.allclose(probs[0], probs[1], atol=1e-5) and np.allclose(probs[0], probs[2], atol=1e-5)
    assert linear_clf.predict(pil)[0] in linear_clf.classes


def test_classifier_from_images_and_labels(encoder, photos):
    imgs = [np.asarray(Image.fromarray(p).resize((32, 32))) for p in photos[:4] for _ in range(2)]
    labels = ["a", "a", "b", "b", "c", "c", "d", "d"]
    clf = Classifier.fit(encoder, imgs, labels=labels, val_fraction=0, epochs=50)
    assert clf.classes == ["a", "b", "c", "d"] and clf.temperature == 1.0
    assert clf.predict(imgs) == labels                                     # fits its training set
    with pytest.raises(ValueError, match="labels"):
        Classifier.fit(encoder, imgs, labels=labels[:-1])
    with pytest.raises(ValueError, match="head"):
        Classifier.fit(encoder, imgs, labels=labels, head="svm")


def test_head_on_features_alone():
    xtr, ytr = _blobs(30, 0)
    xte, yte = _blobs(20, 1)
    clf = Classifier.fit_features(None, xtr, ytr, ["a", "b", "c", "d"], head="mlp", hidden_dim=32, epochs=50)
    assert clf.metrics["n_train"] == 108 and clf.metrics["n_val"] == 12    # 10 % of every class held out
    assert (clf.proba_from_features(xte).argmax(1) == yte).mean() >= 0.9
    with pytest.raises(ValueError, match="no encoder"):
        clf.predict([np.zeros((8, 8, 3), np.uint8)])
    with pytest.raises(ValueError, match="at least 2 classes"):
        Classifier.fit_features(None, xtr[:30], ytr[:30], ["a", "b", "c", "d"])


def test_temperature_scaling_calibrates():
    torch.manual_seed(0)
    y = torch.randint(0, 5, (2000,))
    clean = torch.nn.functional.one_hot(y, 5).float() * 2 + torch.randn(2000, 5)
    over = clean * 6                                                       # same ranking, over-confident
    t = fit_temperature(over, y)
    assert t == pytest.approx(6 * fit_temperature(clean, y), rel=1e-3)      # NLL optimum scales with the logits
    assert expected_calibration_error((over / t).softmax(1), y) < expected_calibration_error(over.softmax(1), y) / 3


def test_save_load_roundtrip(linear_clf, labelled_images, tmp_path):
    linear_clf.save(tmp_path / "clf")
    back = Classifier.load(tmp_path / "clf", device="cpu")
    files = sorted(labelled_images[1].rglob("*.jpg"))
    assert back.classes == linear_clf.classes and back.temperature == linear_clf.temperature
    np.testing.assert_allclose(back.predict_proba(files), linear_clf.predict_proba(files), atol=1e-6)
    (tmp_path / "clf" / "classifier.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        Classifier.load(tmp_path / "clf")
    with pytest.raises(FileNotFoundError, match="classifier.json"):
        Classifier.load(tmp_path)


def test_onnx_export_is_one_graph_matching_torch(linear_clf, labelled_images, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    files = sorted(labelled_images[1].rglob("*.jpg"))
    out = linear_clf.export(tmp_path / "onnx", formats=["onnx"], check_images=files[:4])
    meta = json.loads((tmp_path / "onnx" / "classifier.json").read_text())
    assert meta["classes"] == linear_clf.classes and meta["onnx"]["input"] == "images"
    assert meta["onnx"]["outputs"] == ["embedding", "logits", "probs"] and meta["onnx"]["parity"]["same_top1"]
    assert json.loads((tmp_path / "onnx" / "config.json").read_text())["mean"] == linear_clf.encoder.config["mean"]
    # independent check: preprocess by hand with numpy as the config says, run the graph, compare with torch
    sess = ort.InferenceSession(str(out["onnx"]), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["images"]
    size = linear_clf.encoder.image_size
    imgs = [np.asarray(Image.open(f).convert("RGB").resize((size, size), Image.BILINEAR)) for f in files]
    x = np.stack(imgs).astype(np.float32).transpose(0, 3, 1, 2) / 255
    mean, std = (np.asarray(meta["onnx"]["preprocessing"][k], np.float32)[None, :, None, None] for k in ("mean", "std"))
    logits, probs = sess.run(["logits", "probs"], {"images": (x - mean) / std})
    np.testing.assert_allclose(probs, linear_clf.predict_proba(imgs), atol=1e-4)
    np.testing.assert_allclose(logits, linear_clf.logits(imgs), atol=1e-3, rtol=1e-3)
    assert [linear_clf.classes[i] for i in probs.argmax(1)] == linear_clf.predict(imgs)
    # the torch-free deployment kit (top-level export/) opens the classifier graph as an encoder
    kit_file = Path(__file__).resolve().parents[1] / "export" / "sslfeatures_runtime.py"
    if not kit_file.exists():
        pytest.skip("export/sslfeatures_runtime.py is not in this checkout")
    spec = importlib.util.spec_from_file_location("sslfeatures_runtime_for_test", kit_file)
    kit_mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(kit_mod)
    kit = kit_mod.OnnxEncoder(tmp_path / "onnx", device="cpu")
    np.testing.assert_allclose(kit.embed(files), linear_clf.encoder.embed(files), atol=1e-4, rtol=1e-4)
    kit_probs = kit.session.run(["probs"], {"images": kit.preprocess(files)})[0]
    np.testing.assert_allclose(kit_probs, linear_clf.predict_proba(files), atol=1e-4)


# -- fine-tuning ---------------------------------------------------------------------------
def test_layer_decay_groups(encoder):
    from sslfeatures.backbones import backbone_from_config

    net = _Net(backbone_from_config(encoder.config["backbone"]), 4, None)
    groups = _layer_decay_groups(net, 0.05, 0.5)
    scales = sorted({g["lr_scale"] for g in groups})
    assert scales[-1] == 1.0 and scales[0] == pytest.approx(0.5 ** 9)     # stem + 8 blocks below the head
    head_ids = {id(p) for p in net.head.parameters()}
    assert all(g["lr_scale"] == 1.0 for g in groups if any(id(p) in head_ids for p in g["params"]))
    assert {g["weight_decay"] for g in groups} == {0.0, 0.05}              # none on biases / norms
    n = sum(p.numel() for g in groups for p in g["params"])
    assert n == sum(p.numel() for p in net.parameters())                   # every parameter, once
    # a ViT as in MAE: embeddings decay**(depth + 1), block i decay**(depth - i), head 1; no decay on tokens
    from sslfeatures.backbones import Backbone

    vit = _Net(Backbone("vit_tiny_patch16_224", image_size=32, patch_size=8, depth=2), 3, None)
    scale = {n: g["lr_scale"] for g in _layer_decay_groups(vit, 0.05, 0.5) for n, p in vit.named_parameters()
             if any(p is q for q in g["params"])}
    wd = {n: g["weight_decay"] for g in _layer_decay_groups(vit, 0.05, 0.5) for n, p in vit.named_parameters()
          if any(p is q for q in g["params"])}
    assert scale["backbone.model.cls_token"] == scale["backbone.model.patch_embed.proj.weight"] == 0.125
    assert scale["backbone.model.blocks.0.attn.qkv.weight"] == 0.25
    assert scale["backbone.model.blocks.1.mlp.fc1.weight"] == 0.5 and scale["head.weight"] == 1.0
    assert wd["backbone.model.pos_embed"] == 0.0 and wd["backbone.model.blocks.0.attn.qkv.weight"] == 0.05


def test_finetune_few_steps_and_from_scratch(encoder, labelled_images):
    train, test = labelled_images
    before = {k: v.clone() for k, v in encoder.backbone.model.state_dict().items()}
    ft = encoder.finetune(train, label_fraction=0.5, epochs=2, batch_size=8, lr=1e-3, test=test, eval_every=1)
    assert ft.n_labelled == 16 and ft.config["steps"] == 4 and len(ft.history) == 2
    assert 0 <= ft.test_top1 <= 1 and "test_top1" in ft.history[-1]
    after = ft.classifier.encoder.backbone.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if before[k].is_floating_point())
    assert all(torch.equal(before[k], v) for k, v in encoder.backbone.model.state_dict().items())  # original untouched
    assert ft.classifier.predict(sorted(test.rglob("*.jpg"))[:2])[0] in ft.classifier.classes
    assert ft.classifier.encoder.config["finetune"]["label_fraction"] == 0.5
    scratch = encoder.finetune(train, label_fraction=0.5, epochs=1, batch_size=8, lr=1e-3, from_scratch=True,
                               mixup=0.8, cutmix=1.0)
    assert scratch.from_scratch and scratch.config["layer_decay"] == 1.0 and scratch.config["mixup"] == 0.8
    assert scratch.classifier.encoder.method is None
    with pytest.raises(ValueError, match="label fraction"):
        encoder.finetune(train, label_fraction=1.5)


# -- CLI -----------------------------------------------------------------------------------
def test_cli_classify_and_eval(labelled_images, tmp_path, encoder, capsys):
    train, test = labelled_images
    encoder.save_pretrained(tmp_path / "enc")
    assert main(["classify", "fit", "--model", str(tmp_path / "enc"), "--data", str(train), "--out",
                 str(tmp_path / "clf"), "--test", str(test), "--epochs", "30", "--val-fraction", "0.25"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["classes"] == ["class_0", "class_1", "class_2", "class_3"] and 0 <= out["test"]["top1"] <= 1
    assert main(["classify", "predict", "--model", str(tmp_path / "clf"), "--data", str(test), "--top-k", "2"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 12 and all(len(r["top"]) == 2 and r["label"] == r["top"][0][0] for r in rows)
    assert main(["eval", "fewshot", "--model", "raw", "--train", str(train), "--test", str(test), "--shots", "1", "2",
                 "--seeds", "2", "--out", str(tmp_path / "c.json")]) == 0
    assert "| 2 |" in capsys.readouterr().out and json.loads((tmp_path / "c.json").read_text())["shots"] == [1, 2]
    assert main(["eval", "cluster", "--model", "raw", "--data", str(test)]) == 0
    assert 0 <= json.loads(capsys.readouterr().out)["nmi"] <= 1
    for cmd in (["eval", "knn"], ["knn"], ["eval", "linear", "--epochs", "3"]):
        assert main(cmd + ["--model", "raw", "--train", str(train), "--test", str(test)]) == 0
        assert 0 <= json.loads(capsys.readouterr().out)["top1"] <= 1
    assert main(["classify", "finetune", "--model", str(tmp_path / "enc"), "--data", str(train), "--out",
                 str(tmp_path / "ft"), "--label-fraction", "0.5", "--epochs", "1", "--batch-size", "8"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["finetune"]["n_labelled"] == 16 and (tmp_path / "ft" / "head.safetensors").exists()
    assert main(["classify", "predict", "--model", str(tmp_path), "--data", str(test)]) == 2
    assert "classifier.json" in capsys.readouterr().err
