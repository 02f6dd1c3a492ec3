"""Bad inputs: every case of the corpus (scripts/make_bad_corpus.py) is decoded correctly or
skipped with one clear line naming the file and the reason, by training, embedding,
indexing and video propagation; a summary follows; strict modes fail fast instead."""
from __future__ import annotations

import importlib.util
import logging
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sslfeatures import Encoder, Pretrainer
from sslfeatures.data import BadFileReport, DecodeError, ImageFolder, iterate, list_images, load_pil

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(backbone="resnet18", stem="small_s2", backbone_kwargs={"channels": [8, 16, 32, 64]}, image_size=16,
            batch_size=8, epochs=1, progress=False, precision="fp32", num_workers=0, log_every=1)



pytestmark = pytest.mark.usefixtures("fast_tiny_runs")

def load_corpus_script():
    spec = importlib.util.spec_from_file_location("make_bad_corpus", ROOT / "scripts" / "make_bad_corpus.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("make_bad_corpus", mod)  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """(folder, {case_id: Case}) of the bad-inputs corpus, written by the script."""
    root = tmp_path_factory.mktemp("bad")
    cases = load_corpus_script().make_corpus(root)
    return root, cases


def _image_cases(cases, expect):
    """Corpus files an image folder lists (image extensions) with the given expectation."""
    from sslfeatures.data.decode import IMAGE_EXTENSIONS

    return {c.name for c in cases.values() if c.expect == expect and c.name.lower().endswith(IMAGE_EXTENSIONS)}


@pytest.fixture(scope="module")
def tiny_encoder():
    return Encoder.random_init("resnet18", image_size=16, stem="small_s2",
                               backbone_kwargs={"channels": [8, 16, 32, 64]}, device="cpu", precision="fp32")


def _skip_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipping unreadable image")]


def test_corpus_has_every_required_case(corpus):
    root, cases = corpus
    required = {"truncated_jpeg", "truncated_png", "zero_bytes", "text_as_jpg", "html_as_png", "cmyk_jpeg",
                "png_16bit", "rgba", "palette_transparency", "exif_rotated", "one_pixel", "decompression_bomb",
                "animated_gif", "multipage_tiff", "truncated_mp4", "symlink_loop", "unreadable", "non_utf8_name"}
    assert required <= set(cases), required - set(cases)
    assert len(cases) >= 15
    assert (root / "manifest.json").exists()


def test_each_case_decodes_or_fails_with_its_reason(corpus):
    root, cases = corpus
    for cid, case in cases.items():
        path = os.path.join(root, case.name)
        if cid in ("truncated_mp4", "folder_loop"):
            continue  # not images (checked by the propagation / listing tests)
        if case.expect == "ok":
            img = load_pil(path)
            assert img.mode == "RGB", cid
            if case.size is not None:
                assert img.size == tuple(case.size), (cid, img.size)
        else:
            with pytest.raises(DecodeError) as err:
                load_pil(path)
            assert case.reason in err.value.reason, (cid, err.value.reason)
            assert "\n" not in str(err.value), cid  # one line, even for a name holding a newline


def test_decoded_pixels_are_right(corpus):
    root, _ = corpus
    good = np.asarray(load_pil(root / "good.png"), np.int16)
    assert np.abs(np.asarray(load_pil(root / "cmyk.jpg"), np.int16) - good).mean() < 12  # CMYK -> same colours
    rot = np.asarray(load_pil(root / "exif_rot.jpg"), np.int16)
    assert np.abs(rot - np.rot90(good, -1)).mean() < 12  # rotated upright, not left as stored
    rgba = np.asarray(load_pil(root / "rgba.png"))
    assert (rgba[0] > 240).all()  # fully transparent top row composited on white
    assert (np.asarray(load_pil(root / "one_pixel.png")) == [200, 10, 10]).all()


def test_permission_denied_is_reported(tmp_path, monkeypatch):
    # running as root, chmod 000 does not stop reads: check the error path directly too
    p = tmp_path / "locked.png"
    Image.new("RGB", (4, 4)).save(p)

    def deny(*a, **k):
        raise PermissionError(13, "Permission denied", str(p))

    monkeypatch.setattr(Image, "open", deny)
    with pytest.raises(DecodeError, match="permission denied"):
        load_pil(p)


def test_folder_listing_survives_loops_and_odd_names(corpus):
    root, cases = corpus
    files = list_images(root)
    names = {os.path.relpath(f, root) for f in files}
    assert names == _image_cases(cases, "ok") | _image_cases(cases, "skip")  # the folder loop is walked once
    assert os.fsdecode(b"caf\xe9_latin1.png") in names


def test_training_skips_bad_files_with_one_line_each_and_a_summary(corpus, tmp_path, caplog):
    root, cases = corpus
    caplog.set_level(logging.WARNING)
    run = Pretrainer("simclr", **TINY).fit(root, output_dir=tmp_path / "run")
    skipped = {os.path.relpath(p, root) for p in run.bad_files}
    assert skipped == _image_cases(cases, "skip")
    assert run.steps >= 1
    lines = _skip_lines(caplog)
    assert len(lines) == len(skipped)  # each file once
    for line in lines:
        assert "\n" not in line
    assert any("two\\nlines.jpg" in line for line in lines)  # the newline is escaped, not printed
    assert any(f"{len(skipped)} file(s) skipped" in r.getMessage() for r in caplog.records)  # the summary
    report = (tmp_path / "run" / "bad_files.txt").read_text(encoding="utf-8")
    assert len(report.splitlines()) == len(skipped)
    assert (tmp_path / "run" / "model.safetensors").exists()


def test_training_strict_mode_fails_fast(corpus, tmp_path):
    with pytest.raises(DecodeError, match="strict mode"):
        Pretrainer("simclr", **TINY, strict=True).fit(corpus[0], output_dir=tmp_path / "strict")
    assert not (tmp_path / "strict" / "checkpoints").exists()  # nothing trained


def test_embedding_skips_bad_files_and_strict_fails(corpus, tiny_encoder, caplog):
    root, cases = corpus
    caplog.set_level(logging.WARNING)
    report = BadFileReport()
    paths, feats = tiny_encoder.embed_folder(root, batch_size=4, num_workers=0, report=report)
    assert {os.path.relpath(p, root) for p in paths} == _image_cases(cases, "ok")
    assert {os.path.relpath(p, root) for p in report.entries} == _image_cases(cases, "skip")
    assert feats.shape == (len(paths), tiny_encoder.num_features) and np.isfinite(feats).all()
    assert len(_skip_lines(caplog)) == len(report)
    with pytest.raises(DecodeError, match="strict mode"):
        tiny_encoder.embed(root, batch_size=4, num_workers=0, strict=True)
    with pytest.raises(DecodeError, match="truncated.jpg"):  # a single bad path raises, naming it
        tiny_encoder.embed(str(root / "truncated.jpg"))


def test_strict_iteration_stops_at_the_first_bad_batch(corpus):
    root, _ = corpus
    src = ImageFolder(root, size=16)
    first_bad = next(i for i, f in enumerate(src.files) if f.name == "bomb.png")
    seen = 0
    with pytest.raises(DecodeError):
        for x, _ in iterate(src, batch_size=2, num_workers=0, report=BadFileReport(strict=True)):
            seen += len(x)
    assert seen <= first_bad + 2 < len(src)


def test_index_skips_bad_files_and_saves_odd_names(corpus, tiny_encoder, tmp_path, caplog):
    pytest.importorskip("faiss")
    from sslfeatures.index import Index

    root, cases = corpus
    caplog.set_level(logging.WARNING)
    index = Index.build(tiny_encoder, root, kind="flat", batch_size=4, progress=False)
    assert {os.path.relpath(p, root) for p in index.paths} == _image_cases(cases, "ok")
    assert len(_skip_lines(caplog)) == len(_image_cases(cases, "skip"))
    assert any("file(s) skipped" in r.getMessage() for r in caplog.records)
    index.save(tmp_path / "odd.index")  # a non-UTF-8 file name survives the round trip
    back = Index.load(tmp_path / "odd.index", load_encoder=False)
    assert sorted(back.paths) == sorted(index.paths)
    latin = [p for p in back.paths if "latin1" in p]
    assert latin and os.path.exists(latin[0])
    with pytest.raises(DecodeError, match="strict mode"):
        Index.build(tiny_encoder, root, kind="flat", batch_size=4, progress=False, strict=True)


def test_propagation_reports_a_broken_video_or_frame(corpus, tiny_encoder, tmp_path):
    pytest.importorskip("av")
    from sslfeatures.cli import main
    from sslfeatures.video import propagate_masks

    root, _ = corpus
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 1
    with pytest.raises(DecodeError, match="broken.mp4") as err:
        propagate_masks(tiny_encoder, root / "broken.mp4", mask, resolution=32)
    assert "video" in err.value.reason
    frames = tmp_path / "frames"
    frames.mkdir()
    good = (root / "good.png").read_bytes()
    for i in range(3):
        (frames / f"{i:05d}.png").write_bytes(good)
    (frames / "00003.png").write_bytes(good[: len(good) // 2])
    res = propagate_masks(tiny_encoder, frames, np.zeros((32, 48), np.uint8), resolution=32, max_frames=3)
    assert len(res) == 3  # the good frames before the bad one are fine
    with pytest.raises(DecodeError, match="00003.png"):
        propagate_masks(tiny_encoder, frames, np.zeros((32, 48), np.uint8), resolution=32)
    # the command line ends with one error line, not a traceback
    enc_dir = tiny_encoder.save_pretrained(tmp_path / "enc")
    Image.fromarray(mask * 255).save(tmp_path / "mask.png")
    code = main(["propagate", str(root / "broken.mp4"), "--model", str(enc_dir), "--first-mask",
                 str(tmp_path / "mask.png"), "--out", str(tmp_path / "out")])
    assert code == 2


def test_cli_embed_writes_odd_names_back_as_bytes(corpus, tiny_encoder, tmp_path, capsys):
    from sslfeatures.cli import main

    root, cases = corpus
    enc_dir = tiny_encoder.save_pretrained(tmp_path / "enc")
    assert main(["embed", "--model", str(enc_dir), "--data", str(root), "--out", str(tmp_path / "f.npy")]) == 0
    lines = (tmp_path / "f.paths.txt").read_bytes().splitlines()
    assert len(lines) == len(_image_cases(cases, "ok"))
    assert any(line.endswith(b"caf\xe9_latin1.png") for line in lines)
    assert all(os.path.exists(line) for line in lines)
