"""Crash safety: kill -9 a training run (and an index build) at random moments, including
half-way through a checkpoint / index write. Every time, what is on disk loads, and the
resumed run ends with exactly the weights (and index) of an uninterrupted one.

The runs are forked from one server process (tests/reliability_worker.py) so that a kill
costs the run's time, not another torch import.
"""
from __future__ import annotations

import json
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

WORKER = Path(__file__).with_name("reliability_worker.py")


class Server:
    """The fork server: ``start(job)`` forks a run and returns its pid once it says GO."""

    def __init__(self):
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen([sys.executable, str(WORKER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=env, bufsize=1)
        self.log: list[str] = []
        self.pending: list[str] = []
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.strip())
        self.lines.put(None)

    def _line(self, timeout: float = 120.0) -> str:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no word from the worker in {timeout} s; last lines: {self.log[-6:]}") from None
        if line is None:
            raise RuntimeError(f"worker exited: {self.log[-6:]}")
        self.log.append(line)
        return line

    def _until(self, *prefixes: str) -> str:
        """The next line starting with one of ``prefixes``; lines of other kinds that arrive
        first (the child's GO can beat the server's PID) are kept for a later call."""
        for i, line in enumerate(self.pending):
            if line.startswith(prefixes):
                return self.pending.pop(i)
        while True:
            line = self._line()
            if line.startswith("ERROR"):
                raise AssertionError(f"worker job failed: {line}")
            if line.startswith(prefixes):
                return line
            self.pending.append(line)

    def start(self, **job) -> int:
        self.pending.clear()
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        pid = int(self._until("PID").split()[1])
        assert int(self._until("GO").split()[1]) == pid
        return pid

    def wait(self, pid: int) -> str:
        """Wait for the job to end; returns ``"done"`` or ``"killed"``."""
        line = self._until("EXIT", "DONE")
        if line.startswith("DONE"):
            self._until("EXIT")
            return "done"
        status = int(line.split()[2])
        return "killed" if os.WIFSIGNALED(status) else f"exit {status}"

    def run(self, **job) -> float:
        t0 = time.monotonic()
        pid = self.start(**job)
        assert self.wait(pid) == "done"
        return time.monotonic() - t0

    def kill_after(self, delay: float, **job) -> str:
        pid = self.start(**job)
        time.sleep(delay)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return self.wait(pid)

    def kill_in_write(self, **job) -> None:
        pid = self.start(**job)
        assert self._until("IN_WRITE").split()[1] == str(pid)
        os.kill(pid, signal.SIGKILL)
        assert self.wait(pid) == "killed"

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="module")
def server():
    s = Server()
    yield s
    s.close()


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    from PIL import Image

    root = tmp_path_factory.mktemp("crash_imgs")
    rng = np.random.default_rng(0)
    for i in range(48):
        base = rng.integers(0, 255, (1, 1, 3))
        arr = np.clip(base + rng.integers(-40, 40, (24, 24, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(root / f"{i:02d}.png")
    return root


def _check_checkpoint(out: Path) -> int:
    """The checkpoint on disk is intact: latest.json parses, names an existing file whose
    tensors all load. Returns its step (0 when there is none yet)."""
    ptr = out / "checkpoints" / "latest.json"
    if not ptr.exists():
        return 0
    meta = json.loads(ptr.read_text())
    tensors = load_file(str(out / "checkpoints" / meta["file"]))
    assert any(k.startswith("model/") for k in tensors)
    return int(meta["step"])


def test_training_survives_kill_9_at_random_moments(server, images, tmp_path):
    ref = tmp_path / "reference"
    server.run(job="train", out=str(ref), data=str(images))
    t_run = server.run(job="train", out=str(tmp_path / "timing"), data=str(images))  # warm: files cached
    total = _check_checkpoint(ref)
    assert total == 18
    rng = random.Random(1234)
    out = tmp_path / "killed"
    kills, last = 0, 0
    outcomes = []
    for k in range(16):  # random moments: while starting/resuming, mid-step, mid-checkpoint
        if k == 2 and last + 2 <= total:  # once exactly half-way through writing a checkpoint file
            server.kill_in_write(job="train", out=str(out), data=str(images), hang=last + 2)
            outcome = "killed"
        else:
            outcome = server.kill_after(rng.uniform(0.02, 0.2) * t_run, job="train", out=str(out), data=str(images))
        outcomes.append((outcome, last))
        kills += outcome == "killed"
        step = _check_checkpoint(out)
        assert step >= last  # never goes back: the previous checkpoint is kept until a newer one is whole
        last = step
        if step == total or kills >= 11:
            break
    assert kills >= 10, outcomes
    assert sum(step > 0 for _, step in outcomes) >= 5, outcomes  # most kills interrupt a resumed run
    server.run(job="train", out=str(out), data=str(images))  # resume to the end
    a, b = load_file(str(ref / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    ca = load_file(str(ref / "checkpoints" / "ckpt-00000018.safetensors"))
    cb = load_file(str(out / "checkpoints" / "ckpt-00000018.safetensors"))
    for key in ca:  # optimiser state too
        assert torch.equal(ca[key], cb[key]), key
    leftovers = [p.name for p in (out / "checkpoints").iterdir() if p.name.endswith(".tmp")]
    assert not leftovers, leftovers  # temp files of killed writes are cleaned up


def test_index_saves_survive_kill_9(server, tmp_path):
    pytest.importorskip("faiss")
    sys.path.insert(0, str(WORKER.parent))
    from reliability_worker import INDEX_CHUNKS, INDEX_ROWS, index_vectors

    from sslfeatures.index import Index

    ref = tmp_path / "ref.index"
    server.run(job="index", out=str(ref))
    t_run = server.run(job="index", out=str(tmp_path / "timing.index"))
    rng = random.Random(99)
    path = tmp_path / "killed.index"
    kills, last = 0, 0
    for k in range(16):
        if k == 2 and last // INDEX_ROWS + 2 < INDEX_CHUNKS:  # half-way through writing the file
            server.kill_in_write(job="index", out=str(path), hang=last // INDEX_ROWS + 2)
            outcome = "killed"
        else:
            outcome = server.kill_after(rng.uniform(0.02, 0.25) * t_run, job="index", out=str(path))
        kills += outcome == "killed"
        if path.exists():  # whatever is on disk is a whole index: some prefix of the chunks
            idx = Index.load(path, load_encoder=False)
            n = len(idx)
            assert n % INDEX_ROWS == 0 and n >= last
            done = n // INDEX_ROWS
            x, paths = index_vectors(done - 1)
            np.testing.assert_allclose(idx.vectors([paths[-1]])[0], x[-1] / np.linalg.norm(x[-1]), rtol=1e-5,
                                       atol=1e-6)
            last = n
        if last == INDEX_CHUNKS * INDEX_ROWS or kills >= 11:
            break
    assert kills >= 10
    server.run(job="index", out=str(path))
    a, b = Index.load(ref, load_encoder=False), Index.load(path, load_encoder=False)
    assert a.paths == b.paths
    np.testing.assert_array_equal(a.vectors(), b.vectors())
