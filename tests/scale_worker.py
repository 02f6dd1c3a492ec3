"""The per-process worker of tests/test_scale.py (launched 2x by torchrun or by the test's
own launcher, which sets RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT as torchrun does).

``python tests/scale_worker.py fit SPEC.json``
    ``Pretrainer(**spec["config"]).fit(spec["data"], spec["out"], ...)``; the process of rank
    ``spec["kill_rank"]`` kills itself (SIGKILL) at optimizer step ``spec["kill_step"]``.
    Rank 0 writes ``spec["result"]`` (JSON: steps, final loss) or, on an error, the error's
    type and message.
``python tests/scale_worker.py syncbn DIR``
    One training step of a BatchNorm model on this process's half of the batch in
    ``DIR/syncbn.in.pt``, with SyncBatchNorm and DDP; rank 0 saves loss and gradients.
``python tests/scale_worker.py many LIST.json``
    Each ``[task, arg]`` of the list in turn, in the same processes (one launch, one
    process group: launching costs more than the tasks on a small CPU).
"""
from __future__ import annotations

import json
import os
import signal
import sys
import traceback
from pathlib import Path

import torch


def _fit(spec_path: Path) -> int:
    from sslfeatures import Pretrainer
    from sslfeatures.methods import get_method

    spec = json.loads(spec_path.read_text())
    rank = int(os.environ.get("RANK", "0"))
    cfg = dict(spec["config"])
    name = cfg.pop("method")
    if spec.get("kill_rank") is not None and rank == spec["kill_rank"]:
        cls = get_method(name)
        original = cls.training_step

        def training_step(self, views, info, *args, **kwargs):
            if info.step == spec["kill_step"]:
                os.kill(os.getpid(), signal.SIGKILL)  # a crash no handler sees (OOM killer, node loss)
            return original(self, views, info, *args, **kwargs)

        cls.training_step = training_step
    try:
        run = Pretrainer(name, **cfg).fit(spec["data"], output_dir=spec["out"], resume=spec.get("resume", False),
                                         max_steps=spec.get("max_steps"))
    except Exception as exc:
        if rank == 0:
            Path(spec["result"]).write_text(json.dumps({"error": type(exc).__name__, "message": str(exc)}))
        traceback.print_exc()
        return 3
    if rank == 0:
        Path(spec["result"]).write_text(json.dumps({"steps": run.steps, "loss": run.final_loss,
                                                    "bad_files": run.bad_files}))
    return 0


def _syncbn(workdir: Path) -> int:
    import torch.distributed as dist
    import torch.nn as nn

    from sslfeatures.engine import scale
    from test_scale import syncbn_model, syncbn_step

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    inputs = torch.load(workdir / "syncbn.in.pt", weights_only=True)
    model = syncbn_model()
    model.load_state_dict(inputs["state"])
    model = scale.convert_sync_batchnorm(model, torch.device("cpu"))
    assert any(isinstance(m, scale.DistributedBatchNorm) for m in model.modules())
    per = len(inputs["views"][0]) // world
    ddp = nn.parallel.DistributedDataParallel(model)
    out = syncbn_step(ddp, model, [v[rank * per:(rank + 1) * per] for v in inputs["views"]])
    if rank == 0:
        torch.save(out, workdir / "syncbn.ddp.pt")
    dist.barrier()
    return 0


def _many(list_path: Path) -> int:
    for task, arg in json.loads(list_path.read_text()):
        rc = TASKS[task](Path(arg))
        if rc:
            return rc
    return 0


TASKS = {"fit": _fit, "syncbn": _syncbn, "many": _many}


if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    task, arg = sys.argv[1], Path(sys.argv[2])
    code = TASKS[task](arg)
    if torch.distributed.is_initialized() and code == 0:
        torch.distributed.destroy_process_group()
    sys.exit(code)
