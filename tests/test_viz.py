"""Visual probes added for issue 8: MAE reconstructions, nearest-neighbour grids, mask
metrics, and the `viz recon|neighbors` commands."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sslfeatures import Encoder, Pretrainer
from sslfeatures.viz import (load_method, mae_reconstruction, mask_iou, mask_precision, nearest_neighbors,
                             neighbor_grid, reconstruction_grid)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def mae_run(tmp_path_factory, tiny_images):
    out = tmp_path_factory.mktemp("mae_run") / "run"
    Pretrainer("mae", backbone="vit_tiny_patch16_224", patch_size=8, image_size=32, backbone_kwargs={"depth": 1},
               decoder_dim=32, decoder_depth=1, decoder_heads=2, batch_size=8, epochs=1, warmup_epochs=0,
               precision="fp32", num_workers=0, progress=False, device="cpu").fit(str(tiny_images), out, max_steps=3)
    return out


def test_mae_reconstruction_shapes_and_mask_ratio(mae_run, photos):
    method = load_method(mae_run)
    res = [mae_reconstruction(method, photos[1], r, seed=0) for r in (0.5, 0.75)]
    for r, ratio in zip(res, (0.5, 0.75)):
        for key in ("image", "masked", "reconstruction", "pasted"):
            assert r[key].shape == (32, 32, 3) and r[key].dtype == np.float32
            assert 0 <= r[key].min() and r[key].max() <= 1
        assert r["mask"].shape == (4, 4) and r["mask"].mean() == pytest.approx(ratio)
        assert np.isfinite(r["mse"])
        # visible patches are the image's own pixels
        vis = ~np.kron(r["mask"], np.ones((8, 8), bool))
        np.testing.assert_allclose(r["pasted"][vis], r["image"][vis], atol=2e-3)
    # seeded: the same mask twice; a run folder works as well as the method
    again = mae_reconstruction(mae_run, photos[1], 0.5, seed=0)
    np.testing.assert_array_equal(again["mask"], res[0]["mask"])
    assert reconstruction_grid(res).shape == (2 * 32 + 2, 4 * 32 + 3 * 2, 3)
    with pytest.raises(ValueError, match="mask_ratio"):
        mae_reconstruction(method, photos[1], 1.0)


def test_mae_reconstruction_rejects_other_methods(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_config"):
        load_method(tmp_path)
    with pytest.raises(ValueError, match="MAE"):
        mae_reconstruction(torch.nn.Linear(2, 2), np.zeros((8, 8, 3), np.uint8))


def test_nearest_neighbors_and_grid(photos):
    enc = Encoder.random_init("resnet18", image_size=32, stem="small_s2", device="cpu",
                              backbone_kwargs={"channels": [16, 32, 64, 128]})
    gallery = [p[:160, :160] for p in photos[:6]] + [p[40:200, 40:200] for p in photos[:6]]
    idx, sims = nearest_neighbors(enc, gallery[:3], gallery, k=4)
    assert idx.shape == sims.shape == (3, 4)
    assert list(idx[:, 0]) == [0, 1, 2]  # an image is its own nearest neighbour...
    assert np.all(np.diff(sims, axis=1) <= 1e-6)
    idx2, _ = nearest_neighbors(enc, None, gallery, k=3, query_indices=[0, 1, 2])
    assert not any(i in row for i, row in zip([0, 1, 2], idx2))  # ...unless excluded
    labels = list(range(6)) * 2
    grid = neighbor_grid(gallery[:3], gallery, idx2, size=24, query_labels=labels[:3], gallery_labels=labels)
    assert grid.dtype == np.uint8 and grid.ndim == 3 and grid.shape[2] == 3
    assert grid.shape[0] == 3 * 24 + 2 * 4
    with pytest.raises(ValueError, match="k must be"):
        nearest_neighbors(enc, None, gallery, k=12, query_indices=[0])


def test_mask_metrics():
    target = np.zeros((8, 8), bool)
    target[2:6, 2:6] = True
    assert mask_iou(target, target) == 1.0
    pred = np.zeros((4, 4), bool)  # a patch grid, upsampled x2
    pred[1:3, 1:3] = True
    assert mask_iou(pred, target) == 1.0 and mask_precision(pred, target) == 1.0
    pred[0, 0] = True
    assert mask_iou(pred, target) == pytest.approx(16 / 20)
    assert mask_precision(pred, target) == pytest.approx(16 / 20)
    assert mask_precision(np.zeros((4, 4), bool), target) == 0.0


def test_cli_recon_and_neighbors(mae_run, labelled_images, photos, tmp_path):
    from sslfeatures.cli import main

    Image.fromarray(photos[0]).save(tmp_path / "img.png")
    assert main(["viz", "recon", "--run", str(mae_run), "--image", str(tmp_path / "img.png"),
                 "--mask-ratio", "0.5", "0.9", "--out", str(tmp_path / "recon.png")]) == 0
    assert Image.open(tmp_path / "recon.png").size == (4 * 32 + 6, 2 * 32 + 2)
    assert main(["viz", "neighbors", "--model", str(mae_run), "--data", str(labelled_images[1]), "--queries", "3",
                 "--k", "4", "--size", "24", "--out", str(tmp_path / "nn.png")]) == 0
    w, h = Image.open(tmp_path / "nn.png").size
    assert h == 3 * 24 + 2 * 4 and w > 5 * 24
