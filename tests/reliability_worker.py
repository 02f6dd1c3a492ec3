"""A fork server for the kill -9 tests (tests/test_reliability_crash.py).

Importing torch + sslfeatures takes seconds; the crash tests start a dozen short runs and
kill each one at a random moment. This process imports once, then for each JSON command
read from stdin forks a child that does the job. Protocol (one line each, on stdout):

    parent -> {"job": "train"|"index", "out": ..., "data": ..., "hang": step or -1}
    server -> PID <pid>                 the child doing the job
    child  -> GO <pid>                  imports done, work starts now
    child  -> IN_WRITE <pid>            (hang >= 0) half of a file is written; the child sleeps
    child  -> DONE <pid>                the job finished
    server -> EXIT <pid> <status>       the child is gone (status: os.waitpid's)
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

import sslfeatures.plots
import sslfeatures.index  # noqa: F401  (imported once here, not in every forked run)
import tqdm.auto  # noqa: F401
from sslfeatures import Encoder, Pretrainer  # noqa: F401
from sslfeatures.engine import checkpoint as ck

TRAIN = dict(backbone="resnet18", stem="small_s2", backbone_kwargs={"channels": [8, 16, 32, 64]}, image_size=16,
             batch_size=8, epochs=3, progress=False, precision="fp32", num_workers=0, device="cpu", log_every=1,
             checkpoint_every=1, proj_hidden_dim=32, proj_dim=16, seed=7)
INDEX_CHUNKS, INDEX_ROWS, INDEX_DIM = 12, 3000, 32


def say(msg: str) -> None:
    sys.stdout.write(f"{msg} {os.getpid()}\n")
    sys.stdout.flush()


def _hang_in(write_prefix: str) -> None:
    """Make the next atomic write of a file named ``write_prefix...`` stop half-way (the
    temp file half written, the target untouched) and sleep until killed."""
    from sslfeatures import utils

    real = utils.atomic_writer

    class _Half:
        def __init__(self, fh):
            self.fh = fh

        def write(self, data):
            self.fh.write(bytes(data[: max(1, len(data) // 2)]))
            self.fh.flush()
            say("IN_WRITE")
            time.sleep(120)

        def __getattr__(self, name):
            return getattr(self.fh, name)

    from contextlib import contextmanager

    @contextmanager
    def writer(path):
        with real(path) as fh:
            yield _Half(fh) if Path(path).name.startswith(write_prefix) else fh

    utils.atomic_writer = writer
    import sslfeatures.index as index_mod  # imports atomic_writer by name

    index_mod.atomic_writer = writer


def train(cmd: dict) -> None:
    out = Path(cmd["out"])
    if cmd.get("hang", -1) >= 0:
        _hang_in(f"ckpt-{cmd['hang']:08d}")
    resume = ck.has_checkpoint(out / "checkpoints")
    say("GO")
    Pretrainer("simclr", **TRAIN).fit(cmd["data"], output_dir=out, resume=resume, overwrite=not resume)


def index_vectors(i: int) -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng(1000 + i)
    x = rng.standard_normal((INDEX_ROWS, INDEX_DIM)).astype(np.float32)
    return x, [f"chunk{i:02d}/img{j:05d}.jpg" for j in range(INDEX_ROWS)]


def index(cmd: dict) -> None:
    """Build an index chunk by chunk, saving after each; a restarted job continues from the
    saved file (the chunks already in it are not added again)."""
    from sslfeatures.index import Index

    path = Path(cmd["out"])
    if cmd.get("hang", -1) >= 0:
        _hang_in(path.name)
    say("GO")
    idx = Index.load(path, load_encoder=False) if path.exists() else None
    done = 0 if idx is None else len(idx) // INDEX_ROWS
    for i in range(done, INDEX_CHUNKS):
        x, paths = index_vectors(i)
        if idx is None:
            idx = Index.from_vectors(x, paths, kind="flat", metric="cosine", target_recall=None)
        else:
            idx.add_vectors(x, paths)
        if cmd.get("hang", -1) >= 0 and i < cmd["hang"]:
            continue  # reach the chosen save with a bigger file
        idx.save(path)


def main() -> None:
    torch.set_num_threads(1)
    sslfeatures.plots.plot_loss_curve = lambda *a, **k: None  # matplotlib is most of a tiny run's time
    for line in sys.stdin:
        if not line.strip():
            continue
        cmd = json.loads(line)
        pid = os.fork()
        if pid == 0:  # the child: do the job, never return into the loop
            code = 0
            try:
                {"train": train, "index": index}[cmd["job"]](cmd)
                say("DONE")
            except BaseException as e:  # report, then exit non-zero
                sys.stdout.write(f"ERROR {os.getpid()} {type(e).__name__}: {' '.join(str(e).split())}\n")
                code = 1
            sys.stdout.flush()
            os._exit(code)
        sys.stdout.write(f"PID {pid}\n")
        sys.stdout.flush()
        _, status = os.waitpid(pid, 0)
        sys.stdout.write(f"EXIT {pid} {status}\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
