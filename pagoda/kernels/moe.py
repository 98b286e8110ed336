"""Fused mixture-of-experts: two grouped GEMMs over tokens sorted by expert (vLLM's design).

Each token picks top_k experts, so there are P = num_tokens * top_k (token, expert) pairs; pair
p = t * top_k + j is token t's j-th choice. The steps:

1. `moe_align`: sort the pairs by expert and pad each expert's group to a multiple of BLOCK_M,
   giving `sorted_ids` (pair indices, the pad value P marks an empty row), `expert_ids` (the
   expert of each BLOCK_M block) and `num_padded` (a 1-element device tensor: the used length).
   One Triton program for small batches (decode: one launch), torch ops (no sort) for large
   ones; no host sync either way: buffers are sized from the host-side upper bound
   P + min(E, P) * (BLOCK_M - 1), so every shape is known before any device value is read.
2. `_grouped_gemm_kernel`: a program owns BLOCK_M sorted rows (all of one expert) times BLOCK_N
   output columns and multiplies their activations by that expert's weight; the result lands in
   row p (the pair index), so no un-permute is needed. Blocks past `num_padded` exit at once.
   x [T, H] @ w13[e]^T -> [P, 2I] (the activation row of pair p is p // top_k).
3. The gated activation (the Triton silu_and_mul / gelu_and_mul) -> [P, I].
4. The same kernel with w2: [P, I] @ w2[e]^T -> [P, H], times the pair's routing weight.
5. A sum over each token's top_k rows.

The grid is computed from host-side shapes only, so a captured CUDA graph replays it for any
routing of the same batch size.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import nn


@triton.jit(do_not_specialize=["num_pairs", "num_rows_bound"])  # per-step counts
def _grouped_gemm_kernel(
    a_ptr, b_ptr, c_ptr, topk_weights_ptr,
    sorted_ids_ptr, expert_ids_ptr, num_padded_ptr,
    N, K, num_pairs, num_rows_bound,
    stride_am, stride_ak, stride_be, stride_bn, stride_bk, stride_cm, stride_cn,
    A_ROW_DIV: tl.constexpr, MUL_ROUTED_WEIGHT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """c[p, n] = sum_k a[p // A_ROW_DIV, k] * b[expert(p), n, k] (* topk_weight[p])."""
    # Grouped ordering: GROUP_M row blocks (mostly one expert) sweep the columns together, so
    # an expert's weight tile is reused from L2.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(num_rows_bound, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    in_group = GROUP_M * num_pid_n
    first_m = (pid // in_group) * GROUP_M
    group_size = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % group_size
    pid_n = (pid % in_group) // group_size
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(sorted_ids_ptr + rows)
    row_mask = pairs < num_pairs
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Columns past N wrap around (loads stay in bounds without a mask); the store drops them.
    b_cols = offs_n % N
    a_rows = (pairs // A_ROW_DIV).to(tl.int64)
    a_ptrs = a_ptr + a_rows[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = (b_ptr + expert * stride_be + b_cols[None, :].to(tl.int64) * stride_bn
              + offs_k[:, None] * stride_bk)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = offs_k < K - k0
        a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_mask[:, None], other=0.0)
        acc += tl.dot(a, b.to(a.dtype), input_precision=DOT_PREC)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    if MUL_ROUTED_WEIGHT:
        w = tl.load(topk_weights_ptr + pairs, mask=row_mask, other=0.0)
        acc = acc * w.to(tl.float32)[:, None]
    c_ptrs = c_ptr + pairs.to(tl.int64)[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty),
             mask=row_mask[:, None] & (offs_n[None, :] < N))


@triton.jit(do_not_specialize=["num_pairs", "num_rows", "num_blocks"])
def _align_kernel(ids_ptr, sorted_ids_ptr, expert_ids_ptr, num_padded_ptr,
                  num_pairs, num_experts, num_rows, num_blocks,
                  BLOCK_M: tl.constexpr, E_P2: tl.constexpr, CHUNK: tl.constexpr):
    """`moe_align` in one program (small batches: one launch instead of ~25 torch ops)."""
    experts = tl.arange(0, E_P2)
    lanes = tl.arange(0, CHUNK)
    counts = tl.zeros((E_P2,), dtype=tl.int32)
    for c0 in range(0, num_pairs, CHUNK):
        ids = tl.load(ids_ptr + c0 + lanes, mask=c0 + lanes < num_pairs, other=-1)
        counts += tl.sum((ids.to(tl.int32)[:, None] == experts[None, :]).to(tl.int32), 0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, 0)
    tl.store(num_padded_ptr, tl.sum(padded, 0))
    for b0 in range(0, num_blocks, CHUNK):  # a block's expert: how many groups end before it
        first_row = (b0 + lanes) * BLOCK_M
        expert = tl.sum((ends[None, :] <= first_row[:, None]).to(tl.int32), 1)
        tl.store(expert_ids_ptr + b0 + lanes, tl.minimum(expert, num_experts - 1),
                 mask=b0 + lanes < num_blocks)
    for r0 in range(0, num_rows, CHUNK):
        tl.store(sorted_ids_ptr + r0 + lanes, tl.zeros((CHUNK,), dtype=tl.int32) + num_pairs,
                 mask=r0 + lanes < num_rows)
    tl.debug_barrier()  # the pad fill above lands before the scatter below
    next_row = ends - padded
    for c0 in range(0, num_pairs, CHUNK):
        pairs = c0 + lanes
        ids = tl.load(ids_ptr + pairs, mask=pairs < num_pairs, other=-1)
        onehot = (ids.to(tl.int32)[:, None] == experts[None, :]).to(tl.int32)
        dest = tl.sum(onehot * (tl.cumsum(onehot, 0) - 1 + next_row[None, :]), 1)
        tl.store(sorted_ids_ptr + dest, pairs, mask=pairs < num_pairs)
        next_row += tl.sum(onehot, 0)


# Above this many (token, expert) pairs the torch ops (parallel over the batch) beat one
# program's serial chunks.
_ALIGN_KERNEL_MAX_PAIRS = 1024


def moe_align(topk_ids: torch.Tensor, num_experts: int, block_m: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sorted_ids int32 [R], expert_ids int32 [R // block_m], num_padded int32 [1]).

    Within an expert's group the pairs keep their order (token, then slot). R = round_up(P +
    min(E, P) * (block_m - 1), block_m) bounds the padded length on the host (each routed-to
    expert adds fewer than block_m pad rows); rows past num_padded hold the pad value P and
    blocks past it an unused, in-range expert id. No sort and no host sync."""
    num_pairs = topk_ids.numel()
    num_blocks = triton.cdiv(num_pairs + min(num_experts, num_pairs) * (block_m - 1), block_m)
    if num_pairs > _ALIGN_KERNEL_MAX_PAIRS:
        return _torch_align(topk_ids, num_experts, block_m, num_blocks)
    dev = topk_ids.device
    sorted_ids = torch.empty(num_blocks * block_m, dtype=torch.int32, device=dev)
    expert_ids = torch.empty(num_blocks, dtype=torch.int32, device=dev)
    num_padded = torch.empty(1, dtype=torch.int32, device=dev)
    e_p2 = triton.next_power_of_2(num_experts)
    _align_kernel[(1,)](topk_ids.contiguous(), sorted_ids, expert_ids, num_padded,
                        num_pairs, num_experts, sorted_ids.numel(), num_blocks,
                        BLOCK_M=block_m, E_P2=e_p2, CHUNK=max(16, min(64, 8192 // e_p2)),
                        num_warps=4)
    return sorted_ids, expert_ids, num_padded


def _torch_align(topk_ids: torch.Tensor, num_experts: int, block_m: int, num_blocks: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`moe_align` for large batches: a pair's rank in its expert's group is a running count
    over tokens ([T, E] int32) plus its earlier duplicates within the token (none from a
    top-k, but they are counted right)."""
    dev = topk_ids.device
    ids = topk_ids.to(torch.int64)
    num_tokens, top_k = ids.shape
    num_pairs = num_tokens * top_k
    per_token = torch.zeros(num_tokens, num_experts, dtype=torch.int32, device=dev)
    per_token.scatter_add_(1, ids, torch.ones_like(ids, dtype=torch.int32))
    running = torch.cumsum(per_token, 0, dtype=torch.int32)
    counts = running[-1].to(torch.int64)
    earlier_slots = torch.ones(top_k, top_k, dtype=torch.bool, device=dev).tril_(-1)
    dups = ((ids[:, :, None] == ids[:, None, :]) & earlier_slots).sum(-1)
    rank = (running - per_token).gather(1, ids) + dups  # [T, k]: earlier pairs of the expert

    padded = (counts + block_m - 1) // block_m * block_m
    ends = torch.cumsum(padded, 0)
    dest = (ends - padded)[ids] + rank
    sorted_ids = torch.full((num_blocks * block_m,), num_pairs, dtype=torch.int32, device=dev)
    sorted_ids.scatter_(0, dest.reshape(-1),
                        torch.arange(num_pairs, dtype=torch.int32, device=dev))

    block_starts = torch.arange(0, num_blocks * block_m, block_m, device=dev)
    expert_ids = torch.searchsorted(ends, block_starts, right=True)
    expert_ids = expert_ids.clamp_(max=num_experts - 1).to(torch.int32)
    return sorted_ids, expert_ids, ends[-1:].to(torch.int32)


# Average routed rows per expert up to which each tile config serves (the last: above).
_ROWS_PER_EXPERT_LIMITS = (16, 64)


def _config(num_pairs: int, num_experts: int) -> dict:
    """Tile shapes from the average rows per expert (host-side shapes only). Untuned defaults
    in the range of vLLM's tuned configs for bf16 on Hopper."""
    per_expert = num_pairs / num_experts
    if per_expert <= _ROWS_PER_EXPERT_LIMITS[0]:  # decode: few rows an expert -> thin tiles
        return dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=3)
    if per_expert <= _ROWS_PER_EXPERT_LIMITS[1]:
        return dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=3)
    return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=3)


def warm_up_token_counts(num_experts: int, top_k: int, max_tokens: int) -> list[int]:
    """The fewest tokens that select each tile config, up to max_tokens: a call at each
    compiles every variant a step of at most max_tokens can launch (the configs and the align
    kernel depend only on these shapes; the fewest tokens also reach the align kernel where
    the config's range allows, at most _ALIGN_KERNEL_MAX_PAIRS pairs)."""
    counts = [1]
    for limit in _ROWS_PER_EXPERT_LIMITS:
        tokens = limit * num_experts // top_k + 1
        if tokens <= max_tokens:
            counts.append(tokens)
    return counts


def _grouped_gemm(a: torch.Tensor, w: torch.Tensor, out: torch.Tensor,
                  topk_weights: torch.Tensor, align: tuple, a_row_div: int,
                  mul_routed_weight: bool, config: dict) -> None:
    """out[p] = a[p // a_row_div] @ w[expert(p)]^T (* topk_weights[p]) for every routed p."""
    sorted_ids, expert_ids, num_padded = align
    num_experts, n, k = w.shape
    block_m, block_n = config["BLOCK_M"], config["BLOCK_N"]
    grid = (triton.cdiv(sorted_ids.numel(), block_m) * triton.cdiv(n, block_n),)
    _grouped_gemm_kernel[grid](
        a, w, out, topk_weights, sorted_ids, expert_ids, num_padded,
        n, k, out.shape[0], sorted_ids.numel(),
        a.stride(0), a.stride(1), w.stride(0), w.stride(1), w.stride(2),
        out.stride(0), out.stride(1),
        A_ROW_DIV=a_row_div, MUL_ROUTED_WEIGHT=mul_routed_weight,
        DOT_PREC="ieee" if a.dtype == torch.float32 else None, **config)


def _gated_act(act_fn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The Triton gated activation matching act_fn; any other module runs as itself."""
    from pagoda.kernels.activation import gelu_and_mul, silu_and_mul
    from pagoda.layers.activation import GeluAndMul, SiluAndMul
    if isinstance(act_fn, SiluAndMul):
        return silu_and_mul(x)
    if isinstance(act_fn, GeluAndMul):
        return gelu_and_mul(x, act_fn.approximate)
    return act_fn(x)


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, act_fn: nn.Module) -> torch.Tensor:
    """x [T, H]; w13 [E, 2I, H] (gate rows, then up); w2 [E, H, I]; topk_weights / topk_ids
    [T, top_k]; act_fn a gated activation module ([.., 2I] -> [.., I]). Returns [T, H] in
    x's dtype: sum over j of topk_weights[t, j] * expert_{ids[t, j]}(x[t])."""
    num_tokens, hidden = x.shape
    num_experts, two_inter, _ = w13.shape
    top_k = topk_ids.shape[1]
    if num_tokens == 0 or top_k == 0:
        return torch.zeros_like(x)
    assert w13.shape[2] == hidden and w2.shape == (num_experts, hidden, two_inter // 2)
    num_pairs = num_tokens * top_k
    config = _config(num_pairs, num_experts)
    align = moe_align(topk_ids, num_experts, config["BLOCK_M"])
    weights = topk_weights.reshape(-1).to(torch.float32).contiguous()

    gate_up = torch.empty(num_pairs, two_inter, dtype=x.dtype, device=x.device)
    _grouped_gemm(x, w13, gate_up, weights, align, top_k, False, config)
    hidden_act = _gated_act(act_fn, gate_up)
    down = torch.empty(num_pairs, hidden, dtype=x.dtype, device=x.device)
    _grouped_gemm(hidden_act, w2, down, weights, align, 1, True, config)
    return down.view(num_tokens, top_k, hidden).sum(dim=1)
