"""Encoder: bit-exact safetensors round trip, every input kind, hub loading offline, no pickle."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from sslfeatures import Encoder
from sslfeatures.data import DecodeError
from sslfeatures.encoder import UnsafeFileError


@pytest.fixture(scope="module")
def encoder():
    return Encoder.random_init("resnet18", image_size=32, stem="small_s2",
                               backbone_kwargs={"channels": [16, 32, 64, 128]}, seed=0)


def test_round_trip_is_bit_exact(encoder, tmp_path, tiny_images):
    encoder.save_pretrained(tmp_path / "e")
    back = Encoder.from_pretrained(tmp_path / "e")
    sa, sb = encoder.backbone.model.state_dict(), back.backbone.model.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert np.array_equal(encoder.embed(tiny_images), back.embed(tiny_images))
    files = encoder.export(tmp_path / "x", formats=["safetensors"])
    assert files["safetensors"].exists()
    assert json.loads((tmp_path / "x" / "config.json").read_text())["image_size"] == 32
    with pytest.raises(ValueError, match="unknown export format"):
        encoder.export(tmp_path / "y", formats=["tflite"])


def test_embed_accepts_paths_pil_arrays_tensors(encoder, tiny_images):
    path = sorted(tiny_images.rglob("*.png"))[0]
    pil = Image.open(path)
    arr = np.asarray(pil.convert("RGB"))
    ten = torch.from_numpy(arr).permute(2, 0, 1)
    out = encoder.embed([str(path), pil, arr, ten, path])
    assert out.shape == (5, encoder.num_features) and out.dtype == np.float32
    assert np.allclose(out[0], out[1:], atol=1e-5)
    assert encoder.embed(arr).shape == (1, encoder.num_features)
    for pooling in ("mean", "gem"):
        assert encoder.embed(arr, pooling=pooling).shape == (1, encoder.num_features)
    patches = encoder.patch_features([arr, arr])
    assert patches.ndim == 3 and patches.shape[0] == 2 and patches.shape[2] == encoder.num_features


def test_embed_names_a_bad_file(encoder, tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"")
    with pytest.raises(DecodeError, match="bad.jpg: empty file"):
        encoder.embed([tmp_path / "bad.jpg"])


def test_vit_patch_tokens_and_cls():
    enc = Encoder.random_init("vit_tiny_patch16_224", image_size=32, patch_size=8, backbone_kwargs={"depth": 1})
    x = np.zeros((32, 32, 3), np.uint8)
    assert enc.patch_features(x).shape == (1, 16, 192)
    assert enc.embed(x, pooling="cls").shape == (1, 192)


def test_image_size_override_is_a_test_resolution(encoder, tmp_path):
    """from_pretrained(image_size=) resizes inputs to the new size (a ViT interpolates its position
    embeddings), is saved with the encoder, and a bad value is a clear error."""
    x = (np.random.default_rng(0).random((2, 28, 28, 3)) * 255).astype(np.uint8)
    encoder.save_pretrained(tmp_path / "e")
    big = Encoder.from_pretrained(tmp_path / "e", image_size=40)
    assert big.image_size == 40 and Encoder.from_pretrained(tmp_path / "e").image_size == 32
    # the same as upsizing the images to 40 px by hand (bicubic) and embedding them at that size
    ref = big.embed([np.asarray(Image.fromarray(xi).resize((40, 40), Image.BICUBIC)) for xi in x])
    assert np.allclose(big.embed(x), ref, atol=1e-5)
    assert not np.allclose(big.embed(x), encoder.embed(x), atol=1e-3)
    big.save_pretrained(tmp_path / "big")
    assert json.loads((tmp_path / "big" / "config.json").read_text())["image_size"] == 40
    vit = Encoder.random_init("vit_tiny_patch16_224", image_size=32, patch_size=8, backbone_kwargs={"depth": 1})
    vit.image_size = 48
    assert vit.embed(x).shape == (2, 192) and vit.patch_features(x).shape == (2, 36, 192)
    for bad in (0, -4, 3.5, True):
        with pytest.raises(ValueError, match="image_size must be a positive integer"):
            Encoder.from_pretrained(tmp_path / "e", image_size=bad)


@pytest.mark.parametrize("name, kw", [
    ("resnet18", dict(image_size=32, stem="small_s2", backbone_kwargs={"channels": [16, 32, 64, 128]})),
    ("vit_tiny_patch16_224", dict(image_size=32, patch_size=8, backbone_kwargs={"depth": 3})),
    ("efficientnet_b0", dict(image_size=32)),  # its last output is the head conv's, after the last stage
])
def test_last_blocks_concatenates_the_last_blocks(name, kw, tiny_images):
    """``last_blocks=n``: the last n blocks/stages pooled and concatenated, the last one = the default
    embedding; for a ViT each block's tokens get the final norm (DINO's get_intermediate_layers)."""
    enc = Encoder.random_init(name, seed=0, **kw)
    imgs = sorted(tiny_images.rglob("*.png"))[:3]
    one, three = enc.embed(imgs), enc.embed(imgs, last_blocks=3)
    assert three.shape[0] == 3 and three.shape[1] > one.shape[1]
    np.testing.assert_allclose(three[:, -one.shape[1]:], one, rtol=1e-4, atol=1e-5)
    bb = enc.backbone
    x = enc._preprocess(torch.stack([torch.from_numpy(np.array(Image.open(p).convert("RGB").resize(
        (32, 32)))).permute(2, 0, 1) for p in imgs]))
    with torch.no_grad():
        if bb.is_vit:  # block 2 of 3 by hand: run the blocks, final norm, mean of the patch tokens
            t = bb.model.patch_drop(bb.model.norm_pre(bb.model._pos_embed(bb.model.patch_embed(x))))
            for blk in bb.model.blocks[:2]:
                t = blk(t)
            want = bb.model.norm(t)[:, bb.num_prefix_tokens:].mean(1)
            got = bb(x, "mean", last_blocks=2)[:, :192]
        else:  # stage 3 of ResNet's 4: its average-pooled map
            feats = bb.forward_last_blocks(x, 2)
            want, got = feats[0].mean((2, 3)), bb(x, last_blocks=2)[:, :feats[0].shape[1]]
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="last_blocks must be a positive integer"):
        enc.embed(imgs, last_blocks=0)
    with pytest.raises(ValueError, match="has 3 blocks|has \\d+ stages"):
        enc.embed(imgs, last_blocks=99)


def test_hub_id_loads_offline_from_a_local_cache(encoder, tmp_path, monkeypatch):
    # the layout huggingface-hub keeps on disk: models--org--name/{refs,snapshots}
    cache = tmp_path / "hub"
    repo = cache / "models--acme--tiny-encoder"
    for rev, seed in (("1111111111111111111111111111111111111111", 1),
                      ("2222222222222222222222222222222222222222", 2)):
        snap = repo / "snapshots" / rev
        Encoder.random_init("resnet18", image_size=32, stem="small_s2",
                            backbone_kwargs={"channels": [16, 32, 64, 128]}, seed=seed).save_pretrained(snap)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("2222222222222222222222222222222222222222")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    main = Encoder.from_pretrained("acme/tiny-encoder", cache_dir=cache)
    pinned = Encoder.from_pretrained("acme/tiny-encoder", revision="1111111111111111111111111111111111111111",
                                     cache_dir=cache)
    x = np.full((32, 32, 3), 128, np.uint8)
    assert not np.allclose(main.embed(x), pinned.embed(x))
    ref = Encoder.from_pretrained(repo / "snapshots" / "1111111111111111111111111111111111111111")
    assert np.array_equal(pinned.embed(x), ref.embed(x))


def test_pickle_files_are_refused(encoder, tmp_path):
    encoder.save_pretrained(tmp_path / "e")
    torch.save(encoder.backbone.model.state_dict(), tmp_path / "e" / "weights.pt")
    with pytest.raises(UnsafeFileError, match="never unpickles"):
        Encoder.from_pretrained(tmp_path / "e" / "weights.pt")
    ok = Encoder.from_pretrained(tmp_path / "e" / "weights.pt", allow_pickle=True)
    assert ok.num_features == encoder.num_features
    # a folder that only ships pytorch_model.bin is refused too, and loads when opted in
    (tmp_path / "e" / "weights.pt").rename(tmp_path / "e" / "pytorch_model.bin")
    (tmp_path / "e" / "model.safetensors").unlink()
    with pytest.raises(UnsafeFileError, match="pytorch_model.bin"):
        Encoder.from_pretrained(tmp_path / "e")
    assert Encoder.from_pretrained(tmp_path / "e", allow_pickle=True).num_features == encoder.num_features


def test_bad_config_is_a_clear_error(encoder, tmp_path):
    encoder.save_pretrained(tmp_path / "e")
    cfg = json.loads((tmp_path / "e" / "config.json").read_text())
    cfg["image_size"] = "big"
    (tmp_path / "e" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="'image_size' should be int"):
        Encoder.from_pretrained(tmp_path / "e")
    with pytest.raises(FileNotFoundError, match="neither an existing"):
        Encoder.from_pretrained(str(tmp_path / "nothing-here"))
