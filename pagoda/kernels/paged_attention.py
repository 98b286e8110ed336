"""One Triton attention kernel for prefill, chunked prefill (with cached context) and decode.

The KV cache has already been written for this step, so every key of a sequence, old or new,
is read from the paged cache through the block table. (Except with `decode_rope`, at decode:
the program whose split holds the new key rotates it and writes it with its value first.)

With `decode_rope` and up to 16 sequences (PRELOAD), the old keys stream in while the q/k/v
GEMM before this kernel still runs: under PDL the kernel is resident early, and its PDL wait
sits inside the key loop's first iteration, so the first K/V tiles that Triton's pipeliner
issues before the loop load before the wait. Only the old keys can load early: the loads skip
the new key's slot, whose score (q . k) and value join each tile from registers. q and the
new key are read after the wait; they sit inside a branch, and the pipeliner hoists only a
loop's top-level loads. On the H200 (Llama-3.1-8B P1, same-call A/B) a step went from 4.22
to 4.17 ms, graph 4.01 -> 3.97 ms at batch 1 and 4.05 -> 4.00 at batch 8. A first form,
with the first tile peeled and held in registers before the wait, lost (4.27 ms: 255
registers and layout conversions). The cos/sin rows and the slot load before the wait too;
after it, q, the new key and value, and both rotation partners are read at once
(kv_cache._q_and_new_kv): read one after another, each waited behind the layout conversion
of the one before, five round trips in the sm90 code (4.13 -> 4.10 ms a P1 step).

A program owns BLOCK_Q consecutive queries of one sequence times the query heads that share
one KV head (GQA packs those heads into the rows of one tile, so each K/V tile is loaded once
for the whole group) and loops over the keys in tiles of TILE_N with an online softmax.

Programs are laid out as `q_block = query_start // BLOCK_Q + seq_idx` (vLLM's trick): the grid
size `num_tokens // BLOCK_Q + num_seqs` is known on the host without reading any device tensor,
so the launch is CUDA-graph safe; each program finds its sequence by a binary search over
query_start_loc and exits early when it has no queries.

Split-KV (flash decoding): with few sequences and long contexts the grid above is too small to
fill the GPU, so a third grid axis splits each sequence's key range into NUM_SPLITS pieces; each
writes an unnormalised partial output plus its running max and sum. The last split of a
sequence and KV head to finish (an atomic counter, zeroed again by that split) combines them,
so no reduce kernel follows (on the H200 this saved 0.07 ms a Llama-8B step at batch 8
against a separate reduce kernel, and was even at batch 1). A decode program reads all the
partials it combines at once (_combine_decode_splits: P1 4.15 -> 4.10 ms a step against
reading them split by split). A decode graph fixes NUM_SPLITS for max_model_len, so a short
context leaves later splits without a key tile: they exit at once, only the splits with
tiles count and are combined, and a context of one tile is written by its split directly
(P1, 128-384 keys: 4.19 -> 4.17 ms a step).
(Letting split 0 do a short sequence whole was measured on the H200 and dropped: 0.21 ms a
Llama-8B step slower at ~250 keys, docs/benchmarks.md.) At decode (one token per sequence) the
grid is one program per sequence instead, with no search.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from pagoda.kernels.kv_cache import (_load_cos_sin, _load_q, _q_and_new_kv, _store_new_kv,
                                     _write_new_kv)
from pagoda.kernels.pdl import launch_args, wait_then_release

# =0 gives decode the general grid, for A/B runs
_DECODE_GRID = os.environ.get("PAGODA_ATTN_DECODE_GRID", "1") != "0"
# =0 keeps a rotating decode step's first key tiles after the PDL wait, for A/B runs; up to
# PAGODA_ATTN_PRELOAD_MAX sequences: at 64 the early loads cost more than they hide (H200,
# Llama-3.1-8B decode graph at batch 64: 5.26 ms against 4.91)
_PRELOAD = os.environ.get("PAGODA_ATTN_PRELOAD", "1") != "0"
_PRELOAD_MAX_SEQS = int(os.environ.get("PAGODA_ATTN_PRELOAD_MAX", "16"))
_COUNTERS: dict[torch.device, torch.Tensor] = {}
_OLD_COUNTERS: list[torch.Tensor] = []  # captured CUDA graphs may still point at these


def _split_counters(device: torch.device, n: int) -> torch.Tensor:
    """Zeroed int32 counters, one per (q block, KV head), that the split programs count
    on; the last one to finish zeroes its counter again. Allocated once per device and
    never freed (CUDA graphs keep the address)."""
    counters = _COUNTERS.get(device)
    if counters is None or counters.numel() < n:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("split-KV counters must be allocated before graph capture")
        if counters is not None:
            _OLD_COUNTERS.append(counters)
        counters = torch.zeros(max(n, 1 << 16), dtype=torch.int32, device=device)
        _COUNTERS[device] = counters
    return counters


@triton.jit
def _tanh(x):
    # tl has no portable tanh across Triton versions and the interpreter; going through
    # exp(-2|x|) cannot overflow.
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _find_seq(query_start_ptr, num_seqs, q_block, BLOCK_Q: tl.constexpr):
    lo = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        start = tl.load(query_start_ptr + mid) // BLOCK_Q + mid
        if start <= q_block:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _locate_q_block(query_start_ptr, num_seqs, q_block, BLOCK_Q: tl.constexpr,
                    DECODE: tl.constexpr):
    """(sequence, its first token, its query count, this block's index within it). DECODE
    (one token per sequence): program = sequence = token, with no search and no load."""
    if DECODE:
        return q_block, q_block, 1, 0
    seq = _find_seq(query_start_ptr, num_seqs, q_block, BLOCK_Q)
    q_start = tl.load(query_start_ptr + seq)
    q_len = tl.load(query_start_ptr + seq + 1) - q_start
    return seq, q_start, q_len, q_block - (q_start // BLOCK_Q + seq)


@triton.jit
def _key_rows(block_table_ptr, seq, stride_bt, q_start, kpos, kmask, block_size,
              stride_kv_blk, stride_kv_slot, PAGED: tl.constexpr):
    """int64 element offset of each key's row (before the head offset)."""
    if PAGED:
        blk = tl.load(block_table_ptr + seq * stride_bt + kpos // block_size, mask=kmask, other=0)
        return blk.to(tl.int64) * stride_kv_blk + (kpos % block_size).to(tl.int64) * stride_kv_slot
    else:  # profiling run: keys straight from this step's k/v tensors
        return (q_start + kpos).to(tl.int64) * stride_kv_blk


@triton.jit
def _key_tiles(context, local_block, q_len, kv_len, window, split, BLOCK_Q: tl.constexpr,
               TILE_N: tl.constexpr, NUM_SPLITS: tl.constexpr, USE_WINDOW: tl.constexpr):
    """This program's key tiles [lo, hi) (its split's share), the causal end of its q
    block's keys, and how many splits have tiles (at least 1: split 0 answers even a
    sequence with no keys, a CUDA graph's padding row)."""
    first_pos = context + local_block * BLOCK_Q
    kv_end = tl.minimum(context + tl.minimum((local_block + 1) * BLOCK_Q, q_len), kv_len)
    kv_start = 0
    if USE_WINDOW:  # the sliding window's first visible key
        kv_start = tl.maximum(first_pos - window + 1, 0)
    tile_lo = kv_start // TILE_N
    tile_hi = tl.cdiv(kv_end, TILE_N)
    num_tiles = tl.maximum(tile_hi - tile_lo, 0)
    per_split = tl.maximum(tl.cdiv(num_tiles, NUM_SPLITS), 1)
    active_splits = tl.maximum(tl.cdiv(num_tiles, per_split), 1)
    tile_lo = tile_lo + split * per_split
    tile_hi = tl.minimum(tile_lo + per_split, tile_hi)
    return tile_lo, tile_hi, kv_end, active_splits


@triton.jit
def _masked_scores(s, kpos, kmask, q_pos, soft_cap, window, USE_SOFT_CAP: tl.constexpr,
                   USE_WINDOW: tl.constexpr):
    """One tile of scores [rows, keys]: soft-capped, then -inf where a key is past the end,
    after the query (causal) or outside its sliding window."""
    if USE_SOFT_CAP:
        s = soft_cap * _tanh(s / soft_cap)
    allowed = kmask[None, :] & (kpos[None, :] <= q_pos[:, None])
    if USE_WINDOW:
        allowed = allowed & ((q_pos[:, None] - kpos[None, :]) < window)
    return tl.where(allowed, s, float("-inf"))


@triton.jit
def _tile_probs(s, kpos, kmask, q_pos, m_i, l_i, soft_cap, window, slope,
                USE_SOFT_CAP: tl.constexpr, USE_WINDOW: tl.constexpr, USE_ALIBI: tl.constexpr):
    """One key tile's scaled scores [rows, keys], masked and folded into the online softmax
    (_online_softmax_step's results)."""
    s = _masked_scores(s, kpos, kmask, q_pos, soft_cap, window, USE_SOFT_CAP, USE_WINDOW)
    if USE_ALIBI:  # after the mask: a masked score stays -inf
        s += slope[:, None] * (kpos[None, :] - q_pos[:, None]).to(tl.float32)
    return _online_softmax_step(s, m_i, l_i)


@triton.jit
def _online_softmax_step(s, m_i, l_i):
    """Folds a tile of scores into the running max and sum: the tile's probabilities, the
    factor that rescales what was accumulated so far, the new max and the new sum."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # row masked so far: no NaN
    p = tl.exp(s - m_safe[:, None])
    alpha = tl.exp(m_i - m_safe)
    return p, alpha, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def _combine_splits(out_ptr, part_acc_ptr, part_ml_ptr, tok, head, row_mask, d, d_mask,
                    stride_ot, stride_oh, num_heads, head_dim, active_splits,
                    NUM_SPLITS: tl.constexpr, SPLITS_P2: tl.constexpr):
    """Writes out[tok, head] for this program's rows from the active splits' partial outputs
    (the running max and sum of each rescale its unnormalised output). Loads bypass L1:
    other programs wrote the partials, and an earlier layer's may still be cached there."""
    s = tl.arange(0, SPLITS_P2)
    first = (tok * num_heads + head) * NUM_SPLITS  # [rows]: each row's split 0
    ml = part_ml_ptr + (first[:, None] + s[None, :]) * 2
    ml_mask = row_mask[:, None] & (s < active_splits)[None, :]
    m = tl.load(ml, mask=ml_mask, other=float("-inf"), cache_modifier=".cg")
    l = tl.load(ml + 1, mask=ml_mask, other=0.0, cache_modifier=".cg")
    m_max = tl.max(m, 1)
    w = tl.exp(m - tl.where(m_max == float("-inf"), 0.0, m_max)[:, None])
    total = tl.sum(w * l, 1)
    io_mask = row_mask[:, None] & d_mask[None, :]
    acc = tl.zeros([first.shape[0], d.shape[0]], tl.float32)
    for i in tl.static_range(NUM_SPLITS):
        w_i = tl.sum(tl.where(s[None, :] == i, w, 0.0), 1)
        # a vector, not a scalar comparison: Triton's interpreter rejects a scalar in a mask
        live = tl.full(first.shape, i, tl.int32) < active_splits
        part = tl.load(part_acc_ptr + (first + i)[:, None] * head_dim + d[None, :],
                       mask=io_mask & live[:, None], other=0.0, cache_modifier=".cg")
        acc += part * w_i[:, None]
    _store_normalised(out_ptr + tok[:, None] * stride_ot + head[:, None] * stride_oh
                      + d[None, :], acc, total, io_mask)


@triton.jit
def _combine_decode_splits(out_ptr, part_acc_ptr, part_ml_ptr, tok, kv_head, d, d_mask,
                           stride_ot, stride_oh, num_heads, num_queries_per_kv, head_dim,
                           active_splits, QPKV_P2: tl.constexpr, NUM_SPLITS: tl.constexpr,
                           SPLITS_P2: tl.constexpr):
    """_combine_splits for a decode program, whose only rows are one token's query heads
    of this KV head: every split's partials in one [heads, splits, DIM] read, issued at
    once. (The row-wise form reads split after split, each read waiting behind the
    cross-thread sums of the one before: a round trip per split.)"""
    g = tl.arange(0, QPKV_P2)
    head = kv_head * num_queries_per_kv + g
    s = tl.arange(0, SPLITS_P2)
    part = (tok * num_heads + head.to(tl.int64))[:, None] * NUM_SPLITS + s[None, :]  # [G, S]
    ml_mask = (g < num_queries_per_kv)[:, None] & (s < active_splits)[None, :]
    m = tl.load(part_ml_ptr + part * 2, mask=ml_mask, other=float("-inf"), cache_modifier=".cg")
    l = tl.load(part_ml_ptr + part * 2 + 1, mask=ml_mask, other=0.0, cache_modifier=".cg")
    acc = tl.load(part_acc_ptr + part[:, :, None] * head_dim + d[None, None, :],
                  mask=ml_mask[:, :, None] & d_mask[None, None, :], other=0.0,
                  cache_modifier=".cg")
    m_max = tl.max(m, 1)
    w = tl.exp(m - tl.where(m_max == float("-inf"), 0.0, m_max)[:, None])
    out_mask = (g < num_queries_per_kv)[:, None] & d_mask[None, :]
    _store_normalised(out_ptr + tok * stride_ot + head[:, None] * stride_oh + d[None, :],
                      tl.sum(acc * w[:, :, None], 1), tl.sum(w * l, 1), out_mask)


@triton.jit
def _store_normalised(out_rows, acc, total, mask):
    """out = acc / total per row (0 where a row saw no key), in the output's dtype."""
    out = acc / tl.where(total > 0, total, 1.0)[:, None]
    tl.store(out_rows, out.to(out_rows.dtype.element_ty), mask=mask)


# The batch size varies every step: specialising it (1, multiples of 16, the rest) compiled
# new variants in the middle of a run (docs/benchmarks.md, 2026-11-30).
@triton.jit(do_not_specialize=["num_seqs"])
def _attention_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, part_acc_ptr, part_ml_ptr, counter_ptr,
    block_table_ptr, seq_lens_ptr, query_start_ptr, alibi_ptr,
    pos_ptr, cos_sin_ptr, new_k_ptr, new_v_ptr, slot_ptr, q_norm_ptr, k_norm_ptr, eps,
    stride_cs, stride_nk_t, stride_nk_h, stride_nv_t, stride_nv_h, half,
    scale, soft_cap, window, num_seqs, num_heads,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kv_blk, stride_kv_slot, stride_kv_head, stride_bt,
    block_size, num_queries_per_kv, head_dim,
    BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, QPKV_P2: tl.constexpr,
    DIM_P2: tl.constexpr, TILE_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
    USE_SOFT_CAP: tl.constexpr, USE_WINDOW: tl.constexpr, USE_ALIBI: tl.constexpr,
    PAGED: tl.constexpr, DECODE: tl.constexpr, SPLITS_P2: tl.constexpr,
    ROPE: tl.constexpr, IS_NEOX: tl.constexpr, QK_NORM: tl.constexpr,
    PRELOAD: tl.constexpr, DOT_PREC: tl.constexpr, USE_PDL: tl.constexpr,
):
    if not PRELOAD:
        wait_then_release(USE_PDL)
    q_block = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq, q_start, q_len, local_block = _locate_q_block(query_start_ptr, num_seqs, q_block,
                                                       BLOCK_Q, DECODE)
    if local_block * BLOCK_Q >= q_len:  # past its sequence's queries (never at decode)
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context = seq_len - q_len
    kv_len = seq_len if PAGED else q_len
    tile_lo, tile_hi, kv_end, active_splits = _key_tiles(
        context, local_block, q_len, kv_len, window, split, BLOCK_Q, TILE_N, NUM_SPLITS,
        USE_WINDOW)
    if split >= active_splits:  # a short context leaves later splits no tile: no partial
        return

    rows = tl.arange(0, BLOCK_M)
    qi = local_block * BLOCK_Q + rows // QPKV_P2
    group = rows % QPKV_P2
    head = kv_head * num_queries_per_kv + group
    row_mask = (qi < q_len) & (group < num_queries_per_kv)
    q_pos = context + qi
    tok = (q_start + qi).to(tl.int64)
    d = tl.arange(0, DIM_P2)
    d_mask = d < head_dim
    kv_head_off = kv_head.to(tl.int64) * stride_kv_head
    cos_sin = cos_sin_ptr + tl.load(pos_ptr + q_start).to(tl.int64) * stride_cs if ROPE else 0
    holds_new_key = (tile_lo < tile_hi) & (tile_hi * TILE_N >= kv_end)  # (decode)
    new_k_row = new_k_ptr + q_start * stride_nk_t + kv_head * stride_nk_h  # (decode)
    new_v_row = new_v_ptr + q_start * stride_nv_t + kv_head * stride_nv_h
    q_rows = q_ptr + tok[:, None] * stride_qt + head[:, None] * stride_qh
    slope = 0.0
    if USE_ALIBI:
        slope = tl.load(alibi_ptr + head, mask=row_mask, other=0.0).to(tl.float32)
    if PRELOAD:  # q comes inside the loop, after the wait
        q = tl.zeros([BLOCK_M, DIM_P2], q_ptr.dtype.element_ty)
        new_v = tl.zeros([1, DIM_P2], k_ptr.dtype.element_ty)
        new_score = tl.zeros([BLOCK_M], tl.float32)
        # read before the wait: positions, slots and the cos/sin cache are inputs of the
        # step, which the running q/k/v GEMM does not write
        cos, sin = _load_cos_sin(cos_sin, d[None, :], half, IS_NEOX)
        slot = tl.load(slot_ptr + q_start)
    else:
        q = _load_q(q_rows, row_mask[:, None] & d_mask[None, :], d, cos_sin, half, head_dim,
                    q_norm_ptr, eps, ROPE, IS_NEOX, QK_NORM)
        if ROPE:
            if holds_new_key:
                _write_new_kv(new_k_row, new_v_row, k_ptr + kv_head_off, v_ptr + kv_head_off,
                              tl.load(slot_ptr + q_start), cos_sin, d, d_mask, half, head_dim,
                              block_size, stride_kv_blk, stride_kv_slot, k_norm_ptr, eps,
                              IS_NEOX, QK_NORM)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DIM_P2], tl.float32)
    for t in range(tile_lo, tile_hi):
        kpos = t * TILE_N + tl.arange(0, TILE_N)
        kmask = kpos < kv_end
        # PRELOAD: the loads skip the new key's slot (not written yet), whose score and value
        # come from registers below; the pipeliner issues the first tiles' loads before the
        # loop, so they run while the q/k/v GEMM does
        load_mask = kmask
        if PRELOAD:
            is_new_key = kpos == kv_end - 1  # decode: the last key is this step's
            load_mask = kmask & ~is_new_key
        krow = _key_rows(block_table_ptr, seq, stride_bt, q_start, kpos, kmask, block_size,
                         stride_kv_blk, stride_kv_slot, PAGED) + kv_head_off
        k = tl.load(k_ptr + krow[None, :] + d[:, None],
                    mask=d_mask[:, None] & load_mask[None, :], other=0.0)
        if PRELOAD:
            if t == tile_lo:
                wait_then_release(USE_PDL)
                q, new_k, new_v = _q_and_new_kv(
                    q_rows, row_mask[:, None] & d_mask[None, :], new_k_row, new_v_row,
                    holds_new_key, k_ptr, cos, sin, d, d_mask, half, head_dim, q_norm_ptr,
                    k_norm_ptr, eps, IS_NEOX, QK_NORM)
                new_score = tl.sum(q.to(tl.float32) * new_k.to(tl.float32), 1)
                if holds_new_key:
                    _store_new_kv(new_k, new_v, k_ptr + kv_head_off, v_ptr + kv_head_off,
                                  slot, d, d_mask, block_size, stride_kv_blk, stride_kv_slot)
        s = tl.dot(q, k.to(q.dtype), input_precision=DOT_PREC)
        if PRELOAD:
            s = tl.where(is_new_key[None, :], new_score[:, None], s)
        p, alpha, m_new, l_i = _tile_probs(s * scale, kpos, kmask, q_pos, m_i, l_i, soft_cap,
                                           window, slope, USE_SOFT_CAP, USE_WINDOW, USE_ALIBI)
        v = tl.load(v_ptr + krow[:, None] + d[None, :],
                    mask=load_mask[:, None] & d_mask[None, :], other=0.0)
        p = p.to(q.dtype)
        acc = acc * alpha[:, None] + tl.dot(p, v.to(q.dtype), input_precision=DOT_PREC)
        if PRELOAD:
            p_new = tl.sum(tl.where(is_new_key[None, :], p.to(tl.float32), 0.0), 1)
            acc += p_new[:, None] * new_v.to(q.dtype).to(tl.float32)
        m_i = m_new
    if PRELOAD:  # a row without keys never entered the loop (a second wait returns at once)
        wait_then_release(USE_PDL)

    io_mask = row_mask[:, None] & d_mask[None, :]
    out_rows = out_ptr + tok[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :]
    if NUM_SPLITS == 1:  # a compile-time branch: no partial path compiled at all
        _store_normalised(out_rows, acc, l_i, io_mask)
    elif active_splits == 1:  # the whole key range was this program's: no partials
        _store_normalised(out_rows, acc, l_i, io_mask)
    else:
        part = (tok * num_heads + head) * NUM_SPLITS + split  # [T, H, S] row index
        tl.store(part_acc_ptr + part[:, None] * head_dim + d[None, :], acc, mask=io_mask)
        tl.store(part_ml_ptr + part * 2, m_i, mask=row_mask)
        tl.store(part_ml_ptr + part * 2 + 1, l_i, mask=row_mask)
        # the last active split of this q block and KV head to finish combines them
        count = counter_ptr + q_block * tl.num_programs(1) + kv_head
        if tl.atomic_add(count, 1, sem="acq_rel", scope="gpu") == active_splits - 1:
            if DECODE:
                _combine_decode_splits(out_ptr, part_acc_ptr, part_ml_ptr, q_start.to(tl.int64),
                                       kv_head, d, d_mask, stride_ot, stride_oh, num_heads,
                                       num_queries_per_kv, head_dim, active_splits, QPKV_P2,
                                       NUM_SPLITS, SPLITS_P2)
            else:
                _combine_splits(out_ptr, part_acc_ptr, part_ml_ptr, tok, head, row_mask, d,
                                d_mask, stride_ot, stride_oh, num_heads, head_dim,
                                active_splits, NUM_SPLITS, SPLITS_P2)
            tl.store(count, 0)  # zero again for the next launch


@dataclass
class DecodeRope:
    """What a decode step's attention needs to rotate q and to rotate and write this step's
    k/v itself (one kernel a layer fewer): as kv_cache.rope_and_write_kv's arguments."""
    positions: torch.Tensor  # [T]
    cos_sin_cache: torch.Tensor  # [max_pos, rot_dim]
    is_neox: bool
    new_k: torch.Tensor  # [T, Hkv, D], unrotated
    new_v: torch.Tensor
    slot_mapping: torch.Tensor  # [T], -1: padding
    qk_norm: Optional[tuple[torch.Tensor, torch.Tensor, float]] = None  # q, k weights, eps


def choose_config(max_query_len: int, num_queries_per_kv: int, head_dim: int,
                  num_splits: int = 1, override: Optional[dict] = None) -> dict:
    """Tile shapes and launch options. tl.dot needs at least 16 rows, so decode packs the GQA
    group (and, when the group is small, more query slots) into 16 rows. `override` (keys
    block_m, tile_n, num_warps, num_stages) is for tuning runs.

    Picked from a sweep on an H200 (bf16, H=32/8, D=128; benchmarks/kernels_bench.py):
    decode B=64 x 2048 keys: tile 64 with 2 stages 137 us vs 198 us at 3 stages; split decode
    B=1 x 32768: tile 128 48 us vs 62 us at tile 64; prefill 4096 tokens: 128 x 64 tiles,
    8 warps, 2 stages 804 us (171 TFLOP/s) vs 946 us for 64 x 64, 4 warps, 3 stages.
    D=256 keeps the smaller tiles (register pressure); it was not swept."""
    qpkv_p2 = triton.next_power_of_2(num_queries_per_kv)
    dim_p2 = triton.next_power_of_2(head_dim)
    if dim_p2 > 128:
        cfg = dict(block_m=16 if max_query_len <= 1 else 64, tile_n=32,
                   num_warps=4 if max_query_len <= 1 else 8, num_stages=3)
    elif max_query_len > 1:
        cfg = dict(block_m=128, tile_n=64, num_warps=8, num_stages=2)
    elif num_splits > 1:
        cfg = dict(block_m=16, tile_n=128, num_warps=4, num_stages=3)
    else:
        cfg = dict(block_m=16, tile_n=64, num_warps=4, num_stages=2)
    cfg.update(override or {})
    cfg["block_m"] = max(cfg["block_m"], qpkv_p2)
    cfg["block_q"] = cfg["block_m"] // qpkv_p2
    return cfg


def paged_attention(
    q: torch.Tensor, key: torch.Tensor, value: torch.Tensor, out: torch.Tensor, *,
    query_start_loc: torch.Tensor, seq_lens: torch.Tensor, block_table: Optional[torch.Tensor],
    num_seqs: int, max_query_len: int, scale: float,
    sliding_window: Optional[int] = None, soft_cap: Optional[float] = None,
    alibi_slopes: Optional[torch.Tensor] = None, num_splits: int = 1,
    tile_n: Optional[int] = None, config: Optional[dict] = None,
    decode_rope: Optional[DecodeRope] = None,
) -> torch.Tensor:
    """q/out: [T, H, D]. key/value: the cache halves [num_blocks, block_size, Hkv, D] (paged,
    with block_table) or, when block_table is None, this step's k/v [T, Hkv, D] (profiling
    run: causal attention over the new tokens only). Positions come from seq_lens.
    decode_rope (decode steps only): q arrives unrotated, and this step's k/v are rotated
    and written into the cache here instead of by kv_cache.rope_and_write_kv."""
    num_tokens, num_heads, head_dim = q.shape
    paged = block_table is not None
    num_kv_heads = key.shape[2] if paged else key.shape[1]
    qpkv = num_heads // num_kv_heads
    cfg = choose_config(max_query_len, qpkv, head_dim, num_splits, config)
    block_m, block_q, tile_n = cfg["block_m"], cfg["block_q"], tile_n or cfg["tile_n"]
    dim_p2 = triton.next_power_of_2(head_dim)
    if paged:
        block_size = key.shape[1]
        kv_strides = (key.stride(0), key.stride(1), key.stride(2))
        bt, stride_bt = block_table, block_table.stride(0)
    else:
        block_size = 1
        kv_strides = (key.stride(0), 0, key.stride(1))
        bt, stride_bt = seq_lens, 0
    assert key.stride(-1) == 1 and value.stride(-1) == 1 and q.stride(-1) == 1
    assert key.stride() == value.stride()
    part_acc = part_ml = out  # unused placeholders when there is no split
    if num_splits > 1:
        part_acc = torch.empty(num_tokens, num_heads, num_splits, head_dim,
                               dtype=torch.float32, device=q.device)
        part_ml = torch.empty(num_tokens, num_heads, num_splits, 2,
                              dtype=torch.float32, device=q.device)
    # Decode (one token per sequence, as every CUDA-graph step): a program per sequence, which
    # saves the search over query_start_loc and its dependent loads; padded sequences of a
    # graph batch have seq_len 0 and attend to nothing.
    decode = paged and uses_decode_grid(num_tokens, num_seqs, max_query_len)
    grid = (num_seqs if decode else num_tokens // block_q + num_seqs, num_kv_heads, num_splits)
    counters = _split_counters(q.device, grid[0] * grid[1]) if num_splits > 1 else out
    if decode_rope is not None and not decode:
        raise ValueError("decode_rope needs a decode step: one token per sequence, paged")
    rope_args = _rope_args(decode_rope, q)
    _attention_kernel[grid](
        q, key, value, out, part_acc, part_ml, counters,
        bt, seq_lens, query_start_loc, alibi_slopes if alibi_slopes is not None else q,
        *rope_args, scale, float(soft_cap or 0.0), int(sliding_window or 0), num_seqs, num_heads,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        *kv_strides, stride_bt, block_size, qpkv, head_dim,
        BLOCK_Q=block_q, BLOCK_M=block_m, QPKV_P2=triton.next_power_of_2(qpkv),
        DIM_P2=dim_p2, TILE_N=tile_n, NUM_SPLITS=num_splits,
        USE_SOFT_CAP=bool(soft_cap), USE_WINDOW=bool(sliding_window),
        USE_ALIBI=alibi_slopes is not None, PAGED=paged, DECODE=decode,
        SPLITS_P2=triton.next_power_of_2(num_splits), ROPE=decode_rope is not None,
        IS_NEOX=decode_rope is None or decode_rope.is_neox,
        QK_NORM=decode_rope is not None and decode_rope.qk_norm is not None,
        PRELOAD=decode_rope is not None and _PRELOAD and num_seqs <= _PRELOAD_MAX_SEQS,
        DOT_PREC="ieee" if q.dtype == torch.float32 else None,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **launch_args(q.device),
    )
    return out


def uses_decode_grid(num_tokens: int, num_seqs: int, max_query_len: int) -> bool:
    """Whether a paged step runs the decode grid (a program per sequence): one token per
    sequence, padded sequences included."""
    return max_query_len <= 1 and num_tokens == num_seqs and _DECODE_GRID


def _rope_args(rope: Optional[DecodeRope], q: torch.Tensor) -> tuple:
    """The kernel's rotation arguments (pos_ptr .. half); placeholders without rotation."""
    if rope is None:
        return (q, q, q, q, q, q, q, 0.0, 0, 0, 0, 0, 0, 0)
    k, v = rope.new_k, rope.new_v
    assert k.stride(-1) == 1 and v.stride(-1) == 1 and rope.cos_sin_cache.stride(-1) == 1
    q_weight, k_weight, eps = rope.qk_norm if rope.qk_norm is not None else (q, q, 0.0)
    return (rope.positions, rope.cos_sin_cache, k, v, rope.slot_mapping, q_weight, k_weight,
            eps, rope.cos_sin_cache.stride(0), k.stride(0), k.stride(1), v.stride(0),
            v.stride(1), rope.cos_sin_cache.shape[-1] // 2)
