"""Methods II (MoCo v1/v3, SimSiam, BYOL without batch statistics, Barlow Twins, VICReg,
W-MSE): each trains on tiny real images with its loss falling, nothing NaN and the
collapse monitor quiet; SimSiam without stop-gradient collapses and the monitor says so;
the new losses and the GN+WS backbone option do what their papers define."""
from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch

from sslfeatures import Encoder, Pretrainer, create_backbone
from sslfeatures.config import ConfigError
from sslfeatures.engine.monitor import collapse_stats, is_collapsed
from sslfeatures.losses import barlow_twins_loss, info_nce, vicreg_terms, whiten, wmse_loss

CNN = dict(backbone="resnet18", stem="small_s2", backbone_kwargs={"channels": [16, 32, 64, 128]}, image_size=32)
VIT = dict(backbone="vit_tiny_patch16_224", patch_size=8, image_size=32, backbone_kwargs={"depth": 2})
# tiny images and backbone: SimSiam without stop-gradient needs ~50 steps to collapse
SIMSIAM = dict(backbone="resnet18", stem="small_s2", backbone_kwargs={"channels": [8, 16, 32, 64]}, image_size=16,
               proj_hidden_dim=64, proj_dim=64, pred_hidden_dim=16, lr=1.0)
# name -> (method, recipe, overrides); SimSiam's run is test_simsiam_collapses_without_stop_gradient[True]
TINY: dict[str, tuple[str, str | None, dict]] = {
    "mocov1": ("mocov1", None, dict(CNN, queue_size=16, lr=0.1, ema_momentum=0.9, temperature=0.2)),
    "mocov3": ("mocov3", None, dict(VIT, proj_hidden_dim=128, pred_hidden_dim=128, proj_dim=64, lr=1e-3,
                                    momentum_start=0.9)),
    "byol_gn_ws": ("byol", "byol_gn_ws", dict(CNN, backbone_kwargs=dict(CNN["backbone_kwargs"], norm="gn_ws"),
                                              proj_hidden_dim=128, pred_hidden_dim=128, proj_dim=64, lr=0.5)),
    "barlow_twins": ("barlow_twins", None, dict(CNN, proj_hidden_dim=128, proj_dim=128, lr=0.3)),
    "vicreg": ("vicreg", None, dict(CNN, proj_hidden_dim=128, proj_dim=128, lr=0.3)),
    "wmse": ("wmse", None, dict(CNN, proj_hidden_dim=64, proj_dim=8, w_size=16, w_iter=1, lr=2e-3)),
}
STEPS = 16
FIT = dict(epochs=30, batch_size=16, warmup_epochs=0, log_every=1, progress=False, precision="fp32",
           checkpoint_every=10_000)


@pytest.fixture(scope="module")
def crops(photos) -> np.ndarray:
    """STEPS * 16 real 32 px crops of scikit-image photos: one epoch of the tiny runs."""
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for k in range(STEPS * 16):
        pil = Image.fromarray(photos[k % len(photos)])
        w, h = pil.size
        s = int(min(w, h) * rng.uniform(0.3, 0.9))
        x0, y0 = rng.integers(0, w - s + 1), rng.integers(0, h - s + 1)
        out.append(np.asarray(pil.crop((x0, y0, x0 + s, y0 + s)).resize((32, 32), Image.BILINEAR)))
    return np.stack(out)


def _fit(method: str, recipe: str | None, overrides: dict, data, out):
    return Pretrainer(method, recipe=recipe, **overrides, **FIT).fit(data, output_dir=out, max_steps=STEPS)


def _collapse_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "representation collapse" in r.getMessage()]


@pytest.mark.parametrize("name", list(TINY))
def test_loss_falls_no_nan_no_collapse(name, crops, tmp_path, caplog):
    method, recipe, overrides = TINY[name]
    run = _fit(method, recipe, overrides, crops, tmp_path / name)
    losses = [m["loss"] for m in run.metrics if "loss" in m]
    assert len(losses) == STEPS and all(math.isfinite(v) for v in losses)
    first, last = np.mean(losses[1:5]), np.mean(losses[-4:])  # at step 0 MoCo's queue is still random
    assert last < first, f"{name}: loss did not fall ({first:.4f} -> {last:.4f})"
    monitor = [m for m in run.metrics if "norm_std" in m]
    assert monitor and not is_collapsed(monitor[-1]), monitor
    assert not _collapse_warnings(caplog)
    enc = Encoder.from_pretrained(run.output_dir)
    v = enc.embed(crops[:8])
    assert v.shape == (8, enc.num_features) and np.isfinite(v).all()


@pytest.mark.parametrize("stop_gradient", [True, False])
@pytest.mark.usefixtures("fast_tiny_runs")  # one thread, as the full suite runs it: see the comment below
def test_simsiam_collapses_without_stop_gradient(stop_gradient, crops, tmp_path, caplog):
    """Chen & He 2021, Fig. 2: with stop-gradient the loss falls and nothing collapses;
    without it the loss drops to near its minimum of -1, the output degenerates and the
    collapse monitor fires (watching SimSiam's prediction; the backbone lags far behind)."""
    caplog.set_level(logging.WARNING, logger="sslfeatures")
    data = np.concatenate([crops] * 4)  # 32 steps of 32 an epoch: the monitor looks 5 times
    fit = dict(FIT, batch_size=32)
    # one thread (fast_tiny_runs): at lr 1.0 this tiny run is chaotic, and on an AVX-512 host the 2-thread
    # trajectory's 64-d prediction (16-d hidden) dips to effective rank 1.24 once, under the monitor's 1.5,
    # although its normalised std stays 0.5-0.8 (the 1-thread run: rank 1.68-3.38)
    run = Pretrainer("simsiam", **SIMSIAM, stop_gradient=stop_gradient, **fit).fit(
        data, output_dir=tmp_path / "run", max_steps=160)
    losses = [m["loss"] for m in run.metrics if "loss" in m]
    assert len(losses) == 160 and all(math.isfinite(v) for v in losses)
    stats = [m for m in run.metrics if "head_norm_std" in m]
    assert len(stats) == 5
    assert not any(is_collapsed({k: v for k, v in m.items() if not k.startswith("head_")}) for m in stats)
    if stop_gradient:
        assert np.mean(losses[-8:]) < np.mean(losses[1:9]) - 0.3
        assert not any(is_collapsed(m) for m in stats) and not _collapse_warnings(caplog)
    else:
        assert min(losses) < -0.9
        assert any(is_collapsed(m) for m in stats), stats
        assert _collapse_warnings(caplog), "the collapse monitor did not fire"


def test_gn_ws_backbone_uses_no_batch_statistics(tmp_path):
    bb = create_backbone("resnet18", image_size=32, stem="small_s2", norm="gn_ws",
                         channels=[16, 32, 64, 128]).train()
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in bb.modules())
    x = torch.rand(6, 3, 32, 32)
    with torch.no_grad():  # in train mode an image's embedding does not depend on its batch
        torch.testing.assert_close(bb(x)[:2], bb(x[:2]), rtol=1e-4, atol=1e-5)
        bn = create_backbone("resnet18", image_size=32, stem="small_s2", channels=[16, 32, 64, 128]).train()
        assert not torch.allclose(bn(x)[:2], bn(x[:2]), rtol=1e-4, atol=1e-5)  # BatchNorm's does
    p = Pretrainer("byol", recipe="byol_gn_ws", **TINY["byol_gn_ws"][2])
    assert p.method_cfg.head_bn is False and p.cfg.backbone_kwargs["norm"] == "gn_ws"
    method = p.build()
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in method.modules())
    with pytest.raises(ValueError, match="has none"):
        create_backbone("vit_tiny_patch16_224", image_size=32, patch_size=8, norm="gn_ws")
    with pytest.raises(ValueError, match="unknown norm"):
        create_backbone("resnet18", norm="layer")


def test_a_recipe_variant_is_a_method_name(capsys):
    """Pretrainer("byol_gn_ws") = Pretrainer("byol", recipe="byol_gn_ws"); unknown names list the variants."""
    from sslfeatures.cli import main

    by_name, by_recipe = Pretrainer("byol_gn_ws"), Pretrainer("byol", recipe="byol_gn_ws")
    assert by_name.method_cls is by_recipe.method_cls and by_name.full_config() == by_recipe.full_config()
    assert by_name.cfg.backbone_kwargs["norm"] == "gn_ws" and by_name.method_cfg.head_bn is False
    with pytest.raises(ValueError, match=r"recipe variants: .*byol_gn_ws \(byol\)"):
        Pretrainer("byol_gnws")
    with pytest.raises(ConfigError, match="already names a recipe"):
        Pretrainer("byol_gn_ws", recipe="byol")
    assert main(["methods"]) == 0
    assert "byol_gn_ws" in capsys.readouterr().out


def test_mocov3_freezes_a_random_patch_projection_and_sincos_positions():
    from sslfeatures.methods.mae import sincos_2d

    method = Pretrainer("mocov3", **TINY["mocov3"][2]).build()
    vit = method.backbone.model
    assert not any(p.requires_grad for p in vit.patch_embed.parameters())
    assert not vit.pos_embed.requires_grad
    torch.testing.assert_close(vit.pos_embed[0, 1:], sincos_2d(vit.pos_embed.shape[-1], 4))
    assert all(p.requires_grad for p in vit.blocks.parameters())
    learned = Pretrainer("mocov3", **TINY["mocov3"][2], freeze_patch_embed=False, sincos_pos_embed=False).build()
    assert learned.backbone.model.patch_embed.proj.weight.requires_grad


def test_whitening_and_redundancy_losses():
    torch.manual_seed(0)
    x = torch.randn(256, 8) @ torch.randn(8, 8) + 3.0
    z = whiten(x)
    torch.testing.assert_close(z.mean(0), torch.zeros(8), atol=1e-4, rtol=0)
    torch.testing.assert_close(z.T @ z / 255, torch.eye(8), atol=1e-3, rtol=0)
    # Barlow Twins: identical decorrelated views give C = I (loss ~ 0); unrelated views do not
    assert float(barlow_twins_loss(z, z)) < 1e-3
    assert float(barlow_twins_loss(z, z[torch.randperm(256)])) > 1.0
    t = vicreg_terms(3 * z, 3 * z)  # std 3 >= 1, no covariance, identical views
    assert float(t["invariance"]) == 0 and float(t["variance"]) == 0 and float(t["covariance"]) < 1e-3
    assert float(vicreg_terms(torch.ones(16, 4), torch.ones(16, 4))["variance"]) > 0.9  # collapsed
    # W-MSE: a view against itself costs 0, against an unrelated batch ~2 (cos ~ 0)
    assert float(wmse_loss([x, x], w_size=64, w_iter=2)) < 1e-4
    assert float(wmse_loss([x, torch.randn(256, 8)], w_size=64)) > 1.5
    with pytest.raises(ValueError, match="multiple of w_size"):
        wmse_loss([x[:100], x[:100]], w_size=64)
    with pytest.raises(ValueError, match="more than 8 samples"):
        whiten(x[:8])
    # MoCo v3's InfoNCE: matched pairs among orthogonal keys beat a shuffled pairing
    e = torch.eye(16)
    assert float(info_nce(e, e, 0.1)) < 1e-3 < float(info_nce(e, e[torch.roll(torch.arange(16), 1)], 0.1))


def test_whitening_stays_fp32_under_bf16_autocast():
    """On a CPU with bf16 units (and on CUDA) the engine trains under autocast: the whitening's
    covariance, Cholesky factor and projection must still run in fp32, or a 64-sample batch of
    32-d embeddings whitens wrongly (and its covariance can turn singular mid-run)."""
    torch.manual_seed(0)
    x = torch.randn(4, 64, 32) @ torch.randn(32, 32) + 3.0  # 4 sub-batches of 64, correlated 32-d
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = whiten(x.bfloat16())
    assert z.dtype == torch.float32
    cov = z.transpose(-1, -2) @ z / 63
    torch.testing.assert_close(cov, torch.eye(32).expand_as(cov), atol=2e-3, rtol=0)
    torch.testing.assert_close(z, whiten(x.bfloat16().float()), atol=1e-4, rtol=1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert float(wmse_loss([x[0], x[0]], w_size=64)) < 1e-4


def test_config_errors_are_clear():
    with pytest.raises(ValueError, match="w_size must be larger than proj_dim"):
        Pretrainer("wmse", **dict(CNN, proj_dim=64, w_size=32)).build()
    with pytest.raises(ValueError, match="expected true/false"):
        Pretrainer("simsiam", stop_gradient="no")
    assert Pretrainer("barlow-twins").method_cfg.lambd == 0.0051


def test_recipes_hold_the_papers_defaults():
    v1 = Pretrainer("mocov1")
    assert v1.method_cfg.temperature == 0.07 and v1.method_cfg.queue_size == 65536 and v1.cfg.base_lr == 0.03
    v3 = Pretrainer("mocov3")
    assert v3.cfg.optimizer == "adamw" and v3.cfg.base_lr == 1.5e-4 and v3.cfg.warmup_epochs == 40
    assert v3.method_cfg.temperature == 0.2 and v3.method_cfg.momentum_start == 0.99
    ss = Pretrainer("simsiam")
    assert ss.method_cfg.stop_gradient and ss.method_cfg.pred_hidden_dim == 512 and ss.cfg.base_lr == 0.05
    bt = Pretrainer("barlow_twins")
    assert bt.method_cfg.proj_dim == 8192 and bt.cfg.optimizer == "lars"
    vr = Pretrainer("vicreg")
    assert (vr.method_cfg.sim_coeff, vr.method_cfg.std_coeff, vr.method_cfg.cov_coeff) == (25.0, 25.0, 1.0)
    wm = Pretrainer("wmse")
    assert wm.method_cfg.w_size == 256 and wm.method_cfg.proj_dim == 128


def test_monitor_checks_the_head_embedding_when_a_method_exposes_it():
    torch.manual_seed(0)
    spread = collapse_stats(torch.randn(64, 32))
    line = collapse_stats(torch.randn(64, 1) * torch.randn(1, 32) + 1e-4 * torch.randn(64, 32))
    assert not is_collapsed(spread) and line["eff_rank"] < 1.5
    assert is_collapsed({**spread, **{f"head_{k}": v for k, v in line.items()}})
    assert not is_collapsed({**spread, **{f"head_{k}": v for k, v in spread.items()}})
