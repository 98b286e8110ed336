"""Rotary position embedding with a precomputed cos/sin cache.

The inverse frequencies come from transformers' own `ROPE_INIT_FUNCTIONS` (llama3, linear,
dynamic, yarn, longrope), so scaling variants match the reference implementation exactly."""

from __future__ import annotations

import json
from typing import Any, Optional

import torch
from torch import nn

from pagoda import platform


def rope_parameters(config: Any) -> dict:
    """The rope settings whatever the transformers version calls them."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    scaling = getattr(config, "rope_scaling", None) or {}
    params = {**scaling, **params}
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    # Phi-3 checkpoints keep it at the top level of config.json beside rope_scaling;
    # transformers 5.x copies it into rope_parameters, 4.x leaves it out.
    original = getattr(config, "original_max_position_embeddings", None)
    if original is not None:
        params.setdefault("original_max_position_embeddings", original)
    params["rope_type"] = params.get("rope_type", params.get("type", "default"))
    return params


def _inv_freq(config: Any, rotary_dim: int, max_model_len: int) -> tuple[torch.Tensor, float]:
    params = rope_parameters(config)
    rope_type = params["rope_type"]
    base = params["rope_theta"]
    default = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim))
    original = params.get("original_max_position_embeddings",
                          getattr(config, "max_position_embeddings", max_model_len))
    if rope_type == "default" or (rope_type == "dynamic" and max_model_len <= original):
        # transformers' dynamic NTK equals the default until a sequence outgrows the original
        # length; beyond it we fix the scaling at max_model_len (as vLLM does).
        return default, 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"rope scaling type {rope_type!r} is not supported")
    kwargs = {"seq_len": max_model_len} if rope_type == "dynamic" else {}
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, None, **kwargs)
    return inv_freq.float(), float(scaling)


def longrope_original_len(config: Any, max_model_len: int) -> Optional[int]:
    """For longrope, when sequences can outgrow it: the original context length. Past it
    transformers switches a sequence to the long factors and recomputes its whole KV cache
    with them (Phi3ForCausalLM.prepare_inputs_for_generation); the scheduler does the same
    (Scheduler._restart_for_long_rope)."""
    params = rope_parameters(config)
    original = params.get("original_max_position_embeddings")
    if params["rope_type"] != "longrope" or original is None or max_model_len <= original:
        return None
    return int(original)


def _cos_sin(inv_freq: torch.Tensor, scaling: float, num_positions: int) -> torch.Tensor:
    freqs = torch.outer(torch.arange(num_positions, dtype=torch.float32), inv_freq)
    return torch.cat([freqs.cos() * scaling, freqs.sin() * scaling], dim=-1)


class RotaryEmbedding(nn.Module):
    def __init__(self, config: Any, head_dim: int, rotary_dim: Optional[int] = None,
                 max_position: int = 2048, is_neox_style: bool = True,
                 inv_freq: Optional[torch.Tensor] = None):
        super().__init__()
        self.head_dim = head_dim
        self.rotary_dim = rotary_dim or head_dim
        self.is_neox_style = is_neox_style
        scaling = 1.0
        # longrope: rows [0, original) hold the short factors; row original + p holds the
        # long ones for position p. The runner adds `long_offset` to the positions of a
        # request longer than `original` (worker/model_runner.py rope_index).
        self.long_offset: Optional[int] = None
        if inv_freq is None:
            inv_freq, scaling = _inv_freq(config, self.rotary_dim, max_position)
            self.long_offset = longrope_original_len(config, max_position)
        cache = _cos_sin(inv_freq, scaling, max_position)
        if self.long_offset is not None:
            from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
            long_inv_freq, _ = ROPE_INIT_FUNCTIONS["longrope"](config, None,
                                                               seq_len=self.long_offset + 1)
            cache = torch.cat([cache[:self.long_offset],
                               _cos_sin(long_inv_freq.float(), scaling, max_position)])
        self.register_buffer("cos_sin_cache", cache, persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """q: [T, H, D], k: [T, Hkv, D]; rotated in place where a kernel does it."""
        if q.is_cuda and platform.use_triton_kernels(q.device):
            from pagoda.kernels.rotary import apply_rotary
            apply_rotary(positions, q, k, self.cos_sin_cache, self.is_neox_style)
            return q, k
        cos, sin = self.cos_sin_cache[positions].to(q.dtype).chunk(2, dim=-1)
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        rot, rest = x[..., :self.rotary_dim], x[..., self.rotary_dim:]
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        if self.is_neox_style:
            x1, x2 = rot.chunk(2, dim=-1)
            rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
        else:
            x1, x2 = rot[..., 0::2], rot[..., 1::2]
            rotated = torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
            rotated = rotated.flatten(-2)
        return torch.cat([rotated, rest], dim=-1) if rest.numel() else rotated


_ROPE_CACHE: dict[tuple, RotaryEmbedding] = {}


def get_rope(config: Any, head_dim: int, rotary_dim: Optional[int] = None,
             max_position: int = 2048, is_neox_style: bool = True) -> RotaryEmbedding:
    """One shared module per distinct rope setting and device: a 128k-position cos/sin cache
    is 64 MB, which every layer would otherwise hold a copy of."""
    device = torch.empty(0).device  # the device the model is being built on
    key = (json.dumps(rope_parameters(config), sort_keys=True, default=str), head_dim,
           rotary_dim, max_position, is_neox_style, str(device))
    if key not in _ROPE_CACHE:
        _ROPE_CACHE[key] = RotaryEmbedding(config, head_dim, rotary_dim, max_position,
                                           is_neox_style)
    return _ROPE_CACHE[key]
