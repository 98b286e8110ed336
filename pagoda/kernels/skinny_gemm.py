"""y = x @ w.T (+ bias) for few rows of x (decode: M <= 16), streaming w once at full bandwidth.

At M = 1..16 a linear layer is a pass over its weight. cuBLAS picks split-K tiles for the
narrow Llama projections (q/k/v, o_proj) and reaches ~3.1 TB/s on an H200 plus a separate
reduce launch; here each program owns BLOCK_N output columns for all M rows and walks the
whole K dimension with pipelined loads, so there is no reduce and every weight byte is read
exactly once. tl.dot needs 16 rows, so x is padded to 16 rows by masking (free: the tensor
cores are idle in a bandwidth-bound pass). Configs come from a sweep on an H200
(benchmarks/kernels_bench.py, `skinny`). The same kernel takes the decoder layer's small
neighbours into its prologue and epilogue (layers/fused_decode.py): see `skinny_gemm`'s
`square_sums` and `act`, and `add_linear`."""

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
def _inv_rms(s_ptr, rows, row_mask, num_parts, K, eps, PARTS_P2: tl.constexpr):
    """1/rms of each row of the un-normalised x, from the sums of squares that the GEMM
    which wrote x left, one per program of that GEMM ([rows, num_parts])."""
    p = tl.arange(0, PARTS_P2)
    parts = tl.load(s_ptr + rows[:, None] * num_parts + p[None, :],
                    mask=row_mask[:, None] & (p < num_parts)[None, :], other=0.0)
    return tl.math.rsqrt(tl.sum(parts, 1) / K + eps)


@triton.jit
def _epilogue(acc, up, inv_rms, b_ptr, r_ptr, rows, cols, col_mask, out_mask, N, stride_rm,
              out_dtype, HAS_BIAS: tl.constexpr, NORM: tl.constexpr, GATED: tl.constexpr,
              ACT: tl.constexpr, RESIDUAL: tl.constexpr):
    """1/rms, bias, act(gate) * up, residual: each rounded to the output dtype where the
    unfused layers round (HF: act(gate) rounded, then the product; residual + output)."""
    if NORM:
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
    return acc.to(out_dtype)


@triton.jit(do_not_specialize=["M"])  # decode rows: one compiled variant for 1..16
def _skinny_gemm_kernel(
    x_ptr, w_ptr, b_ptr, r_ptr, y_ptr, s_in_ptr, s_out_ptr, M, N, K, stride_xm,
    stride_wn, stride_rm, stride_ym, num_parts, eps, HAS_BIAS: tl.constexpr, NORM: tl.constexpr,
    PARTS_P2: tl.constexpr, GATED: tl.constexpr, ACT: tl.constexpr, RESIDUAL: tl.constexpr,
    SUM_SQUARES: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, DOT_PREC: tl.constexpr, USE_PDL: tl.constexpr,
):
    wait_then_release(USE_PDL)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.arange(0, 16)
    ks = tl.arange(0, BLOCK_K)
    col_mask = cols < N
    row_mask = rows < M
    inv_rms = tl.zeros([16], tl.float32)
    if NORM:  # loaded before the loop, which then only streams x and w into the dots
        inv_rms = _inv_rms(s_in_ptr, rows, row_mask, num_parts, K, eps, PARTS_P2)
    x_base = x_ptr + rows[:, None] * stride_xm
    w_base = w_ptr + cols.to(tl.int64)[:, None] * stride_wn
    up_base = w_base
    if GATED:  # the up rows follow the gate rows
        up_base = w_base + N * stride_wn
    acc = tl.zeros([16, BLOCK_N], tl.float32)
    up = tl.zeros([16, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + ks
        if EVEN_K:
            x_mask = row_mask[:, None]
            w_mask = col_mask[:, None]
        else:
            x_mask = row_mask[:, None] & (kk < K)[None, :]
            w_mask = col_mask[:, None] & (kk < K)[None, :]
        x = tl.load(x_base + kk[None, :], mask=x_mask, other=0.0)
        w = tl.load(w_base + kk[None, :], mask=w_mask, other=0.0)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PREC)
        if GATED:
            wu = tl.load(up_base + kk[None, :], mask=w_mask, other=0.0)
            up = tl.dot(x, tl.trans(wu), up, input_precision=DOT_PREC)
    out_mask = row_mask[:, None] & col_mask[None, :]
    y = _epilogue(acc, up, inv_rms, b_ptr, r_ptr, rows, cols, col_mask, out_mask, N, stride_rm,
                  y_ptr.dtype.element_ty, HAS_BIAS, NORM, GATED, ACT, RESIDUAL)
    tl.store(y_ptr + rows[:, None] * stride_ym + cols[None, :], y, mask=out_mask)
    if SUM_SQUARES:  # this program's share of the next norm: its columns, as stored
        yf = tl.where(out_mask, y.to(tl.float32), 0.0)
        tl.store(s_out_ptr + rows * tl.num_programs(0) + tl.program_id(0), tl.sum(yf * yf, 1),
                 mask=row_mask)


def choose_config(n: int, k: int) -> dict:
    """Tiles by weight shape, from the H200 sweep (bf16, M = 1 and 8, weights streamed from
    HBM): narrow outputs take narrow tiles so every SM gets a program; wider outputs take
    64-column tiles with shorter K steps (the best configs for 6144 and 28672 columns, and
    128-wide K steps for the 128k-column LM head). PAGODA_SKINNY_TILES overrides shapes for
    A/B runs inside the decode graph, where the sweep's standalone timings may not hold
    (PDL overlap, co-resident CTAs): "NxK:block_n/block_k/num_stages+..." with N and K the
    weight's rows and columns (a gated GEMM's block_n still covers gate and up rows); no
    commas or semicolons, so a value fits gpu_suite's AB list."""
    if (n, k) in _TILE_OVERRIDES:
        return dict(_TILE_OVERRIDES[(n, k)])
    block_n = 16 if n <= 2048 else 32 if n <= 4096 else 64
    block_k = 512 if block_n < 64 else 128 if n >= 65536 else 256
    return dict(block_n=block_n, block_k=block_k, num_warps=4, num_stages=4)


def _parse_tiles(spec: str) -> dict:
    """PAGODA_SKINNY_TILES -> {(n, k): config}; a malformed entry is an error, not ignored."""
    tiles = {}
    for entry in filter(None, (part.strip() for part in spec.split("+"))):
        try:
            shape, values = entry.split(":")
            n, k = (int(x) for x in shape.lower().split("x"))
            block_n, block_k, stages = (int(x) for x in values.split("/"))
        except ValueError:
            raise ValueError(f"PAGODA_SKINNY_TILES entry {entry!r}: want "
                             "NxK:block_n/block_k/num_stages") from None
        tiles[(n, k)] = dict(block_n=block_n, block_k=block_k, num_warps=4,
                             num_stages=stages)
    return tiles


_TILE_OVERRIDES = _parse_tiles(os.environ.get("PAGODA_SKINNY_TILES", ""))


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
                config: Optional[dict] = None, *, square_sums: Optional[torch.Tensor] = None,
                eps: float = 1e-6, act: Optional[str] = None) -> torch.Tensor:
    """x [..., K] with at most 16 rows in all; weight [N, K] (row-major, as nn.Linear).

    Two fusions for a decoder layer at decode (layers/fused_decode.py), each saving a kernel:
    - square_sums [rows, P] (from `add_linear`): x is the un-normalised residual stream and
      the weight has its RMSNorm's weight folded in; each output row is scaled by x's 1/rms,
      computed from these sums (the norm is a per-row scale, so it commutes with the GEMM).
    - act ("silu", "gelu", "gelu_tanh"): weight is [2N, K], the gate rows then the up rows;
      each program holds both halves of its columns and returns act(gate) * up, [..., N].

    Measured on the H200 (benchmarks/kernels_bench.py --fused): Llama-3.1-8B's gate_up with
    the norm and act fused takes 58.8 us at batch 1 against 63.3 for cuBLAS plus the act
    kernel. Any elementwise work on the x tiles inside the loop breaks the load pipelining:
    computing the norm's sums of squares there doubled q/k/v (16 -> 30 us) and gate_up
    (59 -> 110 us), and a separate pass over x before the loop still cost 5 and 15 us; so did
    folding act(gate) * up into down_proj's x loads (32 -> 176 us). Starting the weight stream
    early lost every time (decode graph at batch 1, docs/benchmarks.md): the first tile loaded
    before the PDL wait (4.19 against 4.15 ms), o_proj's weight prefetched into L2 during
    attention, each program's first 1-6 tiles prefetched into L2 before the wait (4.12-5.17
    against 4.05), and weight tiles through TMA (4.18 against 4.05). Nor did spreading the
    columns in ragged ranges over whole waves of SMs (q/k/v on 132 programs instead of 96
    tiles): 4.19 against 4.17 ms a P1 step. Nor did removing the gate_up -> down_proj boundary
    with a one-kernel MLP (a program per SM, partials reduced after a grid barrier): 88.8 us
    a Llama-8B MLP at batch 1 either way, 102 against 89 at batch 8 (removed in 7ebc780).
    Nor did moving the PDL wait into the K loop's first iteration, as the decode attention
    does, so that the pipeliner's first weight tiles load early (x read again after the
    wait): 15.2 and 7.0 ms a P1 step (all GEMMs; all but o_proj and down) against 4.16, at
    240-255 registers with spills (removed in 70f85aa)."""
    m, n_out = _check(x, weight, act)
    if square_sums is not None and (square_sums.shape[0] != m or square_sums.dim() != 2
                                    or not square_sums.is_contiguous()):
        raise ValueError(f"square_sums must be a contiguous [{m}, P] tensor (add_linear's)")
    y = torch.empty(m, n_out, dtype=x.dtype, device=x.device)
    if m:
        _launch(x, weight, bias, config, y, act=act, square_sums=square_sums, eps=eps)
    return y.view(*x.shape[:-1], n_out)


def add_linear(residual: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
               bias: Optional[torch.Tensor] = None, config: Optional[dict] = None
               ) -> torch.Tensor:
    """residual += x @ weight.T (+ bias), in place (each program reads and writes only its
    own columns). Returns the sums of squares of the new residual rows, one per program
    [rows, P], which the next norm needs: `skinny_gemm(residual, ..., square_sums=...)`."""
    m, n = _check(x, weight, None)
    if residual.shape[-1] != n or residual.numel() != m * n or residual.dtype != x.dtype:
        raise ValueError(f"residual of shape {tuple(residual.shape)} and {residual.dtype} "
                         f"does not fit an output of {m} x {n} {x.dtype}")
    if not residual.is_contiguous():
        raise ValueError("the residual is updated in place and must be contiguous")
    block_n = _tiles(weight, x.dtype, config, gated=False)["block_n"]
    sums = torch.empty(m, triton.cdiv(n, block_n), dtype=torch.float32, device=x.device)
    if m:
        _launch(x, weight, bias, config, residual.view(m, n), residual=True, sums_out=sums)
    return sums


def _check(x: torch.Tensor, weight: torch.Tensor, act: Optional[str]) -> tuple[int, int]:
    """(rows of x, output columns)."""
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"input has {x.shape[-1]} features, the weight {k}")
    m = x.numel() // k if k else 0
    if m > MAX_ROWS:
        raise ValueError(f"skinny_gemm takes at most {MAX_ROWS} rows, got {m}")
    if act is not None and (act not in _ACTS or n % 2):
        raise ValueError(f"gated act {act!r} needs a known activation and an even row count")
    return m, n // 2 if act is not None else n


def _launch(x, weight, bias, config, y, *, act=None, square_sums=None, eps=1e-6,
            residual=False, sums_out=None) -> None:
    n, k = weight.shape
    x2d = x.reshape(-1, k)
    if x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    assert weight.stride(-1) == 1
    cfg = _tiles(weight, x.dtype, config, gated=act is not None)
    block_n = cfg["block_n"]
    n_out = y.shape[1]
    num_parts = square_sums.shape[1] if square_sums is not None else 1
    _skinny_gemm_kernel[(triton.cdiv(n_out, block_n),)](
        x2d, weight, _or(bias, weight), y, y, _or(square_sums, y), _or(sums_out, y),
        x2d.shape[0], n_out, k, x2d.stride(0), weight.stride(0), y.stride(0), y.stride(0),
        num_parts, eps, HAS_BIAS=bias is not None, NORM=square_sums is not None,
        PARTS_P2=triton.next_power_of_2(num_parts), GATED=act is not None,
        ACT=_ACTS[act or "silu"], RESIDUAL=residual, SUM_SQUARES=sums_out is not None,
        EVEN_K=k % cfg["block_k"] == 0, BLOCK_N=block_n, BLOCK_K=cfg["block_k"],
        DOT_PREC="ieee" if x.dtype == torch.float32 else None,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **launch_args(x.device),
    )


def _tiles(weight: torch.Tensor, dtype: torch.dtype, config: Optional[dict], gated: bool
           ) -> dict:
    """The launch's tiles: the caller's config as given, else the shape's, with block_k
    halved in fp32 (the same tile bytes, so shared memory, as bf16) and block_n halved for a
    gated GEMM (each program reads block_n rows of gate and of up). add_linear sizes its sums
    of squares, one per program, from the same block_n."""
    cfg = dict(choose_config(*weight.shape), **(config or {}))
    if not config:
        if dtype == torch.float32:
            cfg["block_k"] //= 2
        if gated:
            cfg["block_n"] = max(16, cfg["block_n"] // 2)
    return cfg


def _or(tensor: Optional[torch.Tensor], placeholder: torch.Tensor) -> torch.Tensor:
    """A pointer argument the kernel does not read when its flag is off."""
    return tensor if tensor is not None else placeholder
