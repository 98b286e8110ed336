"""Activations, including the gated ones that take [.., 2d] and return [.., d]."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pagoda import platform


class SiluAndMul(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and platform.use_triton_kernels(x.device):
            from pagoda.kernels.activation import silu_and_mul
            return silu_and_mul(x)
        d = x.shape[-1] // 2
        return F.silu(x[..., :d]) * x[..., d:]


class GeluAndMul(nn.Module):
    def __init__(self, approximate: str = "none"):
        super().__init__()
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = x.shape[-1] // 2
        return F.gelu(x[..., :d], approximate=self.approximate) * x[..., d:]


_ACTS = {
    "silu": nn.SiLU, "swish": nn.SiLU, "relu": nn.ReLU,
    "gelu": nn.GELU, "gelu_new": lambda: nn.GELU(approximate="tanh"),
    "gelu_pytorch_tanh": lambda: nn.GELU(approximate="tanh"),
    "gelu_fast": lambda: nn.GELU(approximate="tanh"),
}
_GATED = {"silu": SiluAndMul, "swish": SiluAndMul,
          "gelu": GeluAndMul, "gelu_pytorch_tanh": lambda: GeluAndMul("tanh"),
          "gelu_new": lambda: GeluAndMul("tanh")}


def get_act_fn(name: str) -> nn.Module:
    if name not in _ACTS:
        raise ValueError(f"activation {name!r} is not supported")
    return _ACTS[name]()


def get_gated_act_fn(name: str) -> nn.Module:
    if name not in _GATED:
        raise ValueError(f"gated activation {name!r} is not supported")
    return _GATED[name]()
