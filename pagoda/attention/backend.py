"""The narrow attention contract.

The model runner fills `CommonAttentionMetadata` once per step; the backend turns it into its
own metadata (`build_metadata`) and then, for every layer, `forward(layer, q, k, v, kv_cache,
metadata)` writes the new k/v into the paged cache through the slot mapping and attends
causally over the cached and new tokens of each sequence.

KV cache layout, per layer: [2, num_blocks, block_size, num_kv_heads, head_dim].
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Optional, Protocol

import torch


@dataclass
class CommonAttentionMetadata:
    num_reqs: int
    num_actual_tokens: int
    max_query_len: int
    max_seq_len: int
    query_start_loc: torch.Tensor  # int32 [num_reqs + 1], on the device
    seq_lens: torch.Tensor  # int32 [num_reqs]: cached + new tokens per sequence
    block_table: torch.Tensor  # int32 [num_reqs, max_blocks_per_seq]
    slot_mapping: torch.Tensor  # int64 [num_tokens]: cache slot of each new token
    query_start_loc_cpu: torch.Tensor  # host copies, so no backend needs a device sync
    seq_lens_cpu: torch.Tensor


class AttentionLayerSpec(Protocol):
    """What a backend may read from the calling layer."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    scale: float
    sliding_window: Optional[int]  # attend to at most this many most recent tokens
    logits_soft_cap: Optional[float]
    alibi_slopes: Optional[torch.Tensor]  # [num_heads], float32


@dataclass
class Rotary:
    """What a backend applies to q and k before anything else: each head's RMSNorm on q and
    on k where the model has them (Qwen3), then the rotary embedding at `positions`. A
    backend may fuse all of it into its KV-cache write."""
    rope: Any  # a RotaryEmbedding
    positions: torch.Tensor
    q_norm: Optional[Any] = None  # RMSNorm over head_dim (with k_norm, or neither)
    k_norm: Optional[Any] = None

    def apply(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The unfused form: new q and k where there are norms, else rotated in place."""
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return self.rope(self.positions, q, k)


class AttentionBackend(Protocol):
    name: str

    def build_metadata(self, common: CommonAttentionMetadata) -> Any: ...

    def forward(self, layer: AttentionLayerSpec, q: torch.Tensor, k: torch.Tensor,
                v: torch.Tensor, kv_cache: Optional[torch.Tensor], metadata: Any,
                rotary: Optional[Rotary] = None) -> torch.Tensor:
        """q [T, H, D], k/v [T, Hkv, D]. rotary: applied to q and k before anything else (a
        backend may fuse it with the KV-cache write)."""


_BACKENDS = {
    "torch_ref": "pagoda.attention.backends.torch_ref:TorchRefBackend",
    "triton": "pagoda.attention.backends.triton:TritonBackend",
}


def get_attention_backend(name: str) -> AttentionBackend:
    if name not in _BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; known: {', '.join(_BACKENDS)}")
    module_name, cls_name = _BACKENDS[name].split(":")
    return getattr(importlib.import_module(module_name), cls_name)()
