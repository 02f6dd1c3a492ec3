"""The speed-up ceiling that int8 can give a GEMM-bound encoder on this CPU.

A ViT spends ~90 % of its FLOPs in the Linear layers' GEMMs, so ONNX Runtime int8 cannot embed
faster than fp32 by more than the ratio of the CPU's int8 and fp32 GEMM rates. This script
measures both rates in onnxruntime (``MatMul`` fp32 vs ``MatMulInteger`` u8 x s8, the kernel the
static int8 export's QDQ MatMuls run) and PyTorch's fp32 ``matmul``, on the shapes of ViT-S/16's
projections at 224 px (197 tokens x batch rows, 384 -> 1152/384/1536 features), and prints the
ratio beside the CPU's instruction-set flags. Without VNNI (``avx512_vnni`` / ``avx_vnni``) an
x86 CPU multiplies int8 with ``vpmaddubsw`` + ``vpmaddwd``, at most twice the fp32 FMA rate.

    python benchmarks/gemm_ceiling.py --threads 2 [--seconds 3]
"""
from __future__ import annotations

import argparse
import platform
import time
from functools import partial

import numpy as np

from sslfeatures.utils import cpu_flags


def gemm_flags() -> list[str]:
    """The SIMD flags that decide int8 and bf16 GEMM speed, of those this CPU has."""
    have = cpu_flags()
    return [f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16")
            if f in have]


def rate(fn, flops: float, seconds: float) -> float:
    """GFLOP/s (or GOP/s) of the no-argument call ``fn`` over ``seconds`` after one warm-up call."""
    fn()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        n += 1
    return flops * n / (time.perf_counter() - t0) / 1e9


def main() -> None:
    import onnxruntime as ort
    import torch
    from onnx import TensorProto, helper, numpy_helper

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=3.0, help="timing per cell")
    ap.add_argument("--batch", type=int, default=8, help="images per call: rows = 197 x batch")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)

    def session(nodes, inputs, outputs, inits):
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = args.threads, 1
        model = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, inits),
                                  opset_imports=[helper.make_opsetid("", 17)])
        return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])

    print(f"CPU: {platform.processor() or platform.machine()}, flags: {' '.join(gemm_flags()) or 'unknown'}; "
          f"{args.threads} threads, onnxruntime {ort.__version__}, torch {torch.__version__}")
    print("| GEMM (M x K x N) | torch fp32 GFLOP/s | ORT fp32 GFLOP/s | ORT int8 GOP/s | int8 / ORT fp32 "
          "| int8 / torch fp32 |")
    print("|---|---|---|---|---|---|")
    m = 197 * args.batch
    ratios = []
    for k, n in ((384, 1152), (384, 384), (384, 1536), (1536, 384)):
        x = rng.standard_normal((m, k), dtype=np.float32)
        w = rng.standard_normal((k, n), dtype=np.float32)
        xq = rng.integers(0, 256, (m, k), dtype=np.uint8)
        wq = rng.integers(-127, 128, (k, n), dtype=np.int8)
        fp = session([helper.make_node("MatMul", ["x", "w"], ["y"])],
                     [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
                     [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])], [numpy_helper.from_array(w, "w")])
        q = session([helper.make_node("MatMulInteger", ["x", "w", "xz"], ["y"])],
                    [helper.make_tensor_value_info("x", TensorProto.UINT8, [m, k])],
                    [helper.make_tensor_value_info("y", TensorProto.INT32, [m, n])],
                    [numpy_helper.from_array(wq, "w"), numpy_helper.from_array(np.array(128, np.uint8), "xz")])
        tx, tw = torch.from_numpy(x), torch.from_numpy(w)
        flops = 2.0 * m * k * n
        r_t = rate(partial(torch.matmul, tx, tw), flops, args.seconds)
        r_f = rate(partial(fp.run, None, {"x": x}), flops, args.seconds)
        r_q = rate(partial(q.run, None, {"x": xq}), flops, args.seconds)
        ratios.append(r_q / max(r_f, r_t))
        print(f"| {m} x {k} x {n} | {r_t:.1f} | {r_f:.1f} | {r_q:.1f} | {r_q / r_f:.2f}x | {r_q / r_t:.2f}x |")
    print(f"\nint8 GEMM ceiling over the faster fp32 GEMM: {min(ratios):.2f}x - {max(ratios):.2f}x "
          "(an int8 GEMM-bound encoder cannot beat its fp32 self by more than this)")


if __name__ == "__main__":
    main()
