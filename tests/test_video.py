"""Video: decoding, the DAVIS J&F measures, label/keypoint propagation, results, CLI."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sslfeatures import Encoder
from sslfeatures.data import DecodeError
from sslfeatures.video import (LabelPropagator, PropagationConfig, Sprite, composite_clip, cutout, davis_palette,
                               evaluate_sequence, f_measure, iter_frames, iter_propagation, jaccard, list_videos,
                               propagate_masks, read_frames, seg2bmap, to_label_map, write_label_png, write_video)
from sslfeatures.video.davis import boundary_precision_recall, boundary_radius, db_statistics


# -- fixtures -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def clip() -> tuple[np.ndarray, np.ndarray]:
    """8 frames, 96x128: an elliptical cut of the astronaut's head (a real photo) moving
    right and growing over the espresso photo; exact label maps."""
    from skimage import data

    yy, xx = np.mgrid[:512, :512]
    head = ((xx - 250) / 90) ** 2 + ((yy - 140) / 110) ** 2 <= 1
    tex, mask = cutout(data.astronaut(), head)
    return composite_clip(data.coffee(), [Sprite(tex, mask, (0.3, 0.5), (0.6, 0.5), (0.42, 0.48))],
                          n_frames=8, size=(96, 128), pan=0.0)


@pytest.fixture(scope="module")
def resnet() -> Encoder:
    return Encoder.random_init("resnet18", image_size=64, device="cpu")


def _gradient_frames(n: int = 10, h: int = 48, w: int = 64) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    frames = []
    for t in range(n):
        r = (xx * 255 // (w - 1) + 8 * t) % 256
        g = yy * 255 // (h - 1)
        b = np.full_like(xx, 40 + 15 * t)
        frames.append(np.stack([r, g, b], -1).astype(np.uint8))
    return np.stack(frames)


# -- io -------------------------------------------------------------------------------------------------
def test_decode_mp4_written_with_pyav(tmp_path):
    av = pytest.importorskip("av")

    frames = _gradient_frames()
    path = tmp_path / "clip.mp4"
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)

    got = list(iter_frames(path))
    assert len(got) == len(frames)
    assert all(g.shape == (48, 64, 3) and g.dtype == np.uint8 for g in got)
    assert np.abs(np.stack(got).astype(int) - frames.astype(int)).mean() < 8  # lossy codec, smooth content
    sub = read_frames(path, max_side=32, stride=3)
    assert sub.shape == (4, 24, 32, 3)  # frames 0, 3, 6, 9; longer side 32
    assert read_frames(path, max_frames=2).shape[0] == 2


def test_frame_folder_natural_order_gif_and_listing(tmp_path):
    frames = _gradient_frames(n=11)
    folder = tmp_path / "videos" / "seq"
    folder.mkdir(parents=True)
    for i, f in enumerate(frames):
        Image.fromarray(f).save(folder / f"{i}.png")  # 0.png ... 10.png: natural order, not lexical
    got = read_frames(folder)
    assert np.array_equal(got, frames)
    write_video(tmp_path / "videos" / "anim.gif", frames[:4], fps=5)
    gif = read_frames(tmp_path / "videos" / "anim.gif")
    assert gif.shape == (4, 48, 64, 3) and np.abs(gif.astype(int) - frames[:4].astype(int)).mean() < 6
    assert list_videos(tmp_path / "videos") == [tmp_path / "videos" / "anim.gif", folder]


def test_decode_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        next(iter_frames(tmp_path / "missing.mp4"))
    bad_gif = tmp_path / "bad.gif"  # GIFs are decoded with Pillow, without PyAV
    bad_gif.write_bytes(b"GIF89a" + b"\x00" * 10)
    with pytest.raises(DecodeError):
        next(iter_frames(bad_gif))
    pytest.importorskip("av")
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video at all")
    with pytest.raises(DecodeError):
        next(iter_frames(bad))
    with pytest.raises(ValueError, match="stride"):
        next(iter_frames(bad, stride=0))


# -- J&F against hand-computed values -------------------------------------------------------------------------
def test_jaccard_hand_cases():
    gt = np.zeros((4, 4), bool)
    gt[0:2] = True                                  # 8 pixels
    pred = np.zeros((4, 4), bool)
    pred[1:3] = True                                # 8 pixels, 4 shared
    assert jaccard(gt, pred) == pytest.approx(4 / 12)
    assert jaccard(np.zeros((3, 3)), np.zeros((3, 3))) == 1.0
    void = np.zeros((4, 4), bool)
    void[2] = True                                  # ignore row 2: intersection 4, union 8
    assert jaccard(gt, pred, void) == pytest.approx(4 / 8)


def test_seg2bmap_hand_case():
    seg = np.zeros((5, 5), bool)
    seg[1:3, 1:3] = True
    expected = np.array([[1, 1, 1, 0, 0],
                         [1, 0, 1, 0, 0],
                         [1, 1, 1, 0, 0],
                         [0, 0, 0, 0, 0],
                         [0, 0, 0, 0, 0]], bool)
    assert np.array_equal(seg2bmap(seg), expected)


def test_boundary_f_hand_case():
    """gt: columns 0-4 of a 10x10 image (boundary: column 4, 10 px). pred: columns 0-6 in
    rows 0-4 and 0-4 in rows 5-9 (boundary: (0..4, 6), (4, 4), (4, 5), (5..9, 4): 12 px).
    With a 1-pixel tolerance 7 of 12 predicted and 7 of 10 true boundary pixels match."""
    gt = np.zeros((10, 10), bool)
    gt[:, :5] = True
    pred = gt.copy()
    pred[:5, 5:7] = True
    p, r = boundary_precision_recall(gt, pred, bound_th=1)
    assert (p, r) == (pytest.approx(7 / 12), pytest.approx(7 / 10))
    assert f_measure(gt, pred, bound_th=1) == pytest.approx(7 / 11)
    assert f_measure(gt, pred, bound_th=2) == pytest.approx(1.0)  # column 6 is 2 px from column 4
    assert f_measure(gt, gt) == 1.0
    assert f_measure(gt, np.zeros_like(gt)) == 0.0                 # P = 1, R = 0
    assert f_measure(np.zeros_like(gt), np.zeros_like(gt)) == 1.0
    assert boundary_radius((480, 854)) == 8                        # ceil(0.008 * 979.7)


def test_boundary_f_matches_reference_morphology():
    """Same F as the benchmark's recipe written with scikit-image's disk and SciPy's dilation."""
    from scipy.ndimage import binary_dilation, gaussian_filter
    from skimage.morphology import disk

    rng = np.random.default_rng(0)
    for _ in range(10):
        h, w = rng.integers(20, 90, 2)
        a = gaussian_filter(rng.random((h, w)), 3) > 0.5
        b = gaussian_filter(rng.random((h, w)), 3) > 0.5
        radius = int(np.ceil(0.008 * np.hypot(h, w)))
        fb, gb = seg2bmap(b), seg2bmap(a)
        if not fb.any() or not gb.any():
            continue
        p = (fb & binary_dilation(gb, disk(radius))).sum() / fb.sum()
        r = (gb & binary_dilation(fb, disk(radius))).sum() / gb.sum()
        ref = 0.0 if p + r == 0 else 2 * p * r / (p + r)
        assert f_measure(a, b) == pytest.approx(ref, abs=1e-12)


def test_db_statistics_hand_case():
    mean, recall, decay = db_statistics([1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3])
    assert mean == pytest.approx(0.65)
    assert recall == pytest.approx(5 / 8)      # values > 0.5
    assert decay == pytest.approx(0.9 - 0.4)   # first bin [1, .9, .8], last bin [.5, .4, .3]


def test_evaluate_sequence_two_objects_and_errors():
    gt = np.zeros((4, 6, 6), np.uint8)
    gt[:, 0:2, 0:2] = 1
    gt[:, 3:6, 3:6] = 2
    pred = gt.copy()
    pred[pred == 2] = 0                      # object 2 is never found
    s = evaluate_sequence(pred, gt)          # frames 1 and 2 are evaluated
    assert s.per_frame_j.shape == (2, 2)
    assert s.per_object[1]["J-Mean"] == 1.0 and s.per_object[2]["J-Mean"] == 0.0
    assert s.j_mean == pytest.approx(0.5) and s.f_mean == pytest.approx(0.5)
    assert s["J&F-Mean"] == pytest.approx(0.5) and s.j_recall == pytest.approx(0.5)
    assert s.frames == ["00001", "00002"]
    bad = pred.copy()
    bad[1, 0, 5] = 3
    with pytest.raises(ValueError, match="object id 3"):
        evaluate_sequence(bad, gt)
    with pytest.raises(ValueError, match="length"):
        evaluate_sequence(pred[:3], gt)


def test_label_maps_and_palette_png(tmp_path):
    lab = np.zeros((6, 8), np.uint8)
    lab[1:3, 1:3] = 1
    lab[4:, 5:] = 7
    path = write_label_png(tmp_path / "m.png", lab)
    with Image.open(path) as img:
        assert img.mode == "P"
        assert tuple(img.getpalette()[3:6]) == (128, 0, 0)       # DAVIS palette, id 1
    assert np.array_equal(to_label_map(path), lab)
    assert np.array_equal(to_label_map(lab.astype(bool)), (lab > 0).astype(np.uint8))
    assert np.array_equal(to_label_map((lab > 0).astype(np.uint8) * 255), (lab > 0).astype(np.uint8))
    rgb = davis_palette()[lab]                                   # a colour mask in palette colours
    assert np.array_equal(to_label_map(rgb), lab)
    with pytest.raises(ValueError, match="0..255"):
        to_label_map(np.full((3, 3), 300))


# -- the propagation algorithm on hand-built features ---------------------------------------------------------
def _one_hot_grid(h: int, w: int, shift: int = 0) -> torch.Tensor:
    """Features identifying each cell's column content: cell (i, j) carries the one-hot code
    of position (i, j - shift), i.e. the scene moved ``shift`` cells to the right."""
    codes = torch.eye(h * w).reshape(h, w, h * w)
    out = torch.full((h, w, h * w), 0.0)
    for j in range(w):
        if 0 <= j - shift < w:
            out[:, j] = codes[:, j - shift]
        else:
            out[:, j, 0] = 1.0  # new content: like cell (0, 0), background
    return out


def test_propagator_follows_a_shift_exactly():
    h, w = 4, 6
    labels = torch.zeros(2, h, w)
    labels[0] = 1
    labels[0, 1:3, 1:3] = 0
    labels[1, 1:3, 1:3] = 1                      # object: a 2x2 block
    prop = LabelPropagator(_one_hot_grid(h, w), labels, PropagationConfig(topk=1, size_mask_neighborhood=0))
    out = prop.step(_one_hot_grid(h, w, shift=1))
    assert torch.equal(out[1] > 0.5, torch.roll(labels[1] > 0.5, 1, dims=1))
    out2 = prop.step(_one_hot_grid(h, w, shift=2))  # matched against the first frame and the queue
    assert torch.equal(out2[1] > 0.5, torch.roll(labels[1] > 0.5, 2, dims=1))


def test_neighbourhood_window_blocks_far_matches():
    h, w = 1, 8
    feats0 = torch.eye(8).reshape(h, w, 8)
    labels = torch.zeros(2, h, w)
    labels[0] = 1
    labels[:, 0, 0] = torch.tensor([0.0, 1.0])    # the object is cell 0
    moved = torch.zeros(h, w, 8)
    moved[0, 7, 0] = 1.0                          # cell 7 now looks like the object
    moved[0, :7, 1] = 1.0                         # the rest looks like cell 1 (background)
    free = LabelPropagator(feats0, labels, PropagationConfig(topk=1, size_mask_neighborhood=0)).step(moved)
    assert free[1, 0, 7] == pytest.approx(1.0)
    windowed = LabelPropagator(feats0, labels, PropagationConfig(topk=1, size_mask_neighborhood=2)).step(moved)
    assert windowed[1, 0, 7] == pytest.approx(0.0)  # cell 0 lies 7 cells away, outside the window


def test_config_validation():
    with pytest.raises(ValueError, match="topk"):
        PropagationConfig(topk=0).validate()
    with pytest.raises(TypeError, match="unknown propagation option"):
        PropagationConfig.from_kwargs(top_k=3)


# -- propagation with encoders on a real-photo clip -------------------------------------------------------------
def test_propagation_beats_copying_the_first_mask(clip, resnet):
    frames, labels = clip
    res = resnet.propagate_masks(frames, first_mask=labels[0], layer=1, resolution=None)
    assert len(res) == len(frames) and res.size == (96, 128) and res.object_ids == [0, 1]
    assert np.array_equal(res[0], labels[0])
    scores = res.evaluate(list(labels))
    copy = evaluate_sequence([labels[0]] * len(labels), labels)
    assert scores.j_mean > copy.j_mean + 0.2, (scores.j_mean, copy.j_mean)
    assert scores.j_mean > 0.5


def test_vit_and_multi_object_ids(clip):
    frames, labels = clip
    lab = labels.copy()
    lab[lab == 1] = 5
    lab[:, 70:, :30] = 9                     # a second, static object with id 9
    vit = Encoder.random_init("vit_tiny_patch16_224", image_size=64, patch_size=8, device="cpu",
                              backbone_kwargs={"depth": 2})
    res = propagate_masks(vit, frames[:4], lab[0], resolution=64, n_last_frames=2)
    assert res.object_ids == [0, 5, 9]
    assert set(np.unique(res.to_array())) <= {0, 5, 9}
    assert res[3].shape == (96, 128)


def test_streaming_reads_frames_lazily(clip, resnet):
    frames, labels = clip
    pulled = []

    def gen():
        for i, f in enumerate(frames):
            pulled.append(i)
            yield f

    it = iter_propagation(resnet, gen(), labels[0], config=PropagationConfig(batch_size=2, resolution=None))
    first = next(it)
    assert first.index == 0 and len(pulled) == 2  # one batch decoded, not the whole video
    assert sum(1 for _ in it) == len(frames) - 1


def test_keypoints_follow_the_object(clip, resnet):
    frames, labels = clip
    ys, xs = np.nonzero(labels[0] == 1)
    start = np.array([[xs.mean(), ys.mean()]], np.float32)    # the object's centre
    res = propagate_masks(resnet, frames, labels[0], keypoints=start, layer=1, resolution=None)
    assert res.keypoints.shape == (len(frames), 1, 2)
    ys, xs = np.nonzero(labels[-1] == 1)
    true_end = np.array([xs.mean(), ys.mean()])
    err_tracked = np.linalg.norm(res.keypoints[-1, 0] - true_end)
    err_static = np.linalg.norm(start[0] - true_end)
    assert err_tracked < 0.5 * err_static, (err_tracked, err_static)


def test_token_only_encoder_matches_torch_path(clip, resnet):
    """An encoder whose backbone only offers forward_tokens (as the ONNX-runtime encoder does)
    gives the same masks as the PyTorch path on the same features."""
    frames, labels = clip
    vit = Encoder.random_init("vit_tiny_patch16_224", image_size=64, patch_size=8, device="cpu",
                              backbone_kwargs={"depth": 2})

    class TokensOnly:
        def __init__(self, backbone):
            self._bb = backbone

        def forward_tokens(self, x):
            return self._bb.forward_tokens(x)

    class FakeOrt:
        config = {**vit.config, "onnx": {"dynamic_image_size": True}}
        device, precision, image_size = vit.device, "fp32", vit.image_size
        backbone = TokensOnly(vit.backbone)
        _preprocess = vit._preprocess

    a = propagate_masks(vit, frames[:4], labels[0], resolution=64, layer=None)
    b = propagate_masks(FakeOrt(), frames[:4], labels[0], resolution=64)
    assert np.array_equal(a.to_array(), b.to_array())


def test_result_save_and_evaluate_folder(tmp_path, clip, resnet):
    pytest.importorskip("av")  # writes and reads an .mp4
    frames, labels = clip
    video = tmp_path / "clip.mp4"
    write_video(video, frames, fps=8)
    gt = tmp_path / "gt"
    for i, lab in enumerate(labels):
        write_label_png(gt / f"{i:05d}.png", lab)
    res = propagate_masks(resnet, video, gt / "00000.png", layer=1, resolution=None)
    files = res.save(tmp_path / "out")
    pngs = sorted((tmp_path / "out").glob("*.png"))
    assert [p.name for p in pngs] == [f"{i:05d}.png" for i in range(8)]
    with Image.open(pngs[3]) as img:
        assert img.mode == "P" and img.size == (128, 96)
    assert read_frames(files["overlay"]).shape == (8, 96, 128, 3)
    from_folder = res.evaluate(gt)
    from_arrays = res.evaluate(list(labels))
    assert from_folder.to_dict() == pytest.approx(from_arrays.to_dict())
    assert "J&F-Mean" in str(from_folder)
    with pytest.raises(ValueError, match="another aspect ratio"):
        propagate_masks(resnet, frames[:2], np.zeros((50, 50), np.uint8))


def test_cli_propagate(tmp_path, clip, resnet, capsys):
    from sslfeatures.cli import main

    frames, labels = clip
    resnet.save_pretrained(tmp_path / "enc")
    write_video(tmp_path / "clip.gif", frames[:5], fps=8)
    for i, lab in enumerate(labels[:5]):
        write_label_png(tmp_path / "gt" / f"{i:05d}.png", lab)
    rc = main(["propagate", str(tmp_path / "clip.gif"), "--model", str(tmp_path / "enc"),
               "--first-mask", str(tmp_path / "gt" / "00000.png"), "--out", str(tmp_path / "out"),
               "--gt", str(tmp_path / "gt"), "--resolution", "0", "--layer", "1", "--keypoints", "40,50"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["frames"] == 5 and out["objects"] == [1]
    assert 0.0 <= out["scores"]["J&F-Mean"] <= 1.0
    written = {p.name for p in Path(tmp_path / "out").iterdir()}
    assert {"00000.png", "00004.png", "overlay.gif", "keypoints.csv"} <= written
    assert main(["propagate", str(tmp_path / "clip.gif"), "--model", str(tmp_path / "enc"),
                 "--out", str(tmp_path / "o2")]) == 2          # neither a mask nor keypoints


def test_propagator_matches_dino_dense_reference():
    """Banded, chunked propagation == DINO's dense recipe: exp(cos / T) masked to the window,
    top-k over all context frames, normalised, applied to the context's (soft) labels."""
    torch.manual_seed(0)
    h, w, d, c = 7, 9, 16, 3
    frames = [torch.randn(h, w, d) for _ in range(5)]
    labels0 = torch.softmax(torch.randn(c, h, w) * 3, 0)
    cfg = PropagationConfig(n_last_frames=2, topk=4, size_mask_neighborhood=2, temperature=0.2)
    prop = LabelPropagator(frames[0], labels0, cfg, max_chunk_bytes=4 * 3 * h * w * w * 2)  # 2 rows a chunk

    ii, jj = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    ii, jj = ii.reshape(-1), jj.reshape(-1)
    window = ((ii[:, None] - ii[None]).abs() <= 2) & ((jj[:, None] - jj[None]).abs() <= 2)
    ctx = [(torch.nn.functional.normalize(frames[0].reshape(-1, d), dim=1), labels0.reshape(c, -1))]
    for f in frames[1:]:
        q = torch.nn.functional.normalize(f.reshape(-1, d), dim=1)
        aff = torch.cat([torch.exp(q @ k.T / 0.2) * window for k, _ in ctx], 1)  # (N, M*N)
        kth = aff.topk(4, dim=1).values[:, -1:]
        aff = torch.where(aff >= kth, aff, torch.zeros_like(aff))
        aff = aff / aff.sum(1, keepdim=True)
        ref = aff @ torch.cat([v.T for _, v in ctx])                            # (N, C)
        got = prop.step(f)
        assert torch.allclose(got.reshape(c, -1).T, ref, atol=1e-5)
        ctx = ctx[:1] + (ctx[1:] + [(q, ref.T)])[-2:]
