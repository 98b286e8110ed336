"""Qwen3-MoE: Qwen3's attention (per-head q/k RMSNorm) with Qwen2-MoE's layer layout and no
shared expert."""

from __future__ import annotations

from typing import Any

from pagoda.layers.moe import MoECausalLM
from pagoda.models.qwen2_moe import qwen_moe_stack
from pagoda.models.qwen3 import Qwen3ForCausalLM


class Qwen3MoeForCausalLM(MoECausalLM):
    def __init__(self, config: Any, max_position: int):
        options = Qwen3ForCausalLM.attention_options(config)
        super().__init__(config, qwen_moe_stack(config, max_position, options))
