"""GPT-NeoX (Pythia): partial neox-style rotary, a fused per-head q/k/v, LayerNorm and,
by default, the parallel residual."""

from __future__ import annotations

from typing import Any

from pagoda.layers.blocks_gpt import (AttnSpec, GPTBlock, GPTStack, PlainMLP, SelfAttention,
                                      layer_norm_eps, partial_rotary_dim)
from pagoda.layers.decoder import CausalLM
from pagoda.layers.layernorm import LayerNorm


class GPTNeoXForCausalLM(CausalLM):
    weight_substitutions = (
        (r"^gpt_neox\.embed_in\.", "model.embed_tokens."),
        (r"^gpt_neox\.final_layer_norm\.", "model.norm."),
        (r"^gpt_neox\.", "model."),
        (r"^embed_out\.", "lm_head."),
        (r"\.input_layernorm\.", ".ln_1."),
        (r"\.post_attention_layernorm\.", ".ln_2."),
        (r"\.attention\.query_key_value\.", ".attn.qkv_proj."),
        (r"\.attention\.dense\.", ".attn.o_proj."),
        # Old checkpoints carry causal-mask buffers; renamed so the loader skips them.
        (r"\.attention\.(masked_)?bias$", r".attn.\1bias"),
        (r"\.mlp\.dense_h_to_4h\.", ".mlp.fc_in."),
        (r"\.mlp\.dense_4h_to_h\.", ".mlp.fc_out."),
    )

    def __init__(self, config: Any, max_position: int):
        hidden, heads = config.hidden_size, config.num_attention_heads
        head_dim = hidden // heads
        bias = bool(getattr(config, "attention_bias", True))
        spec = AttnSpec(hidden, heads, heads, head_dim, qkv_bias=bias, o_bias=bias,
                        grouped_qkv=True, rotary_dim=partial_rotary_dim(config, head_dim))
        eps = layer_norm_eps(config)
        wiring = "parallel" if getattr(config, "use_parallel_residual", True) else "sequential"

        def layer(i: int) -> GPTBlock:
            return GPTBlock(SelfAttention(spec, config, i, max_position),
                            PlainMLP(hidden, config.intermediate_size, config.hidden_act),
                            LayerNorm(hidden, eps), LayerNorm(hidden, eps), wiring)

        super().__init__(config, GPTStack(config, layer, LayerNorm(hidden, eps)))
