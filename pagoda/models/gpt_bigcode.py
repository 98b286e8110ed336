"""GPTBigCode (StarCoder, SantaCoder): GPT-2's layout with nn.Linear weights and, usually,
multi-query attention (one KV head)."""

from __future__ import annotations

from typing import Any

from pagoda.layers.decoder import CausalLM
from pagoda.models.gpt2 import GPT2_SUBSTITUTIONS, build_gpt2_stack


class GPTBigCodeForCausalLM(CausalLM):
    weight_substitutions = GPT2_SUBSTITUTIONS

    def __init__(self, config: Any, max_position: int):
        # Multi-query: q | k | v contiguous; otherwise per head [H, 3, D]. Both are the
        # grouped layout (one group of H heads, or H groups of one).
        num_kv = 1 if getattr(config, "multi_query", True) else config.num_attention_heads
        super().__init__(config, build_gpt2_stack(config, max_position, num_kv, True))
