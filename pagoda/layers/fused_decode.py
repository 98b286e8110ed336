"""The decode-rows fast path of a pre-norm decoder layer: six kernels a layer instead of nine.

Unfused, a Llama layer at decode runs add+norm, q/k/v, rotary+KV write, attention (which
combines its own KV splits), o_proj, add+norm, gate_up, act-and-mul and down_proj. Here the
skinny GEMM (kernels/skinny_gemm.py) absorbs its small neighbours:
- o_proj and down_proj add their output into the residual stream in place (`add_linear`)
  and leave the new rows' sums of squares, one per program;
- the GEMM after each norm (q/k/v, gate_up) reads the un-normalised stream and scales its
  rows by 1/rms from those sums; the norm's weight is folded into that GEMM's weight once,
  after loading (`fold_norm_weights`), and the norm keeps a weight of ones;
- gate_up's epilogue applies act(gate) * up.
RMSNorm is a per-row scale followed by the weight, so all of this is the same arithmetic up
to rounding. A fused layer hands the next one the stream and its sums (`SquareSums`) in place
of (hidden, residual). The first layer's input and the final norm keep their own kernel.
On the H200 (Llama-3.1-8B, docs/benchmarks.md) a decode step went from 4.32 to 4.26 ms at
batch 1 and its graph from 4.32 to 4.16 ms at batch 8: with PDL the small kernels' launches
already overlapped, so each one removed saves ~0.6 us.

Folding happens for layers built from the unquantised shared blocks (RMSNorm without offset,
RotarySelfAttention, GatedMLP with SiLU or GELU) on one GPU in half precision; the fused
path then serves every step of at most 16 tokens, and longer steps run unfused with the
folded weights and unit norms. PAGODA_FUSED_DECODE=0 turns both off (for A/B runs)."""

from __future__ import annotations

import os
from dataclasses import dataclass
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


@dataclass
class SquareSums:
    """Stands in for the residual between fused layers: the stream (passed as `hidden`) is
    complete, and these are its rows' sums of squares in parts, [rows, parts]."""
    parts: torch.Tensor


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
    """Whether the layer is built from the blocks the fused path knows."""
    from pagoda.layers.decoder import GatedMLP, RotarySelfAttention
    attn, mlp = layer.self_attn, layer.mlp
    return (type(attn) is RotarySelfAttention and type(mlp) is GatedMLP
            and _plain_norm(layer.input_layernorm)
            and _plain_norm(layer.post_attention_layernorm)
            and gated_act_name(mlp.act_fn) is not None
            and len(set(mlp.gate_up_proj.output_sizes)) == 1
            and all(map(_plain_linear, (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj,
                                        mlp.down_proj))))


def _device_supports(weight: torch.Tensor) -> bool:
    if MODE == "force":
        return True
    return (MODE != "0" and weight.is_cuda and weight.dtype in (torch.bfloat16, torch.float16)
            and platform.use_triton_kernels(weight.device))


@torch.no_grad()
def fold_norm_weights(model: nn.Module) -> int:
    """After loading: for every layer that will take the fused path, the input and
    post-attention norm weights move into q/k/v's and gate_up's weights (columns scaled) and
    the norms keep ones. Returns the number of layers folded."""
    from pagoda.layers.decoder import PreNormDecoderLayer
    folded = 0
    for layer in model.modules():
        if (type(layer) is not PreNormDecoderLayer or not fusable(layer)
                or not _device_supports(layer.self_attn.qkv_proj.weight)):
            continue
        for norm, linear in ((layer.input_layernorm, layer.self_attn.qkv_proj),
                             (layer.post_attention_layernorm, layer.mlp.gate_up_proj)):
            scaled = linear.weight.float() * norm.weight.float()[None, :]
            linear.weight.copy_(scaled.to(linear.weight.dtype))
            norm.weight.fill_(1.0)
        layer.norms_folded = True
        folded += 1
    return folded


def use_fused(layer: nn.Module, hidden: torch.Tensor) -> bool:
    rows = hidden.numel() // hidden.shape[-1] if hidden.shape[-1] else 0
    return getattr(layer, "norms_folded", False) and 0 < rows <= MAX_ROWS


def fused_forward(layer: nn.Module, positions: torch.Tensor, hidden: torch.Tensor,
                  residual) -> tuple[torch.Tensor, SquareSums]:
    from pagoda.kernels.skinny_gemm import add_linear, skinny_gemm
    from pagoda.layers.decoder import norm_with_residual
    attn, mlp = layer.self_attn, layer.mlp
    qkv_proj, gate_up = attn.qkv_proj, mlp.gate_up_proj
    if isinstance(residual, SquareSums):  # the previous layer was fused
        stream = hidden
        qkv = skinny_gemm(stream, qkv_proj.weight, qkv_proj.bias, square_sums=residual.parts,
                          eps=layer.input_layernorm.eps)
    else:  # first layer (or after an unfused one): the norm runs alone, weight ones
        normed, stream = norm_with_residual(layer.input_layernorm, hidden, residual)
        qkv = skinny_gemm(normed, qkv_proj.weight, qkv_proj.bias)
    out = attn.attend(positions, qkv)
    sums = add_linear(stream, out, attn.o_proj.weight, attn.o_proj.bias)
    act = skinny_gemm(stream, gate_up.weight, gate_up.bias, square_sums=sums,
                      eps=layer.post_attention_layernorm.eps, act=gated_act_name(mlp.act_fn))
    sums = add_linear(stream, act, mlp.down_proj.weight, mlp.down_proj.bias)
    return stream, SquareSums(sums)
