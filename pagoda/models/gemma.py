"""Gemma: Llama's shape with (1 + weight) RMSNorms, embeddings scaled by sqrt(hidden_size),
a GeLU-gated MLP and tied embeddings."""

from __future__ import annotations

from typing import Any

from pagoda.layers.decoder import CausalLM, DecoderStack, PreNormDecoderLayer
from pagoda.layers.layernorm import RMSNorm


class GemmaForCausalLM(CausalLM):
    def __init__(self, config: Any, max_position: int):
        bias = bool(getattr(config, "attention_bias", False))
        model = DecoderStack(
            config, lambda i: PreNormDecoderLayer(config, i, max_position, norm_offset=1.0,
                                                  qkv_bias=bias, o_bias=bias),
            RMSNorm(config.hidden_size, config.rms_norm_eps, offset=1.0),
            embed_scale=config.hidden_size ** 0.5)
        super().__init__(config, model)
