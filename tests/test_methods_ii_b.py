"""DINOv2 (DINO + iBOT + KoLeo + Sinkhorn-Knopp), DINOv2 distillation, ViT registers,
GRN and ConvNeXt V2 FCMAE: the maths against hand computations, the masking against
its invariants, and a few training steps on tiny real images per method."""
from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from sslfeatures import Encoder, Pretrainer
from sslfeatures.backbones import Backbone, backbone_from_config
from sslfeatures.layers import ConvNeXtV2Block, GlobalResponseNorm, global_response_norm
from sslfeatures.losses import iBOTPatchLoss, koleo_loss, sinkhorn_knopp
from sslfeatures.methods.dinov2 import block_mask, sample_ibot_masks, vit_tokens
from sslfeatures.methods.fcmae import masked_convnext_features

VIT = dict(backbone="vit_tiny_patch16_224", patch_size=8, image_size=32)
DINO_HEAD = dict(out_dim=128, hidden_dim=64, bottleneck_dim=32, lr=1e-3, warmup_teacher_temp_epochs=0,
                 teacher_temp=0.04, freeze_last_layer_epochs=0,
                 views=[{"scale": [0.4, 1.0], "count": 2}, {"scale": [0.1, 0.4], "size_frac": 0.5, "count": 2}])
CONVNEXT = dict(backbone="convnextv2_atto", image_size=32, patch_size=2,
                backbone_kwargs={"depths": [1, 1, 1, 1], "dims": [16, 32, 64, 128], "output_stride": 8})


@pytest.fixture(autouse=True)
def _one_thread():
    """These tests are sized for one core; two intra-op threads only spin on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- GRN -----------------------------------------------------------------------------------------
def test_grn_matches_a_hand_computation():
    # one image, 2x2 positions, 2 channels (channels last)
    x = torch.tensor([[[[1.0, 0.0], [2.0, 1.0]], [[0.0, 3.0], [2.0, 1.0]]]])
    gamma, beta = torch.tensor([0.5, -1.0]), torch.tensor([0.1, 0.2])
    g = np.array([math.sqrt(1 + 4 + 0 + 4), math.sqrt(0 + 1 + 9 + 1)])  # per-channel L2 over positions
    n = g / (g.mean() + 1e-6)
    expected = x.numpy() + gamma.numpy() * (x.numpy() * n) + beta.numpy()
    out = global_response_norm(x, gamma, beta)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-6)
    # channels-first layout gives the same numbers
    out_cf = global_response_norm(x.permute(0, 3, 1, 2), gamma, beta, channels_last=False)
    np.testing.assert_allclose(out_cf.permute(0, 2, 3, 1).numpy(), expected, rtol=1e-5, atol=1e-6)
    # the mask removes position (0, 1) from the statistics (and only from them)
    mask = torch.tensor([[[[0.0], [1.0]], [[0.0], [0.0]]]])
    g_vis = np.array([math.sqrt(1 + 0 + 4), math.sqrt(0 + 9 + 1)])
    n_vis = g_vis / (g_vis.mean() + 1e-6)
    expected_m = x.numpy() + gamma.numpy() * (x.numpy() * n_vis) + beta.numpy()
    np.testing.assert_allclose(global_response_norm(x, gamma, beta, mask).numpy(), expected_m, rtol=1e-5, atol=1e-6)
    # the layer starts as the identity and matches timm's GRN once its parameters are set
    layer = GlobalResponseNorm(2)
    torch.testing.assert_close(layer(x), x)
    from timm.layers.grn import GlobalResponseNorm as TimmGRN

    timm_grn = TimmGRN(2)
    with torch.no_grad():
        for p in (layer, timm_grn):
            p.weight.copy_(gamma)
            p.bias.copy_(beta)
    torch.testing.assert_close(layer(x), timm_grn(x))


def test_convnextv2_block_ignores_masked_positions():
    torch.manual_seed(0)
    blk = ConvNeXtV2Block(8).eval()
    with torch.no_grad():
        blk.grn.weight.normal_()
    x = torch.randn(2, 8, 6, 6)
    mask = (torch.rand(2, 1, 6, 6) < 0.5).float()
    y1 = blk(x, mask)
    y2 = blk(x + mask * torch.randn_like(x) * 10, mask)
    keep = (1 - mask).bool().expand_as(y1)
    torch.testing.assert_close(y1[keep], y2[keep])
    assert not torch.allclose(blk(x), y1)  # the mask does change the visible outputs' context


# -- registers -------------------------------------------------------------------------------------
def test_registers_are_dropped_from_outputs_and_survive_save_load(tmp_path):
    bb = Backbone("vit_tiny_patch16_224", image_size=32, patch_size=8, registers=3, depth=1)
    assert bb.model.reg_token.shape[1] == 3 and bb.num_prefix_tokens == 4
    x = torch.randn(2, 3, 32, 32)
    feats = bb.forward_features(x)
    assert feats.shape[1] == 1 + 3 + 16
    torch.testing.assert_close(bb.forward_tokens(x), feats[:, 4:])
    torch.testing.assert_close(bb(x, pooling="mean"), feats[:, 4:].mean(1))
    torch.testing.assert_close(bb(x, pooling="cls"), feats[:, 0])
    # changing the registers changes the features (they take part in attention) ...
    with torch.no_grad():
        bb.model.reg_token.add_(1.0)
    assert not torch.allclose(bb.forward_tokens(x), feats[:, 4:])
    # ... and the Encoder round trip keeps them
    enc = Encoder.random_init("vit_tiny_patch16_224", image_size=32, patch_size=8, device="cpu",
                              backbone_kwargs={"registers": 3, "depth": 1})
    assert enc.config["backbone"]["registers"] == 3
    enc.save_pretrained(tmp_path / "enc")
    back = Encoder.from_pretrained(tmp_path / "enc", device="cpu")
    assert back.backbone.num_prefix_tokens == 4
    img = (np.random.default_rng(0).random((2, 32, 32, 3)) * 255).astype(np.uint8)
    np.testing.assert_allclose(back.embed(img), enc.embed(img), rtol=1e-5, atol=1e-6)
    assert back.patch_features(img).shape == (2, 16, enc.num_features)
    assert backbone_from_config(bb.config).model.reg_token.shape[1] == 3


def test_registers_need_a_vit_and_a_valid_count():
    with pytest.raises(ValueError, match="needs a ViT"):
        Backbone("resnet18", registers=2)
    with pytest.raises(ValueError, match="non-negative integer"):
        Backbone("vit_tiny_patch16_224", registers=-1)
    with pytest.raises(ValueError, match="once"):
        Backbone("vit_tiny_patch16_224", registers=2, reg_tokens=2)


# -- DINOv2 pieces ------------------------------------------------------------------------------------
def test_sinkhorn_knopp_balances_prototypes_and_is_stable():
    torch.manual_seed(0)
    logits = torch.randn(64, 16)
    q = sinkhorn_knopp(logits, 0.1, n_iters=3)
    torch.testing.assert_close(q.sum(1), torch.ones(64))            # each sample: a distribution
    q_many = sinkhorn_knopp(logits, 0.1, n_iters=200)
    torch.testing.assert_close(q_many.sum(0), torch.full((16,), 4.0), rtol=1e-3, atol=1e-3)  # B/K each
    torch.testing.assert_close(sinkhorn_knopp(logits + 50.0, 0.1), q, rtol=1e-4, atol=1e-5)  # exp(500) would overflow
    assert torch.isfinite(sinkhorn_knopp(logits * 100, 0.01)).all()
    assert sinkhorn_knopp(torch.zeros(0, 16), 0.1).shape == (0, 16)        # no masked patch on this process


_SPLIT = (10, 22)  # uneven rows per process, as masked-patch counts are


def _dist_inputs() -> torch.Tensor:
    return torch.randn(sum(_SPLIT), 8, generator=torch.Generator().manual_seed(0)) * 3


def _sk_worker(rank: int, world: int, init_file: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    local = _dist_inputs().split(_SPLIT)[rank]
    loss = iBOTPatchLoss(8, centering="centering", center_momentum=0.5)
    loss.update_center(local)
    torch.save({"q": sinkhorn_knopp(local, 0.1, n_iters=5), "center": loss.center,
                "empty": sinkhorn_knopp(local[:0] if rank else local, 0.1, n_iters=5)}, f"{out}.{rank}")
    dist.destroy_process_group()


def test_sinkhorn_and_ibot_centre_span_all_processes(tmp_path):
    """2 gloo processes with uneven shares of the rows give the single-process Sinkhorn-Knopp
    assignments and iBOT centre of the whole batch (and a process with no row takes part)."""
    import torch.multiprocessing as mp

    mp.spawn(_sk_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "res")), nprocs=2, join=True)
    res = [torch.load(tmp_path / f"res.{r}", weights_only=True) for r in range(2)]
    full = _dist_inputs()
    torch.testing.assert_close(torch.cat([r["q"] for r in res]), sinkhorn_knopp(full, 0.1, n_iters=5))
    ref = iBOTPatchLoss(8, centering="centering", center_momentum=0.5)
    ref.update_center(full)
    torch.testing.assert_close(res[0]["center"], ref.center)
    torch.testing.assert_close(res[1]["center"], ref.center)
    torch.testing.assert_close(res[0]["empty"], sinkhorn_knopp(full[:_SPLIT[0]], 0.1, n_iters=5))
    assert res[1]["empty"].shape == (0, 8)
    # a per-process Sinkhorn-Knopp would differ: the test can tell
    assert not torch.allclose(res[0]["q"], sinkhorn_knopp(full[:_SPLIT[0]], 0.1, n_iters=5))


def test_koleo_prefers_spread_features():
    torch.manual_seed(0)
    spread = torch.eye(8)
    clustered = torch.eye(8) * 0.01 + torch.ones(8, 8)
    assert koleo_loss(spread) < koleo_loss(clustered)
    np.testing.assert_allclose(float(koleo_loss(spread)), -math.log(math.sqrt(2)), rtol=1e-5)
    x = torch.randn(16, 4, requires_grad=True)
    koleo_loss(x).backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="B >= 2"):
        koleo_loss(torch.randn(1, 4))


def test_ibot_loss_weights_each_image_by_its_masked_patches():
    loss_fn = iBOTPatchLoss(3, student_temp=1.0, centering="centering", center_momentum=1.0)
    masks = torch.tensor([[True, True, False], [False, True, False], [False, False, False]])
    s = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 2.0]])
    t = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    ce = -(torch.softmax(t, -1) * torch.log_softmax(s, -1)).sum(-1)
    expected = (ce[0] / 2 + ce[1] / 2 + ce[2] / 1) / 3  # image 0: 2 masked, image 1: 1, image 2: none
    torch.testing.assert_close(loss_fn(s, t, masks, teacher_temp=1.0), expected)
    with pytest.raises(ValueError, match="masked patches"):
        loss_fn(s[:2], t[:2], masks, 1.0)


def test_block_masks_cover_the_requested_share():
    rng = random.Random(0)
    m = block_mask(14, 14, 60, rng, max_patches=98)
    assert 30 <= int(m.sum()) <= 60
    masks = sample_ibot_masks(32, (14, 14), 0.5, (0.1, 0.5), random.Random(1))
    per_image = masks.sum(1)
    assert masks.shape == (32, 196) and masks.dtype == torch.bool
    assert int((per_image > 0).sum()) == 16                                # mask_probability 0.5
    assert int(per_image.max()) <= int(196 * 0.5) and int(per_image[per_image > 0].min()) >= 4
    again = sample_ibot_masks(32, (14, 14), 0.5, (0.1, 0.5), random.Random(1))
    assert torch.equal(masks, again)


def test_masked_patches_are_hidden_from_the_student():
    torch.manual_seed(0)
    bb = Backbone("vit_tiny_patch16_224", image_size=32, patch_size=8, registers=2, depth=2).eval()
    x = torch.randn(2, 3, 32, 32)
    token = torch.randn(1, bb.num_features)
    pooled, patches = vit_tokens(bb, x)
    feats = bb.forward_features(x)
    torch.testing.assert_close(patches, bb.tokens_from_features(feats))
    torch.testing.assert_close(pooled, bb(x))
    masks = torch.zeros(2, 16, dtype=torch.bool)
    masks[0, [0, 1, 5]] = True
    masks[1, [10]] = True
    pix = masks.view(2, 1, 4, 4).float().repeat_interleave(8, 2).repeat_interleave(8, 3)
    a = vit_tokens(bb, x, masks, token)
    b = vit_tokens(bb, x + pix * torch.randn_like(x) * 5, masks, token)
    torch.testing.assert_close(a[0], b[0])
    torch.testing.assert_close(a[1], b[1])
    assert not torch.allclose(a[1], patches)


# -- FCMAE masking -------------------------------------------------------------------------------------
@pytest.mark.parametrize("stem", [dict(patch_size=2, output_stride=8), dict(patch_size=1)])
def test_dense_masked_convnext_is_exact_and_leak_free(stem):
    torch.manual_seed(0)
    model = Backbone("convnextv2_atto", image_size=32, depths=(1, 1, 1, 1), dims=(16, 32, 64, 128),
                     **stem).model.eval().requires_grad_(False)
    for name, p in model.named_parameters():  # GRN starts as the identity and biases at zero, which
        if ".grn." in name or name.endswith("bias"):  # would hide masking mistakes: randomise them
            p.normal_(std=0.5)
    r = model.feature_info[-1]["reduction"]
    x = torch.randn(2, 3, 32, 32)
    g = 32 // r
    torch.testing.assert_close(masked_convnext_features(model, x, torch.zeros(2, g, g)), model.forward_features(x))
    mask = torch.tensor([[[1.0, 0, 0, 1], [0, 1, 0, 0], [0, 0, 0, 1], [1, 0, 0, 0]]] * 2)
    pix = mask.repeat_interleave(r, 1).repeat_interleave(r, 2).unsqueeze(1)
    y1 = masked_convnext_features(model, x, mask)
    y2 = masked_convnext_features(model, x + pix * torch.randn_like(x) * 5, mask)
    torch.testing.assert_close(y1, y2)                       # masked pixels never reach the output
    assert float(y1.abs().amax(1)[mask.bool()].max()) == 0.0  # and masked cells stay empty
    assert not torch.allclose(y1, model.forward_features(x))
    # sparse semantics: with only the top-left 2x2 cells visible, those cells get exactly what the
    # dense network computes on that crop alone (zero padding = masked neighbours, GRN over the crop)
    corner = torch.ones(2, g, g)
    corner[:, :2, :2] = 0
    crop = model.forward_features(x[..., : 2 * r, : 2 * r])
    torch.testing.assert_close(masked_convnext_features(model, x, corner)[..., :crop.shape[-2], :crop.shape[-1]], crop)


# -- training on tiny real images ---------------------------------------------------------------------
def _fit(name, cfg, images, out):
    cfg = dict(cfg, epochs=30, batch_size=8, warmup_epochs=0, log_every=1, progress=False, precision="fp32",
               checkpoint_every=10_000)
    return Pretrainer(name, **cfg).fit(images, output_dir=out, max_steps=18)


def _check_run(run, images, name):
    losses = [m["loss"] for m in run.metrics if "loss" in m]
    assert len(losses) == 18 and all(math.isfinite(v) for v in losses)
    first, last = np.mean(losses[:4]), np.mean(losses[-4:])
    assert last < first, f"{name}: loss did not fall ({first:.4f} -> {last:.4f})"
    monitor = [m for m in run.metrics if "norm_std" in m]
    assert monitor and monitor[-1]["norm_std"] > 0.01 and monitor[-1]["eff_rank"] > 1.5
    enc = Encoder.from_pretrained(run.output_dir)
    v = enc.embed(images)
    assert v.shape == (48, enc.num_features) and np.isfinite(v).all()
    return enc


def test_dinov2_with_registers_trains(tiny_images, tmp_path):
    cfg = dict(VIT, **DINO_HEAD, backbone_kwargs={"depth": 2, "registers": 2}, ibot_separate_head=True, ibot_out_dim=64)
    run = _fit("dinov2", cfg, tiny_images, tmp_path / "dinov2")
    rows = [m for m in run.metrics if "ibot_loss" in m]
    assert all(math.isfinite(m["ibot_loss"]) and math.isfinite(m["koleo_loss"]) for m in rows)
    assert 0 < np.mean([m["masked_patches"] for m in rows]) < 0.5
    enc = _check_run(run, tiny_images, "dinov2")
    assert enc.config["backbone"]["registers"] == 2 and enc.backbone.num_prefix_tokens == 3


def test_dinov2_distills_any_encoder(tiny_images, tmp_path):
    teacher = Encoder.random_init("resnet18", image_size=32, stem="small_s2", device="cpu",
                                  backbone_kwargs={"channels": [16, 32, 64, 128]})  # a CNN, other width
    teacher.config["mean"], teacher.config["std"] = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]
    teacher.save_pretrained(tmp_path / "teacher")
    cfg = dict(VIT, **DINO_HEAD, backbone_kwargs={"depth": 1}, teacher=str(tmp_path / "teacher"))
    run = _fit("dinov2_distill", cfg, tiny_images, tmp_path / "distill")
    assert all(m["masked_patches"] == 1.0 for m in run.metrics if "masked_patches" in m)  # iBOT on every patch
    enc = _check_run(run, tiny_images, "dinov2_distill")
    assert enc.config["backbone"]["name"] == "vit_tiny_patch16_224"  # the student, not the teacher
    with pytest.raises(ValueError, match="needs teacher="):
        Pretrainer("dinov2_distill", **VIT, **DINO_HEAD).build()


def test_fcmae_trains_and_scores_masked_patches_only(tiny_images, tmp_path):
    cfg = dict(CONVNEXT, decoder_dim=32, lr=2e-3)
    method = Pretrainer("fcmae", **cfg).build()
    imgs = torch.randn(2, 3, 32, 32)
    torch.manual_seed(0)
    loss, pred, mask = method.forward_loss(imgs)
    assert pred.shape == (2, 16, 8 * 8 * 3) and mask.shape == (2, 4, 4)
    assert int(mask.sum()) == 2 * round(16 * 0.6)
    grad = torch.autograd.grad(loss, pred)[0]
    visible = ~mask.flatten(1).bool()
    assert grad[visible].abs().max() == 0 and grad[~visible].abs().max() > 0
    with pytest.raises(ValueError, match="multiple of the encoder's total stride"):
        method.forward_loss(torch.randn(1, 3, 28, 28))
    with pytest.raises(ValueError, match="ConvNeXt"):
        Pretrainer("fcmae", backbone="resnet18", image_size=32).build()
    run = _fit("fcmae", cfg, tiny_images, tmp_path / "fcmae")
    _check_run(run, tiny_images, "fcmae")
