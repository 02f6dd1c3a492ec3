"""Scaling out on CPU (gloo, 2 processes): gradient accumulation, SyncBatchNorm, FSDP,
activation checkpointing, compile, a killed rank, resuming on another world size.

Multi-process cases launch ``tests/scale_worker.py`` twice with the environment torchrun
would give them (RANK, WORLD_SIZE, MASTER_ADDR/PORT), or through torchrun itself.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

from sslfeatures import Pretrainer
from sslfeatures.engine import scale

WORKER = Path(__file__).resolve().parent / "scale_worker.py"
VIT = dict(backbone="vit_tiny_patch16_224", patch_size=4, image_size=16,
           backbone_kwargs={"depth": 1, "embed_dim": 48, "num_heads": 2})
MAE = dict(VIT, decoder_dim=32, decoder_depth=1, decoder_heads=2)
CNN = dict(backbone="resnet18", stem="small_s2", backbone_kwargs={"channels": [8, 16, 32, 64]}, image_size=16)
RUN = dict(progress=False, log_every=1, precision="fp32", num_workers=0, warmup_epochs=0.5, lr=1e-3)


# -- launching --------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(Path(__file__).resolve().parents[1])] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    if sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    return env


def launch(task: str, arg: Path, nproc: int = 2, timeout: float = 120) -> list[subprocess.CompletedProcess]:
    """Start ``nproc`` workers as torchrun would (one env per rank), wait for all of them."""
    port = _free_port()
    procs = []
    for rank in range(nproc):
        env = dict(_env(), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc),
                   LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, str(WORKER), task, str(arg)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    done = []
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            out, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise AssertionError(f"workers still running after {timeout} s (a hang)") from None
        done.append(subprocess.CompletedProcess(p.args, p.returncode, out, ""))
    return done


def torchrun(task: str, arg: Path, nproc: int = 2, timeout: float = 180) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
           "--nproc-per-node", str(nproc), str(WORKER), task, str(arg)]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)


def _spec(tmp: Path, name: str, data: Path, out: Path, config: dict, **kw) -> Path:
    spec = dict(config=config, data=str(data), out=str(out), result=str(tmp / f"{name}.result.json"), **kw)
    path = tmp / f"{name}.json"
    path.write_text(json.dumps(spec))
    return path


def _result(spec: Path) -> dict:
    return json.loads(Path(json.loads(spec.read_text())["result"]).read_text())


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    ck = json.loads((run_dir / "checkpoints" / "latest.json").read_text())["file"]
    return {k: v for k, v in load_file(str(run_dir / "checkpoints" / ck)).items() if k.startswith("model/")}


# -- gradient accumulation ----------------------------------------------------------------
def _bn_eval(method: nn.Module) -> nn.Module:
    for m in method.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    return method


@pytest.mark.parametrize("name,cfg", [("mae", MAE), ("rotation", VIT), ("simclr", dict(VIT, proj_hidden_dim=32,
                                                                                       proj_dim=16))])
def test_accumulation_is_exact_where_the_method_says_so(tiny_images, name, cfg):
    """Two micro-batches with loss/2 give the gradients of one step on both halves together
    exactly when ``Method.exact_accumulation`` says so (BN in eval mode: that is judged apart)."""
    from sslfeatures.data import ImageFolder
    from sslfeatures.methods import StepInfo

    torch.manual_seed(0)
    method = _bn_eval(Pretrainer(name, **cfg).build().train())
    images = torch.stack([ImageFolder(tiny_images, size=16)[i][0] for i in range(8)])
    torch.manual_seed(1)
    views = method.views(images, 16)
    info = StepInfo(0, 10, 0, 10)

    def grads_after(parts: int) -> dict[str, torch.Tensor]:
        method.zero_grad(set_to_none=True)
        torch.manual_seed(2)  # masks/rotations: the micro-batches draw what the whole batch draws, in order
        for m, chunk in enumerate(zip(*[scale.split_micro_batches(v, parts) for v in views])):
            (method(list(chunk), StepInfo(0, 10, 0, 10, m, parts))["loss"] / parts).backward()
        return {n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None}

    whole, accumulated = grads_after(1), grads_after(2)
    assert info.micro_step == 0 and whole.keys() == accumulated.keys()
    top = max(float(g.abs().max()) for g in whole.values())
    diff = max(float((whole[k] - accumulated[k]).abs().max()) for k in whole)
    if type(method).exact_accumulation:
        assert diff <= 1e-5 * top, (name, diff, top)
    else:  # in-batch negatives: a micro-batch is a smaller contrastive problem
        assert diff > 1e-3 * top, (name, diff, top)


def test_accumulation_warning_names_the_reasons():
    mae = Pretrainer("mae", **MAE).build()
    assert scale.accumulation_warning(mae, 1) is None and scale.accumulation_warning(mae, 4) is None
    simclr = scale.accumulation_warning(Pretrainer("simclr", **CNN).build(), 4)
    assert "approximate" in simclr and "in-batch negatives" in simclr and "BatchNorm" in simclr
    byol = scale.accumulation_warning(Pretrainer("byol", **CNN).build(), 2)  # exact loss, but BN statistics
    assert "BatchNorm" in byol and "negatives" not in byol


def test_accumulation_resume_equals_uninterrupted(tiny_images, tmp_path, caplog):
    cfg = dict(MAE, **RUN, batch_size=4, accumulate_steps=2, epochs=1, checkpoint_every=100)
    caplog.set_level(logging.WARNING)
    full = Pretrainer("mae", **cfg).fit(tiny_images, output_dir=tmp_path / "full")
    assert full.steps == 48 // (4 * 2)  # optimizer steps: 48 images / (4 x 1 process x 2)
    assert [r["step"] for r in full.metrics if "loss" in r] == list(range(1, 7))  # logged per optimizer step
    assert not any("approximate" in r.message for r in caplog.records)  # MAE accumulates exactly
    Pretrainer("mae", **cfg).fit(tiny_images, output_dir=tmp_path / "part", max_steps=3)
    resumed = Pretrainer("mae", **cfg).fit(tiny_images, output_dir=tmp_path / "part", resume=True)
    assert resumed.steps == 6
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "part")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    meta = json.loads((tmp_path / "part" / "checkpoints" / "latest.json").read_text())
    assert (meta["global_batch"], meta["accumulate_steps"], meta["world_size"]) == (8, 2, 1)


def test_accumulating_an_approximate_method_warns(tiny_images, tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    cfg = dict(CNN, **RUN, batch_size=4, accumulate_steps=2, epochs=1, checkpoint_every=100, proj_hidden_dim=16,
               proj_dim=8)
    Pretrainer("simclr", **cfg).fit(tiny_images, output_dir=tmp_path / "r", max_steps=1)
    assert any("accumulate_steps=2 is approximate for simclr" in r.message for r in caplog.records)


# -- activation checkpointing, compile ------------------------------------------------------
def test_grad_checkpointing_gives_the_same_gradients(tiny_images):
    from sslfeatures.data import ImageFolder
    from sslfeatures.methods import StepInfo

    cfg = dict(MAE, backbone_kwargs=dict(VIT["backbone_kwargs"], depth=2), decoder_depth=2)
    images = torch.stack([ImageFolder(tiny_images, size=16)[i][0] for i in range(8)])
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        method = Pretrainer("mae", **cfg).build().train()
        if ckpt:
            assert scale.enable_grad_checkpointing(method) == 4  # 2 encoder + 2 decoder blocks
            assert type(method.backbone.model.blocks[0]).__name__ == "CheckpointedBlock"
        torch.manual_seed(1)
        views = method.views(images, 16)
        method(views, StepInfo(0, 10, 0, 10))["loss"].backward()
        grads.append({n: p.grad for n, p in method.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-6, atol=1e-7, msg=k)
    with pytest.raises(ValueError, match="ViT blocks"):
        scale.enable_grad_checkpointing(Pretrainer("simclr", **CNN).build())


def test_compile_option_is_wired(tiny_images, tmp_path, monkeypatch):
    """compile=True compiles the backbone's blocks in place (names unchanged). A real
    inductor compile takes minutes on this 2-core CI machine, so the compile itself is
    stubbed here: what is checked is what the engine compiles and that training runs."""
    compiled: list[str] = []

    def fake_compile(self, *args, **kwargs):
        compiled.append(type(self).__name__)

    monkeypatch.setattr(nn.Module, "compile", fake_compile)
    run = Pretrainer("mae", **dict(MAE, **RUN, batch_size=8, epochs=1, compile=True)).fit(
        tiny_images, output_dir=tmp_path / "r", max_steps=1)
    assert run.steps == 1 and compiled == ["Block", "Block"]  # the encoder block and the decoder block
    cnn = Pretrainer("simclr", **CNN).build()
    compiled.clear()
    assert scale.compile_backbone(cnn) == 1 and compiled == ["ResNet"]


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                    reason="no C compiler: torch.compile's CPU backend (inductor) needs one")
@pytest.mark.skipif(os.environ.get("SSLFEATURES_COMPILE_TEST") != "1",
                    reason="a real inductor compile takes ~50 s on a 2-core CPU; set SSLFEATURES_COMPILE_TEST=1")
def test_compile_really_trains(tiny_images, tmp_path):
    run = Pretrainer("mae", **dict(MAE, **RUN, batch_size=8, epochs=1, compile=True)).fit(
        tiny_images, output_dir=tmp_path / "r", max_steps=2)
    assert run.steps == 2 and run.final_loss == run.final_loss


# -- SyncBatchNorm ------------------------------------------------------------------------
def syncbn_model() -> nn.Module:
    torch.manual_seed(0)
    return Pretrainer("simclr", **dict(CNN, proj_hidden_dim=32, proj_dim=16, temperature=0.2)).build().train()


def syncbn_step(model: nn.Module, method: nn.Module, views: list[torch.Tensor]) -> dict:
    from sslfeatures.methods import StepInfo

    loss = model(views, StepInfo(0, 10, 0, 10))["loss"]
    loss.backward()
    bn = next(m for m in method.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
    return {"loss": loss.detach(), "grads": {n: p.grad.clone() for n, p in method.named_parameters()
                                             if p.grad is not None},
            "running_mean": bn.running_mean.clone(), "running_var": bn.running_var.clone()}


FSDP_CFG = dict(MAE, **RUN, method="mae", batch_size=4, epochs=1, checkpoint_every=2, strategy="fsdp")


@pytest.fixture(scope="module")
def torchrun_runs(tiny_images, tmp_path_factory) -> Path:
    """One torchrun launch (2 processes), three jobs in it: the SyncBatchNorm step, an FSDP
    run stopped after 3 steps, and the same run resumed to its end (6 steps)."""
    from sslfeatures.data import ImageFolder

    tmp = tmp_path_factory.mktemp("torchrun")
    method = syncbn_model()
    images = torch.stack([ImageFolder(tiny_images, size=32)[i][0] for i in range(16)])
    torch.manual_seed(3)
    views = method.views(images, 16)
    torch.save({"state": method.state_dict(), "views": views}, tmp / "syncbn.in.pt")
    part = _spec(tmp, "fsdp_part", tiny_images, tmp / "fsdp", FSDP_CFG, max_steps=3)
    rest = _spec(tmp, "fsdp_rest", tiny_images, tmp / "fsdp", FSDP_CFG, resume=True)
    (tmp / "jobs.json").write_text(json.dumps([["syncbn", str(tmp)], ["fit", str(part)], ["fit", str(rest)]]))
    proc = torchrun("many", tmp / "jobs.json")
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return tmp


def test_sync_batchnorm_two_processes_match_one(torchrun_runs):
    """BN in training mode, 2 processes x 8 images with SyncBatchNorm == 1 process x 16."""
    inputs = torch.load(torchrun_runs / "syncbn.in.pt", weights_only=True)
    method = syncbn_model()
    method.load_state_dict(inputs["state"])
    ref = syncbn_step(method, method, inputs["views"])
    ddp = torch.load(torchrun_runs / "syncbn.ddp.pt", weights_only=True)
    scale_ = max(float(g.abs().max()) for g in ref["grads"].values())
    for k, g in ref["grads"].items():
        torch.testing.assert_close(ddp["grads"][k], g, rtol=1e-4, atol=1e-5 * scale_, msg=k)
    for k in ("running_mean", "running_var"):
        torch.testing.assert_close(ddp[k], ref[k], rtol=1e-5, atol=1e-6)
    half = syncbn_model()  # the comparison is sensitive: per-process statistics differ
    half.load_state_dict(inputs["state"])
    alone = syncbn_step(half, half, [v[:8] for v in inputs["views"]])
    assert not torch.allclose(alone["running_mean"], ref["running_mean"], rtol=1e-3, atol=1e-5)


def test_fsdp_trains_checkpoints_and_resumes(torchrun_runs, tiny_images, tmp_path):
    from sslfeatures import Encoder

    assert _result(torchrun_runs / "fsdp_part.json")["steps"] == 3
    assert _result(torchrun_runs / "fsdp_rest.json")["steps"] == 6
    # the same images and random draws on 1 process x 2 micro-batches, unsharded
    cfg = {k: v for k, v in FSDP_CFG.items() if k not in ("method", "strategy")}
    Pretrainer("mae", **dict(cfg, accumulate_steps=2)).fit(tiny_images, output_dir=tmp_path / "ref")
    a, b = _weights(tmp_path / "ref"), _weights(torchrun_runs / "fsdp")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)
    enc = Encoder.from_pretrained(torchrun_runs / "fsdp")
    ref = Encoder.from_pretrained(tmp_path / "ref")
    x = torch.rand(2, 3, 16, 16)
    torch.testing.assert_close(enc.backbone(x), ref.backbone(x), rtol=1e-4, atol=1e-5)


def test_fsdp_needs_several_processes(tiny_images, tmp_path):
    cfg = {k: v for k, v in FSDP_CFG.items() if k != "method"}
    with pytest.raises(RuntimeError, match="launch the run with torchrun"):
        Pretrainer("mae", **cfg).fit(tiny_images, output_dir=tmp_path / "r")


def test_sync_batchnorm_reverts_to_plain_batchnorm():
    method = syncbn_model()
    before = {k: v.clone() for k, v in method.state_dict().items()}
    scale.convert_sync_batchnorm(method, torch.device("cpu"))
    assert sum(isinstance(m, scale.DistributedBatchNorm) for m in method.modules()) > 10
    assert method.state_dict().keys() == before.keys()
    scale.revert_sync_batchnorm(method)
    assert not any(isinstance(m, scale.DistributedBatchNorm) for m in method.modules())
    assert all(type(m) in (nn.BatchNorm1d, nn.BatchNorm2d) for m in method.modules()
               if isinstance(m, nn.modules.batchnorm._BatchNorm))
    for k, v in method.state_dict().items():
        assert torch.equal(v, before[k]), k


# -- a killed rank; resuming on another world size ----------------------------------------
def test_killed_rank_ends_the_job_and_resume_continues(tiny_images, tmp_path, caplog):
    cfg = dict(MAE, **RUN, method="mae", batch_size=4, epochs=2, checkpoint_every=2, dist_timeout=60)
    out = tmp_path / "run"
    t0 = time.monotonic()
    killed = _spec(tmp_path, "killed", tiny_images, out, cfg, kill_rank=1, kill_step=5)
    procs = launch("fit", killed, timeout=90)
    assert time.monotonic() - t0 < 60
    assert procs[1].returncode == -9 and procs[0].returncode != 0
    err = _result(killed)
    assert err["error"] == "PeerLostError", err
    assert "another process of this run died" in err["message"] and "step 4" in err["message"]
    assert "resume=True" in err["message"]
    assert json.loads((out / "checkpoints" / "latest.json").read_text())["step"] == 4

    one, other = tmp_path / "one_process", tmp_path / "other_batch"  # the step-4 checkpoint, twice
    shutil.copytree(out, one)
    shutil.copytree(out, other)

    resumed = _spec(tmp_path, "resumed", tiny_images, out, cfg, resume=True)
    procs = launch("fit", resumed)
    assert all(p.returncode == 0 for p in procs), "\n".join(p.stdout[-3000:] for p in procs)
    assert _result(resumed)["steps"] == 12  # 48 images / (4 x 2 processes) x 2 epochs
    assert (out / "model.safetensors").exists()

    # another world size, same images per step: 1 process accumulating 2 micro-batches of 4
    cfg1 = {k: v for k, v in cfg.items() if k != "method"}
    run = Pretrainer("mae", **dict(cfg1, accumulate_steps=2)).fit(tiny_images, output_dir=one, resume=True)
    assert run.steps == 12
    a, b = _weights(out), _weights(one)
    for k in a:  # MAE accumulates exactly and each micro-batch draws what its rank drew: equal up to round-off
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)

    # another global batch (1 process x 4 images): the same point in epochs, schedules re-derived
    caplog.set_level(logging.WARNING)
    run = Pretrainer("mae", **cfg1).fit(tiny_images, output_dir=other, resume=True)
    assert run.steps == 24  # 48 / 4 x 2 epochs; step 4 of 12 (x 8 images) became step 8 of 24 (x 4)
    assert any("continuing at step 8 of the new schedule" in r.message for r in caplog.records)


def test_folder_stream_gives_each_process_its_own_share_reseeded_every_epoch():
    """The per-process split of the image stream (what DistributedSampler with set_epoch does)."""
    from sslfeatures.data import ArrayImages, TrainStream

    images = [torch.full((3, 8, 8), i, dtype=torch.uint8) for i in range(40)]  # pixel value = index
    seen = {}
    for epoch in (0, 1):
        parts = [torch.cat(list(TrainStream(ArrayImages(images, size=8), 4, seed=5, num_workers=0, rank=r,
                                            world_size=2, progress=False).epoch(epoch)))[:, 0, 0, 0].tolist()
                 for r in range(2)]
        assert len(parts[0]) == len(parts[1]) == 20 and not set(parts[0]) & set(parts[1])
        seen[epoch] = parts
    assert seen[0][0] != seen[1][0]  # another order (and share) every epoch


# -- WebDataset tar shards ----------------------------------------------------------------
SHARD_RUN = dict(MAE, **RUN, batch_size=8, epochs=1, checkpoint_every=100)


def test_shard_command_round_trip_and_exact_resume(tiny_images, tmp_path, capsys):
    from sslfeatures.cli import main

    out = tmp_path / "shards"
    assert main(["shard", str(tiny_images), "--out", str(out), "--max-count", "10"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary == {"shards": 5, "samples": 48, "skipped": 0, "pattern": str(out / "train-{000000..000004}.tar")}
    assert not list(out.glob(".*"))  # no temp files left
    index = json.loads((out / "shards.json").read_text())
    assert [s["count"] for s in index["shards"]] == [10, 10, 10, 10, 8]
    try:  # the webdataset package (dev extra) reads them: the image bytes unchanged, the original path
        import webdataset as wds
    except ImportError:
        wds = None
    if wds is not None:
        first = next(iter(wds.WebDataset(str(out / "train-000000.tar"), shardshuffle=False)))
        assert first["png"] == (tiny_images / first["path"].decode()).read_bytes()

    full = Pretrainer("mae", **SHARD_RUN).fit(summary["pattern"], output_dir=tmp_path / "full")
    assert full.steps == 48 // 8 and not full.bad_files
    Pretrainer("mae", **SHARD_RUN).fit(out, output_dir=tmp_path / "part", max_steps=2)  # a folder of shards
    Pretrainer("mae", **SHARD_RUN).fit(out, output_dir=tmp_path / "part", resume=True)
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "part")
    for k in a:  # mid-epoch resume re-reads the shards and skips what was trained on: the same batches
        assert torch.equal(a[k], b[k]), k


def test_shards_split_over_processes_and_workers(tiny_images, tmp_path):
    from sslfeatures.data.shards import ShardSource, ShardStream, write_shards

    write_shards(tiny_images, tmp_path, max_count=6)  # 8 shards of 6
    source = ShardSource(tmp_path / "train-{000000..000007}.tar", size=16)
    streams = [ShardStream(source, 4, seed=1, num_workers=2, rank=r, world_size=2) for r in range(2)]
    assert len(streams[0]) == len(streams[1]) == 48 // 8
    for epoch in (0, 1):
        mine = [set(s.shards_of(epoch)) for s in streams]
        assert not mine[0] & mine[1] and mine[0] | mine[1] == set(range(8))
    assert streams[0].shards_of(0) != streams[0].shards_of(1)  # reshuffled every epoch (seeded)
    batches = [torch.cat(list(s.epoch(0))) for s in streams]
    assert batches[0].shape == (24, 3, 16, 16)
    # no image twice in an epoch, none shared by the processes
    flat = {tuple(x.flatten()[:64].tolist()) for b in batches for x in b}
    assert len(flat) == 48
    again = torch.cat(list(ShardStream(source, 4, seed=1, num_workers=2, rank=0, world_size=2).epoch(0)))
    assert torch.equal(again, batches[0])  # seeded: the same order again (for the same number of workers)


def _tar(path: Path, members: list[tuple[str, bytes | None, bytes]]) -> None:
    import io
    import tarfile

    with tarfile.open(path, "w") as tar:
        for name, link, data in members:
            info = tarfile.TarInfo(name)
            if link is not None:
                info.type, info.linkname = tarfile.SYMTYPE, link.decode()
                tar.addfile(info)
                continue
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_corrupt_member_is_reported_and_unsafe_names_refused(tiny_images, tmp_path):
    good = sorted(tiny_images.rglob("*.png"))
    members = [(f"{i:06d}.png", None, f.read_bytes()) for i, f in enumerate(good[:16])]
    members[3] = ("000003.png", None, b"\x89PNG not really")            # corrupt
    members += [("../escape.png", None, good[20].read_bytes()),           # path traversal
                ("/etc/absolute.png", None, good[21].read_bytes()),       # absolute name
                ("000099.png", b"/etc/passwd", b"")]                       # a link
    _tar(tmp_path / "bad-000000.tar", members)
    run = Pretrainer("mae", **dict(SHARD_RUN, batch_size=4)).fit(tmp_path / "bad-000000.tar",
                                                                 output_dir=tmp_path / "run")
    assert run.steps == 4  # 16 samples counted; the corrupt one is made up for by reading the shard again
    reasons = {k.rsplit(":", 1)[-1]: v for k, v in run.bad_files.items()}
    assert "not a recognised image format" in reasons["000003.png"]
    assert "path traversal" in reasons["../escape.png"] and "absolute" in reasons["/etc/absolute.png"]
    assert "not a regular file" in reasons["000099.png"]
    text = (tmp_path / "run" / "bad_files.txt").read_text()
    assert "bad-000000.tar:000003.png" in text
    from sslfeatures.data.shards import ShardSource

    assert len(ShardSource(tmp_path / "bad-000000.tar", size=16)) == 16  # counted: 15 good + 1 corrupt
