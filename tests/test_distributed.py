"""DDP safety: 2 CPU processes (gloo, launched by torchrun) reproduce the single-process run
on the same global batch for every method whose loss reaches across the batch.

Each process gets half of the global batch, runs the method's training step under
``DistributedDataParallel`` and back-propagates; the process-averaged loss, the
(DDP-averaged) gradients of every trainable parameter, and the cross-process state (MoCo's
queue, DINO's centre) must equal those of one process that sees the whole batch. A
contrastive or batch-statistics loss that forgot to gather, or gathered without gradients,
fails this (lightly shipped that bug twice).

BatchNorm layers are put in eval mode on both sides: their batch statistics are per process
by design (sharing them is the `sync_bn` option's job, tested in tests/test_scale.py), and
what is under test is every cross-sample term of the losses.

Run as a script (``torchrun --nproc-per-node 2 tests/test_distributed.py --worker DIR``)
this file is the worker.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

CNN = dict(backbone="resnet18", stem="small_s2", backbone_kwargs={"channels": [8, 16, 32, 64]}, image_size=16)
VIT = dict(backbone="vit_tiny_patch16_224", patch_size=8, image_size=16, backbone_kwargs={"depth": 1})
METHODS: dict[str, dict] = {
    "simclr": dict(CNN, proj_hidden_dim=32, proj_dim=16, temperature=0.2),
    "mocov1": dict(CNN, queue_size=64, proj_dim=16),
    "mocov3": dict(VIT, proj_hidden_dim=32, pred_hidden_dim=32, proj_dim=16),
    "barlow_twins": dict(CNN, proj_hidden_dim=32, proj_dim=32),
    "vicreg": dict(CNN, proj_hidden_dim=32, proj_dim=32),
    "wmse": dict(CNN, proj_hidden_dim=32, proj_dim=4, w_size=8, w_iter=2),
    "dino": dict(VIT, out_dim=64, hidden_dim=32, bottleneck_dim=16, freeze_last_layer_epochs=0,
                 views=[{"scale": [0.4, 1.0], "count": 2}]),
}
# losses that depend on which samples share the batch (a per-process loss would differ)
BATCH_COUPLED = {"simclr", "mocov3", "barlow_twins", "vicreg", "wmse"}
GLOBAL_BATCH = 16
SEED = 1234


def _build(name: str):
    from sslfeatures import Pretrainer

    torch.manual_seed(0)
    method = Pretrainer(name, **METHODS[name]).build()
    method.train()
    for m in method.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    return method


def _info():
    from sslfeatures.methods import StepInfo

    return StepInfo(step=0, total_steps=10, epoch=0, steps_per_epoch=10)


def _state_after_step(name: str, method) -> dict[str, torch.Tensor]:
    """Cross-process state a step leaves behind (after the optimizer-step hook)."""
    if name == "mocov1":
        method.after_optimizer_step(_info())  # EMA update + enqueue of the global batch's keys
        return {"queue": method.queue.clone(), "queue_ptr": method.queue_ptr.clone()}
    if name == "dino":
        return {"center": method.criterion.center.clone()}
    return {}


def _step(name: str, model, method, views: list[torch.Tensor]) -> dict:
    torch.manual_seed(SEED)
    loss = model(views, _info())["loss"]
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in method.named_parameters() if p.grad is not None}
    return {"loss": loss.detach(), "grads": grads, "state": _state_after_step(name, method)}


# -- the worker (one per process, under torchrun) ---------------------------------------
def _worker(workdir: Path) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    for name in METHODS:
        inputs = torch.load(workdir / f"{name}.in.pt", weights_only=True)
        method = _build(name)
        method.load_state_dict(inputs["state"])
        per = GLOBAL_BATCH // world
        views = [v[rank * per:(rank + 1) * per] for v in inputs["views"]]
        ddp = nn.parallel.DistributedDataParallel(method)
        out = _step(name, ddp, method, views)
        losses = [torch.zeros(()) for _ in range(world)]
        dist.all_gather(losses, out["loss"])
        if rank == 0:
            out["rank_losses"] = torch.stack(losses)
            torch.save(out, workdir / f"{name}.ddp.pt")
        dist.barrier()
    dist.destroy_process_group()


# -- the test (single process + launching the workers) ----------------------------------
@pytest.fixture(scope="module")
def runs(tmp_path_factory, photos) -> dict[str, tuple[dict, dict, float]]:
    from PIL import Image

    workdir = tmp_path_factory.mktemp("ddp")
    rng = np.random.default_rng(0)
    crops = []
    for k in range(GLOBAL_BATCH):  # real photo crops, 32 px
        pil = Image.fromarray(photos[k % len(photos)])
        w, h = pil.size
        s = int(min(w, h) * rng.uniform(0.4, 0.9))
        x0, y0 = rng.integers(0, w - s + 1), rng.integers(0, h - s + 1)
        crops.append(np.asarray(pil.crop((x0, y0, x0 + s, y0 + s)).resize((32, 32), Image.BILINEAR)))
    batch = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).contiguous()

    refs = {}
    for name in METHODS:
        method = _build(name)
        torch.manual_seed(7)
        views = method.views(batch, METHODS[name]["image_size"])
        torch.save({"state": method.state_dict(), "views": views}, workdir / f"{name}.in.pt")
        ref = _step(name, method, method, views)
        half = _build(name)  # what one process would compute if the loss did not gather
        half.load_state_dict(torch.load(workdir / f"{name}.in.pt", weights_only=True)["state"])
        with torch.no_grad():
            torch.manual_seed(SEED)
            half_loss = float(half([v[: GLOBAL_BATCH // 2] for v in views], _info())["loss"])
        refs[name] = (ref, half_loss)

    env = dict(os.environ, OMP_NUM_THREADS="1")
    if sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
           "--nproc-per-node", "2", str(Path(__file__).resolve()), "--worker", str(workdir)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return {name: (refs[name][0], torch.load(workdir / f"{name}.ddp.pt", weights_only=True), refs[name][1])
            for name in METHODS}


@pytest.mark.parametrize("name", list(METHODS))
def test_two_processes_match_one(runs, name):
    ref, ddp, half_loss = runs[name]
    single = float(ref["loss"])
    assert np.isfinite(single)
    # the loss of the global batch is the mean of the per-process losses
    assert float(ddp["rank_losses"].mean()) == pytest.approx(single, rel=1e-5, abs=1e-6)
    if name in BATCH_COUPLED:  # ... and the comparison is sensitive to a missing gather
        assert abs(half_loss - single) > 1e-3 * max(1.0, abs(single)), (half_loss, single)
    assert ref["grads"].keys() == ddp["grads"].keys() and len(ref["grads"]) > 4
    scale = max(float(g.abs().max()) for g in ref["grads"].values())  # float32 round-off is relative to it
    assert scale > 0
    for pname, g in ref["grads"].items():
        torch.testing.assert_close(ddp["grads"][pname], g, rtol=1e-4, atol=1e-5 * scale,
                                   msg=lambda m, p=pname: f"{name}: gradient of {p} differs: {m}")
    for key, v in ref["state"].items():
        torch.testing.assert_close(ddp["state"][key], v, rtol=1e-5, atol=1e-6, msg=f"{name}: {key} differs")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        _worker(Path(sys.argv[2]))
    else:
        raise SystemExit("usage: torchrun --nproc-per-node 2 tests/test_distributed.py --worker DIR")
