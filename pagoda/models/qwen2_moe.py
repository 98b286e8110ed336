"""Qwen2-MoE: Qwen2's attention; sparse MoE blocks (with a sigmoid-gated shared expert) on
every `decoder_sparse_step`-th layer not listed in `mlp_only_layers`, dense MLPs elsewhere."""

from __future__ import annotations

from typing import Any, Optional

from pagoda.layers.decoder import DecoderStack, PreNormDecoderLayer
from pagoda.layers.layernorm import RMSNorm
from pagoda.layers.moe import MoECausalLM, SparseMoeBlock
from pagoda.models.qwen2 import Qwen2ForCausalLM


def qwen_moe_block(config: Any, layer_idx: int) -> Optional[SparseMoeBlock]:
    """The layer's MoE block, or None where the config wants the dense MLP."""
    step = getattr(config, "decoder_sparse_step", 1) or 1
    sparse = (layer_idx not in (getattr(config, "mlp_only_layers", None) or [])
              and config.num_experts > 0 and (layer_idx + 1) % step == 0)
    if not sparse:
        return None
    return SparseMoeBlock(config.hidden_size, config.moe_intermediate_size, config.num_experts,
                          config.num_experts_per_tok,
                          renormalize=bool(getattr(config, "norm_topk_prob", False)),
                          act=config.hidden_act,
                          shared_intermediate_size=getattr(
                              config, "shared_expert_intermediate_size", 0) or 0)


def qwen_moe_stack(config: Any, max_position: int, attn_options: dict) -> DecoderStack:
    return DecoderStack(
        config, lambda i: PreNormDecoderLayer(config, i, max_position,
                                              mlp=qwen_moe_block(config, i), **attn_options),
        RMSNorm(config.hidden_size, config.rms_norm_eps))


class Qwen2MoeForCausalLM(MoECausalLM):
    def __init__(self, config: Any, max_position: int):
        options = Qwen2ForCausalLM.attention_options(config)
        options["qkv_bias"] = bool(getattr(config, "qkv_bias", True))
        super().__init__(config, qwen_moe_stack(config, max_position, options))
