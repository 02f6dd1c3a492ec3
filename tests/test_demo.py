"""Smoke test of the `make demo` path (a few steps instead of the full schedule)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_demo_runs_end_to_end(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "demo.py"), "--out", str(tmp_path),
                           "--max-steps", "2"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "raw pixels" in out and "random init" in out and "SimCLR pre-trained" in out
    assert (tmp_path / "exported" / "model.safetensors").exists()
    assert (tmp_path / "neighbours.png").stat().st_size > 10_000
    assert (tmp_path / "run" / "loss.png").exists()
