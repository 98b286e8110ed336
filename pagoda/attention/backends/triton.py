"""Triton attention backend (GPU): KV-cache write plus one unified paged-attention kernel.

`build_metadata` makes only host-side decisions (from the host copies in the common metadata)
so a step never waits on the device; `forward` launches two kernels per layer: rotary + KV
write, and attention (whose split-KV path combines its splits itself). With
the default PAGODA_ATTN_ROPE=1 a decode step of up to 64 sequences launches one: the
attention kernel rotates q, and this step's k on its way into the cache (4.28 -> 4.22 ms a
P1 step on the H200; docs/benchmarks.md). PAGODA_ATTN_ROPE=0 keeps the separate rotary +
KV-write kernel at every batch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch

from pagoda.attention.backend import AttentionLayerSpec, CommonAttentionMetadata, Rotary
from pagoda.kernels.kv_cache import rope_and_write_kv, write_kv_cache
from pagoda.kernels.paged_attention import DecodeRope, paged_attention, uses_decode_grid
from pagoda.platform import num_sms

# Split-KV pays off only when one program per (sequence, KV head) leaves most SMs idle and each
# split still gets several key tiles; below these sizes the extra reduce launch costs more.
_MIN_KEYS_PER_SPLIT = 256
_MAX_SPLITS = 32
_ATTN_ROPE = os.environ.get("PAGODA_ATTN_ROPE", "1") == "1"
# Above this decode batch the separate rotary + KV-write kernel wins again: its launch is
# amortised, while the extra work in each attention program is not (H200, graph ms a step:
# Llama-3.1-8B batch 64 4.97 in-attention vs 5.00, batch 256 7.32 vs 7.25; Qwen3-0.6B
# batch 256 attention 214 vs 207 us a layer against a 3.7 us rotary kernel).
_ATTN_ROPE_MAX_BATCH = 64


@dataclass
class TritonAttentionMetadata:
    common: CommonAttentionMetadata
    decode_only: bool  # every sequence has exactly one new token
    num_sms: int
    force_splits: Optional[int] = None  # tests: exercise the split path on any batch

    def num_splits(self, num_kv_heads: int) -> int:
        if self.force_splits is not None:
            return self.force_splits
        if not self.decode_only:
            return 1
        programs = max(self.common.num_reqs * num_kv_heads, 1)
        by_occupancy = (2 * self.num_sms) // programs
        by_length = self.common.max_seq_len // _MIN_KEYS_PER_SPLIT
        splits = min(_MAX_SPLITS, by_occupancy, by_length)
        # a power of 2: the split count is a compile-time constant, and an eager run whose
        # contexts grow would otherwise compile a variant every 256 tokens, up to 31 of them
        return 1 << (splits.bit_length() - 1) if splits >= 2 else 1


class TritonBackend:
    name = "triton"

    def __init__(self, force_splits: Optional[int] = None, tile_n: Optional[int] = None):
        # Both knobs exist for tests: small key tiles exercise the online softmax across tiles.
        self.force_splits = force_splits
        self.tile_n = tile_n

    def build_metadata(self, common: CommonAttentionMetadata) -> TritonAttentionMetadata:
        device = common.query_start_loc.device
        return TritonAttentionMetadata(
            common=common,
            decode_only=common.max_query_len <= 1,
            num_sms=num_sms(device),
            force_splits=self.force_splits,
        )

    def forward(self, layer: AttentionLayerSpec, q: torch.Tensor, k: torch.Tensor,
                v: torch.Tensor, kv_cache: Optional[torch.Tensor],
                metadata: TritonAttentionMetadata,
                rotary: Optional[Rotary] = None) -> torch.Tensor:
        common = metadata.common
        fuse_rotary = rotary is not None and kv_cache is not None and _fusable(rotary, q)
        if rotary is not None and not fuse_rotary:
            q, k = rotary.apply(q, k)
        out = torch.empty_like(q)
        if q.shape[0] == 0 or common.num_reqs == 0:
            return out
        decode_rope = None
        if kv_cache is None:  # profiling run: no cache, attend over the new tokens only
            # The kernel reads k and v with one set of strides; with q/k norms k is a new
            # tensor while v is still a view of the fused qkv output.
            key, value, block_table, splits = k.contiguous(), v.contiguous(), None, 1
        else:
            # Padded tokens carry slot -1 and are skipped by the kernel, so the whole
            # (possibly CUDA-graph padded) batch is passed without slicing on the host.
            n = min(k.shape[0], common.slot_mapping.shape[0])
            if (fuse_rotary and _ATTN_ROPE and common.num_reqs <= _ATTN_ROPE_MAX_BATCH
                    and uses_decode_grid(q.shape[0], common.num_reqs, common.max_query_len)):
                # the attention kernel rotates q, and k on its way into the cache
                rope = rotary.rope
                decode_rope = DecodeRope(rotary.positions[:n], rope.cos_sin_cache,
                                         rope.is_neox_style, k[:n], v[:n],
                                         common.slot_mapping[:n], _qk_norm_weights(rotary))
            elif fuse_rotary:  # q rotated in place, k rotated on its way into the cache
                rope = rotary.rope
                rope_and_write_kv(rotary.positions[:n], q[:n], k[:n], v[:n],
                                  rope.cos_sin_cache, rope.is_neox_style, kv_cache,
                                  common.slot_mapping[:n], _qk_norm_weights(rotary))
            else:
                write_kv_cache(k[:n], v[:n], kv_cache, common.slot_mapping[:n])
            key, value, block_table = kv_cache[0], kv_cache[1], common.block_table
            splits = metadata.num_splits(layer.num_kv_heads)
        paged_attention(
            q, key, value, out,
            query_start_loc=common.query_start_loc, seq_lens=common.seq_lens,
            block_table=block_table, num_seqs=common.num_reqs,
            max_query_len=common.max_query_len, scale=layer.scale,
            sliding_window=layer.sliding_window, soft_cap=layer.logits_soft_cap,
            alibi_slopes=layer.alibi_slopes, num_splits=splits, tile_n=self.tile_n,
            decode_rope=decode_rope,
        )
        return out


def _fusable(rotary: Rotary, q: torch.Tensor) -> bool:
    """Whether the KV-cache write can apply `rotary`: always without q/k norms; with them,
    for plain RMSNorms (no weight offset) under full rotary."""
    if rotary.q_norm is None:
        return True
    from pagoda.layers.layernorm import RMSNorm
    return (all(type(norm) is RMSNorm and norm.offset == 0.0
                for norm in (rotary.q_norm, rotary.k_norm))
            and rotary.rope.cos_sin_cache.shape[-1] == q.shape[-1])


def _qk_norm_weights(rotary: Rotary) -> Optional[tuple[torch.Tensor, torch.Tensor, float]]:
    if rotary.q_norm is None:
        return None
    return rotary.q_norm.weight, rotary.k_norm.weight, rotary.q_norm.eps
