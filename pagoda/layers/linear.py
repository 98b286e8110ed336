"""Linear layers whose parameters know how to take their shard of a checkpoint tensor.

Column-parallel layers split the output dimension over tensor-parallel ranks, row-parallel
ones the input dimension. Fused layers (q/k/v, gate/up) take each checkpoint tensor into its
slice through `weight_loader(param, tensor, shard_id)`, so the loader needs no special cases.
The actual matmul goes through a quantization method (`create_weights` / `apply`).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pagoda import platform
from pagoda.distributed.parallel_state import (all_gather_last_dim, all_reduce, get_tp_rank,
                                               get_tp_size)


class UnquantizedLinearMethod:
    def create_weights(self, layer: "LinearBase") -> None:
        weight = torch.empty(layer.out_features, layer.in_features, dtype=layer.params_dtype)
        layer.weight = nn.Parameter(weight, requires_grad=False)
        layer.weight.weight_loader = layer.weight_loader

    def process_weights_after_loading(self, layer: "LinearBase") -> None:
        pass

    def apply(self, layer: "LinearBase", x: torch.Tensor,
              bias: Optional[torch.Tensor]) -> torch.Tensor:
        return linear(x, layer.weight, bias)


class LinearBase(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool,
                 params_dtype: Optional[torch.dtype] = None, quant_method=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.params_dtype = params_dtype or torch.get_default_dtype()
        self.tp_size, self.tp_rank = get_tp_size(), get_tp_rank()
        self.quant_method = quant_method or UnquantizedLinearMethod()
        self.quant_method.create_weights(self)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=self.params_dtype),
                                     requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor,
                      shard_id=None) -> None:
        _copy_checked(param.data, loaded, self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_method.apply(self, x, self.bias)


class ReplicatedLinear(LinearBase):
    pass


class ColumnParallelLinear(LinearBase):
    """Output dimension split over ranks; `gather_output` reassembles it."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 gather_output: bool = False, **kw):
        self.gather_output = gather_output
        super().__init__(in_features, out_features // get_tp_size(), bias, **kw)

    def weight_loader(self, param, loaded, shard_id=None):
        size = param.data.shape[0]
        _copy_checked(param.data, loaded.narrow(0, self.tp_rank * size, size), self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        return all_gather_last_dim(out) if self.gather_output else out


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs in one matmul (e.g. gate and up projections)."""

    def __init__(self, in_features: int, output_sizes: Sequence[int], bias: bool = False, **kw):
        self.output_sizes = list(output_sizes)
        super().__init__(in_features, sum(output_sizes), bias, **kw)

    def weight_loader(self, param, loaded, shard_id: Optional[int] = None):
        if shard_id is None:  # checkpoint already fused (e.g. Phi-3 gate_up_proj)
            return self._load_fused(param, loaded)
        tp = self.tp_size
        offset = sum(self.output_sizes[:shard_id]) // tp
        size = self.output_sizes[shard_id] // tp
        shard = loaded.narrow(0, self.tp_rank * size, size)
        _copy_checked(param.data.narrow(0, offset, size), shard, self)

    def _load_fused(self, param, loaded):
        offset = 0
        for i, full in enumerate(self.output_sizes):
            self.weight_loader(param, loaded.narrow(0, offset, full), i)
            offset += full


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections in one matmul; k/v heads are replicated when there are fewer
    KV heads than ranks."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int,
                 bias: bool = False, **kw):
        tp = get_tp_size()
        self.head_dim = head_dim
        self.num_heads = num_heads // tp
        self.num_kv_heads = max(1, num_kv_heads // tp)
        self.kv_replicas = max(1, tp // num_kv_heads)
        self.total_sizes = (num_heads * head_dim, num_kv_heads * head_dim,
                            num_kv_heads * head_dim)
        out = (self.num_heads + 2 * self.num_kv_heads) * head_dim * tp
        super().__init__(hidden_size, out, bias, **kw)

    def shard_slices(self) -> dict[str, tuple[int, int]]:
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return {"q": (0, q), "k": (q, kv), "v": (q + kv, kv)}

    def weight_loader(self, param, loaded, shard_id: Optional[str] = None):
        if shard_id is None:  # fused checkpoint tensor
            q, k, v = self.total_sizes
            for sid, (start, size) in zip("qkv", ((0, q), (q, k), (q + k, v))):
                self.weight_loader(param, loaded.narrow(0, start, size), sid)
            return
        offset, size = self.shard_slices()[shard_id]
        rank = self.tp_rank if shard_id == "q" else self.tp_rank // self.kv_replicas
        shard = loaded.narrow(0, rank * size, size)
        _copy_checked(param.data.narrow(0, offset, size), shard, self)


class RowParallelLinear(LinearBase):
    """Input dimension split over ranks; the partial sums are all-reduced."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, **kw):
        super().__init__(in_features // get_tp_size(), out_features, bias, **kw)

    def weight_loader(self, param, loaded, shard_id=None):
        if param.dim() == 1:  # bias: added once, after the reduction
            return _copy_checked(param.data, loaded, self)
        size = param.data.shape[1]
        _copy_checked(param.data, loaded.narrow(1, self.tp_rank * size, size), self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias if self.tp_rank == 0 else None
        out = self.quant_method.apply(self, x, None)
        out = all_reduce(out)
        return out + bias if bias is not None else out


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None
           ) -> torch.Tensor:
    """F.linear; on CUDA, decode-sized inputs may go through the skinny GEMM kernel."""
    if x.is_cuda and platform.use_triton_kernels(x.device):
        from pagoda.kernels import skinny_gemm
        return skinny_gemm.linear(x, weight, bias)
    return F.linear(x, weight, bias)


def _copy_checked(dst: torch.Tensor, src: torch.Tensor, layer: nn.Module) -> None:
    if dst.shape != src.shape:
        raise ValueError(f"{type(layer).__name__}: checkpoint tensor of shape "
                         f"{tuple(src.shape)} does not fit parameter of shape {tuple(dst.shape)}")
    dst.copy_(src)
