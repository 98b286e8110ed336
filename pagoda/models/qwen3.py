"""Qwen3: Llama's shape with RMSNorm on each head of q and k before the rotary embedding."""

from __future__ import annotations

from typing import Any

from pagoda.models.llama import LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    @staticmethod
    def attention_options(config: Any) -> dict:
        return {"qkv_bias": bool(getattr(config, "attention_bias", False)), "qk_norm": True}
