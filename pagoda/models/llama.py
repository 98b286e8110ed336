"""Llama 2/3/3.1 (and Mistral): pre-norm decoder with rotary attention and a gated MLP."""

from __future__ import annotations

from typing import Any

from pagoda.layers.decoder import CausalLM, DecoderStack, PreNormDecoderLayer
from pagoda.layers.layernorm import RMSNorm


class LlamaForCausalLM(CausalLM):
    def __init__(self, config: Any, max_position: int):
        options = self.attention_options(config)
        model = DecoderStack(
            config, lambda i: PreNormDecoderLayer(config, i, max_position, **options),
            RMSNorm(config.hidden_size, getattr(config, "rms_norm_eps", 1e-6)))
        super().__init__(config, model)

    @staticmethod
    def attention_options(config: Any) -> dict:
        bias = bool(getattr(config, "attention_bias", False))
        return {"qkv_bias": bias, "o_bias": bias}


class MistralForCausalLM(LlamaForCausalLM):
    @staticmethod
    def attention_options(config: Any) -> dict:
        return {"sliding_window": getattr(config, "sliding_window", None)}
