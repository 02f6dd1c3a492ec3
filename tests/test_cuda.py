"""GPU checks: training, resume, embedding and export on CUDA, with bf16/fp16 autocast.

Skipped where no CUDA device is present (CI). The rest of the suite pins the CPU
(``SSLFEATURES_DEVICE=cpu`` in conftest) so its bit-exact checks hold on a GPU machine too;
these tests ask for ``device="cuda"`` explicitly and compare against the CPU with tolerances
(cuDNN and TF32/bf16 arithmetic are not bit-exact).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from sslfeatures import Encoder, Pretrainer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CNN = dict(backbone="resnet18", stem="small_s2", backbone_kwargs={"channels": [16, 32, 64, 128]}, image_size=32)
VIT = dict(backbone="vit_tiny_patch16_224", patch_size=8, image_size=32, backbone_kwargs={"depth": 2})
RUN = dict(progress=False, log_every=1, batch_size=16, epochs=2, num_workers=0, device="cuda")
CASES = {
    "simclr": dict(CNN, proj_hidden_dim=128, lr=0.5, temperature=0.2),
    "byol": dict(CNN, proj_hidden_dim=128, pred_hidden_dim=128, proj_dim=64, lr=0.5),
    "dino": dict(VIT, out_dim=256, hidden_dim=128, bottleneck_dim=64, lr=1e-3, warmup_teacher_temp_epochs=0,
                 views=[{"scale": [0.4, 1.0], "count": 2}, {"scale": [0.1, 0.4], "size_frac": 0.5, "count": 2}]),
    "mae": dict(VIT, decoder_dim=64, decoder_depth=1, decoder_heads=2, lr=1e-3),
}


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(1)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("method", sorted(CASES))
def test_trains_on_cuda_and_embeds_like_the_cpu(method, precision, tiny_images, tmp_path):
    run = Pretrainer(method, precision=precision, **RUN, **CASES[method]).fit(tiny_images, output_dir=tmp_path / "r")
    losses = [m["loss"] for m in run.metrics if "loss" in m]
    assert len(losses) == run.steps == 6 and all(np.isfinite(losses)), losses
    gpu = Encoder.from_pretrained(run.output_dir, device="cuda")
    cpu = Encoder.from_pretrained(run.output_dir, device="cpu")
    assert next(gpu.backbone.parameters()).is_cuda
    files = sorted(tiny_images.rglob("*.png"))[:12]
    g, c = gpu.embed(files), cpu.embed(files)
    assert g.dtype == np.float32 and g.shape == c.shape
    assert _cosines(g, c).min() > 0.99  # bf16 autocast on the GPU vs fp32 on the CPU


def test_resume_on_cuda_continues_the_run(tiny_images, tmp_path):
    cfg = dict(RUN, **CASES["byol"], checkpoint_every=2)
    Pretrainer("byol", **cfg).fit(tiny_images, output_dir=tmp_path / "r", max_steps=3)
    resumed = Pretrainer("byol", **cfg).fit(tiny_images, output_dir=tmp_path / "r", resume=True)
    assert resumed.steps == 6
    assert [m["step"] for m in resumed.metrics if "loss" in m] == [1, 2, 3, 4, 5, 6]  # continued, not restarted


def test_export_from_a_cuda_encoder_is_parity_checked(tiny_images, tmp_path):
    pytest.importorskip("onnxruntime")
    run = Pretrainer("simclr", **RUN, **CASES["simclr"]).fit(tiny_images, output_dir=tmp_path / "r", max_steps=2)
    enc = Encoder.from_pretrained(run.output_dir, device="cuda")
    files = enc.export(tmp_path / "out", formats=["safetensors", "onnx"], check_images=tiny_images)
    ort = Encoder.from_pretrained(files["onnx"], device="cpu")
    imgs = sorted(tiny_images.rglob("*.png"))[:8]
    assert _cosines(ort.embed(imgs), Encoder.from_pretrained(run.output_dir, device="cpu").embed(imgs)).min() > 0.9999
