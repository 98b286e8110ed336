"""Rotary position embedding applied in place to q [T, H, D] and k [T, Hkv, D].

cos_sin_cache: [max_pos, rot_dim] = cat(cos, sin), each rot_dim / 2 wide. Only the first rot_dim
channels of each head rotate (partial rotary); the rest stay as they are.
  neox style:  pairs are (i, i + rot_dim/2)  -- rotate halves
  GPT-J style: pairs are (2i, 2i + 1)        -- interleaved
One program per token does both q and k, so cos/sin are loaded once per token.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl


@triton.jit
def _head_rms_norm(x, xp, inv_rms, w_ptr, offs, partner_offs, mask, ty):
    """Qwen3's per-head RMSNorm of a channel and its rotation partner, rounded as the
    unfused RMSNorm rounds (normalised to the dtype, then times the weight)."""
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    wp = tl.load(w_ptr + partner_offs, mask=mask, other=0.0).to(tl.float32)
    x = ((x * inv_rms).to(ty).to(tl.float32) * w).to(ty).to(tl.float32)
    xp = ((xp * inv_rms).to(ty).to(tl.float32) * wp).to(ty).to(tl.float32)
    return x, xp


@triton.jit
def _rotate_heads(ptr, stride_t, stride_h, tok, num_heads, cos, sin, half,
                  HEADS_P2: tl.constexpr, HALF_P2: tl.constexpr, IS_NEOX: tl.constexpr,
                  norm_ptr=None, eps=0.0, NORM: tl.constexpr = False):
    """Rotates each head in place; with NORM, each head is first RMS-normalised with the
    weight at norm_ptr (full rotary only: the two halves are then the whole head)."""
    h = tl.arange(0, HEADS_P2)[:, None]
    i = tl.arange(0, HALF_P2)[None, :]
    mask = (h < num_heads) & (i < half)
    if IS_NEOX:
        off1 = i
        off2 = i + half
    else:
        off1 = 2 * i
        off2 = 2 * i + 1
    base = ptr + tok * stride_t + h * stride_h
    x1 = tl.load(base + off1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(base + off2, mask=mask, other=0.0).to(tl.float32)
    ty = ptr.dtype.element_ty
    if NORM:
        inv_rms = tl.math.rsqrt((tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1)) / (2 * half) + eps)
        x1, x2 = _head_rms_norm(x1, x2, inv_rms[:, None], norm_ptr, off1, off2, i < half, ty)
    tl.store(base + off1, (x1 * cos - x2 * sin).to(ty), mask=mask)
    tl.store(base + off2, (x2 * cos + x1 * sin).to(ty), mask=mask)


@triton.jit
def _rotary_kernel(
    pos_ptr, q_ptr, k_ptr, cache_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_cache,
    num_q_heads, num_k_heads, half,
    QH_P2: tl.constexpr, KH_P2: tl.constexpr, HALF_P2: tl.constexpr, IS_NEOX: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + tok).to(tl.int64)
    i = tl.arange(0, HALF_P2)[None, :]
    cmask = i < half
    cos = tl.load(cache_ptr + pos * stride_cache + i, mask=cmask, other=0.0).to(tl.float32)
    sin = tl.load(cache_ptr + pos * stride_cache + half + i, mask=cmask, other=0.0).to(tl.float32)
    _rotate_heads(q_ptr, stride_qt, stride_qh, tok, num_q_heads, cos, sin, half,
                  QH_P2, HALF_P2, IS_NEOX)
    _rotate_heads(k_ptr, stride_kt, stride_kh, tok, num_k_heads, cos, sin, half,
                  KH_P2, HALF_P2, IS_NEOX)


def _as_heads(x: torch.Tensor, head_dim: Optional[int]) -> torch.Tensor:
    if x.dim() == 2:  # [T, H * D] straight out of the qkv projection
        assert head_dim is not None, "a 2-D q/k needs head_dim"
        return x.view(x.shape[0], -1, head_dim)
    return x


def apply_rotary(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                 cos_sin_cache: torch.Tensor, is_neox: bool = True,
                 head_dim: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k in place; returns them. positions: int [T]."""
    q3, k3 = _as_heads(q, head_dim), _as_heads(k, head_dim)
    num_tokens = q3.shape[0]
    rot_dim = cos_sin_cache.shape[-1]
    assert rot_dim % 2 == 0 and rot_dim <= q3.shape[-1]
    assert q3.stride(-1) == 1 and k3.stride(-1) == 1 and cos_sin_cache.stride(-1) == 1
    if num_tokens == 0:
        return q, k
    half = rot_dim // 2
    _rotary_kernel[(num_tokens,)](
        positions, q3, k3, cos_sin_cache,
        q3.stride(0), q3.stride(1), k3.stride(0), k3.stride(1), cos_sin_cache.stride(0),
        q3.shape[1], k3.shape[1], half,
        QH_P2=triton.next_power_of_2(q3.shape[1]), KH_P2=triton.next_power_of_2(k3.shape[1]),
        HALF_P2=triton.next_power_of_2(half), IS_NEOX=is_neox,
    )
    return q, k
