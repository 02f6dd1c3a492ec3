"""Every method trains a few steps on tiny real images: the loss falls, nothing is NaN,
the collapse monitor stays quiet, and the encoder comes out in the run folder."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from sslfeatures import Encoder, Pretrainer, list_methods
from sslfeatures.engine.config import load_recipe, recipe_path

CNN = dict(backbone="resnet18", stem="small_s2", backbone_kwargs={"channels": [16, 32, 64, 128]}, image_size=32)
VIT = dict(backbone="vit_tiny_patch16_224", patch_size=8, image_size=32, backbone_kwargs={"depth": 2})
TINY = {
    "simclr": dict(CNN, proj_hidden_dim=128, lr=0.5, temperature=0.2),
    "mocov2": dict(CNN, queue_size=32, proj_hidden_dim=128, lr=0.1, ema_momentum=0.9),
    "byol": dict(CNN, proj_hidden_dim=128, pred_hidden_dim=128, proj_dim=64, lr=0.5),
    "dino": dict(VIT, out_dim=256, hidden_dim=128, bottleneck_dim=64, lr=1e-3, warmup_teacher_temp_epochs=0,
                 teacher_temp=0.04, center_momentum=0.0, freeze_last_layer_epochs=0, backbone_kwargs={"depth": 2},
                 views=[{"scale": [0.4, 1.0], "count": 2}, {"scale": [0.1, 0.4], "size_frac": 0.5, "count": 2}]),
    "mae": dict(VIT, decoder_dim=64, decoder_depth=1, decoder_heads=4, lr=2e-3),
}


def test_every_registered_method_has_a_recipe_and_a_training_test():
    assert set(TINY) <= set(list_methods())
    test_sources = "".join(p.read_text() for p in Path(__file__).parent.glob("test_*.py"))
    for name in list_methods():
        assert recipe_path(name).exists() and load_recipe(name)["method"] == name, f"no recipe for {name!r}"
        assert f'"{name}"' in test_sources, f"method {name!r} is not trained by any test"


@pytest.mark.parametrize("name", sorted(TINY))
def test_loss_falls(name, tiny_images, tmp_path):
    cfg = dict(TINY[name], epochs=30, batch_size=16, warmup_epochs=0, log_every=1, progress=False,
               precision="fp32", checkpoint_every=10_000)
    run = Pretrainer(name, **cfg).fit(tiny_images, output_dir=tmp_path / name, max_steps=24)
    losses = [m["loss"] for m in run.metrics if "loss" in m]
    assert len(losses) == 24 and all(math.isfinite(v) for v in losses)
    # steps 0-1 are skipped: MoCo's queue starts as random (easy) negatives
    first, last = np.mean(losses[2:6]), np.mean(losses[-4:])
    assert last < first, f"{name}: loss did not fall ({first:.4f} -> {last:.4f})"
    monitor = [m for m in run.metrics if "norm_std" in m]
    assert monitor and monitor[-1]["norm_std"] > 0.01 and monitor[-1]["eff_rank"] > 1.5
    enc = Encoder.from_pretrained(run.output_dir)
    v = enc.embed(tiny_images)
    assert v.shape == (48, enc.num_features) and v.dtype == np.float32 and np.isfinite(v).all()
    assert (run.output_dir / "metrics.csv").exists() and (run.output_dir / "loss.png").exists()


def test_moco_shuffling_bn_normalises_query_and_key_with_different_groups():
    """MoCo's shuffling BN: with BN in train mode the key of an image is normalised with a
    random group of images, not the query's; the keys still come back in the batch's order."""
    import torch
    import torch.nn as nn

    from sslfeatures.methods.moco import split_forward

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4, affine=False))
    x = torch.randn(16, 4)
    whole = net(x)
    ordered = split_forward(net, x, 4)
    for i in range(4):  # each quarter of the batch is normalised alone, in order
        assert torch.allclose(ordered[4 * i:4 * i + 4], net(x[4 * i:4 * i + 4]), atol=1e-5)
    assert not torch.allclose(ordered, whole, atol=1e-3)
    torch.manual_seed(1)
    shuffled = split_forward(net, x, 4, shuffle=True)
    torch.manual_seed(1)
    order = torch.randperm(16)
    groups = [set(order[4 * i:4 * i + 4].tolist()) for i in range(4)]
    for i in range(16):  # row i is image i, normalised with the random group that holds it
        g = sorted(next(s for s in groups if i in s))
        assert torch.allclose(shuffled[i], net(x[g])[g.index(i)], atol=1e-5)
    assert any(groups[i] != set(range(4 * i, 4 * i + 4)) for i in range(4))
    net.eval()  # with running statistics the grouping changes nothing
    assert torch.allclose(split_forward(net, x, 4, shuffle=True), net(x), atol=1e-6)
    assert torch.equal(split_forward(net, x[:3], 8), net(x[:3]))  # too few images to split: one group
    assert Pretrainer("mocov2").method_cfg.bn_splits == 1 and Pretrainer("mocov1").method_cfg.bn_splits == 1
