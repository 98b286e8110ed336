"""Phi-3: Llama's shape with q/k/v and gate/up already fused in the checkpoint (the fused
linear layers take them whole), optional partial rotary and sliding window."""

from __future__ import annotations

from typing import Any

from pagoda.layers.blocks_gpt import partial_rotary_dim
from pagoda.layers.decoder import head_dim_of
from pagoda.models.llama import LlamaForCausalLM


class Phi3ForCausalLM(LlamaForCausalLM):
    @staticmethod
    def attention_options(config: Any) -> dict:
        return {"sliding_window": getattr(config, "sliding_window", None),
                "rotary_dim": partial_rotary_dim(config, head_dim_of(config))}
