"""ZeroShotProbe: LiT on tiny real images, loading a tiny local transformers CLIP offline,
prompt ensembling, save/load, ONNX export of both towers."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
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
