"""GPT-2: learned positions, LayerNorm, contiguous fused q|k|v, and Conv1D weights stored
[in, out] (transposed from nn.Linear's [out, in])."""

from __future__ import annotations

import re
from typing import Any, Iterable

import torch

from pagoda.layers.blocks_gpt import (AttnSpec, GPTBlock, GPTStack, PlainMLP, SelfAttention,
                                      layer_norm_eps)
from pagoda.layers.decoder import CausalLM
from pagoda.layers.layernorm import LayerNorm

_PREFIX = r"^(transformer\.)?"  # checkpoints saved from the bare GPT2Model lack the prefix

GPT2_SUBSTITUTIONS = (
    (_PREFIX + r"wte\.", "model.embed_tokens."),
    (_PREFIX + r"wpe\.", "model.embed_positions."),
    (_PREFIX + r"ln_f\.", "model.norm."),
    (_PREFIX + r"h\.", "model.layers."),
    (r"\.attn\.c_attn\.", ".attn.qkv_proj."),
    (r"\.attn\.c_proj\.", ".attn.o_proj."),
    (r"\.mlp\.c_fc\.", ".mlp.fc_in."),
    (r"\.mlp\.c_proj\.", ".mlp.fc_out."),
)
_CONV1D = re.compile(r"\.(c_attn|c_proj|c_fc)\.weight$")


def gpt2_attention_scale(config: Any, head_dim: int, layer_idx: int) -> float:
    scale = head_dim ** -0.5 if getattr(config, "scale_attn_weights", True) else 1.0
    if getattr(config, "scale_attn_by_inverse_layer_idx", False):
        scale /= float(layer_idx + 1)
    return scale


def build_gpt2_stack(config: Any, max_position: int, num_kv_heads: int,
                     grouped_qkv: bool) -> GPTStack:
    """GPT-2 and GPTBigCode differ only in the KV heads and the fused q/k/v layout."""
    hidden, heads = config.hidden_size, config.num_attention_heads
    head_dim, eps = hidden // heads, layer_norm_eps(config)
    inner = getattr(config, "n_inner", None) or 4 * hidden

    def layer(i: int) -> GPTBlock:
        spec = AttnSpec(hidden, heads, num_kv_heads, head_dim, grouped_qkv=grouped_qkv,
                        scale=gpt2_attention_scale(config, head_dim, i))
        return GPTBlock(SelfAttention(spec, config, i, max_position),
                        PlainMLP(hidden, inner, config.activation_function),
                        LayerNorm(hidden, eps), LayerNorm(hidden, eps))

    return GPTStack(config, layer, LayerNorm(hidden, eps),
                    num_positions=config.max_position_embeddings)


class GPT2LMHeadModel(CausalLM):
    weight_substitutions = GPT2_SUBSTITUTIONS

    def __init__(self, config: Any, max_position: int):
        heads = config.num_attention_heads
        super().__init__(config, build_gpt2_stack(config, max_position, heads, False))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        super().load_weights((name, t.t() if _CONV1D.search(name) and t.dim() == 2 else t)
                             for name, t in weights)
