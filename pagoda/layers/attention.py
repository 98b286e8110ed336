"""The attention layer: reads the step's metadata and KV cache from the forward context and
hands the work to the attention backend. Models only see q, k, v in and out."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from pagoda.attention.backend import Rotary
from pagoda.forward_context import get_forward_context


class Attention(nn.Module):
    def __init__(self, num_heads: int, head_dim: int, scale: float, num_kv_heads: int,
                 layer_idx: int, sliding_window: Optional[int] = None,
                 logits_soft_cap: Optional[float] = None,
                 alibi_slopes: Optional[torch.Tensor] = None):
        super().__init__()
        self.num_heads, self.head_dim, self.scale = num_heads, head_dim, scale
        self.num_kv_heads, self.layer_idx = num_kv_heads, layer_idx
        self.sliding_window = sliding_window
        self.logits_soft_cap = logits_soft_cap
        if alibi_slopes is not None:
            self.register_buffer("alibi_slopes", alibi_slopes.float(), persistent=False)
        else:
            self.alibi_slopes = None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                rope: Optional[nn.Module] = None,
                positions: Optional[torch.Tensor] = None,
                qk_norm: Optional[tuple[nn.Module, nn.Module]] = None) -> torch.Tensor:
        """q: [T, H*D], k/v: [T, Hkv*D] -> [T, H*D]. rope (a RotaryEmbedding) rotates q and k
        at `positions` first, after the per-head norms qk_norm (q's, k's) where given; the
        backend may fuse all of that into its KV-cache write."""
        ctx = get_forward_context()
        num_tokens = q.shape[0]
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        kv_cache = ctx.kv_caches[self.layer_idx] if ctx.kv_caches is not None else None
        rotary = None
        if rope is not None:
            rotary = Rotary(rope, positions, *(qk_norm or (None, None)))
        elif qk_norm is not None:
            raise ValueError("q/k norms are applied with the rotary embedding: pass rope")
        out = ctx.backend.forward(self, q, k, v, kv_cache, ctx.attn_metadata, rotary)
        return out.reshape(num_tokens, self.num_heads * self.head_dim)
