"""Qwen2: Llama's shape with biases on the q/k/v projections."""

from __future__ import annotations

from typing import Any

from pagoda.models.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    @staticmethod
    def attention_options(config: Any) -> dict:
        window = None
        if getattr(config, "use_sliding_window", False):
            window = getattr(config, "sliding_window", None)
        return {"qkv_bias": True, "sliding_window": window}
