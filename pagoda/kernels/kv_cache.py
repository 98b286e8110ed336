"""Write new keys and values into the paged KV cache through the slot mapping.

Cache layout per layer: [2, num_blocks, block_size, num_kv_heads, head_dim]; slot s lives at
block s // block_size, offset s % block_size. A slot of -1 marks a padding token (CUDA-graph
batches are padded) and is skipped, so the padded tail never touches a real block.

`rope_and_write_kv` also applies the rotary embedding: q is rotated in place and k is rotated
on its way into the cache (one launch per layer instead of two; the attention kernel reads
every key from the cache). The arithmetic and roundings are the rotary kernel's. For models
with a per-head RMSNorm on q and k before the rotation (Qwen3) it applies those too, which
saves two norm kernels and two copies a layer. `_load_q`, `_new_kv`, `_q_and_new_kv`,
`_store_new_kv` and `_write_new_kv` are the same rotation and write for the decode attention
kernel (kernels/paged_attention.py), which at up to 64 decode sequences does them itself
instead of this launch.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from pagoda.kernels.pdl import launch_args, wait_then_release
from pagoda.kernels.rotary import _head_rms_norm, _rotate_heads


@triton.jit
def _write_kv_kernel(
    k_ptr, v_ptr, cache_ptr, slot_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_c_kv, stride_c_blk, stride_c_slot, stride_c_head,
    block_size, num_kv_heads, head_dim,
    HEADS_P2: tl.constexpr, DIM_P2: tl.constexpr,
):
    tok = tl.program_id(0)
    slot = tl.load(slot_ptr + tok)
    if slot < 0:  # padding token
        return
    blk = slot // block_size
    off = slot % block_size
    h = tl.arange(0, HEADS_P2)[:, None]
    d = tl.arange(0, DIM_P2)[None, :]
    mask = (h < num_kv_heads) & (d < head_dim)
    k = tl.load(k_ptr + tok * stride_kt + h * stride_kh + d, mask=mask)
    v = tl.load(v_ptr + tok * stride_vt + h * stride_vh + d, mask=mask)
    dst = cache_ptr + blk * stride_c_blk + off * stride_c_slot + h * stride_c_head + d
    ty = cache_ptr.dtype.element_ty
    tl.store(dst, k.to(ty), mask=mask)
    tl.store(dst + stride_c_kv, v.to(ty), mask=mask)


def write_kv_cache(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    """k, v: [T, Hkv, D] (last dim contiguous); slot_mapping: int64 [T], -1 = skip."""
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    assert k.stride(2) == 1 and v.stride(2) == 1 and kv_cache.stride(4) == 1
    block_size = kv_cache.shape[2]
    _write_kv_kernel[(num_tokens,)](
        k, v, kv_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        block_size, num_kv_heads, head_dim,
        HEADS_P2=triton.next_power_of_2(num_kv_heads),
        DIM_P2=triton.next_power_of_2(head_dim),
    )


@triton.jit
def _copy_slot_kernel(cache_ptr, src_ptr, dst_ptr, slot_elems, stride_plane, stride_blk,
                      BLOCK: tl.constexpr):
    """One (moved block, layer-and-k/v plane) a program: slot 0's heads x dim elements."""
    i = tl.program_id(0)
    plane = cache_ptr + tl.program_id(1).to(tl.int64) * stride_plane
    src = plane + tl.load(src_ptr + i) * stride_blk
    dst = plane + tl.load(dst_ptr + i) * stride_blk
    for e0 in range(0, slot_elems, BLOCK):
        e = e0 + tl.arange(0, BLOCK)
        tl.store(dst + e, tl.load(src + e, mask=e < slot_elems), mask=e < slot_elems)


def copy_first_slot(kv_all: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
    """kv_all [layers, 2, blocks, block_size, heads, dim] (contiguous): slot 0 of blocks src
    -> blocks dst (int64 [n] each), in every layer, in one launch. The same copy through
    torch indexing ran as ~56 kernels on an H200: a cache over 2^31 elements makes
    PyTorch split the iteration into 32-bit-indexable pieces (137 us an index_copy_)."""
    assert kv_all.is_contiguous() and src.shape == dst.shape
    if src.numel() == 0:
        return
    planes = kv_all.shape[0] * kv_all.shape[1]
    slot_elems = kv_all.shape[4] * kv_all.shape[5]
    _copy_slot_kernel[(src.numel(), planes)](
        kv_all, src, dst, slot_elems, kv_all.stride(1), kv_all.stride(2),
        BLOCK=min(triton.next_power_of_2(slot_elems), 1024))


@triton.jit
def _rope_lanes(d, half, IS_NEOX: tl.constexpr):
    """For channels d: which are rotated (the first 2 * half), which is first of its pair,
    each one's partner (d +- half, or d ^ 1 interleaved) and its cos/sin column."""
    rot = d < 2 * half
    if IS_NEOX:
        first = d < half
        partner = tl.where(first, d + half, d - half)
        c = tl.where(first, d, d - half)
    else:
        first = d % 2 == 0
        partner = tl.where(first, d + 1, d - 1)
        c = d // 2
    return rot, first, tl.where(rot, partner, d), tl.where(rot, c, 0)


@triton.jit
def _load_pair(rows, d, mask, half, IS_NEOX: tl.constexpr):
    """Each channel of rows (shaped to broadcast with d) and its rotation partner, fp32."""
    _, _, partner, _ = _rope_lanes(d, half, IS_NEOX)
    # d again, spelled like partner: both reads then take the same register layout, so
    # neither is converted (a conversion waits for its data) before the other is issued
    _, _, same, _ = _rope_lanes(partner, half, IS_NEOX)
    x = tl.load(rows + same, mask=mask, other=0.0).to(tl.float32)
    xp = tl.load(rows + partner, mask=mask, other=0.0).to(tl.float32)
    return x, xp


@triton.jit
def _load_cos_sin(cos_sin_base, d, half, IS_NEOX: tl.constexpr):
    """One position's cos and sin per channel (unrotated channels: 0)."""
    rot, _, _, c = _rope_lanes(d, half, IS_NEOX)
    cos = tl.load(cos_sin_base + c, mask=rot, other=0.0).to(tl.float32)
    sin = tl.load(cos_sin_base + half + c, mask=rot, other=0.0).to(tl.float32)
    return cos, sin


@triton.jit
def _rope(x, xp, cos, sin, d, half, head_dim, norm_ptr, eps, ty, IS_NEOX: tl.constexpr,
          NORM: tl.constexpr):
    """_load_pair's channels rotated; with NORM, each head RMS-normalised first (weight at
    norm_ptr, rounded to ty as the unfused norm rounds)."""
    rot, first, partner, _ = _rope_lanes(d, half, IS_NEOX)
    if NORM:
        inv_rms = tl.math.rsqrt(tl.sum(x * x, 1) / head_dim + eps)[:, None]
        x, xp = _head_rms_norm(x, xp, inv_rms, norm_ptr, d, partner, d < head_dim, ty)
    rotated = tl.where(first, x * cos - xp * sin, x * cos + xp * sin)
    return tl.where(rot, rotated, x)


@triton.jit
def _rotated_k(k_base, cos_sin_base, d, mask, half, head_dim, norm_ptr, eps,
               IS_NEOX: tl.constexpr, NORM: tl.constexpr):
    """One token's k heads [HEADS, DIM] with the first 2 * half channels rotated: each
    channel pairs with its partner as in _rotate_heads. With NORM, each head is
    RMS-normalised first (weight at norm_ptr)."""
    x, xp = _load_pair(k_base, d, mask, half, IS_NEOX)
    cos, sin = _load_cos_sin(cos_sin_base, d, half, IS_NEOX)
    return _rope(x, xp, cos, sin, d, half, head_dim, norm_ptr, eps, k_base.dtype.element_ty,
                 IS_NEOX, NORM)


@triton.jit
def _rope_write_kv_kernel(
    pos_ptr, q_ptr, k_ptr, v_ptr, cos_sin_ptr, cache_ptr, slot_ptr, q_norm_ptr, k_norm_ptr,
    eps, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_cs,
    stride_c_kv, stride_c_blk, stride_c_slot, stride_c_head,
    block_size, num_q_heads, num_kv_heads, head_dim, half,
    QH_P2: tl.constexpr, KH_P2: tl.constexpr, DIM_P2: tl.constexpr, HALF_P2: tl.constexpr,
    IS_NEOX: tl.constexpr, QK_NORM: tl.constexpr, USE_PDL: tl.constexpr,
):
    wait_then_release(USE_PDL)
    tok = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + tok).to(tl.int64)
    cos_sin_base = cos_sin_ptr + pos * stride_cs
    i = tl.arange(0, HALF_P2)[None, :]
    cos = tl.load(cos_sin_base + i, mask=i < half, other=0.0).to(tl.float32)
    sin = tl.load(cos_sin_base + half + i, mask=i < half, other=0.0).to(tl.float32)
    _rotate_heads(q_ptr, stride_qt, stride_qh, tok, num_q_heads, cos, sin, half,
                  QH_P2, HALF_P2, IS_NEOX, q_norm_ptr, eps, QK_NORM)
    slot = tl.load(slot_ptr + tok)
    if slot < 0:  # padding token: q is rotated (harmless), nothing is written
        return
    h = tl.arange(0, KH_P2)[:, None]
    d = tl.arange(0, DIM_P2)[None, :]
    mask = (h < num_kv_heads) & (d < head_dim)
    dst = cache_ptr + (slot // block_size) * stride_c_blk + (slot % block_size) * stride_c_slot \
        + h * stride_c_head
    _write_rotated_kv(k_ptr + tok * stride_kt + h * stride_kh,
                      v_ptr + tok * stride_vt + h * stride_vh, dst, dst + stride_c_kv,
                      cos_sin_base, d, mask, half, head_dim, k_norm_ptr, eps, IS_NEOX, QK_NORM)


@triton.jit
def _write_rotated_kv(k_rows, v_rows, k_dst, v_dst, cos_sin_base, d, mask, half, head_dim,
                      norm_ptr, eps, IS_NEOX: tl.constexpr, NORM: tl.constexpr):
    """One token's k heads (normalised with NORM, then rotated) and v heads into their cache
    rows; k is rounded to its own dtype first, as the unfused rotary kernel stores it.
    k_rows/v_rows/k_dst/v_dst: each head's row start, shaped to broadcast with d."""
    k = _rotated_k(k_rows, cos_sin_base, d, mask, half, head_dim, norm_ptr, eps, IS_NEOX, NORM)
    v = tl.load(v_rows + d, mask=mask)
    ty = k_dst.dtype.element_ty
    tl.store(k_dst + d, k.to(k_rows.dtype.element_ty).to(ty), mask=mask)
    tl.store(v_dst + d, v.to(ty), mask=mask)


@triton.jit
def _load_q(q_rows, mask, d, cos_sin, half, head_dim, q_norm_ptr, eps, ROPE: tl.constexpr,
            IS_NEOX: tl.constexpr, QK_NORM: tl.constexpr):
    """This program's query rows [rows, DIM]; with ROPE (decode: q comes unrotated, straight
    from the projection) normalised and rotated as `rope_and_write_kv` does (the decode
    attention kernel's, kernels/paged_attention.py)."""
    if ROPE:
        q = _rotated_k(q_rows, cos_sin, d[None, :], mask, half, head_dim, q_norm_ptr, eps,
                       IS_NEOX, QK_NORM)
        return q.to(q_rows.dtype.element_ty)
    return tl.load(q_rows + d[None, :], mask=mask, other=0.0)


@triton.jit
def _new_kv(new_k, new_v, cache_k, cos_sin, d, d_mask, half, head_dim, k_norm_ptr, eps,
            IS_NEOX: tl.constexpr, QK_NORM: tl.constexpr):
    """Decode with the rotation fused in: this token's key for one KV head (normalised and
    rotated as `rope_and_write_kv` does) and its value, [1, DIM] each, rounded as the cache
    stores them."""
    one_head = tl.zeros([1, 1], tl.int32)  # the [heads, 1] row shape the helper takes
    k = _rotated_k(new_k + one_head, cos_sin, d[None, :], d_mask[None, :], half, head_dim,
                   k_norm_ptr, eps, IS_NEOX, QK_NORM)
    ty = cache_k.dtype.element_ty
    v = tl.load(new_v + one_head + d[None, :], mask=d_mask[None, :], other=0.0)
    return k.to(new_k.dtype.element_ty).to(ty), v.to(ty)


@triton.jit
def _q_and_new_kv(q_rows, q_mask, new_k, new_v, has_new_key, cache_k, cos, sin, d, d_mask,
                  half, head_dim, q_norm_ptr, k_norm_ptr, eps, IS_NEOX: tl.constexpr,
                  QK_NORM: tl.constexpr):
    """_load_q's rows and _new_kv's key and value (zeros unless has_new_key), with cos and sin
    already loaded. Every global read is issued before any arithmetic: each layout
    conversion waits for the data it converts, so reads interleaved with arithmetic cost one
    round trip each (five, from the sm90 code, where the decode attention kernel waits)."""
    one_head = tl.zeros([1, 1], tl.int32)
    # a [1, 1] comparison, not the scalar: Triton's interpreter rejects a scalar in a mask
    kv_mask = d_mask[None, :] & ((one_head + has_new_key.to(tl.int32)) != 0)
    qx, qxp = _load_pair(q_rows, d[None, :], q_mask, half, IS_NEOX)
    kx, kxp = _load_pair(new_k + one_head, d[None, :], kv_mask, half, IS_NEOX)
    v = tl.load(new_v + one_head + d[None, :], mask=kv_mask, other=0.0)
    q_ty = q_rows.dtype.element_ty
    q = _rope(qx, qxp, cos, sin, d[None, :], half, head_dim, q_norm_ptr, eps, q_ty, IS_NEOX,
              QK_NORM)
    k = _rope(kx, kxp, cos, sin, d[None, :], half, head_dim, k_norm_ptr, eps,
              new_k.dtype.element_ty, IS_NEOX, QK_NORM)
    ty = cache_k.dtype.element_ty
    return q.to(q_ty), k.to(new_k.dtype.element_ty).to(ty), v.to(ty)


@triton.jit
def _store_new_kv(k, v, cache_k, cache_v, slot, d, d_mask, block_size, stride_kv_blk,
                  stride_kv_slot):
    """_new_kv's key and value into the cache at `slot` (-1: a padding token, nothing
    written)."""
    if slot >= 0:
        row = (slot // block_size).to(tl.int64) * stride_kv_blk \
            + (slot % block_size).to(tl.int64) * stride_kv_slot
        tl.store(cache_k + row + d[None, :], k, mask=d_mask[None, :])
        tl.store(cache_v + row + d[None, :], v, mask=d_mask[None, :])


@triton.jit
def _write_new_kv(new_k, new_v, cache_k, cache_v, slot, cos_sin, d, d_mask, half, head_dim,
                  block_size, stride_kv_blk, stride_kv_slot, k_norm_ptr, eps,
                  IS_NEOX: tl.constexpr, QK_NORM: tl.constexpr):
    """_new_kv into the cache, then a CTA barrier, so the key tile loads after it see it."""
    k, v = _new_kv(new_k, new_v, cache_k, cos_sin, d, d_mask, half, head_dim, k_norm_ptr, eps,
                   IS_NEOX, QK_NORM)
    _store_new_kv(k, v, cache_k, cache_v, slot, d, d_mask, block_size, stride_kv_blk,
                  stride_kv_slot)
    tl.debug_barrier()


def rope_and_write_kv(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                      v: torch.Tensor, cos_sin_cache: torch.Tensor, is_neox: bool,
                      kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
                      qk_norm: Optional[tuple[torch.Tensor, torch.Tensor, float]] = None
                      ) -> None:
    """q [T, H, D] rotated in place; k rotated into the cache with v; k itself is left as
    it was. positions int [T]; cos_sin_cache [max_pos, rot_dim] as the rotary kernel's.
    qk_norm: (q weight [D], k weight [D], eps) of per-head RMSNorms applied first (the
    weight times the normalised head); needs full rotary (rot_dim == D)."""
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    assert q.stride(2) == 1 and k.stride(2) == 1 and v.stride(2) == 1
    assert kv_cache.stride(4) == 1 and cos_sin_cache.stride(-1) == 1
    half = cos_sin_cache.shape[-1] // 2
    q_weight, k_weight, eps = qk_norm if qk_norm is not None else (q, k, 0.0)
    assert qk_norm is None or 2 * half == head_dim, "fused q/k norms need full rotary"
    _rope_write_kv_kernel[(num_tokens,)](
        positions, q, k, v, cos_sin_cache, kv_cache, slot_mapping, q_weight, k_weight, eps,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        cos_sin_cache.stride(0),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        kv_cache.shape[2], q.shape[1], num_kv_heads, head_dim, half,
        QH_P2=triton.next_power_of_2(q.shape[1]), KH_P2=triton.next_power_of_2(num_kv_heads),
        DIM_P2=triton.next_power_of_2(head_dim), HALF_P2=triton.next_power_of_2(half),
        IS_NEOX=is_neox, QK_NORM=qk_norm is not None, **launch_args(q.device),
    )
