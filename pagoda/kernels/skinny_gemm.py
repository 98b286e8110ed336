"""y = x @ w.T (+ bias) for few rows of x (decode: M <= 16), streaming w once at full bandwidth.

At M = 1..16 a linear layer is a pass over its weight. cuBLAS picks split-K tiles for the
narrow Llama projections (q/k/v, o_proj) and reaches ~3.1 TB/s on an H200 plus a separate
reduce launch; here each program owns BLOCK_N output columns for all M rows and walks the
whole K dimension with pipelined loads, so there is no reduce and every weight byte is read
exactly once. tl.dot needs 16 rows, so x is padded to 16 rows by masking (free: the tensor
cores are idle in a bandwidth-bound pass). Configs come from a sweep on an H200
(benchmarks/kernels_bench.py, `skinny`)."""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from pagoda.kernels.pdl import launch_args, wait_then_release

MAX_ROWS = 16
# PAGODA_SKINNY_ALL=1 routes every half-precision decode projection here, gate_up included:
# the sweep timed kernels alone, but in a CUDA graph with programmatic dependent launch a
# cuBLAS kernel also breaks the launch overlap on both sides. Measured on Llama-3.1-8B P1
# (H200, 2026-11-29): 4.44 against 4.40 ms a step, so it stays off; kept for A/B runs.
_ALL_SHAPES = os.environ.get("PAGODA_SKINNY_ALL") == "1"


@triton.jit
def _skinny_gemm_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
    HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, DOT_PREC: tl.constexpr, USE_PDL: tl.constexpr,
):
    wait_then_release(USE_PDL)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.arange(0, 16)
    ks = tl.arange(0, BLOCK_K)
    col_mask = cols < N
    row_mask = rows < M
    x_base = x_ptr + rows[:, None] * stride_xm
    w_base = w_ptr + cols.to(tl.int64)[:, None] * stride_wn
    acc = tl.zeros([16, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + ks
        if EVEN_K:
            x_mask = row_mask[:, None]
            w = tl.load(w_base + kk[None, :], mask=col_mask[:, None], other=0.0)
        else:
            k_mask = kk < K
            x_mask = row_mask[:, None] & k_mask[None, :]
            w = tl.load(w_base + kk[None, :], mask=col_mask[:, None] & k_mask[None, :], other=0.0)
        x = tl.load(x_base + kk[None, :], mask=x_mask, other=0.0)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PREC)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rows[:, None] * stride_ym + cols[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=row_mask[:, None] & col_mask[None, :])


def choose_config(n: int, k: int) -> dict:
    """Tiles by weight shape, from the H200 sweep (bf16, M = 1 and 8, weights streamed from
    HBM): narrow outputs take narrow tiles so every SM gets a program; wider outputs take
    64-column tiles with shorter K steps (the best configs for 6144 and 28672 columns, and
    128-wide K steps for the 128k-column LM head)."""
    block_n = 16 if n <= 2048 else 32 if n <= 4096 else 64
    block_k = 512 if block_n < 64 else 128 if n >= 65536 else 256
    return dict(block_n=block_n, block_k=block_k, num_warps=4, num_stages=4)


def beats_cublas(m: int, n: int, k: int, dtype: torch.dtype) -> bool:
    """Where the sweep found this kernel faster: half-precision decode rows on projections up
    to 16k outputs (Llama-3.1-8B q/k/v 15.3 -> 14.8 us, o_proj 13.4 -> 11.2, down_proj
    31.4 -> 29.3; Qwen3-0.6B o_proj 12.3 -> 4.3) and on an LM head of 64k+ outputs over 4096+
    features (Llama-3.1-8B 240 -> 232 us). cuBLAS stays ahead on gate_up (28672 outputs:
    55.1 vs 57.0 us), and fp32 keeps cuBLAS's exact reduction order."""
    if not 0 < m <= MAX_ROWS or dtype not in (torch.bfloat16, torch.float16):
        return False
    return _ALL_SHAPES or n <= 16384 or (n >= 65536 and k >= 4096)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None
           ) -> torch.Tensor:
    """F.linear, through the skinny GEMM where it beats cuBLAS (CUDA, decode rows)."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if x.is_cuda and beats_cublas(rows, weight.shape[0], weight.shape[1], x.dtype):
        return skinny_gemm(x, weight, bias)
    return torch.nn.functional.linear(x, weight, bias)


def skinny_gemm(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                config: Optional[dict] = None) -> torch.Tensor:
    """x [..., K] with at most 16 rows in all; weight [N, K] (row-major, as nn.Linear).

    Folding the MLP's act(gate) * up into the x loads was tried and measured on the H200:
    down_proj took 176 us instead of 32 (the elementwise work in the loop defeats the load
    pipelining), so the activation keeps its own kernel. Loading the first weight tile before
    the PDL wait (weights are never written) was slower too: 4.19 ms per Llama-8B decode
    graph at batch 1 and 4.60 at batch 8, against 4.15 and 4.39. So was prefetching o_proj's
    weight into L2 during attention (`prefetch.global.L2`, three placements, +0.06 to +0.15
    ms a step; docs/benchmarks.md)."""
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"input has {x.shape[-1]} features, the weight {k}")
    x2d = x.reshape(-1, x.shape[-1])
    m = x2d.shape[0]
    if m > MAX_ROWS:
        raise ValueError(f"skinny_gemm takes at most {MAX_ROWS} rows, got {m}")
    if x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    assert weight.stride(-1) == 1
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return y.view(*x.shape[:-1], n)
    cfg = dict(choose_config(n, k), **(config or {}))
    _skinny_gemm_kernel[(triton.cdiv(n, cfg["block_n"]),)](
        x2d, weight, bias if bias is not None else weight, y, m, n, k,
        x2d.stride(0), weight.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, EVEN_K=k % cfg["block_k"] == 0,
        BLOCK_N=cfg["block_n"], BLOCK_K=cfg["block_k"],
        DOT_PREC="ieee" if x.dtype == torch.float32 else None,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **launch_args(x.device),
    )
    return y.view(*x.shape[:-1], n)
