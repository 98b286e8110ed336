"""Blocks for the GPT-2 era families (GPT-2, GPT-J, GPT-NeoX, OPT, Bloom, Falcon, GPTBigCode,
Phi): LayerNorm, biased projections, a plain (ungated) MLP, fused q/k/v checkpoints in several
layouts, rotary / ALiBi / learned positions, and residual wiring that is sequential, parallel
or post-norm. A family file only fills in an `AttnSpec`, picks a wiring and maps names."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn

from pagoda.distributed.parallel_state import get_tp_rank, get_tp_size
from pagoda.layers.activation import get_act_fn
from pagoda.layers.attention import Attention
from pagoda.layers.embedding import VocabParallelEmbedding
from pagoda.layers.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from pagoda.layers.rotary import get_rope, rope_parameters


@dataclass
class AttnSpec:
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    qkv_bias: bool = True
    o_bias: bool = True
    grouped_qkv: bool = False  # fused checkpoint laid out per KV group (see GroupedQKVLinear)
    rotary_dim: int = 0  # 0: no rotary embedding
    neox_style: bool = True  # False: GPT-J's interleaved pairs
    alibi: bool = False
    alibi_scale: float = 1.0  # Falcon adds the bias before scaling the scores
    scale: Optional[float] = None  # default head_dim ** -0.5


def partial_rotary_dim(config: Any, head_dim: int) -> int:
    """Rotated dims per head: `partial_rotary_factor` (new configs) or `rotary_pct` (old)."""
    factor = rope_parameters(config).get("partial_rotary_factor")
    if factor is None:
        factor = getattr(config, "partial_rotary_factor", None) or getattr(
            config, "rotary_pct", 1.0)
    return int(head_dim * factor)


def layer_norm_eps(config: Any) -> float:
    for key in ("layer_norm_eps", "layer_norm_epsilon"):
        value = getattr(config, key, None)
        if value is not None:
            return float(value)
    return 1e-5


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """The ALiBi paper's geometric slopes, with the interleaved extra heads when num_heads is
    not a power of two (as Bloom and Falcon compute them)."""
    closest = 2 ** math.floor(math.log2(num_heads))
    base = 2.0 ** (-(2.0 ** -(math.log2(closest) - 3)))
    slopes = [base ** i for i in range(1, closest + 1)]
    if closest != num_heads:
        extra = 2.0 ** (-(2.0 ** -(math.log2(2 * closest) - 3)))
        slopes += [extra ** i for i in range(1, 1 + 2 * (num_heads - closest), 2)]
    return torch.tensor(slopes, dtype=torch.float32)


class GroupedQKVLinear(QKVParallelLinear):
    """A fused q/k/v checkpoint laid out per KV group: for each of the Hkv groups its `group`
    query heads, then its key head, then its value head ([Hkv, group + 2, D]). GPT-NeoX, Bloom
    and old Falcon (group 1, [H, 3, D]), multi-query Falcon / GPTBigCode (Hkv 1: q | k | v) and
    new Falcon are all this layout. Reordered to q | k | v once, at load."""

    def weight_loader(self, param, loaded, shard_id=None):
        if shard_id is None:
            loaded = self._to_qkv(loaded)
        super().weight_loader(param, loaded, shard_id)

    def _to_qkv(self, tensor: torch.Tensor) -> torch.Tensor:
        q_total, kv_total, _ = self.total_sizes
        if tensor.shape[0] != q_total + 2 * kv_total:
            raise ValueError(f"fused q/k/v tensor has {tensor.shape[0]} rows; expected "
                             f"{q_total + 2 * kv_total}")
        num_kv, group = kv_total // self.head_dim, q_total // kv_total
        rest = tensor.shape[1:]
        grouped = tensor.reshape(num_kv, group + 2, self.head_dim, *rest)
        parts = (grouped[:, :group], grouped[:, group], grouped[:, group + 1])
        return torch.cat([p.reshape(-1, *rest) for p in parts])


class SelfAttention(nn.Module):
    """q/k/v projection, optional rotary embedding or ALiBi, paged attention, output
    projection."""

    def __init__(self, spec: AttnSpec, config: Any, layer_idx: int, max_position: int):
        super().__init__()
        tp = get_tp_size()
        self.head_dim = spec.head_dim
        self.num_heads = spec.num_heads // tp
        self.num_kv_heads = max(1, spec.num_kv_heads // tp)
        self.q_size = self.num_heads * spec.head_dim
        self.kv_size = self.num_kv_heads * spec.head_dim
        qkv_cls = GroupedQKVLinear if spec.grouped_qkv else QKVParallelLinear
        self.qkv_proj = qkv_cls(spec.hidden_size, spec.head_dim, spec.num_heads,
                                spec.num_kv_heads, bias=spec.qkv_bias)
        self.o_proj = RowParallelLinear(spec.num_heads * spec.head_dim, spec.hidden_size,
                                        bias=spec.o_bias)
        self.rotary_emb = None
        if spec.rotary_dim:
            self.rotary_emb = get_rope(config, spec.head_dim, spec.rotary_dim, max_position,
                                       spec.neox_style)
        slopes = None
        if spec.alibi:
            rank = get_tp_rank()
            slopes = alibi_slopes(spec.num_heads)[rank * self.num_heads:
                                                  (rank + 1) * self.num_heads]
            slopes = slopes * spec.alibi_scale
        scale = spec.scale if spec.scale is not None else spec.head_dim ** -0.5
        self.attn = Attention(self.num_heads, spec.head_dim, scale, self.num_kv_heads,
                              layer_idx, alibi_slopes=slopes)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv_proj(hidden).split([self.q_size, self.kv_size, self.kv_size], -1)
        return self.o_proj(self.attn(q, k, v, self.rotary_emb, positions))


class PlainMLP(nn.Module):
    """fc_in -> activation -> fc_out (no gate)."""

    def __init__(self, hidden_size: int, intermediate_size: int, act: str, bias: bool = True):
        super().__init__()
        self.fc_in = ColumnParallelLinear(hidden_size, intermediate_size, bias=bias)
        self.act = get_act_fn(act)
        self.fc_out = RowParallelLinear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(self.act(self.fc_in(x)))


WIRINGS = ("sequential", "parallel", "post")


class GPTBlock(nn.Module):
    """One layer, residual wired one of three ways:
    sequential (pre-norm):  h = x + attn(ln_1 x);  out = h + mlp(ln_2 h)
    parallel (GPT-J, NeoX): out = x + attn(ln_1 x) + mlp(ln_2 x), ln_2 None = reuse ln_1 x
    post (OPT-350m):        h = ln_1(x + attn x);  out = ln_2(h + mlp h)"""

    def __init__(self, attn: nn.Module, mlp: nn.Module, ln_1: nn.Module,
                 ln_2: Optional[nn.Module], wiring: str = "sequential"):
        super().__init__()
        if wiring not in WIRINGS:
            raise ValueError(f"unknown residual wiring {wiring!r}")
        self.attn, self.mlp, self.ln_1, self.ln_2, self.wiring = attn, mlp, ln_1, ln_2, wiring

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.wiring == "post":
            h = self.ln_1(x + self.attn(positions, x))
            return self.ln_2(h + self.mlp(h))
        normed = self.ln_1(x)
        attn_out = self.attn(positions, normed)
        if self.wiring == "parallel":
            mlp_in = self.ln_2(x) if self.ln_2 is not None else normed
            return x + attn_out + self.mlp(mlp_in)
        h = x + attn_out
        return h + self.mlp(self.ln_2(h))


class GPTStack(nn.Module):
    """Embeddings (plus learned positions, an embedding norm, or OPT's project_in/out), the
    layers, the final norm. `position_offset` is OPT's 2."""

    def __init__(self, config: Any, make_layer: Callable[[int], nn.Module],
                 final_norm: Optional[nn.Module], embed_dim: Optional[int] = None,
                 num_positions: int = 0, position_offset: int = 0,
                 embed_norm: Optional[nn.Module] = None):
        super().__init__()
        hidden = config.hidden_size
        embed_dim = embed_dim or hidden
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, embed_dim)
        self.project_in = self.project_out = None
        if embed_dim != hidden:
            self.project_in = ColumnParallelLinear(embed_dim, hidden, gather_output=True)
            self.project_out = ColumnParallelLinear(hidden, embed_dim, gather_output=True)
        self.embed_positions = None
        if num_positions:
            self.embed_positions = VocabParallelEmbedding(num_positions + position_offset,
                                                          hidden)
        self.position_offset = position_offset
        self.embed_norm = embed_norm
        self.layers = nn.ModuleList(make_layer(i) for i in range(config.num_hidden_layers))
        self.norm = final_norm

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        if self.project_in is not None:
            hidden = self.project_in(hidden)
        if self.embed_positions is not None:
            hidden = hidden + self.embed_positions(positions + self.position_offset)
        if self.embed_norm is not None:
            hidden = self.embed_norm(hidden)
        for layer in self.layers:
            hidden = layer(positions, hidden)
        if self.norm is not None:
            hidden = self.norm(hidden)
        if self.project_out is not None:
            hidden = self.project_out(hidden)
        return hidden
