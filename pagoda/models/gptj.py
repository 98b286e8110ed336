"""GPT-J: interleaved (GPT-J style) partial rotary, one LayerNorm feeding attention and MLP
in parallel, separate unbiased q/k/v, and an LM head with a bias."""

from __future__ import annotations

from typing import Any

from pagoda.layers.blocks_gpt import (AttnSpec, GPTBlock, GPTStack, PlainMLP, SelfAttention,
                                      layer_norm_eps)
from pagoda.layers.decoder import CausalLM
from pagoda.layers.embedding import ParallelLMHead
from pagoda.layers.layernorm import LayerNorm


class GPTJForCausalLM(CausalLM):
    weight_substitutions = (
        (r"^transformer\.wte\.", "model.embed_tokens."),
        (r"^transformer\.ln_f\.", "model.norm."),
        (r"^transformer\.h\.", "model.layers."),
        (r"\.attn\.out_proj\.", ".attn.o_proj."),
    )

    def __init__(self, config: Any, max_position: int):
        hidden, heads = config.hidden_size, config.num_attention_heads
        head_dim, eps = hidden // heads, layer_norm_eps(config)
        spec = AttnSpec(hidden, heads, heads, head_dim, qkv_bias=False, o_bias=False,
                        rotary_dim=getattr(config, "rotary_dim", None) or head_dim,
                        neox_style=False)
        inner = getattr(config, "n_inner", None) or 4 * hidden

        def layer(i: int) -> GPTBlock:
            return GPTBlock(SelfAttention(spec, config, i, max_position),
                            PlainMLP(hidden, inner, config.activation_function),
                            LayerNorm(hidden, eps), None, "parallel")

        super().__init__(config, GPTStack(config, layer, LayerNorm(hidden, eps)),
                         ParallelLMHead(config.vocab_size, hidden, bias=True))
