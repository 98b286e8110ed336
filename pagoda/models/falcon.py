"""Falcon, old and new decoder architectures: multi-query or grouped KV heads in one fused
per-group q/k/v, rotary or ALiBi, and a parallel (or, for old configs, sequential) block."""

from __future__ import annotations

from typing import Any

from pagoda.layers.blocks_gpt import (AttnSpec, GPTBlock, GPTStack, PlainMLP, SelfAttention,
                                      layer_norm_eps)
from pagoda.layers.decoder import CausalLM
from pagoda.layers.layernorm import LayerNorm
from pagoda.models.bloom import BIGSCIENCE_SUBSTITUTIONS


class FalconForCausalLM(CausalLM):
    weight_substitutions = BIGSCIENCE_SUBSTITUTIONS

    def __init__(self, config: Any, max_position: int):
        hidden, eps = config.hidden_size, layer_norm_eps(config)
        spec = _attn_spec(config)
        wiring, two_norms = _wiring(config)
        inner = getattr(config, "ffn_hidden_size", None) or 4 * hidden

        def layer(i: int) -> GPTBlock:
            return GPTBlock(SelfAttention(spec, config, i, max_position),
                            PlainMLP(hidden, inner, getattr(config, "activation", "gelu"),
                                     bias=bool(config.bias)),
                            LayerNorm(hidden, eps),
                            LayerNorm(hidden, eps) if two_norms else None, wiring)

        super().__init__(config, GPTStack(config, layer, LayerNorm(hidden, eps)))


def _attn_spec(config: Any) -> AttnSpec:
    heads = config.num_attention_heads
    head_dim = config.hidden_size // heads
    if config.new_decoder_architecture:
        num_kv = config.num_kv_heads
    else:
        num_kv = 1 if config.multi_query else heads
    alibi = bool(config.alibi)
    # With ALiBi Falcon adds the bias before scaling the scores, so the slopes scale too.
    return AttnSpec(config.hidden_size, heads, num_kv, head_dim, qkv_bias=bool(config.bias),
                    o_bias=bool(config.bias), grouped_qkv=True,
                    rotary_dim=0 if alibi else head_dim, alibi=alibi,
                    alibi_scale=head_dim ** -0.5)


def _wiring(config: Any) -> tuple[str, bool]:
    """(wiring, whether the MLP has its own norm)."""
    if config.new_decoder_architecture:
        num_ln = getattr(config, "num_ln_in_parallel_attn", None) or 2
        return "parallel", num_ln == 2
    if config.parallel_attn:
        return "parallel", False
    return "sequential", True
