"""ZeroShotProbe: LiT on tiny real images, loading tiny local transformers and open_clip
CLIPs offline, prompt ensembling, save/load, ONNX export of both towers."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from sslfeatures import Encoder, ZeroShotProbe

torch.set_num_threads(1)

CLASSES = {"astronaut": 0, "cat": 1, "coffee cup": 2, "rocket": 3}  # names of conftest.PHOTOS[:4]
TEMPLATES = ["a photo of a {}.", "a picture of the {}."]


def _crops(photo: np.ndarray, n: int, rng: np.random.Generator, size: int = 32) -> list[np.ndarray]:
    pil = Image.fromarray(photo)
    w, h = pil.size
    out = []
    for _ in range(n):
        s = int(min(w, h) * rng.uniform(0.4, 0.9))
        x0, y0 = rng.integers(0, w - s + 1), rng.integers(0, h - s + 1)
        out.append(np.asarray(pil.crop((x0, y0, x0 + s, y0 + s)).resize((size, size), Image.BILINEAR)))
    return out


@pytest.fixture(scope="module")
def captioned(photos):
    """(pairs, test images, test labels): crops of 4 photos captioned from templates."""
    rng = np.random.default_rng(0)
    pairs, test, labels = [], [], []
    for name, i in CLASSES.items():
        for j, img in enumerate(_crops(photos[i], 16, rng)):
            pairs.append((img, TEMPLATES[j % 2].format(name)))
        crops = _crops(photos[i], 6, rng)
        test += crops
        labels += [i] * len(crops)
    return pairs, test, np.array(labels)


@pytest.fixture(scope="module")
def encoder():
    return Encoder.random_init("resnet18", image_size=32, stem="small_s2", device="cpu",
                               backbone_kwargs={"channels": [16, 32, 64, 128]})


@pytest.fixture(scope="module")
def lit(encoder, captioned):
    pairs, _, _ = captioned
    return ZeroShotProbe.fit(encoder, pairs, text_tower="transformer", embed_dim=32, text_width=32,
                             text_layers=1, text_heads=2, context_length=40, epochs=40, batch_size=32,
                             lr=3e-3, device="cpu")


def test_lit_loss_falls_and_classifies_training_classes(lit, captioned):
    _, test, labels = captioned
    losses = [h["loss"] for h in lit.history]
    assert len(losses) == 40 and losses[-1] < 0.8 * losses[0], losses
    pred = lit.classify(test, classes=list(CLASSES), templates=TEMPLATES)
    assert pred.probs.shape == (len(test), 4)
    np.testing.assert_allclose(pred.probs.sum(1), 1, rtol=1e-5)
    assert set(pred.labels) <= set(CLASSES)
    assert pred.top1(labels) > 0.5  # chance is 0.25
    assert pred.top1([list(CLASSES)[i] for i in labels]) == pred.top1(labels)


def test_prompt_ensemble_is_renormalised_mean(lit):
    temps = ["a photo of a {}.", "{} in a picture", "the {}"]
    emb = lit.class_embeddings(["cat", "rocket"], temps)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1, rtol=1e-5)
    each = lit.embed_texts([t.format("cat") for t in temps])
    mean = each.mean(0)
    np.testing.assert_allclose(emb[0], mean / np.linalg.norm(mean), atol=1e-5)
    with pytest.raises(ValueError, match="'\\{\\}'"):
        lit.classify(np.zeros((32, 32, 3), np.uint8), ["cat", "dog"], templates=["no placeholder"])
    with pytest.raises(ValueError, match="repeat"):
        lit.class_embeddings(["cat", "cat"])


def test_save_and_load_roundtrip(lit, captioned, tmp_path):
    _, test, _ = captioned
    lit.save_pretrained(tmp_path / "probe")
    cfg = json.loads((tmp_path / "probe" / "zeroshot.json").read_text())
    assert cfg["method"] == "lit" and len(cfg["history"]) == 40
    back = ZeroShotProbe.from_pretrained(tmp_path / "probe", device="cpu")
    np.testing.assert_allclose(back.logits(test[:5], ["a photo of a cat."]),
                               lit.logits(test[:5], ["a photo of a cat."]), atol=1e-4)
    # the layout is a CLIP run's: from_clip reads it too
    assert ZeroShotProbe.from_clip(tmp_path / "probe").logit_scale == pytest.approx(lit.logit_scale)


def test_fit_errors(encoder, captioned):
    pairs, _, _ = captioned
    with pytest.raises(ValueError, match="unknown text_tower"):
        ZeroShotProbe.fit(encoder, pairs, text_tower="gpt")
    with pytest.raises(ValueError, match="image features of shape"):
        ZeroShotProbe.fit(encoder, pairs, text_tower="transformer", features=np.zeros((3, 128), np.float32))
    with pytest.raises(TypeError, match="Encoder"):
        ZeroShotProbe.fit("not an encoder", pairs)


def test_lit_onnx_export_parity(lit, captioned, tmp_path):
    _, test, _ = captioned
    files = lit.export_onnx(tmp_path / "onnx", images=test[:8])
    assert files["text"].exists() and files["image_projection"].exists() and files["image_encoder"].exists()
    names = [r["output"] for r in files["parity"]]
    assert "text_embedding" in names and "image_embedding" in names
    assert all(r["passed"] for r in files["parity"])
    meta = json.loads((tmp_path / "onnx" / "zeroshot_onnx.json").read_text())
    assert meta["tokenizer"]["type"] == "bytes"


# -- a tiny transformers CLIP, saved locally (no network) ---------------------------------------
def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


@pytest.fixture(scope="module")
def tiny_hf_clip(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("tiny_clip")
    chars = list(_bytes_to_unicode().values())  # a byte-level BPE vocabulary without merges
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    (root / "vocab.json").write_text(json.dumps(vocab))
    (root / "merges.txt").write_text("#version: 0.2\n")
    tok = transformers.CLIPTokenizer(str(root / "vocab.json"), str(root / "merges.txt"))
    eos = vocab["<|endoftext|>"]
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=48, bos_token_id=eos - 1,
                         eos_token_id=eos, pad_token_id=eos),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16)
    torch.manual_seed(0)
    model = transformers.CLIPModel(cfg).eval()
    proc = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    folder = root / "model"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    proc.save_pretrained(folder)
    return folder, model, tok, proc


def test_from_clip_transformers_matches_library_forward(tiny_hf_clip, photos):
    folder, model, tok, proc = tiny_hf_clip
    probe = ZeroShotProbe.from_clip(folder, device="cpu", local_files_only=True)
    assert probe.backend.name == "transformers"
    images = [p[:200, :240] for p in photos[:3]]
    texts = ["a photo of a cat.", "an astronaut", "a cup of coffee on a table"]
    ours = probe.logits(images, texts)
    inp = proc(images=images, return_tensors="pt")
    t = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = model(input_ids=t["input_ids"], attention_mask=t["attention_mask"],
                    pixel_values=inp["pixel_values"]).logits_per_image.numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)
    pred = probe.classify(images, ["cat", "astronaut", "coffee"], templates=TEMPLATES)
    assert pred.probs.shape == (3, 3)


def test_transformers_probe_save_load_and_onnx(tiny_hf_clip, photos, tmp_path):
    folder, _, _, _ = tiny_hf_clip
    probe = ZeroShotProbe.from_clip(folder, device="cpu", local_files_only=True)
    images = [p[:128, :128] for p in photos[:4]]
    probe.save_pretrained(tmp_path / "saved")
    back = ZeroShotProbe.from_pretrained(tmp_path / "saved", device="cpu")
    np.testing.assert_allclose(back.logits(images, ["a cat"]), probe.logits(images, ["a cat"]), atol=1e-5)
    files = probe.export_onnx(tmp_path / "onnx", images=images)
    assert files["text"].exists() and files["image"].exists()
    assert all(r["passed"] for r in files["parity"])


# -- open_clip: a tiny model saved as open_clip's own hub/local folder (config + safetensors) -----------
OPENCLIP_TINY = {"embed_dim": 16,
                 "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
                 "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}
OPENCLIP_PP = {"mean": [0.5, 0.45, 0.4], "std": [0.25, 0.3, 0.35], "interpolation": "bilinear",
               "resize_mode": "shortest"}


@pytest.fixture(scope="module")
def tiny_open_clip(tmp_path_factory):
    """(folder, model, preprocess, tokenizer): a random tiny CLIP built by open_clip, saved
    as open_clip's folders are (``open_clip_config.json`` + ``open_clip_model.safetensors``),
    and the reference pipeline built by hand from the same numbers."""
    open_clip = pytest.importorskip("open_clip")
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = open_clip.CLIP(**OPENCLIP_TINY).eval()
    with torch.no_grad():
        model.logit_scale.fill_(np.log(20.0))  # not the initial 1/0.07: the saved value must be read
    folder = tmp_path_factory.mktemp("tiny_open_clip") / "model"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": OPENCLIP_TINY,
                                                              "preprocess_cfg": OPENCLIP_PP}))
    save_file(model.state_dict(), str(folder / "open_clip_model.safetensors"))
    preprocess = open_clip.image_transform(32, is_train=False, mean=OPENCLIP_PP["mean"], std=OPENCLIP_PP["std"],
                                           interpolation="bilinear", resize_mode="shortest")
    tokenizer = open_clip.SimpleTokenizer(context_length=24)
    return folder, model, preprocess, tokenizer


def _open_clip_logits(model, preprocess, tokenizer, images, texts) -> np.ndarray:
    x = torch.stack([preprocess(Image.fromarray(im)) for im in images])
    with torch.no_grad():
        img, txt, scale = model(x, tokenizer(texts))
    return (scale * img @ txt.T).numpy()


def test_from_clip_open_clip_folder_matches_open_clip(tiny_open_clip, photos):
    folder, model, preprocess, tokenizer = tiny_open_clip
    probe = ZeroShotProbe.from_clip(folder, device="cpu")
    assert probe.backend.name == "open_clip" and probe.logit_scale == pytest.approx(20.0)
    images = [p[:200, :240] for p in photos[:3]]
    texts = ["a photo of a cat.", "an astronaut", "a cup of coffee on a table"]
    ref = _open_clip_logits(model, preprocess, tokenizer, images, texts)
    np.testing.assert_allclose(probe.logits(images, texts), ref, rtol=1e-4, atol=1e-4)
    same = ZeroShotProbe.from_clip(f"open_clip:{folder}", device="cpu")  # the prefixed spelling
    np.testing.assert_allclose(same.logits(images, texts), ref, rtol=1e-4, atol=1e-4)
    classes = ["cat", "astronaut", "coffee"]
    pred = probe.classify(images, classes, templates=TEMPLATES)
    # the prompt ensemble from open_clip's own embeddings: mean of the normalised templates, renormalised
    with torch.no_grad():
        t = F.normalize(model.encode_text(tokenizer([t.format(c) for c in classes for t in TEMPLATES])), dim=-1)
        t = F.normalize(t.view(len(classes), len(TEMPLATES), -1).mean(1), dim=-1)
        x = torch.stack([preprocess(Image.fromarray(im)) for im in images])
        ens = (20.0 * F.normalize(model.encode_image(x), dim=-1) @ t.T).softmax(-1).numpy()
    np.testing.assert_allclose(pred.probs, ens, rtol=1e-4, atol=1e-5)
    assert pred.probs.shape == (3, 3)
    assert pred.labels == [classes[i] for i in ens.argmax(1)]


def test_from_clip_open_clip_architecture_and_checkpoint_file(tiny_open_clip, photos, tmp_path):
    """``open_clip:MODEL/FILE``: a registered architecture and a weights file."""
    import open_clip

    folder, model, _, tokenizer = tiny_open_clip
    (tmp_path / "sslf-tiny-test.json").write_text(json.dumps(OPENCLIP_TINY))
    open_clip.add_model_config(tmp_path / "sslf-tiny-test.json")
    probe = ZeroShotProbe.from_clip(f"open_clip:sslf-tiny-test/{folder / 'open_clip_model.safetensors'}", device="cpu")
    default_pp = open_clip.image_transform(32, is_train=False)  # no preprocess_cfg: OpenAI mean/std, bicubic
    images = [p[:128, :160] for p in photos[:2]]
    np.testing.assert_allclose(probe.logits(images, ["a cat", "a rocket"]),
                               _open_clip_logits(model, default_pp, tokenizer, images, ["a cat", "a rocket"]),
                               rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="without weights"):
        ZeroShotProbe.from_clip("open_clip:sslf-tiny-test")  # open_clip would build it at random
    (tmp_path / "no_weights").mkdir()
    (tmp_path / "no_weights" / "open_clip_config.json").write_text((folder / "open_clip_config.json").read_text())
    with pytest.raises(FileNotFoundError, match="no weights"):
        ZeroShotProbe.from_clip(tmp_path / "no_weights")


def test_open_clip_probe_save_load_and_onnx(tiny_open_clip, photos, tmp_path):
    import shutil

    import open_clip

    from sslfeatures.export.runtime import make_session

    folder, _, _, tokenizer = tiny_open_clip
    shutil.copytree(folder, tmp_path / "src")
    probe = ZeroShotProbe.from_clip(tmp_path / "src", device="cpu")
    images = [p[:128, :128] for p in photos[:4]]
    texts = ["a cat", "an astronaut in a suit"]
    probe.save_pretrained(tmp_path / "saved")
    shutil.rmtree(tmp_path / "src")  # the saved probe needs nothing of its source
    back = ZeroShotProbe.from_pretrained(tmp_path / "saved", device="cpu")
    assert back.backend.name == "open_clip"
    np.testing.assert_allclose(back.logits(images, texts), probe.logits(images, texts), atol=1e-5)
    # the saved folder is an open_clip folder too
    oc_model, _, oc_pp = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'saved'}")
    np.testing.assert_allclose(_open_clip_logits(oc_model.eval(), oc_pp, tokenizer, images, texts),
                               probe.logits(images, texts), rtol=1e-4, atol=1e-4)

    files = probe.export_onnx(tmp_path / "onnx", images=images)
    assert files["text"].exists() and files["image"].exists()
    assert all(r["passed"] for r in files["parity"])
    meta = json.loads(files["config"].read_text())
    assert meta["text_inputs"] == ["input_ids"] and meta["image"]["image_size"] == 32
    # a consumer of the ONNX folder: open_clip's tokenizer from the folder, both graphs in onnxruntime
    tok = open_clip.get_tokenizer(f"local-dir:{tmp_path / 'onnx'}")
    txt = make_session(files["text"], "cpu").run(None, {"input_ids": tok(texts).numpy()})[0]
    px = probe.backend.pixel_values(images).numpy()
    img = make_session(files["image"], "cpu").run(None, {"pixel_values": px})[0]
    np.testing.assert_allclose(meta["logit_scale"] * img @ txt.T, probe.logits(images, texts), rtol=1e-3, atol=1e-3)


def test_from_clip_errors(tmp_path, encoder):
    encoder.save_pretrained(tmp_path / "enc")
    with pytest.raises(ValueError, match="without a text side"):
        ZeroShotProbe.from_clip(tmp_path / "enc")
    with pytest.raises(FileNotFoundError):
        ZeroShotProbe.from_clip(str(tmp_path / "missing" / "x" / "y"))


def test_locked_text_projection_keeps_the_text_geometry(encoder, captioned):
    pairs, test, labels = captioned
    tower_kw = dict(text_tower="transformer", text_width=32, text_layers=1, text_heads=2, context_length=40)
    with pytest.raises(ValueError, match="frozen text tower"):
        ZeroShotProbe.fit(encoder, pairs, lock_text_projection=True, tune_text=True, epochs=1, **tower_kw)
    from sslfeatures.text import TextTower

    tower = TextTower(TextTower.make_config("transformer", 32, 32, 1, 2, 40))
    before = {k: v.clone() for k, v in tower.state_dict().items()}
    probe = ZeroShotProbe.fit(encoder, pairs, text_tower=tower, lock_text_projection=True, epochs=20,
                              batch_size=32, lr=3e-3, device="cpu")
    after = probe.text_encoder.module.tower.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if not k.startswith("proj"))
    w = after["proj.weight"]
    np.testing.assert_allclose((w @ w.T).numpy(), np.eye(32), atol=1e-5)  # orthogonal, untrained
    assert probe.history[-1]["loss"] < probe.history[0]["loss"]
