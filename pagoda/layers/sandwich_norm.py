"""The Gemma 2 decoder layer: RMSNorm both before and after the attention and the MLP
("sandwich" norms), with the residual add fused into the pre-norms as in PreNormDecoderLayer."""

from __future__ import annotations

from typing import Any

from torch import nn

from pagoda.layers.decoder import (GatedMLP, RotarySelfAttention, hidden_act_of,
                                   norm_with_residual)
from pagoda.layers.layernorm import RMSNorm


class SandwichNormDecoderLayer(nn.Module):
    def __init__(self, config: Any, layer_idx: int, max_position: int,
                 norm_offset: float = 1.0, **attn_options):
        super().__init__()
        hidden, eps = config.hidden_size, getattr(config, "rms_norm_eps", 1e-6)
        self.input_layernorm = RMSNorm(hidden, eps, norm_offset)
        self.post_attention_layernorm = RMSNorm(hidden, eps, norm_offset)
        self.pre_feedforward_layernorm = RMSNorm(hidden, eps, norm_offset)
        self.post_feedforward_layernorm = RMSNorm(hidden, eps, norm_offset)
        self.self_attn = RotarySelfAttention(config, layer_idx, max_position,
                                             norm_offset=norm_offset, **attn_options)
        self.mlp = GatedMLP(hidden, config.intermediate_size, hidden_act_of(config))

    def forward(self, positions, hidden, residual):
        hidden, residual = norm_with_residual(self.input_layernorm, hidden, residual)
        hidden = self.post_attention_layernorm(self.self_attn(positions, hidden))
        hidden, residual = self.pre_feedforward_layernorm(hidden, residual)
        return self.post_feedforward_layernorm(self.mlp(hidden)), residual
