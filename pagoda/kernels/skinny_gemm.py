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

from pagoda.kernels.activation import _ACTS, _act
from pagoda.kernels.pdl import launch_args, wait_then_release

MAX_ROWS = 16
# PAGODA_SKINNY_ALL=1 routes every half-precision decode projection here, gate_up included:
# the sweep timed kernels alone, but in a CUDA graph with programmatic dependent launch a
# cuBLAS kernel also breaks the launch overlap on both sides. Measured on Llama-3.1-8B P1
# (H200, 2026-11-29): 4.44 against 4.40 ms a step, so it stays off; kept for A/B runs.
_ALL_SHAPES = os.environ.get("PAGODA_SKINNY_ALL") == "1"


@triton.jit
def _x_tile(x_base, g_ptr, kk, x_mask, k_mask, sq, NORM: tl.constexpr, EVEN_K: tl.constexpr):
    """One [16, BLOCK_K] tile of x. With NORM, x is the un-normalised residual stream: the
    tile is scaled by the RMSNorm weight here and its squares summed into sq; the per-row
    1/rms, known only after the last tile, scales the accumulators in the epilogue."""
    x = tl.load(x_base + kk[None, :], mask=x_mask, other=0.0)
    if NORM:
        xf = x.to(tl.float32)
        sq += tl.sum(xf * xf, 1)
        if EVEN_K:
            g = tl.load(g_ptr + kk)
        else:
            g = tl.load(g_ptr + kk, mask=k_mask, other=0.0)
        x = (xf * g.to(tl.float32)[None, :]).to(x_base.dtype.element_ty)
    return x, sq


@triton.jit
def _epilogue(acc, up, sq, b_ptr, r_ptr, rows, cols, col_mask, out_mask, N, K, stride_rm, eps,
              out_dtype, HAS_BIAS: tl.constexpr, NORM: tl.constexpr, GATED: tl.constexpr,
              ACT: tl.constexpr, RESIDUAL: tl.constexpr):
    """1/rms, bias, act(gate) * up, residual: each rounded to the output dtype where the
    unfused layers round (HF: act(gate) rounded, then the product; residual + output)."""
    if NORM:
        inv_rms = tl.math.rsqrt(sq / K + eps)
        acc = acc * inv_rms[:, None]
        if GATED:
            up = up * inv_rms[:, None]
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        if GATED:
            up += tl.load(b_ptr + N + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if GATED:
        gate = acc.to(out_dtype).to(tl.float32)
        act = _act(gate, ACT).to(out_dtype).to(tl.float32)
        acc = act * up.to(out_dtype).to(tl.float32)
    if RESIDUAL:
        res = tl.load(r_ptr + rows[:, None] * stride_rm + cols[None, :], mask=out_mask, other=0.0)
        acc = acc.to(out_dtype).to(tl.float32) + res.to(tl.float32)
    return acc


@triton.jit
def _skinny_gemm_kernel(
    x_ptr, w_ptr, b_ptr, g_ptr, r_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_rm,
    stride_ym, eps, HAS_BIAS: tl.constexpr, NORM: tl.constexpr, GATED: tl.constexpr,
    ACT: tl.constexpr, RESIDUAL: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_N: tl.constexpr,
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
    up_base = w_base
    if GATED:  # the up rows follow the gate rows
        up_base = w_base + N * stride_wn
    acc = tl.zeros([16, BLOCK_N], tl.float32)
    up = tl.zeros([16, BLOCK_N], tl.float32)
    sq = tl.zeros([16], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + ks
        k_mask = kk < K
        if EVEN_K:
            x_mask = row_mask[:, None]
            w_mask = col_mask[:, None]
        else:
            x_mask = row_mask[:, None] & k_mask[None, :]
            w_mask = col_mask[:, None] & k_mask[None, :]
        x, sq = _x_tile(x_base, g_ptr, kk, x_mask, k_mask, sq, NORM, EVEN_K)
        w = tl.load(w_base + kk[None, :], mask=w_mask, other=0.0)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PREC)
        if GATED:
            wu = tl.load(up_base + kk[None, :], mask=w_mask, other=0.0)
            up = tl.dot(x, tl.trans(wu), up, input_precision=DOT_PREC)
    out_mask = row_mask[:, None] & col_mask[None, :]
    acc = _epilogue(acc, up, sq, b_ptr, r_ptr, rows, cols, col_mask, out_mask, N, K, stride_rm,
                    eps, y_ptr.dtype.element_ty, HAS_BIAS, NORM, GATED, ACT, RESIDUAL)
    tl.store(y_ptr + rows[:, None] * stride_ym + cols[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=out_mask)


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
                config: Optional[dict] = None, *, norm_weight: Optional[torch.Tensor] = None,
                eps: float = 1e-6, act: Optional[str] = None,
                residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x [..., K] with at most 16 rows in all; weight [N, K] (row-major, as nn.Linear).

    The fusions a decoder layer needs at decode, each saving a kernel launch:
    - norm_weight: x is the residual stream and the layer's RMSNorm (weight, eps) is applied
      on the way in: the tile is scaled by the weight as it is loaded, and 1/rms, summed over
      the same tiles, scales the result (the norm is linear per row).
    - act ("silu", "gelu", "gelu_tanh"): weight is [2N, K], the gate rows then the up rows;
      each program holds both halves of its columns and returns act(gate) * up, [..., N].
    - residual [..., N]: returns residual + x @ weight.T, written into residual itself (each
      program reads and writes only its own columns, so in place is safe).

    Folding act(gate) * up into down_proj's x loads instead was tried and measured on the
    H200: down_proj took 176 us instead of 32 (the activation's work on a 14336-wide input in
    the loop defeats the load pipelining); on the output side it is a few registers. Loading the first weight tile before
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
    if act is not None and (act not in _ACTS or n % 2):
        raise ValueError(f"gated act {act!r} needs a known activation and an even row count")
    n_out = n // 2 if act is not None else n
    y = _output(residual, x, m, n_out)
    if m == 0:
        return y.view(*x.shape[:-1], n_out)
    cfg = dict(choose_config(n, k), **(config or {}))
    block_n = max(16, cfg["block_n"] // 2) if act is not None and not config else cfg["block_n"]
    _skinny_gemm_kernel[(triton.cdiv(n_out, block_n),)](
        x2d, weight, _or(bias, weight), _or(norm_weight, weight), y, y, m, n_out, k,
        x2d.stride(0), weight.stride(0), y.stride(0), y.stride(0), eps,
        HAS_BIAS=bias is not None, NORM=norm_weight is not None, GATED=act is not None,
        ACT=_ACTS[act or "silu"], RESIDUAL=residual is not None,
        EVEN_K=k % cfg["block_k"] == 0, BLOCK_N=block_n, BLOCK_K=cfg["block_k"],
        DOT_PREC="ieee" if x.dtype == torch.float32 else None,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **launch_args(x.device),
    )
    return y.view(*x.shape[:-1], n_out)


def _output(residual: Optional[torch.Tensor], x: torch.Tensor, m: int, n: int) -> torch.Tensor:
    """The [m, n] output: a new tensor, or the residual (added to, then overwritten)."""
    if residual is None:
        return torch.empty(m, n, dtype=x.dtype, device=x.device)
    if residual.shape[-1] != n or residual.numel() != m * n or residual.dtype != x.dtype:
        raise ValueError(f"residual of shape {tuple(residual.shape)} and {residual.dtype} "
                         f"does not fit an output of {m} x {n} {x.dtype}")
    if not residual.is_contiguous():
        raise ValueError("the residual is updated in place and must be contiguous")
    return residual.view(m, n)


def _or(tensor: Optional[torch.Tensor], placeholder: torch.Tensor) -> torch.Tensor:
    """A pointer argument the kernel does not read when its flag is off."""
    return tensor if tensor is not None else placeholder
