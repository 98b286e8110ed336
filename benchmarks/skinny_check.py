"""Decode projections as the engine calls them (Llama-3.1-8B shapes, bf16): cuBLAS vs the
skinny GEMM, plain and with the gated activation folded in, timed as CUDA-graph replays over
weight copies that do not fit in L2.   PYTHONPATH=. python benchmarks/skinny_check.py"""

import torch
import torch.nn.functional as F
from triton.testing import do_bench_cudagraph

from pagoda.kernels.activation import silu_and_mul
from pagoda.kernels.skinny_gemm import skinny_gemm

DEV, BF = "cuda", torch.bfloat16


def timed(fn, copies):
    fn()
    return do_bench_cudagraph(fn, rep=30, return_mode="median") / copies * 1e3


for m in (1, 8):
    for n, k in ((6144, 4096), (4096, 4096), (4096, 14336)):
        copies = max(1, -(-150 * 2**20 // (n * k * 2)))
        ws = [torch.randn(n, k, device=DEV, dtype=BF) / 64 for _ in range(copies)]
        x = torch.randn(m, k, device=DEV, dtype=BF)
        gu = torch.randn(m, 2 * k, device=DEV, dtype=BF)
        row = [timed(lambda: [F.linear(x, w) for w in ws], copies),
               timed(lambda: [skinny_gemm(x, w) for w in ws], copies),
               timed(lambda: [F.linear(silu_and_mul(gu), w) for w in ws], copies),
               timed(lambda: [skinny_gemm(silu_and_mul(gu), w) for w in ws], copies),
               timed(lambda: [skinny_gemm(gu, w, gated_act="silu") for w in ws], copies)]
        print(f"M={m} N={n} K={k}: cublas {row[0]:.1f} skinny {row[1]:.1f} | act+cublas "
              f"{row[2]:.1f} act+skinny {row[3]:.1f} gated skinny {row[4]:.1f} us", flush=True)
