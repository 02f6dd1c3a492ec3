"""Visual probes (sslfeatures.viz): attention maps, 60%-mass masks, PCA foreground, t-SNE, CLI."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from sslfeatures import Encoder
from sslfeatures.cli import main
from sslfeatures.viz import attention_maps, pca_rgb, save_png, threshold_mass, tsne


@pytest.fixture(scope="module")
def vit() -> Encoder:
    return Encoder.random_init("vit_tiny_patch16_224", image_size=32, patch_size=4, device="cpu", precision="fp32")


def _square() -> tuple[np.ndarray, np.ndarray]:
    """A bright square on a dark background, aligned to 4-px patches; its (8, 8) patch mask."""
    img = np.full((32, 32, 3), 20, np.uint8)
    img[8:24, 12:28] = (230, 200, 40)
    mask = np.zeros((8, 8), bool)
    mask[2:6, 3:7] = True
    return img, mask


def test_attention_maps_shape(vit, photos):
    maps = attention_maps(vit, photos[0])
    assert maps.shape == (3, 8, 8)  # vit_tiny: 3 heads; 32 px / 4 px patches
    assert np.all(maps >= 0)
    assert np.all(maps.sum((1, 2)) <= 1 + 1e-5) and np.all(maps.sum((1, 2)) > 0.5)


def test_attention_maps_rejects_cnn():
    enc = Encoder.random_init("resnet18", image_size=32, device="cpu")
    with pytest.raises(ValueError, match="ViT"):
        attention_maps(enc, np.zeros((32, 32, 3), np.uint8))


def test_threshold_mass_keeps_60_percent_minimally():
    rng = np.random.default_rng(0)
    attn = rng.random((4, 7, 7)) ** 3
    masks = threshold_mass(attn, 0.6)
    assert masks.shape == attn.shape and masks.dtype == bool
    for a, m in zip(attn, masks):
        kept = a[m].sum() / a.sum()
        assert kept >= 0.6
        # minimal: dropping the smallest kept entry falls below 60 %
        assert (a[m].sum() - a[m].min()) / a.sum() < 0.6
        # and it keeps the largest entries
        assert a[m].min() >= a[~m].max()
    one_hot = np.zeros((3, 3))
    one_hot[1, 2] = 1.0
    assert threshold_mass(one_hot, 0.6).sum() == 1
    with pytest.raises(ValueError):
        threshold_mass(attn, 0.0)


def test_pca_foreground_finds_the_object(vit):
    img, mask = _square()
    rgb, fg = pca_rgb(vit, img)
    assert rgb.shape == (8, 8, 3) and fg.shape == (8, 8)
    assert rgb.min() >= 0 and rgb.max() <= 1
    iou = (fg & mask).sum() / (fg | mask).sum()
    assert iou > 0.8, f"PCA foreground IoU {iou:.2f}\n{fg.astype(int)}"


def test_tsne_and_save_png(tmp_path, vit, photos):
    feats = np.random.default_rng(0).normal(size=(12, 5)).astype(np.float32)
    feats[6:] += 10
    xy = tsne(feats, [0] * 6 + [1] * 6, max_iter=250)
    assert xy.shape == (12, 2)
    # the two far-apart clusters stay apart
    assert np.linalg.norm(xy[:6].mean(0) - xy[6:].mean(0)) > np.linalg.norm(xy[:6].std(0))
    maps = attention_maps(vit, photos[1])
    p = save_png(maps, tmp_path / "a.png", image=np.zeros((32, 32, 3), np.uint8))
    assert Image.open(p).size == (3 * 32, 32)
    with pytest.raises(ValueError):
        tsne(feats[:2])


def test_cli_viz(tmp_path, vit, labelled_images, monkeypatch):
    import sslfeatures.viz as viz

    fast = viz.tsne
    monkeypatch.setattr(viz, "tsne", lambda f, labels=None: fast(f, labels, max_iter=250))
    model = tmp_path / "model"
    vit.save_pretrained(model)
    img, _ = _square()
    Image.fromarray(img).save(tmp_path / "sq.png")
    assert main(["viz", "attention", "--model", str(model), "--image", str(tmp_path / "sq.png"),
                 "--out", str(tmp_path / "att.png")]) == 0
    assert (tmp_path / "att.png").is_file() and (tmp_path / "att_mask.png").is_file()
    assert main(["viz", "pca", "--model", str(model), "--image", str(tmp_path / "sq.png"),
                 "--out", str(tmp_path / "pca.png")]) == 0
    assert Image.open(tmp_path / "pca.png").size == (8, 8)
    assert main(["viz", "tsne", "--model", str(model), "--data", str(labelled_images[1]),
                 "--out", str(tmp_path / "tsne.png")]) == 0
    assert (tmp_path / "tsne.png").is_file()
    assert main(["viz", "pca", "--model", str(model), "--image", str(tmp_path / "missing.png"),
                 "--out", str(tmp_path / "x.png")]) == 2
