"""Write new keys and values into the paged KV cache through the slot mapping.

Cache layout per layer: [2, num_blocks, block_size, num_kv_heads, head_dim]; slot s lives at
block s // block_size, offset s % block_size. A slot of -1 marks a padding token (CUDA-graph
batches are padded) and is skipped, so the padded tail never touches a real block.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


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
