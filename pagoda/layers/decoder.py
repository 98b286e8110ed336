"""Blocks shared by the decoder-only families: rotary self-attention, gated MLP, the
pre-norm decoder layer, the layer stack and the causal-LM wrapper with its weight loading.

A family file only picks options (biases, q/k norms, activation) and names."""

from __future__ import annotations

from typing import Any, Iterable, Optional, Union

import torch
from torch import nn

from pagoda.distributed.parallel_state import get_tp_size
from pagoda.layers.activation import get_gated_act_fn
from pagoda.layers.attention import Attention
from pagoda.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from pagoda.layers.fused_decode import SquareSums, fused_forward, use_fused
from pagoda.layers.layernorm import RMSNorm
from pagoda.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from pagoda.layers.rotary import get_rope
from pagoda.model_loader.weight_utils import (LLAMA_STACKED, check_all_loaded,
                                              load_named_weights)


def head_dim_of(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def hidden_act_of(config: Any) -> str:
    """Gemma 2 names it `hidden_activation`; everyone else `hidden_act`."""
    return (getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", None)
            or "silu")


def norm_with_residual(norm: nn.Module, hidden: torch.Tensor,
                       residual: Union[torch.Tensor, SquareSums, None]
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """The first layer has no residual yet (the embedding output becomes it), nor has a layer
    after a fused one (layers/fused_decode.py: its output is the whole residual stream, and
    `residual` holds that stream's sums of squares); every other layer folds the residual add
    into its input norm."""
    if residual is None or isinstance(residual, SquareSums):
        return norm(hidden), hidden
    return norm(hidden, residual)


class RotarySelfAttention(nn.Module):
    def __init__(self, config: Any, layer_idx: int, max_position: int, qkv_bias: bool = False,
                 qk_norm: bool = False, o_bias: bool = False,
                 sliding_window: Optional[int] = None, scale: Optional[float] = None,
                 logits_soft_cap: Optional[float] = None, rotary_dim: Optional[int] = None,
                 norm_offset: float = 0.0):
        super().__init__()
        tp = get_tp_size()
        self.head_dim = head_dim_of(config)
        total_kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        self.num_heads = config.num_attention_heads // tp
        self.num_kv_heads = max(1, total_kv // tp)
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = QKVParallelLinear(config.hidden_size, self.head_dim,
                                          config.num_attention_heads, total_kv, bias=qkv_bias)
        self.o_proj = RowParallelLinear(config.num_attention_heads * self.head_dim,
                                        config.hidden_size, bias=o_bias)
        eps = getattr(config, "rms_norm_eps", 1e-6)
        self.q_norm = RMSNorm(self.head_dim, eps, norm_offset) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, eps, norm_offset) if qk_norm else None
        self.rotary_emb = get_rope(config, self.head_dim, rotary_dim=rotary_dim,
                                   max_position=max_position)
        self.attn = Attention(self.num_heads, self.head_dim,
                              scale if scale is not None else self.head_dim ** -0.5,
                              self.num_kv_heads, layer_idx, sliding_window=sliding_window,
                              logits_soft_cap=logits_soft_cap)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        return self.o_proj(self.attend(positions, self.qkv_proj(hidden)))

    def attend(self, positions: torch.Tensor, qkv: torch.Tensor) -> torch.Tensor:
        """The projected q/k/v -> the attention output, before o_proj."""
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        qk_norm = (self.q_norm, self.k_norm) if self.q_norm is not None else None
        return self.attn(q, k, v, self.rotary_emb, positions, qk_norm)


class GatedMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, act: str = "silu",
                 bias: bool = False):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(
            hidden_size, [intermediate_size, intermediate_size], bias=bias)
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, bias=bias)
        self.act_fn = get_gated_act_fn(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class PreNormDecoderLayer(nn.Module):
    """x -> norm -> attention -> (+x) -> norm -> MLP -> (+), with the residual add fused
    into the next norm."""

    def __init__(self, config: Any, layer_idx: int, max_position: int,
                 mlp: Optional[nn.Module] = None, norm_offset: float = 0.0, **attn_options):
        super().__init__()
        eps = getattr(config, "rms_norm_eps", 1e-6)
        self.input_layernorm = RMSNorm(config.hidden_size, eps, norm_offset)
        self.self_attn = RotarySelfAttention(config, layer_idx, max_position,
                                             norm_offset=norm_offset, **attn_options)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps, norm_offset)
        # MoE families pass their sparse block; everyone else gets the gated MLP.
        self.mlp = mlp if mlp is not None else GatedMLP(
            config.hidden_size, config.intermediate_size, hidden_act_of(config),
            bias=getattr(config, "mlp_bias", False))

    def forward(self, positions, hidden, residual):
        if use_fused(self, hidden):  # decode rows on the GPU: see layers/fused_decode.py
            return fused_forward(self, positions, hidden, residual)
        hidden, residual = norm_with_residual(self.input_layernorm, hidden, residual)
        hidden = self.self_attn(positions, hidden)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class DecoderStack(nn.Module):
    """`embed_scale` multiplies the embeddings (Gemma scales them by sqrt(hidden_size))."""

    def __init__(self, config: Any, make_layer, final_norm: nn.Module,
                 embed_scale: Optional[float] = None):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(make_layer(i) for i in range(config.num_hidden_layers))
        self.norm = final_norm
        self.embed_scale = embed_scale

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden, residual = self.embed_tokens(input_ids), None
        if self.embed_scale is not None:
            # Gemma rounds the scale to the activation dtype before multiplying.
            hidden = hidden * torch.tensor(self.embed_scale, dtype=hidden.dtype)
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual)
        hidden, _ = norm_with_residual(self.norm, hidden, residual)
        return hidden


class CausalLM(nn.Module):
    """`model` (a DecoderStack-like module) plus the LM head, and HF-name weight loading."""

    stacked_params_mapping = LLAMA_STACKED
    skip_prefixes: tuple[str, ...] = ()
    # (regex, replacement) from checkpoint names to ours, for families named unlike Llama.
    weight_substitutions: tuple[tuple[str, str], ...] = ()

    def __init__(self, config: Any, model: nn.Module, lm_head: Optional[nn.Module] = None):
        super().__init__()
        self.config = config
        self.model = model
        self.lm_head = lm_head or ParallelLMHead(
            config.vocab_size, config.hidden_size,
            soft_cap=getattr(config, "final_logit_softcapping", None))
        self.tied = bool(getattr(config, "tie_word_embeddings", False))
        if self.tied:
            self.lm_head.tie_to(self.model.embed_tokens)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head.compute_logits(hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        skip = self.skip_prefixes + (("lm_head.",) if self.tied else ())
        loaded = load_named_weights(self, weights, self.stacked_params_mapping, skip,
                                    substitutions=self.weight_substitutions)
        if self.tied:
            loaded.add("lm_head.weight")
        check_all_loaded(self, loaded, type(self).__name__)
