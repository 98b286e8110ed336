"""Gemma 2: Gemma plus sandwich norms, attention-logit and final-logit soft-capping, sliding
window attention on alternate layers and a query scale from query_pre_attn_scalar."""

from __future__ import annotations

from typing import Any, Optional

from pagoda.layers.decoder import CausalLM, DecoderStack
from pagoda.layers.layernorm import RMSNorm
from pagoda.layers.sandwich_norm import SandwichNormDecoderLayer


def layer_window(config: Any, layer_idx: int) -> Optional[int]:
    """Configs name each layer's kind in `layer_types`; older ones alternate, sliding first."""
    types = getattr(config, "layer_types", None)
    sliding = (types[layer_idx] == "sliding_attention") if types else layer_idx % 2 == 0
    return getattr(config, "sliding_window", None) if sliding else None


class Gemma2ForCausalLM(CausalLM):
    def __init__(self, config: Any, max_position: int):
        bias = bool(getattr(config, "attention_bias", False))
        scale = config.query_pre_attn_scalar ** -0.5

        def layer(i: int) -> SandwichNormDecoderLayer:
            return SandwichNormDecoderLayer(
                config, i, max_position, qkv_bias=bias, o_bias=bias, scale=scale,
                logits_soft_cap=getattr(config, "attn_logit_softcapping", None),
                sliding_window=layer_window(config, i))

        model = DecoderStack(config, layer,
                             RMSNorm(config.hidden_size, config.rms_norm_eps, offset=1.0),
                             embed_scale=config.hidden_size ** 0.5)
        super().__init__(config, model)
