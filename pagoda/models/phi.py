"""Phi-1/1.5/2: partial rotary, one LayerNorm feeding attention and MLP in parallel, biased
projections and an LM head with a bias."""

from __future__ import annotations

from typing import Any

from pagoda.layers.blocks_gpt import (AttnSpec, GPTBlock, GPTStack, PlainMLP, SelfAttention,
                                      layer_norm_eps, partial_rotary_dim)
from pagoda.layers.decoder import CausalLM
from pagoda.layers.embedding import ParallelLMHead
from pagoda.layers.layernorm import LayerNorm


class PhiForCausalLM(CausalLM):
    weight_substitutions = (
        (r"^model\.final_layernorm\.", "model.norm."),
        (r"\.input_layernorm\.", ".ln_1."),
        (r"\.self_attn\.dense\.", ".attn.o_proj."),
        (r"\.self_attn\.", ".attn."),
        (r"\.mlp\.fc1\.", ".mlp.fc_in."),
        (r"\.mlp\.fc2\.", ".mlp.fc_out."),
    )

    def __init__(self, config: Any, max_position: int):
        if getattr(config, "qk_layernorm", False):
            raise ValueError("Phi with qk_layernorm=True is not supported")
        hidden, heads = config.hidden_size, config.num_attention_heads
        head_dim, eps = hidden // heads, layer_norm_eps(config)
        spec = AttnSpec(hidden, heads, getattr(config, "num_key_value_heads", None) or heads,
                        head_dim, rotary_dim=partial_rotary_dim(config, head_dim))

        def layer(i: int) -> GPTBlock:
            return GPTBlock(SelfAttention(spec, config, i, max_position),
                            PlainMLP(hidden, config.intermediate_size, config.hidden_act),
                            LayerNorm(hidden, eps), None, "parallel")

        super().__init__(config, GPTStack(config, layer, LayerNorm(hidden, eps)),
                         ParallelLMHead(config.vocab_size, hidden, bias=True))
