"""OPT: learned positions offset by 2, optional project_in/out around a narrower embedding
(OPT-350m), and pre-norm or (do_layer_norm_before=False) post-norm layers."""

from __future__ import annotations

from typing import Any

from pagoda.layers.blocks_gpt import AttnSpec, GPTBlock, GPTStack, PlainMLP, SelfAttention
from pagoda.layers.decoder import CausalLM
from pagoda.layers.embedding import ParallelLMHead
from pagoda.layers.layernorm import LayerNorm


class OPTForCausalLM(CausalLM):
    weight_substitutions = (
        # Checkpoints of the bare OPTModel start at "decoder."; each layer has its own
        # final_layer_norm (the one after the MLP), distinct from the stack's.
        (r"^(model\.)?decoder\.layers\.(\d+)\.final_layer_norm\.", r"model.layers.\2.ln_2."),
        (r"^(model\.)?decoder\.final_layer_norm\.", "model.norm."),
        (r"^(model\.)?decoder\.", "model."),
        (r"\.self_attn_layer_norm\.", ".ln_1."),
        (r"\.self_attn\.out_proj\.", ".attn.o_proj."),
        (r"\.self_attn\.", ".attn."),
        (r"\.fc1\.", ".mlp.fc_in."),
        (r"\.fc2\.", ".mlp.fc_out."),
    )

    def __init__(self, config: Any, max_position: int):
        if not getattr(config, "layer_norm_elementwise_affine", True):
            raise ValueError("OPT with layer_norm_elementwise_affine=False is not supported")
        hidden, heads = config.hidden_size, config.num_attention_heads
        bias = bool(getattr(config, "enable_bias", True))
        spec = AttnSpec(hidden, heads, heads, hidden // heads, qkv_bias=bias, o_bias=bias)
        pre_norm = bool(config.do_layer_norm_before)

        def layer(i: int) -> GPTBlock:
            return GPTBlock(SelfAttention(spec, config, i, max_position),
                            PlainMLP(hidden, config.ffn_dim, config.activation_function, bias),
                            LayerNorm(hidden), LayerNorm(hidden),
                            "sequential" if pre_norm else "post")

        keep_final = pre_norm and not getattr(config, "_remove_final_layer_norm", False)
        embed_dim = getattr(config, "word_embed_proj_dim", None) or hidden
        stack = GPTStack(config, layer, LayerNorm(hidden) if keep_final else None,
                         embed_dim=embed_dim, num_positions=config.max_position_embeddings,
                         position_offset=2)
        super().__init__(config, stack, ParallelLMHead(config.vocab_size, embed_dim))
