"""BLOOM: ALiBi instead of positions, a LayerNorm right after the embedding, and a fused
per-head q/k/v ([H, 3, D])."""

from __future__ import annotations

from typing import Any

from pagoda.layers.blocks_gpt import (AttnSpec, GPTBlock, GPTStack, PlainMLP, SelfAttention,
                                      layer_norm_eps)
from pagoda.layers.decoder import CausalLM
from pagoda.layers.layernorm import LayerNorm

_PREFIX = r"^(transformer\.)?"  # bigscience checkpoints are saved without the prefix


# BLOOM's checkpoint names, which Falcon kept (Falcon's new layout adds ln_attn / ln_mlp).
BIGSCIENCE_SUBSTITUTIONS = (
    (_PREFIX + r"word_embeddings\.", "model.embed_tokens."),
    (_PREFIX + r"ln_f\.", "model.norm."),
    (_PREFIX + r"h\.", "model.layers."),
    (r"\.(input_layernorm|ln_attn)\.", ".ln_1."),
    (r"\.(post_attention_layernorm|ln_mlp)\.", ".ln_2."),
    (r"\.self_attention\.query_key_value\.", ".attn.qkv_proj."),
    (r"\.self_attention\.dense\.", ".attn.o_proj."),
    (r"\.mlp\.dense_h_to_4h\.", ".mlp.fc_in."),
    (r"\.mlp\.dense_4h_to_h\.", ".mlp.fc_out."),
)


class BloomForCausalLM(CausalLM):
    weight_substitutions = (
        (_PREFIX + r"word_embeddings_layernorm\.", "model.embed_norm."),
        *BIGSCIENCE_SUBSTITUTIONS,
    )

    def __init__(self, config: Any, max_position: int):
        if getattr(config, "apply_residual_connection_post_layernorm", False):
            raise ValueError("BLOOM with apply_residual_connection_post_layernorm=True is "
                             "not supported")
        hidden, heads = config.hidden_size, config.num_attention_heads
        eps = layer_norm_eps(config)
        spec = AttnSpec(hidden, heads, heads, hidden // heads, grouped_qkv=True, alibi=True)

        def layer(i: int) -> GPTBlock:
            # BLOOM's gelu is the tanh approximation.
            return GPTBlock(SelfAttention(spec, config, i, max_position),
                            PlainMLP(hidden, 4 * hidden, "gelu_pytorch_tanh"),
                            LayerNorm(hidden, eps), LayerNorm(hidden, eps))

        super().__init__(config, GPTStack(config, layer, LayerNorm(hidden, eps),
                                          embed_norm=LayerNorm(hidden, eps)))
