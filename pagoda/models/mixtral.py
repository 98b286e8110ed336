"""Mixtral: Mistral's attention with a sparse MoE block (top-k of 8 experts, renormalised)
in place of the MLP."""

from __future__ import annotations

from typing import Any

from pagoda.layers.decoder import DecoderStack, PreNormDecoderLayer
from pagoda.layers.layernorm import RMSNorm
from pagoda.layers.moe import MoECausalLM, SparseMoeBlock


class MixtralForCausalLM(MoECausalLM):
    weight_substitutions = ((r"\.block_sparse_moe\.", ".mlp."),)

    def __init__(self, config: Any, max_position: int):
        def layer(i: int) -> PreNormDecoderLayer:
            moe = SparseMoeBlock(config.hidden_size, config.intermediate_size,
                                 config.num_local_experts, config.num_experts_per_tok,
                                 renormalize=True, act=config.hidden_act)
            return PreNormDecoderLayer(config, i, max_position, mlp=moe,
                                       sliding_window=getattr(config, "sliding_window", None))

        model = DecoderStack(config, layer, RMSNorm(config.hidden_size, config.rms_norm_eps))
        super().__init__(config, model)
