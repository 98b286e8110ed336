"""The decode-rows fast path of a pre-norm decoder layer: six kernels a layer instead of ten.

Unfused, a Llama layer at decode runs add+norm, q/k/v, rotary+KV write, attention, split
reduce, o_proj, add+norm, gate_up, act-and-mul and down_proj. At batch 1 on an H200 each of
the small ones costs a few microseconds of start-up and tail while HBM idles, which is most of
the gap between a decode step and its weight-streaming floor. Here the skinny GEMM
(kernels/skinny_gemm.py) absorbs its neighbours:
- the input RMSNorm goes into q/k/v's prologue and the post-attention one into gate_up's;
- act(gate) * up goes into gate_up's epilogue;
- the residual adds go into o_proj's and down_proj's epilogues, which update the residual
  stream in place.
A fused layer therefore carries one tensor, the residual stream, and returns (stream, None):
the next layer and the final norm take that like a first layer's input.

It applies on CUDA to at most 16 half-precision rows on one GPU, for layers built from the
unquantised shared blocks (RMSNorm without offset, RotarySelfAttention, GatedMLP with SiLU or
GELU). PAGODA_FUSED_DECODE=0 turns it off (for A/B runs)."""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch import nn

from pagoda import platform
from pagoda.layers.activation import GeluAndMul, SiluAndMul
from pagoda.layers.layernorm import RMSNorm
from pagoda.layers.linear import LinearBase, UnquantizedLinearMethod

# "0": off; "1": on where it applies; "force": on the CPU and in fp32 too, where the Triton
# interpreter runs the kernels (the CPU tests of this path).
MODE = os.environ.get("PAGODA_FUSED_DECODE", "1")
MAX_ROWS = 16  # the skinny GEMM's limit


def gated_act_name(act_fn: nn.Module) -> Optional[str]:
    """The skinny GEMM's name for a gated activation module, or None if it has none."""
    if type(act_fn) is SiluAndMul:
        return "silu"
    if type(act_fn) is GeluAndMul:
        return "gelu_tanh" if act_fn.approximate == "tanh" else "gelu"
    return None


def _plain_linear(layer: nn.Module) -> bool:
    return (isinstance(layer, LinearBase) and layer.tp_size == 1
            and type(layer.quant_method) is UnquantizedLinearMethod)


def _plain_norm(norm: nn.Module) -> bool:
    return type(norm) is RMSNorm and norm.offset == 0.0


def fusable(layer: nn.Module) -> bool:
    """Whether the layer's blocks are the ones the fused path knows (decided once)."""
    cached = getattr(layer, "_fusable", None)
    if cached is None:
        from pagoda.layers.decoder import GatedMLP, RotarySelfAttention
        attn, mlp = layer.self_attn, layer.mlp
        cached = (type(attn) is RotarySelfAttention and type(mlp) is GatedMLP
                  and _plain_norm(layer.input_layernorm)
                  and _plain_norm(layer.post_attention_layernorm)
                  and gated_act_name(mlp.act_fn) is not None
                  and len(set(mlp.gate_up_proj.output_sizes)) == 1
                  and all(map(_plain_linear, (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj,
                                              mlp.down_proj))))
        layer._fusable = cached
    return cached


def use_fused(layer: nn.Module, hidden: torch.Tensor) -> bool:
    rows = hidden.numel() // hidden.shape[-1] if hidden.shape[-1] else 0
    if MODE == "0" or not 0 < rows <= MAX_ROWS or not fusable(layer):
        return False
    if layer.input_layernorm.weight.dtype != hidden.dtype:
        return False
    return MODE == "force" or (hidden.is_cuda and hidden.dtype in (torch.bfloat16, torch.float16)
                               and platform.use_triton_kernels(hidden.device))


def fused_forward(layer: nn.Module, positions: torch.Tensor, hidden: torch.Tensor,
                  residual: Optional[torch.Tensor]) -> tuple[torch.Tensor, None]:
    from pagoda.kernels.skinny_gemm import skinny_gemm
    stream = hidden if residual is None else hidden + residual
    attn, mlp = layer.self_attn, layer.mlp
    norm1, norm2 = layer.input_layernorm, layer.post_attention_layernorm
    qkv = skinny_gemm(stream, attn.qkv_proj.weight, attn.qkv_proj.bias,
                      norm_weight=norm1.weight, eps=norm1.eps)
    out = attn.attend(positions, qkv)
    skinny_gemm(out, attn.o_proj.weight, attn.o_proj.bias, residual=stream)
    act = skinny_gemm(stream, mlp.gate_up_proj.weight, mlp.gate_up_proj.bias,
                      norm_weight=norm2.weight, eps=norm2.eps, act=gated_act_name(mlp.act_fn))
    skinny_gemm(act, mlp.down_proj.weight, mlp.down_proj.bias, residual=stream)
    return stream, None
