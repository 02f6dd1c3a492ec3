"""The classic pretext tasks and video colorization: their labels are right (a rotated
image's label, a shuffled tile order undone by the inverse permutation, patch positions,
Lab round trips), their losses fall on tiny real images, and their trunks come out as
Encoders that save, load and embed (the split-brain Encoder is the concatenation of its
two trunks)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sslfeatures import Encoder, Pretrainer
from sslfeatures.augment import pretext as P
from sslfeatures.methods import StepInfo

CNN = dict(backbone="resnet18", stem="small_s2", backbone_kwargs={"channels": [8, 16, 32, 64]}, image_size=32,
           precision="fp32", progress=False)
NO_COLOUR = {"jitter_p": 0.0, "gray_p": 0.0, "blur_p": 0.0}
TINY = {
    "rotation": dict(CNN, views=[{"scale": [0.6, 1.0], **NO_COLOUR}]),
    "relative_location": dict(CNN, head_hidden_dim=64, pairs_per_image=8,
                              views=[{"size": 48, "scale": [0.8, 1.0], **NO_COLOUR}]),
    "jigsaw": dict(CNN, num_permutations=8, tile_dim=32, head_hidden_dim=64,
                   views=[{"size": 48, "scale": [0.7, 1.0], "hflip": 0.0, **NO_COLOUR}]),
    "context_encoder": dict(CNN, decoder_dim=32, disc_dim=16),
    "colorization": dict(CNN, head_dim=32),
    "split_brain": dict(CNN, head_dim=32),
}
LR = {"rotation": 2e-3, "relative_location": 2e-3, "jigsaw": 1e-2, "context_encoder": 2e-3, "colorization": 2e-3,
      "split_brain": 2e-3}


# -- fixtures ----------------------------------------------------------------------------------
@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tests are budgeted for one core; extra threads only spin on a loaded machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def photo_batch(photos) -> torch.Tensor:
    """16 real 48x48 crops (uint8, (16, 3, 48, 48)) of the colour scikit-image photos."""
    from PIL import Image

    colour = [p for p in photos if np.ptp(p.astype(int)[..., 0] - p[..., 1]) > 40][:4]
    rng = np.random.default_rng(0)
    out = []
    for k in range(16):
        pil = Image.fromarray(colour[k % len(colour)])
        w, h = pil.size
        s = int(min(w, h) * rng.uniform(0.4, 0.8))
        x0, y0 = rng.integers(0, w - s + 1), rng.integers(0, h - s + 1)
        out.append(np.asarray(pil.crop((x0, y0, x0 + s, y0 + s)).resize((48, 48), Image.BILINEAR)))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()


@pytest.fixture(scope="module")
def video_folder(tmp_path_factory, photos):
    """Two short mp4 clips written with PyAV: a camera panning over real photos."""
    pytest.importorskip("av")
    from sslfeatures.video.io import write_video

    root = tmp_path_factory.mktemp("videos")
    for v, (img, (y0, x0)) in enumerate([(photos[0], (40, 40)), (photos[1], (20, 60))]):
        frames = [np.ascontiguousarray(img[y0 + 3 * t: y0 + 3 * t + 64, x0 + 4 * t: x0 + 4 * t + 64])
                  for t in range(14)]
        write_video(root / f"clip{v}.mp4", frames, fps=10)
    return root


def _train(name: str, batch: torch.Tensor, steps: int, key: str = "loss", **over) -> list[float]:
    """Train a method built by the Pretrainer (recipe + overrides) on one fixed batch with
    the engine's parameter groups (lr_scale honoured) and return the logged values."""
    from sslfeatures.engine.optim import build_optimizer, param_groups

    torch.manual_seed(0)
    pre = Pretrainer(name, **{**TINY.get(name, {}), **over})
    method = pre.build()
    make = getattr(method, "param_groups", None)
    groups = make(0.0) if make else param_groups(method.trainable_modules(), 0.0)
    lr = LR.get(name, 2e-3)
    opt = build_optimizer("adamw", groups, lr, 0.0, 0.9, (0.9, 0.999))
    for g in opt.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
    out = []
    method.train()
    for step in range(steps):
        torch.manual_seed(step)
        views = method.views(batch, pre.cfg.image_size)
        res = method(views, StepInfo(step, steps, 0, steps))
        opt.zero_grad(set_to_none=True)
        res["loss"].backward()
        opt.step()
        out.append(float(res[key].detach()))
    return out


def _falls(values: list[float], name: str) -> None:
    assert all(math.isfinite(v) for v in values), f"{name}: non-finite loss {values}"
    first, last = np.mean(values[:3]), np.mean(values[-3:])
    assert last < first, f"{name}: loss did not fall ({first:.4f} -> {last:.4f}): {values}"


# -- colour space ------------------------------------------------------------------------------
def test_lab_matches_skimage_and_round_trips(photos):
    color = pytest.importorskip("skimage.color")
    img = photos[0][:40, :40]
    x = torch.from_numpy(img).permute(2, 0, 1).float().div(255).unsqueeze(0)
    lab = P.rgb_to_lab(x)
    ref = color.rgb2lab(img).transpose(2, 0, 1)
    assert np.abs(lab[0].numpy() - ref).max() < 0.02
    assert (P.lab_to_rgb(lab) - x).abs().max() < 1e-4
    white_black = P.rgb_to_lab(torch.tensor([[1.0, 0.0]] * 3).view(3, 1, 2))
    assert torch.allclose(white_black[:, 0, 0], torch.tensor([100.0, 0.0, 0.0]), atol=1e-2)
    assert torch.allclose(white_black[:, 0, 1], torch.zeros(3), atol=1e-3)


def test_ab_bins_cover_the_srgb_gamut_and_decode():
    bins = P.ab_gamut_bins()
    assert 300 <= len(bins) <= 320 and bins.shape[1] == 2
    assert (bins.remainder(10) == 0).all()
    assert bins[0].tolist() == [-90.0, 50.0]  # the first bin of Zhang et al.'s set as well
    ab = P.rgb_to_lab(torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)))[:, 1:]
    assert (torch.cdist(ab.permute(0, 2, 3, 1).reshape(-1, 2), bins).min(1).values <= 5 * math.sqrt(2) + 1e-4).all()
    soft = P.soft_encode_ab(ab, bins)
    assert torch.allclose(soft.sum(1), torch.ones(1, 32, 32), atol=1e-5) and ((soft > 0).sum(1) == 5).all()
    decoded = P.annealed_mean(torch.log(soft + 1e-12), bins, temperature=1.0)
    assert (decoded - ab).abs().max() < 5.0  # the mean of the soft encoding sits next to the true colour
    prior = torch.zeros(len(bins))
    prior[:10] = 1.0
    w = P.rebalance_weights(prior / prior.sum(), bins, lam=0.5, sigma=5.0)
    p = P.smooth_prior(prior / prior.sum(), bins, 5.0)
    assert torch.isclose((p * w).sum(), torch.tensor(1.0)) and w[200] > w[0]  # rare colours weigh more


# -- rotation ----------------------------------------------------------------------------------
def test_rotation_labels(photo_batch):
    x = photo_batch[:3].float()
    imgs, labels = P.four_rotations(x)
    assert labels.tolist() == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3
    for k in range(4):
        rotated = imgs[labels == k]
        assert torch.equal(torch.rot90(rotated, -k, dims=(-2, -1)), x)  # undoing label k gives the image
    # label 1 is 90 degrees counter-clockwise: the original's last column becomes the first row
    assert torch.equal(imgs[3][:, 0, :], x[0][:, :, -1])
    assert not torch.equal(imgs[3], imgs[9])  # 90 and 270 differ on a real photo


# -- relative patch location --------------------------------------------------------------------
def test_patch_location_labels_match_positions():
    from sslfeatures.methods.relative_location import NEIGHBOURS, patch_geometry, sample_pairs

    size = 96
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                            indexing="ij")
    # pixels know where they are
    coords = torch.stack([yy, xx, torch.zeros_like(yy)]).expand(6, -1, -1, -1).contiguous()
    patch, cell, jitter = patch_geometry(size, 0.5, 0.1)
    assert jitter > 0 and cell > patch
    torch.manual_seed(0)
    centre, neighbours, labels = sample_pairs(coords, 8, gap_ratio=0.5, jitter_ratio=0.1)
    assert centre.shape[-1] == patch and sorted(labels[0].tolist()) == list(range(8))
    for b in range(6):
        for k in range(8):
            row, col = divmod(NEIGHBOURS[int(labels[b, k])], 3)
            dy = float(neighbours[b, k, 0, 0, 0] - centre[b, 0, 0, 0])
            dx = float(neighbours[b, k, 1, 0, 0] - centre[b, 1, 0, 0])
            assert abs(dy - (row - 1) * cell) <= 2 * jitter and abs(dx - (col - 1) * cell) <= 2 * jitter
            assert max(abs(dy), abs(dx)) >= patch + 1  # a gap always separates the pair


def test_chromatic_aberration_guards(photo_batch):
    x = photo_batch[:4].float() / 255
    proj = P.project_out_green_magenta(x)
    axis = torch.tensor([-1.0, 2.0, -1.0]).view(1, 3, 1, 1)
    assert (proj * axis).sum(1).abs().max() < 1e-5  # nothing left along green-magenta
    gray = x.mean(1, keepdim=True).expand_as(x)
    assert torch.allclose(P.project_out_green_magenta(gray), gray, atol=1e-6)
    torch.manual_seed(0)
    dropped = P.color_drop(x)
    kept = [(dropped[b] == x[b]).flatten(1).all(1) for b in range(4)]
    assert all(int(k.sum()) == 1 for k in kept)  # exactly one channel survives


# -- jigsaw ------------------------------------------------------------------------------------
def test_crop_tiles_equals_slicing(photo_batch):
    x = photo_batch[:2].float()
    tops, lefts = torch.tensor([[0, 5], [40, 3]]), torch.tensor([[1, 30], [0, 7]])
    tiles = P.crop_tiles(x, tops, lefts, 8)
    for b in range(2):
        for t in range(2):
            y0, x0 = int(tops[b, t]), int(lefts[b, t])
            assert torch.equal(tiles[b, t], x[b, :, y0:y0 + 8, x0:x0 + 8])
    with pytest.raises(ValueError, match="outside"):
        P.crop_tiles(x, torch.tensor([[45], [0]]), torch.tensor([[0], [0]]), 8)


def test_jigsaw_permutations_and_inverse(photo_batch):
    torch.manual_seed(0)
    method = Pretrainer("jigsaw", **TINY["jigsaw"]).build()
    views = method.views(photo_batch[:4], 32)
    shuffled, labels, tiles = method.make_puzzle(views[0])
    perms = method.permutations[labels]
    for b in range(4):
        for i in range(9):
            assert torch.equal(shuffled[b, i], tiles[b, perms[b, i]])
    assert torch.equal(P.permute_tiles(shuffled, P.inverse_permutation(perms)), tiles)
    assert not torch.equal(shuffled, tiles)


def test_shipped_permutation_sets_are_the_greedy_maximal_hamming_sets():
    from sslfeatures.methods.jigsaw import permutations_path

    shipped = P.load_permutations(permutations_path(100))
    assert np.array_equal(shipped, P.maximal_hamming_permutations(100, 9, seed=0))
    big = P.load_permutations(permutations_path(1000))
    assert big.shape == (1000, 9) and np.array_equal(big[:100], shipped)  # greedy: prefixes agree
    d = (big[:, None] != big[None]).sum(-1)
    assert d[~np.eye(1000, dtype=bool)].mean() > 7.9  # Noroozi & Favaro report 8.00 for their 1000-set
    random = np.stack([np.random.default_rng(i).permutation(9) for i in range(100)])
    dr = (random[:, None] != random[None]).sum(-1)
    ds = (shipped[:, None] != shipped[None]).sum(-1)
    assert ds.sum() > dr.sum()  # farther apart than random permutations


def test_bad_permutation_file_is_refused(tmp_path):
    bad = tmp_path / "p.json"
    bad.write_text('{"permutations": [[0, 1, 2], [0, 0, 2]]}')
    with pytest.raises(ValueError, match="permutation of"):
        P.load_permutations(bad)
    two = tmp_path / "two.json"
    P.save_permutations(two, P.maximal_hamming_permutations(2, 9, seed=0), seed=0)
    with pytest.raises(ValueError, match="num_permutations=3"):
        Pretrainer("jigsaw", **dict(TINY["jigsaw"], num_permutations=3, permutations_file=str(two))).build()
    method = Pretrainer("jigsaw", **dict(TINY["jigsaw"], num_permutations=2, permutations_file=str(two))).build()
    assert method.permutations.shape == (2, 9)


# -- losses fall -------------------------------------------------------------------------------
@pytest.mark.parametrize("name,steps,key", [
    ("rotation", 20, "loss"), ("relative_location", 16, "loss"), ("jigsaw", 30, "loss"),
    ("context_encoder", 12, "rec"), ("colorization", 16, "loss"), ("split_brain", 12, "loss")])
def test_pretext_loss_falls(name, steps, key, photo_batch):
    _falls(_train(name, photo_batch, steps, key), name)


def test_context_encoder_discriminator_has_its_own_lr_and_gradients(photo_batch):
    from sslfeatures.losses import adversarial_losses

    method = Pretrainer("context_encoder", **TINY["context_encoder"]).build()
    disc = {id(p) for p in method.discriminator.parameters()}
    groups = method.param_groups(0.05)
    assert {g.get("lr_scale", 1.0) for g in groups if all(id(p) in disc for p in g["params"])} == {0.1}
    assert {g.get("lr_scale", 1.0) for g in groups if not any(id(p) in disc for p in g["params"])} == {1.0}
    x = method.views(photo_batch[:4], 32)[0]
    masked, pred = method.inpaint(x)
    s, n, o = method.start, method.size, method.overlap
    assert (masked[..., s + o:s + n - o, s + o:s + n - o] == 0).all() and pred.shape[-1] == n
    d_loss, g_loss = adversarial_losses(method.discriminator, method.crop_center(x), pred)
    g_loss.backward(retain_graph=True)  # the generator's loss must not train the discriminator ...
    assert all(p.grad is None or not p.grad.any() for p in method.discriminator.parameters())
    assert any(p.grad is not None and p.grad.any() for p in method.decoder.parameters())
    method.zero_grad(set_to_none=True)
    d_loss.backward()  # ... and the discriminator's loss must not train the generator
    assert all(p.grad is None for p in method.decoder.parameters())
    assert any(p.grad is not None and p.grad.any() for p in method.discriminator.parameters())


# -- encoders that come out --------------------------------------------------------------------
@pytest.mark.parametrize("name", ["colorization", "split_brain"])
def test_lab_trunks_come_out_as_encoders(name, tiny_images, tmp_path):
    cfg = dict(TINY[name], epochs=1, batch_size=8, warmup_epochs=0, log_every=1, checkpoint_every=10_000, lr=2e-3)
    run = Pretrainer(name, **cfg).fit(tiny_images, output_dir=tmp_path / name, max_steps=2)
    enc = Encoder.from_pretrained(run.output_dir)
    assert enc.config["backbone"]["kind"] == ("lab" if name == "colorization" else "split_brain")
    v = enc.embed(tiny_images)
    assert v.shape == (48, 64 if name == "colorization" else 128) and np.isfinite(v).all()
    if name == "split_brain":  # the Encoder is the concatenation of the two trunks
        x = torch.randn(2, 3, 32, 32)
        l_trunk, ab_trunk = enc.backbone.halves
        with torch.no_grad():
            assert torch.allclose(enc.backbone(x), torch.cat([l_trunk(x), ab_trunk(x)], 1), atol=1e-5)
            inter = enc.backbone.forward_intermediates(x, indices=[1], intermediates_only=True)[0]
            l_inter = l_trunk.forward_intermediates(x, indices=[1], intermediates_only=True)[0]
            assert inter.shape[1] == 2 * l_inter.shape[1]
    else:  # the trunk sees lightness only: a hue change that keeps L changes nothing
        assert enc.backbone.model.conv1.in_channels == 1
    enc.export(tmp_path / "exported")
    assert np.allclose(Encoder.from_pretrained(tmp_path / "exported").embed(tiny_images), v, atol=1e-5)


# -- video colorization ------------------------------------------------------------------------
VIDEO = dict(CNN, backbone_kwargs={"channels": [8, 16, 32, 64], "output_stride": 8}, embed_dim=16, batch_size=8,
             views=[{"scale": [0.8, 1.0], **NO_COLOUR}])


def test_video_clips_sample_references_then_target(video_folder):
    from sslfeatures.data.video_clips import VideoClips

    src = VideoClips(video_folder, size=32, num_frames=4, frame_gap=2)
    stream = src.stream_class(src, batch_size=4, seed=0, progress=False)
    assert stream.memory.shape == (28, 3, 32, 32)
    assert stream.n == 2 * (14 - 6)  # every start of every video
    clip = stream.clip(torch.tensor([0]))[0]
    assert torch.equal(clip, stream.memory[torch.tensor([0, 2, 4, 6])])
    batches = list(stream.epoch(0))
    assert len(batches) == 4 and batches[0].shape == (4, 4, 3, 32, 32)
    assert torch.equal(torch.cat(list(stream.epoch(0, start_step=2))), torch.cat(batches[2:]))
    with pytest.raises(ValueError, match="crops and flips only"):
        Pretrainer("video_colorization", **dict(VIDEO, views=[{"jitter_p": 0.8}])).build()


def test_video_colorization_trains_and_tracks(video_folder, tmp_path):
    cfg = dict(VIDEO, epochs=3, warmup_epochs=0, log_every=1, checkpoint_every=10_000, lr=3e-3)
    run = Pretrainer("video_colorization", **cfg).fit(video_folder, output_dir=tmp_path / "vc", max_steps=12)
    losses = [m["loss"] for m in run.metrics if "loss" in m]
    _falls(losses, "video_colorization")
    enc = Encoder.from_pretrained(run.output_dir)
    assert enc.config["backbone"]["lab_channels"] == "L"
    from sslfeatures.methods.video_colorization import propagate_labels

    ref = torch.nn.functional.normalize(torch.randn(1, 8, 20), dim=1)
    labels = torch.nn.functional.one_hot(torch.arange(20) % 4, 4).T.unsqueeze(0).float()
    out = propagate_labels(ref, labels, ref, temperature=0.01)  # sharp attention copies each location's label
    assert torch.equal(out.argmax(1), labels.argmax(1))
    assert torch.allclose(out.sum(1), torch.ones(1, 20), atol=1e-5)
