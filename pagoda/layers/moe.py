"""Mixture of experts: a softmax top-k router, the experts' gated MLPs as stacked weights
([E, 2I, H] gate|up and [E, H, I] down) filled through a per-expert weight loader, an
optional gated shared expert (Qwen2-MoE), and `fused_moe`, the one place the expert compute
happens.

`fused_moe` runs `torch_moe` (a loop over the experts the batch routes to) on the CPU and
the grouped-GEMM Triton kernels of `pagoda/kernels/moe.py` on CUDA (tested against
`torch_moe`); `dense_moe` (graph-capturable, but every expert on every token) serves CUDA
where Triton kernels are off."""

from __future__ import annotations

import importlib.util
import re
from typing import Iterable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from pagoda import platform
from pagoda.distributed.parallel_state import all_reduce, get_tp_rank, get_tp_size
from pagoda.layers.activation import get_gated_act_fn
from pagoda.layers.decoder import CausalLM, GatedMLP
from pagoda.layers.linear import ReplicatedLinear
from pagoda.model_loader.weight_utils import check_all_loaded, load_named_weights

_HAS_TRITON_MOE = importlib.util.find_spec("pagoda.kernels.moe") is not None


def route(router_logits: torch.Tensor, top_k: int, renormalize: bool
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over all experts in fp32, keep the top k; Mixtral (and Qwen MoE configs with
    norm_topk_prob) rescale the kept weights to sum to one."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def torch_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, act_fn: nn.Module) -> torch.Tensor:
    """Reference expert compute: each routed expert runs on its own tokens only."""
    out = torch.zeros_like(x)
    for expert in torch.unique(topk_ids).tolist():
        token_idx, slot = torch.where(topk_ids == expert)
        hidden = act_fn(F.linear(x[token_idx], w13[expert]))
        hidden = F.linear(hidden, w2[expert]) * topk_weights[token_idx, slot, None].to(x.dtype)
        out.index_add_(0, token_idx, hidden)
    return out


def dense_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, act_fn: nn.Module) -> torch.Tensor:
    """Every expert on every token, weighted by zero where not routed: E / top_k times the
    work of `torch_moe`, but static shapes and no host sync, so CUDA graphs can capture it.
    The GPU stopgap until the Triton kernel exists."""
    gates = torch.zeros(x.shape[0], w13.shape[0], dtype=x.dtype, device=x.device)
    gates.scatter_add_(1, topk_ids, topk_weights.to(x.dtype))
    out = torch.zeros_like(x)
    for expert in range(w13.shape[0]):
        hidden = act_fn(F.linear(x, w13[expert]))
        out += F.linear(hidden, w2[expert]) * gates[:, expert, None]
    return out


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, act_fn: nn.Module) -> torch.Tensor:
    if x.is_cuda:
        if _HAS_TRITON_MOE and platform.use_triton_kernels(x.device):
            from pagoda.kernels.moe import fused_moe as triton_fused_moe
            return triton_fused_moe(x, w13, w2, topk_weights, topk_ids, act_fn)
        return dense_moe(x, w13, w2, topk_weights, topk_ids, act_fn)
    return torch_moe(x, w13, w2, topk_weights, topk_ids, act_fn)


class FusedExperts(nn.Module):
    """E gated MLPs; the intermediate dimension is split over tensor-parallel ranks."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int,
                 act: str = "silu"):
        super().__init__()
        tp = get_tp_size()
        self.num_experts, self.rank = num_experts, get_tp_rank()
        self.inter = intermediate_size // tp
        dtype = torch.get_default_dtype()
        self.w13_weight = nn.Parameter(torch.empty(num_experts, 2 * self.inter, hidden_size,
                                                   dtype=dtype), requires_grad=False)
        self.w2_weight = nn.Parameter(torch.empty(num_experts, hidden_size, self.inter,
                                                  dtype=dtype), requires_grad=False)
        self.w13_weight.weight_loader = self.weight_loader
        self.w2_weight.weight_loader = self.weight_loader
        self.act_fn = get_gated_act_fn(act)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor,
                      shard_id: tuple[int, str]) -> None:
        """shard_id = (expert, "gate" | "up" | "down"): one expert's checkpoint tensor."""
        expert, kind = shard_id
        if not 0 <= expert < self.num_experts:
            raise ValueError(f"expert {expert} out of range (the config has "
                             f"{self.num_experts})")
        full, hidden = self.inter * get_tp_size(), self.w2_weight.shape[1]
        want = (hidden, full) if kind == "down" else (full, hidden)
        if tuple(loaded.shape) != want:
            raise ValueError(f"expert {kind} tensor of shape {tuple(loaded.shape)} does not "
                             f"fit; expected {want}")
        if kind == "down":
            shard, dst = loaded.narrow(1, self.rank * self.inter, self.inter), param.data[expert]
        else:
            shard = loaded.narrow(0, self.rank * self.inter, self.inter)
            dst = param.data[expert].narrow(0, 0 if kind == "gate" else self.inter, self.inter)
        dst.copy_(shard)

    @torch.no_grad()
    def warm_up(self, max_tokens: int, top_k: int) -> None:
        """Compile, before serving, the Triton kernel variants that steps of up to max_tokens
        would launch (their tiles follow the rows per expert, so a longer step than any seen
        would compile mid-run; worker/warm_up.py). Local: no collective."""
        w13 = self.w13_weight
        if not (w13.is_cuda and _HAS_TRITON_MOE and platform.use_triton_kernels(w13.device)):
            return
        from pagoda.kernels.moe import warm_up_token_counts
        for tokens in warm_up_token_counts(self.num_experts, top_k, max_tokens):
            x = torch.zeros(tokens, w13.shape[2], dtype=w13.dtype, device=w13.device)
            # round-robin routing in route()'s dtypes: no draw from the sampler's RNG
            ids = torch.arange(tokens * top_k, device=w13.device).remainder_(self.num_experts)
            weights = torch.full((tokens, top_k), 1.0 / top_k, device=w13.device)
            fused_moe(x, w13, self.w2_weight, weights, ids.view(tokens, top_k), self.act_fn)

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor,
                topk_ids: torch.Tensor) -> torch.Tensor:
        out = fused_moe(x, self.w13_weight, self.w2_weight, topk_weights, topk_ids,
                        self.act_fn)
        return all_reduce(out)


class SparseMoeBlock(nn.Module):
    """Router + experts (+ a shared expert whose output a sigmoid gate scales)."""

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int,
                 renormalize: bool, act: str = "silu", shared_intermediate_size: int = 0):
        super().__init__()
        self.top_k, self.renormalize = top_k, renormalize
        self.gate = ReplicatedLinear(hidden_size, num_experts, bias=False)
        self.experts = FusedExperts(num_experts, hidden_size, intermediate_size, act)
        self.shared_expert: Optional[GatedMLP] = None
        if shared_intermediate_size:
            self.shared_expert = GatedMLP(hidden_size, shared_intermediate_size, act)
            self.shared_expert_gate = ReplicatedLinear(hidden_size, 1, bias=False)

    def warm_up_kernels(self, max_tokens: int) -> None:
        """Called by the worker's start-up warm-up with the longest step it will run."""
        self.experts.warm_up(max_tokens, self.top_k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = route(self.gate(x), self.top_k, self.renormalize)
        out = self.experts(x, weights, ids)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out


# Checkpoint projection names of one expert -> which slice of the stacked weights it fills.
_EXPERT_NAME = re.compile(r"^(?P<prefix>.*\.experts)\.(?P<expert>\d+)\.(?P<proj>\w+)\.weight$")
_EXPERT_PROJ = {"w1": "gate", "w3": "up", "w2": "down",
                "gate_proj": "gate", "up_proj": "up", "down_proj": "down"}


class MoECausalLM(CausalLM):
    """CausalLM whose per-expert checkpoint tensors go to the stacked expert weights."""

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        filled: dict[str, set] = {}
        rest = self._load_experts(weights, filled)
        skip = self.skip_prefixes + (("lm_head.",) if self.tied else ())
        loaded = load_named_weights(self, rest, self.stacked_params_mapping, skip,
                                    substitutions=self.weight_substitutions)
        if self.tied:
            loaded.add("lm_head.weight")
        loaded |= _complete_experts(self, filled)
        check_all_loaded(self, loaded, type(self).__name__)

    def _load_experts(self, weights: Iterable[tuple[str, torch.Tensor]],
                      filled: dict[str, set]) -> Iterator[tuple[str, torch.Tensor]]:
        """Loads expert tensors as a side effect; yields every other tensor."""
        params = dict(self.named_parameters())
        for name, tensor in weights:
            match = _EXPERT_NAME.match(name)
            if not match or match["proj"] not in _EXPERT_PROJ:
                yield name, tensor
                continue
            prefix = match["prefix"]
            for pattern, replacement in self.weight_substitutions:
                prefix = re.sub(pattern, replacement, prefix)
            kind = _EXPERT_PROJ[match["proj"]]
            target = f"{prefix}.{'w2' if kind == 'down' else 'w13'}_weight"
            if target not in params:
                raise ValueError(f"checkpoint tensor {name!r} matches no parameter of "
                                 f"{type(self).__name__}")
            try:
                params[target].weight_loader(params[target], tensor, (int(match["expert"]), kind))
            except ValueError as exc:
                raise ValueError(f"checkpoint tensor {name!r}: {exc}") from exc
            filled.setdefault(target, set()).add((int(match["expert"]), kind))


def _complete_experts(model: nn.Module, filled: dict[str, set]) -> set[str]:
    """Names of the stacked expert weights every expert's tensors filled; a partly filled one
    is an error naming the first missing expert tensor."""
    complete = set()
    for name, module in model.named_modules():
        if not isinstance(module, FusedExperts):
            continue
        for param, kinds in ((f"{name}.w13_weight", ("gate", "up")),
                             (f"{name}.w2_weight", ("down",))):
            want = {(e, k) for e in range(module.num_experts) for k in kinds}
            got = filled.get(param, set())
            if got == want:
                complete.add(param)
            elif got:
                expert, kind = min(want - got)
                raise ValueError(f"{type(model).__name__}: no checkpoint tensor for expert "
                                 f"{expert} ({kind}) of {name}")
    return complete
