"""Batched sampling without sorting the vocabulary and without a host sync.

Per row (one program per row, looping over the vocabulary in chunks):
  * greedy rows (temperature < 1e-5): argmax of the raw logits.
  * otherwise l = logits / temperature and the kept set is {l >= t}, where t is the largest of
      - min_p:  m + log(min_p)               (prob >= min_p * max prob; m = max l)
      - top_k:  the k-th largest l            (ties at the threshold are all kept)
      - top_p:  the largest t whose kept mass {l >= t} is still >= top_p times the mass left
                after min_p and top_k (vLLM's order: min_p, then top-k, then top-p on the
                renormalised survivors)
    Then the sample is argmax over kept tokens of prob / q, with q the caller's exponential
    noise (the Gumbel-max trick; per-request seeds stay with whoever draws q). In log space:
    (l - m) - log(q), which cannot underflow.

The k-th largest value and the top-p cut are found by a k-ary search on the threshold: each
pass over the row tests NT thresholds at once, so ROUNDS passes narrow the range by NT**ROUNDS
(8**9 ~ 1.3e8: ~3e-7 on a logit range of 40, about fp32 resolution). That is ~20 passes over a
row that stays in L2, instead of an O(V log V) sort. The cost per element is ~NT compares, so
NT=8 beats 16 (work ~ NT / log2(NT) for the same resolution).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from pagoda.kernels.pdl import launch_args, wait_then_release

_GREEDY_EPS = 1e-5  # vLLM's _SAMPLING_EPS: smaller temperatures mean greedy


@triton.jit
def _lane_argmax(best, best_idx, V):
    """Reduce per-lane (max, first index) pairs to the row's first argmax, as torch.argmax."""
    m = tl.max(best, 0)
    return tl.min(tl.where(best == m, best_idx, V), 0)


@triton.jit
def _keep_better(score, cols, best, best_idx):
    """One step of a per-lane running argmax; strict, so each lane keeps its first maximum."""
    take = score > best
    return tl.where(take, score, best), tl.where(take, cols, best_idx)


# Every pass keeps per-lane running values ([BLOCK] or [BLOCK, NT] registers) and reduces
# across lanes once at the end: a cross-warp reduction per chunk would serialise the loop.
@triton.jit
def _greedy(base, V, BLOCK: tl.constexpr):
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    best_idx = tl.zeros([BLOCK], tl.int32)
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(base + cols, mask=cols < V, other=float("-inf"))
        best, best_idx = _keep_better(x, cols, best, best_idx)
    return _lane_argmax(best, best_idx, V)


@triton.jit
def _load_scaled(src, start, n, scale, BLOCK: tl.constexpr):
    cols = start + tl.arange(0, BLOCK)
    return tl.load(src + cols, mask=cols < n, other=float("-inf")) * scale


@triton.jit
def _search(src, n, scale, m, lo, hi, target, USE_MASS: tl.constexpr,
            NT: tl.constexpr, ROUNDS: tl.constexpr, BLOCK: tl.constexpr):
    """Largest threshold t in [lo, hi) with f(t) >= target, where f(t) counts the values of
    src[:n] * scale with value >= t (or sums their exp(value - m) when USE_MASS). lo must
    satisfy it, hi must not; if lo does not, lo comes back unchanged."""
    j = tl.arange(0, NT)
    for _ in range(ROUNDS):
        t = lo + (hi - lo) * (j + 1).to(tl.float32) / NT
        acc = tl.zeros([BLOCK, NT], tl.float32)
        for start in range(0, n, BLOCK):
            x = _load_scaled(src, start, n, scale, BLOCK)
            keep = x[:, None] >= t[None, :]
            if USE_MASS:
                acc += tl.where(keep, tl.exp(x - m)[:, None], 0.0)
            else:
                acc += keep.to(tl.float32)
        ok = tl.sum(acc, 0) >= target
        lo = tl.maximum(lo, tl.max(tl.where(ok, t, float("-inf")), 0))
        hi = tl.minimum(hi, tl.min(tl.where(ok, float("inf"), t), 0))
    return lo


@triton.jit
def _vec_kth(x, k, lo, hi, NT: tl.constexpr, ROUNDS: tl.constexpr):
    """Lower bound (within resolution) of the k-th largest value of a register vector."""
    j = tl.arange(0, NT)
    for _ in range(ROUNDS):
        t = lo + (hi - lo) * (j + 1).to(tl.float32) / NT
        ok = tl.sum((x[:, None] >= t[None, :]).to(tl.float32), 0) >= k
        lo = tl.maximum(lo, tl.max(tl.where(ok, t, float("-inf")), 0))
        hi = tl.minimum(hi, tl.min(tl.where(ok, float("inf"), t), 0))
    return lo


@triton.jit
def _mass_above(src, n, scale, m, t, BLOCK: tl.constexpr):
    acc = tl.zeros([BLOCK], tl.float32)
    for start in range(0, n, BLOCK):
        x = _load_scaled(src, start, n, scale, BLOCK)
        acc += tl.where(x >= t, tl.exp(x - m), 0.0)
    return tl.sum(acc, 0)


@triton.jit
def _compact(src, n, scale, t, buf, cap, BLOCK: tl.constexpr):
    """Copy the scaled values >= t into buf[:cap] (in order); returns how many there are."""
    count = 0
    for start in range(0, n, BLOCK):
        x = _load_scaled(src, start, n, scale, BLOCK)
        sel = x >= t
        pos = count + tl.cumsum(sel.to(tl.int32), 0) - 1
        tl.store(buf + pos, x, mask=sel & (pos < cap))
        count += tl.sum(sel.to(tl.int32), 0)
    return count


@triton.jit
def _sample_kernel(
    logits_ptr, q_ptr, temp_ptr, top_k_ptr, top_p_ptr, min_p_ptr, out_ptr, buf_ptr,
    V, stride_l, stride_q, greedy_eps, cap,
    NT: tl.constexpr, ROUNDS: tl.constexpr, BLOCK: tl.constexpr, SEARCH_BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_l
    temp = tl.load(temp_ptr + row).to(tl.float32)
    if temp < greedy_eps:
        tl.store(out_ptr + row, _greedy(base, V, BLOCK).to(tl.int64))
        return
    inv_temp = 1.0 / temp
    mx, cut = _lane_max_and_min(base, V, inv_temp, BLOCK)  # the kept set is {l >= cut}
    m = tl.max(mx, 0)
    hi = m + 1.0  # nothing reaches it, so it fails every search
    min_p = tl.load(min_p_ptr + row).to(tl.float32)
    if min_p > 0:
        cut = tl.maximum(cut, m + tl.log(min_p))
    k = tl.load(top_k_ptr + row).to(tl.int64)
    top_p = tl.load(top_p_ptr + row).to(tl.float32)
    use_k = (k > 0) & (k < V)
    use_p = top_p < 1.0
    if use_k | use_p:
        # A floor under the final cut, so the searches can run on the few values above it,
        # compacted into buf, instead of on the whole row. Top-k: the k-th largest of the
        # per-lane maxima (a subset of the row). Top-p alone: values with
        # exp(l - m) < (1 - top_p) * z / V carry under 1 - top_p of the mass all together.
        floor = cut
        z = 0.0
        if use_k:
            if k <= BLOCK:
                floor = tl.maximum(floor, _vec_kth(mx, k.to(tl.float32), cut, hi, NT, ROUNDS))
        else:
            z = _mass_above(base, V, inv_temp, m, cut, BLOCK)
            floor = tl.maximum(floor, m + tl.log((1.0 - top_p) * z / V))
        buf = buf_ptr + row * cap
        n_kept = _compact(base, V, inv_temp, floor, buf, cap, BLOCK)
        src = base
        n = V
        scale = inv_temp
        if n_kept <= cap:  # else: too many candidates, search the whole row
            src = buf
            n = n_kept
            scale = 1.0
        if use_k:
            # If cut (min_p) already keeps fewer than k, the search leaves it in place, which
            # is right: top-k over min_p's survivors keeps them all.
            cut = _search(src, n, scale, m, floor, hi, k.to(tl.float32), False, NT, ROUNDS,
                          SEARCH_BLOCK)
            z = _mass_above(src, n, scale, m, cut, SEARCH_BLOCK)
        if use_p:
            cut = _search(src, n, scale, m, tl.maximum(cut, floor), hi, top_p * z, True, NT,
                          ROUNDS, SEARCH_BLOCK)
    cut = tl.minimum(cut, m)  # the most likely token always survives
    token = _gumbel_max(base, q_ptr + row * stride_q, V, inv_temp, m, cut, BLOCK)
    tl.store(out_ptr + row, token.to(tl.int64))


@triton.jit
def _lane_max_and_min(base, V, inv_temp, BLOCK: tl.constexpr):
    """Pass 1 over a row of scaled logits: the per-lane maxima and the smallest finite value
    (-inf entries are banned tokens, never kept)."""
    mx = tl.full([BLOCK], float("-inf"), tl.float32)
    mn = tl.full([BLOCK], float("inf"), tl.float32)
    for start in range(0, V, BLOCK):
        x = _load_scaled(base, start, V, inv_temp, BLOCK)
        mx = tl.maximum(mx, x)
        mn = tl.minimum(mn, tl.where(x > float("-inf"), x, float("inf")))
    return mx, tl.min(mn, 0)


@triton.jit
def _gumbel_max(base, q_row, V, inv_temp, m, cut, BLOCK: tl.constexpr):
    """Final pass: argmax of (l - m) - log(q) over the kept tokens (l >= cut), q the row's
    exponential noise, which samples from the renormalised kept distribution."""
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    best_idx = tl.zeros([BLOCK], tl.int32)
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        cmask = cols < V
        x = tl.load(base + cols, mask=cmask, other=float("-inf")) * inv_temp
        q = tl.load(q_row + cols, mask=cmask, other=1.0)
        score = tl.where(x >= cut, (x - m) - tl.log(q), float("-inf"))
        best, best_idx = _keep_better(score, cols, best, best_idx)
    return _lane_argmax(best, best_idx, V)


@triton.jit
def _chunk_best_read(logits_row, q_row, lo, V, inv_temp, chunk, USE_Q: tl.constexpr,
                     BLOCK: tl.constexpr):
    """(best score, first index) over columns [lo, lo + chunk): the raw logit, or with
    USE_Q logit * inv_temp - log(q) for the caller's Exp(1) noise q."""
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    best_idx = tl.zeros([BLOCK], tl.int32)
    for start in range(lo, lo + chunk, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        cmask = cols < V
        score = tl.load(logits_row + cols, mask=cmask, other=float("-inf")).to(tl.float32)
        if USE_Q:
            q = tl.load(q_row + cols, mask=cmask, other=1.0)
            score = score * inv_temp - tl.log(q)
        best, best_idx = _keep_better(score, cols, best, best_idx)
    return tl.max(best, 0), _lane_argmax(best, best_idx, V)


@triton.jit
def _gumbel_quarter(logits_row, cols, u, V, inv_temp, best, best_idx):
    """One quarter block of the Philox race: logit * inv_temp - log(-log(u)) (u = 0 gives
    -inf: that token never wins)."""
    x = tl.load(logits_row + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
    return _keep_better(x * inv_temp - tl.log(-tl.log(u)), cols, best, best_idx)


@triton.jit
def _chunk_best_philox(logits_row, seed, row, lo, V, inv_temp, chunk, BLOCK: tl.constexpr):
    """As _chunk_best_read with the noise drawn here, four uniforms per Philox call: a block
    of 4 x QUARTER columns takes the four outputs of QUARTER counters, a quarter each. (One
    call per column, three of its four outputs unused, made this kernel compute-bound: 200 us
    a step for 256 x 152k logits on an H200.) Counter: the row above bit 32, the column / 4
    below, so no two (row, column) pairs share a draw."""
    QUARTER: tl.constexpr = BLOCK // 4
    best = tl.full([QUARTER], float("-inf"), tl.float32)
    best_idx = tl.zeros([QUARTER], tl.int32)
    lanes = tl.arange(0, QUARTER)
    for start in range(lo, lo + chunk, BLOCK):
        u0, u1, u2, u3 = tl.rand4x(seed, (row << 32) + start // 4 + lanes)
        cols = start + lanes
        best, best_idx = _gumbel_quarter(logits_row, cols, u0, V, inv_temp, best, best_idx)
        cols += QUARTER
        best, best_idx = _gumbel_quarter(logits_row, cols, u1, V, inv_temp, best, best_idx)
        cols += QUARTER
        best, best_idx = _gumbel_quarter(logits_row, cols, u2, V, inv_temp, best, best_idx)
        cols += QUARTER
        best, best_idx = _gumbel_quarter(logits_row, cols, u3, V, inv_temp, best, best_idx)
    return tl.max(best, 0), _lane_argmax(best, best_idx, V)


# The chunk size follows the batch, and the seed every step: as constants or specialised
# integers they compiled new variants mid-run (a P4 run on the H200 lost ~3 s to compiles
# as its batch shrank), so they are plain runtime values.
@triton.jit(do_not_specialize=["seed", "num_chunks", "chunk"])
def _chunk_best_kernel(logits_ptr, q_ptr, temp_ptr, best_ptr, idx_ptr, V, stride_l, stride_q,
                       greedy_eps, seed, num_chunks, chunk, NOISE: tl.constexpr,
                       BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    """Best (score, first index) of one vocabulary chunk of one row: the raw logit for greedy
    rows, logit / temperature - log(q) otherwise (Gumbel-max without the row max, which
    does not move the argmax). q, Exp(1) noise, is read from q_ptr (NOISE=1) or drawn here
    from Philox (NOISE=2), which saves writing and reading a [rows, vocab] noise tensor and
    the kernels that fill it."""
    wait_then_release(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    logits_row = logits_ptr + row * stride_l
    temp = tl.load(temp_ptr + row).to(tl.float32)
    greedy = temp < greedy_eps
    inv_temp = 1.0 / tl.where(greedy, 1.0, temp)
    lo = c * chunk
    if NOISE == 0 or greedy:
        m, idx = _chunk_best_read(logits_row, q_ptr, lo, V, 1.0, chunk, False, BLOCK)
    elif NOISE == 1:
        m, idx = _chunk_best_read(logits_row, q_ptr + row * stride_q, lo, V, inv_temp, chunk,
                                  True, BLOCK)
    else:
        m, idx = _chunk_best_philox(logits_row, seed, row, lo, V, inv_temp, chunk, BLOCK)
    tl.store(best_ptr + row * num_chunks + c, m)
    tl.store(idx_ptr + row * num_chunks + c, idx)


@triton.jit(do_not_specialize=["num_chunks"])
def _pick_chunk_kernel(best_ptr, idx_ptr, out_ptr, num_chunks, CHUNKS_P2: tl.constexpr,
                       USE_PDL: tl.constexpr):
    wait_then_release(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, CHUNKS_P2)
    best = tl.load(best_ptr + row * num_chunks + c, mask=c < num_chunks, other=float("-inf"))
    idx = tl.load(idx_ptr + row * num_chunks + c, mask=c < num_chunks, other=2**30)
    m = tl.max(best, 0)
    tl.store(out_ptr + row, tl.min(tl.where(best == m, idx, 2**30), 0).to(tl.int64))


def sample_plain(logits: torch.Tensor, temperature: torch.Tensor,
                 q: Optional[torch.Tensor], chunk: Optional[int] = None,
                 seed: Optional[int] = None) -> torch.Tensor:
    """Greedy or plain temperature sampling (no top-k, top-p or min-p in the batch): the
    vocabulary is split over programs, so a few rows still fill the GPU (one program per row
    walked 128k logits in ~55 us at batch 1). logits: any float dtype (read as fp32). Noise
    for the sampling rows: q [rows, vocab] Exp(1), or, with q None and a seed, drawn in the
    kernel; q and seed both None: every row is greedy (temperature 0). chunk: columns a
    program walks (a power of 2, at least 4); by default about 1024 programs in all."""
    num_rows, vocab = logits.shape
    assert logits.stride(-1) == 1 and (q is None or q.stride(-1) == 1)
    out = torch.empty(num_rows, dtype=torch.int64, device=logits.device)
    if num_rows == 0:
        return out
    if chunk is None:  # 1024..8192 columns: at batch 1, 128k logits make 126 programs
        chunk = min(8192, max(1024, triton.next_power_of_2(triton.cdiv(num_rows * vocab,
                                                                       1024))))
    chunk = min(chunk, triton.next_power_of_2(vocab))
    num_chunks = triton.cdiv(vocab, chunk)
    best = torch.empty(num_rows, num_chunks, dtype=torch.float32, device=logits.device)
    idx = torch.empty(num_rows, num_chunks, dtype=torch.int32, device=logits.device)
    _chunk_best_kernel[(num_rows, num_chunks)](
        logits, q if q is not None else logits, temperature, best, idx, vocab,
        logits.stride(0), q.stride(0) if q is not None else 0, _GREEDY_EPS, seed or 0,
        num_chunks, chunk, NOISE=1 if q is not None else 2 if seed is not None else 0,
        BLOCK=min(chunk, 1024), num_warps=4, **launch_args(logits.device))
    # sized for the smallest default chunk, so every batch size shares one compiled variant
    most_chunks = triton.cdiv(vocab, min(chunk, 1024))
    _pick_chunk_kernel[(num_rows,)](best, idx, out, num_chunks,
                                    CHUNKS_P2=triton.next_power_of_2(most_chunks),
                                    **launch_args(logits.device))
    return out


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
           top_p: torch.Tensor, min_p: torch.Tensor, q: torch.Tensor,
           block: int = 1024, cap: int = 4096) -> torch.Tensor:
    """logits fp32 [B, V]; temperature/top_p/min_p float [B]; top_k int [B] (<= 0 or >= V:
    off); q [B, V] positive exponential noise. Returns int64 [B] token ids. `cap`: candidates
    per row kept in scratch for the threshold searches (more fall back to whole-row passes)."""
    num_rows, vocab = logits.shape
    assert logits.stride(-1) == 1 and q.stride(-1) == 1
    out = torch.empty(num_rows, dtype=torch.int64, device=logits.device)
    if num_rows == 0:
        return out
    buf = torch.empty(num_rows, cap, dtype=torch.float32, device=logits.device)
    block = min(block, triton.next_power_of_2(vocab))
    _sample_kernel[(num_rows,)](
        logits, q, temperature, top_k, top_p, min_p, out, buf,
        vocab, logits.stride(0), q.stride(0), _GREEDY_EPS, cap,
        NT=8, ROUNDS=9, BLOCK=block, SEARCH_BLOCK=max(block // 2, 16), num_warps=8,
    )
    return out
