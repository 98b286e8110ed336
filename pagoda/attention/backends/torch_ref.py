"""Pure-PyTorch paged attention: the CPU path and the oracle every other backend is tested
against. Computes in float32, one sequence at a time."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from pagoda.attention.backend import AttentionLayerSpec, CommonAttentionMetadata, Rotary


def write_kv_cache(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    num_kv_heads, head_dim = k.shape[1], k.shape[2]
    kv_cache[0].view(-1, num_kv_heads, head_dim)[slot_mapping] = k.to(kv_cache.dtype)
    kv_cache[1].view(-1, num_kv_heads, head_dim)[slot_mapping] = v.to(kv_cache.dtype)


def gather_kv(kv_cache: torch.Tensor, block_ids: torch.Tensor, seq_len: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of one sequence, [seq_len, num_kv_heads, head_dim]."""
    _, _, block_size, num_kv_heads, head_dim = kv_cache.shape
    num_blocks = -(-seq_len // block_size)
    ids = block_ids[:num_blocks].long()
    keys = kv_cache[0].index_select(0, ids).view(-1, num_kv_heads, head_dim)[:seq_len]
    values = kv_cache[1].index_select(0, ids).view(-1, num_kv_heads, head_dim)[:seq_len]
    return keys, values


def attend(layer: AttentionLayerSpec, q: torch.Tensor, keys: torch.Tensor,
           values: torch.Tensor, context_len: int) -> torch.Tensor:
    """Causal attention of q [n, H, D] (positions context_len..) over keys/values [s, Hkv, D]."""
    n, seq_len = q.shape[0], keys.shape[0]
    group = layer.num_heads // layer.num_kv_heads
    keys = keys.float().repeat_interleave(group, dim=1)
    values = values.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.float(), keys) * layer.scale
    if layer.logits_soft_cap:
        scores = layer.logits_soft_cap * torch.tanh(scores / layer.logits_soft_cap)
    q_pos = torch.arange(context_len, context_len + n, device=scores.device).unsqueeze(1)
    k_pos = torch.arange(seq_len, device=scores.device).unsqueeze(0)
    if layer.alibi_slopes is not None:
        rel = (k_pos - q_pos).float()
        scores = scores + layer.alibi_slopes.float().view(-1, 1, 1).to(scores.device) * rel
    allowed = k_pos <= q_pos
    if layer.sliding_window:
        allowed = allowed & (q_pos - k_pos < layer.sliding_window)
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("hqk,khd->qhd", probs, values)


def _bias_and_mask(layer: AttentionLayerSpec, q_pos: torch.Tensor, k_pos: torch.Tensor,
                   device: torch.device) -> torch.Tensor:
    """An additive float mask [..., H or 1, n, s] (causality, sliding window, ALiBi) from
    query positions [..., n, 1] and key positions [..., 1, s]."""
    allowed = k_pos <= q_pos
    if layer.sliding_window:
        allowed = allowed & (q_pos - k_pos < layer.sliding_window)
    mask = torch.zeros(allowed.shape, device=device).masked_fill(~allowed, float("-inf"))
    mask = mask.unsqueeze(-3)
    if layer.alibi_slopes is None:
        return mask
    slopes = layer.alibi_slopes.float().to(device).view(-1, 1, 1)
    return mask + slopes * (k_pos - q_pos).float().unsqueeze(-3)


def attend_sdpa(layer: AttentionLayerSpec, q: torch.Tensor, keys: torch.Tensor,
                values: torch.Tensor, context_len: int) -> torch.Tensor:
    """`attend` through PyTorch's fused scaled_dot_product_attention, in float32."""
    n, seq_len, device = q.shape[0], keys.shape[0], q.device
    q_pos = torch.arange(context_len, context_len + n, device=device).unsqueeze(1)
    k_pos = torch.arange(seq_len, device=device).unsqueeze(0)
    mask = _bias_and_mask(layer, q_pos, k_pos, device)  # [1|H, n, s]
    out = F.scaled_dot_product_attention(
        q.float().transpose(0, 1), keys.float().transpose(0, 1),
        values.float().transpose(0, 1), attn_mask=mask, scale=layer.scale,
        enable_gqa=layer.num_heads != layer.num_kv_heads)
    return out.transpose(0, 1)


class TorchRefBackend:
    name = "torch_ref"

    def build_metadata(self, common: CommonAttentionMetadata) -> CommonAttentionMetadata:
        return common

    def forward(self, layer: AttentionLayerSpec, q: torch.Tensor, k: torch.Tensor,
                v: torch.Tensor, kv_cache: Optional[torch.Tensor],
                metadata: CommonAttentionMetadata,
                rotary: Optional[Rotary] = None) -> torch.Tensor:
        if rotary is not None:
            q, k = rotary.apply(q, k)
        num_tokens = metadata.num_actual_tokens
        q, k, v = q[:num_tokens], k[:num_tokens], v[:num_tokens]
        if kv_cache is not None:
            write_kv_cache(k, v, kv_cache, metadata.slot_mapping[:num_tokens])
            one_token_each = num_tokens == metadata.num_reqs and metadata.max_query_len == 1
            if one_token_each and not layer.logits_soft_cap:
                return self._decode(layer, q, kv_cache, metadata)
        # Soft-capping sits between the scores and the softmax, where SDPA cannot reach.
        attend_one = attend if layer.logits_soft_cap else attend_sdpa
        out = torch.empty_like(q)
        starts = metadata.query_start_loc_cpu.tolist()
        seq_lens = metadata.seq_lens_cpu.tolist()
        for i in range(metadata.num_reqs):
            start, end = starts[i], starts[i + 1]
            if end == start:
                continue
            context_len = seq_lens[i] - (end - start)
            if kv_cache is None:  # profiling run: no cache yet, prompts have no context
                keys, values = k[start:end], v[start:end]
            else:
                keys, values = gather_kv(kv_cache, metadata.block_table[i], seq_lens[i])
            out[start:end] = attend_one(layer, q[start:end], keys, values,
                                        context_len).to(q.dtype)
        return out

    def _decode(self, layer: AttentionLayerSpec, q: torch.Tensor, kv_cache: torch.Tensor,
                metadata: CommonAttentionMetadata) -> torch.Tensor:
        """All sequences at once when each has one new token: gather every sequence's keys
        into a padded [B, L] batch and mask past each sequence's length. Padding positions
        gather the sequence's own first key and value (finite, then masked), never another
        request's slots, so nothing needs sanitising afterwards."""
        _, _, block_size, num_kv_heads, head_dim = kv_cache.shape
        batch, max_len = metadata.num_reqs, metadata.max_seq_len
        seq_lens = metadata.seq_lens[:batch].long().view(batch, 1, 1)
        k_pos = torch.arange(max_len, device=q.device).view(1, 1, -1)
        pos = torch.where(k_pos.view(1, -1) < seq_lens.view(batch, 1), k_pos.view(1, -1), 0)
        blocks = metadata.block_table[:batch].long().gather(1, pos // block_size)
        slots = (blocks * block_size + pos % block_size).view(-1)  # [B * L]
        flat = kv_cache.flatten(1, 2)  # [2, num_blocks * block_size, Hkv, D], a view
        # index_select, not flat[0][slots]: the same rows ~5x faster on the CPU.
        shape = (batch, max_len, num_kv_heads, head_dim)
        keys = flat[0].index_select(0, slots).view(shape)
        values = flat[1].index_select(0, slots).view(shape)
        mask = _bias_and_mask(layer, seq_lens - 1, k_pos, q.device)  # [B, 1|H, 1, L]
        out = F.scaled_dot_product_attention(
            q.float().unsqueeze(2), keys.float().transpose(1, 2), values.float().transpose(1, 2),
            attn_mask=mask, scale=layer.scale,
            enable_gqa=layer.num_heads != layer.num_kv_heads)
        return out.squeeze(2).to(q.dtype)
