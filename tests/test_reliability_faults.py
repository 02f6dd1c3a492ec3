"""Numerical faults and a full disk: a NaN/Inf loss or gradient stops the run naming the
step (or is skipped on request); a failed checkpoint write is reported and the previous
checkpoint survives."""
from __future__ import annotations

import errno
import json
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sslfeatures import Pretrainer
from sslfeatures import utils
from sslfeatures.engine import trainer as trainer_mod
from sslfeatures.engine.checkpoint import CheckpointWriteError, load_checkpoint, save_checkpoint
from sslfeatures.engine.trainer import NonFiniteLossError

TINY = dict(backbone="resnet18", stem="small_s2", backbone_kwargs={"channels": [8, 16, 32, 64]}, image_size=16,
            batch_size=8, epochs=1, progress=False, precision="fp32", num_workers=0, log_every=1,
            checkpoint_every=2, proj_hidden_dim=32, proj_dim=16)



pytestmark = pytest.mark.usefixtures("fast_tiny_runs")

class Poisoned(Pretrainer):
    """A Pretrainer whose method turns the loss (or one gradient) non-finite at given steps."""

    def __init__(self, *args, bad_steps=(), where="loss", **kw):
        super().__init__(*args, **kw)
        self.bad_steps, self.where = set(bad_steps), where

    def build(self):
        method = super().build()
        forward, bad, where = method.forward, self.bad_steps, self.where
        param = next(p for p in method.parameters() if p.requires_grad)
        state = {"poison": False}

        def hook(grad):
            if state["poison"]:
                state["poison"] = False
                return grad * float("inf")
            return grad

        param.register_hook(hook)

        def poisoned_forward(views, info, **kw):
            out = forward(views, info, **kw)
            if info.step in bad:
                if where == "loss":
                    out = dict(out, loss=out["loss"] * float("nan"))
                else:
                    state["poison"] = True
            return out

        method.forward = poisoned_forward
        return method


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tiny_images, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLossError) as err:
        Poisoned("simclr", **TINY, bad_steps={5}).fit(tiny_images, output_dir=out)
    msg = str(err.value)
    for part in ("loss", "step 5", "checkpoint (step 4)", "lower lr", "fp32", "clip_grad", "on_nonfinite='skip'"):
        assert part in msg, part
    latest = json.loads((out / "checkpoints" / "latest.json").read_text())
    assert latest["step"] == 4
    weights = load_file(str(out / "checkpoints" / latest["file"]))
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())
    run = Pretrainer("simclr", **TINY).fit(tiny_images, output_dir=out, resume=True)  # and it resumes from there
    assert run.steps == 6


def test_nonfinite_gradient_is_caught_too(tiny_images, tmp_path):
    with pytest.raises(NonFiniteLossError, match="non-finite gradient at step 3"):
        Poisoned("simclr", **TINY, bad_steps={3}, where="grad").fit(tiny_images, output_dir=tmp_path / "g")


def test_skip_mode_skips_bad_batches_and_finishes(tiny_images, tmp_path, caplog):
    run = Poisoned("simclr", **TINY, on_nonfinite="skip", bad_steps={1, 3}, where="grad").fit(
        tiny_images, output_dir=tmp_path / "s")
    assert run.steps == 6 and run.skipped_steps == [1, 3]
    assert any("step 1: non-finite gradient; batch skipped" in r.getMessage() for r in caplog.records)
    weights = load_file(str(tmp_path / "s" / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())


def test_skip_mode_gives_up_when_every_batch_is_bad(tiny_images, tmp_path, monkeypatch):
    monkeypatch.setattr(trainer_mod, "MAX_CONSECUTIVE_SKIPS", 2)
    with pytest.raises(NonFiniteLossError, match="for 3 batches in a row"):
        Poisoned("simclr", **TINY, on_nonfinite="skip", bad_steps=set(range(6))).fit(tiny_images,
                                                                                     output_dir=tmp_path / "x")


def test_on_nonfinite_is_validated():
    from sslfeatures.config import ConfigError

    with pytest.raises(ConfigError, match=r"on_nonfinite: expected one of \['raise', 'skip'\]"):
        Pretrainer("simclr", **dict(TINY, on_nonfinite="ignore"))


class _FullDisk:
    """A file object that accepts ``limit`` bytes, then fails like a full disk."""

    def __init__(self, fh, limit: int):
        self.fh, self.left = fh, limit

    def write(self, data) -> int:
        if len(data) > self.left:
            self.fh.write(bytes(data[: self.left]))
            raise OSError(errno.ENOSPC, "No space left on device")
        self.left -= len(data)
        return self.fh.write(data)

    def __getattr__(self, name):
        return getattr(self.fh, name)


def _fill_disk_for(monkeypatch, match: str, after: int = 0) -> dict:
    """Make every atomic write whose file name contains ``match`` hit a full disk (once
    ``after`` such writes succeeded). Returns a counter dict."""
    real = utils.atomic_writer
    seen = {"n": 0}

    @contextmanager
    def writer(path):
        with real(path) as fh:
            if match in Path(path).name:
                seen["n"] += 1
                if seen["n"] > after:
                    yield _FullDisk(fh, 64)
                    return
            yield fh

    monkeypatch.setattr(utils, "atomic_writer", writer)
    return seen


def test_full_disk_during_a_checkpoint_is_reported_and_the_previous_one_survives(tiny_images, tmp_path,
                                                                                 monkeypatch):
    out = tmp_path / "run"
    _fill_disk_for(monkeypatch, "ckpt-", after=1)  # step 2 is written, step 4 hits the full disk
    with pytest.raises(CheckpointWriteError) as err:
        Pretrainer("simclr", **TINY).fit(tiny_images, output_dir=out)
    msg = str(err.value)
    assert err.value.errno == errno.ENOSPC
    for part in ("step-4 checkpoint", "disk is full", "ckpt-00000002.safetensors, step 2) is intact", "resume=True"):
        assert part in msg, part
    ck = out / "checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == ["ckpt-00000002.safetensors", "latest.json"]  # no temp file left
    monkeypatch.undo()
    run = Pretrainer("simclr", **TINY).fit(tiny_images, output_dir=out, resume=True)
    assert run.steps == 6


def test_full_disk_while_pointing_to_the_new_checkpoint(tmp_path, monkeypatch):
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    save_checkpoint(tmp_path, 1, model, opt, {})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.weight.add_(1.0)
    _fill_disk_for(monkeypatch, "latest.json")
    with pytest.raises(CheckpointWriteError, match="step 1\\) is intact"):
        save_checkpoint(tmp_path, 2, model, opt, {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-00000001.safetensors", "latest.json"]
    fresh = torch.nn.Linear(4, 2)
    assert load_checkpoint(tmp_path, fresh)["step"] == 1
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, before[k])


def test_a_pointer_to_outside_the_folder_is_refused(tmp_path):
    model = torch.nn.Linear(2, 2)
    (tmp_path / "latest.json").write_text(json.dumps({"file": "../elsewhere.safetensors", "step": 1}))
    with pytest.raises(RuntimeError, match="points outside"):
        load_checkpoint(tmp_path, model)
