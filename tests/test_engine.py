"""The engine: exact resume, bad files, protection of existing runs, clear config errors."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from sslfeatures import Pretrainer
from sslfeatures.config import ConfigError

BASE = dict(backbone="resnet18", stem="small_s2", backbone_kwargs={"channels": [16, 32, 64, 128]},
            image_size=32, batch_size=16, epochs=2, proj_hidden_dim=64, progress=False, log_every=1,
            precision="fp32", checkpoint_every=2)


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tiny_images, tmp_path):
    full = Pretrainer("byol", **BASE).fit(tiny_images, output_dir=tmp_path / "full")
    part = Pretrainer("byol", **BASE)
    part.fit(tiny_images, output_dir=tmp_path / "part", max_steps=3)  # "interrupted" mid-epoch
    latest = json.loads((tmp_path / "part" / "checkpoints" / "latest.json").read_text())
    assert latest["step"] == 3
    resumed = Pretrainer("byol", **BASE).fit(tiny_images, output_dir=tmp_path / "part", resume=True)
    assert resumed.steps == full.steps == 6
    a = load_file(str(tmp_path / "full" / "model.safetensors"))
    b = load_file(str(tmp_path / "part" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ca = load_file(str(sorted((tmp_path / "full" / "checkpoints").glob("*.safetensors"))[-1]))
    cb = load_file(str(sorted((tmp_path / "part" / "checkpoints").glob("*.safetensors"))[-1]))
    for k in ca:  # optimiser state and EMA teacher too
        assert torch.equal(ca[k], cb[k]), k


def test_callbacks_see_every_step_and_can_stop_the_run_resumably(tiny_images, tmp_path):
    """``fit(callbacks=...)``: called after each optimizer step with (step, method), the method back
    in train mode after an evaluating callback; ``True`` stops the run, saved so that resuming it
    ends where an uninterrupted run does."""
    seen, modes = [], []

    def evaluate(step, method):
        modes.append(method.training)
        seen.append(step)
        method.eval()  # as an evaluating callback leaves it
        with torch.no_grad():
            feats = method.encoder_backbone()(torch.zeros(2, 3, 32, 32))
        assert feats.shape[0] == 2
        return step == 3

    full = Pretrainer("simclr", **BASE).fit(tiny_images, output_dir=tmp_path / "full")
    part = Pretrainer("simclr", **BASE).fit(tiny_images, output_dir=tmp_path / "part", callbacks=[evaluate])
    assert seen == [1, 2, 3] and all(modes) and part.steps == 3
    assert json.loads((tmp_path / "part" / "checkpoints" / "latest.json").read_text())["step"] == 3
    resumed = Pretrainer("simclr", **BASE).fit(tiny_images, output_dir=tmp_path / "part", resume=True,
                                               callbacks=[lambda step, m: seen.append(step)])
    assert resumed.steps == full.steps == 6 and seen[3:] == [4, 5, 6]
    a = load_file(str(tmp_path / "full" / "model.safetensors"))
    b = load_file(str(tmp_path / "part" / "model.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_broken_files_train_and_are_reported(tiny_images, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_images, data)
    (data / "empty.jpg").write_bytes(b"")
    (data / "fake.png").write_text("not a png")
    good = next(data.rglob("*.png")).read_bytes()
    (data / "truncated.png").write_bytes(good[:200])
    run = Pretrainer("simclr", **dict(BASE, epochs=1)).fit(data, output_dir=tmp_path / "run")
    assert run.steps == 3  # 48 good images / 16
    assert set(run.bad_files) == {str(data / n) for n in ("empty.jpg", "fake.png", "truncated.png")}
    text = (tmp_path / "run" / "bad_files.txt").read_text()
    assert "empty.jpg\tempty file" in text


def test_existing_run_is_not_overwritten(tiny_images, tmp_path):
    cfg = dict(BASE, epochs=1)
    Pretrainer("simclr", **cfg).fit(tiny_images, output_dir=tmp_path / "r", max_steps=2)
    with pytest.raises(FileExistsError, match="resume=True"):
        Pretrainer("simclr", **cfg).fit(tiny_images, output_dir=tmp_path / "r")
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        Pretrainer("simclr", **cfg).fit(tiny_images, output_dir=tmp_path / "new", resume=True)


def test_fractional_epochs_end_mid_epoch_and_zero_epochs_is_an_error(tiny_images, tmp_path):
    run = Pretrainer("simclr", **{**BASE, "epochs": 1.5}).fit(tiny_images, output_dir=tmp_path / "r")
    assert run.steps == 5  # 1.5 x 3 steps per epoch, rounded half up
    assert json.loads((tmp_path / "r" / "checkpoints" / "latest.json").read_text())["step"] == 5
    assert (tmp_path / "r" / "model.safetensors").exists()
    for bad in (0, float("inf")):
        with pytest.raises(ValueError, match=f"epochs must be a finite number more than 0, got {bad}"):
            Pretrainer("simclr", **{**BASE, "epochs": bad}).fit(tiny_images, output_dir=tmp_path / "z")
        assert not (tmp_path / "z").exists()


def test_missing_or_empty_data_fails_before_work(tmp_path):
    with pytest.raises(FileNotFoundError, match="data folder not found"):
        Pretrainer("simclr", **BASE).fit(tmp_path / "missing", output_dir=tmp_path / "r")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images found"):
        Pretrainer("simclr", **BASE).fit(tmp_path / "empty", output_dir=tmp_path / "r")
    assert not (tmp_path / "r").exists()


def test_config_errors_name_what_is_valid():
    with pytest.raises(ValueError, match="available methods: .*simclr"):
        Pretrainer("simclrr")
    with pytest.raises(ConfigError, match="unknown option 'temprature'"):
        Pretrainer("simclr", temprature=0.1)
    with pytest.raises(ConfigError, match="expected a number"):
        Pretrainer("simclr", temperature="hot")
    with pytest.raises(ValueError, match="unknown backbone"):
        Pretrainer("simclr", backbone="resnet_nope").build()


def test_recipes_hold_the_papers_defaults():
    p = Pretrainer("dino")
    assert p.cfg.backbone == "vit_small_patch16_224" and p.cfg.clip_grad == 3.0
    assert p.method_cfg.out_dim == 65536 and p.method_cfg.teacher_temp == 0.07
    assert [s.count for s in p.views.specs] == [1, 1, 8]
    assert Pretrainer("mae").method_cfg.mask_ratio == 0.75
    assert Pretrainer("mocov2").method_cfg.queue_size == 65536
    assert Pretrainer("simclr").cfg.optimizer == "lars"
    assert Pretrainer("byol").method_cfg.momentum_start == 0.996


def test_streamed_safetensors_round_trip_every_tensor_layout():
    """Checkpoints are written tensor by tensor (no whole-state copy): views, shared storage,
    channels_last and non-contiguous tensors all round-trip through safetensors' reader."""
    import io

    from safetensors.torch import load

    from sslfeatures.utils import write_safetensors

    base = torch.randn(6, 4)
    state = {"a": base, "view": base[:2], "t": torch.randn(3, 3).t(), "bf16": torch.randn(5, dtype=torch.bfloat16),
             "empty": torch.zeros(0), "scalar": torch.tensor(3.5), "int": torch.arange(7),
             "bool": torch.tensor([True, False]), "half": torch.randn(2, 2).half()}
    state["cl"] = torch.randn(2, 3, 4, 4).to(memory_format=torch.channels_last)
    buf = io.BytesIO()
    write_safetensors(buf, state, {"step": "3"})
    back = load(buf.getvalue())
    assert back.keys() == state.keys()
    for k, v in state.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k


def test_device_and_precision_environment_defaults(monkeypatch):
    """SSLFEATURES_DEVICE / SSLFEATURES_PRECISION set what "auto" means; explicit values win;
    a wrong value is a clear error naming the variable."""
    from sslfeatures.utils import resolve_device, resolve_precision

    monkeypatch.setenv("SSLFEATURES_DEVICE", "cpu")
    assert resolve_device(None) == resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cuda") == torch.device("cuda")  # explicit: not overridden (nothing is allocated)
    monkeypatch.setenv("SSLFEATURES_DEVICE", "gpu")
    with pytest.raises(ValueError, match="SSLFEATURES_DEVICE='gpu'"):
        resolve_device("auto")
    monkeypatch.setenv("SSLFEATURES_PRECISION", "bf16")
    assert resolve_precision("auto", torch.device("cpu")) == torch.bfloat16
    assert resolve_precision("fp32", torch.device("cpu")) is None
    monkeypatch.setenv("SSLFEATURES_PRECISION", "int4")
    with pytest.raises(ValueError, match="SSLFEATURES_PRECISION='int4'"):
        resolve_precision("auto", torch.device("cpu"))


def test_cpu_facts_read_from_cpuinfo_and_fall_back(monkeypatch, tmp_path):
    """The benchmarks' CPU record and the check for bf16 units read /proc/cpuinfo; with no such
    file the model falls back to ``platform`` and "auto" precision to fp32 (no bf16 units assumed)."""
    import builtins

    from sslfeatures import utils

    real_open = builtins.open
    fake = tmp_path / "cpuinfo"
    fake.write_text("processor\t: 0\nmodel name\t: Test CPU 9000\nflags\t\t: fpu avx2 amx_bf16\n")

    def open_cpuinfo(path, *a, **k):
        return real_open(fake if str(path) == "/proc/cpuinfo" else path, *a, **k)

    monkeypatch.setattr(builtins, "open", open_cpuinfo)
    assert utils.cpu_model() == "Test CPU 9000" and utils.cpu_has_fast_bf16()
    fake.write_text("processor\t: 0\nflags\t\t: fpu avx2\n")
    monkeypatch.delenv("SSLFEATURES_PRECISION", raising=False)
    assert not utils.cpu_has_fast_bf16() and utils.resolve_precision("auto", torch.device("cpu")) is None

    def no_cpuinfo(path, *a, **k):
        if str(path) == "/proc/cpuinfo":
            raise OSError("no such file")
        return real_open(path, *a, **k)

    monkeypatch.setattr(builtins, "open", no_cpuinfo)
    monkeypatch.setattr(utils.platform, "processor", lambda: "fallback-cpu")
    assert utils.cpu_model() == "fallback-cpu" and utils.cpu_flags() == set()
