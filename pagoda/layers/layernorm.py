"""RMSNorm (with the residual add fused in) and LayerNorm.

On CUDA the Triton kernel does the add and the norm in one pass; elsewhere PyTorch does."""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from pagoda import platform

Output = Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]


class RMSNorm(nn.Module):
    """`offset` = 1 gives Gemma's (1 + weight) scaling."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, offset: float = 0.0,
                 params_dtype: Optional[torch.dtype] = None):
        super().__init__()
        self.eps, self.offset = eps, offset
        dtype = params_dtype or torch.get_default_dtype()
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> Output:
        if x.is_cuda and self.offset == 0.0 and platform.use_triton_kernels(x.device):
            from pagoda.kernels import layernorm as kernels
            if residual is None:
                return kernels.rms_norm(x, self.weight, self.eps)
            return kernels.fused_add_rms_norm(x, residual, self.weight, self.eps)
        if residual is not None:
            x = x + residual
            residual = x
        out = self._norm(x)
        return out if residual is None else (out, residual)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:
            return (xf * (self.offset + self.weight.float())).to(dtype)
        return self.weight * xf.to(dtype)


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm that also accepts (and returns) a residual, like RMSNorm."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, bias: bool = True,
                 params_dtype: Optional[torch.dtype] = None):
        super().__init__(hidden_size, eps=eps, bias=bias, dtype=params_dtype)
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> Output:
        if residual is not None:
            x = x + residual
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps), x
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
