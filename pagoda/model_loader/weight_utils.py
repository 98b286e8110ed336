"""Generic weight loading: checkpoint names -> parameters through per-parameter loaders."""

from __future__ import annotations

from typing import Iterable, Sequence

import re

import torch
from torch import nn

# (parameter name part, checkpoint name part, shard id) for fused layers.
StackedMapping = Sequence[tuple[str, str, object]]

LLAMA_STACKED: StackedMapping = (
    ("qkv_proj", "q_proj", "q"), ("qkv_proj", "k_proj", "k"), ("qkv_proj", "v_proj", "v"),
    ("gate_up_proj", "gate_proj", 0), ("gate_up_proj", "up_proj", 1),
)
_ALWAYS_SKIPPED = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached",
                   "attn.bias", "attn.masked_bias")


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
    if param.shape != loaded.shape:
        raise ValueError(f"checkpoint tensor of shape {tuple(loaded.shape)} does not fit "
                         f"parameter of shape {tuple(param.shape)}")
    param.data.copy_(loaded)


def load_named_weights(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]],
                       stacked: StackedMapping = (), skip_prefixes: Sequence[str] = (),
                       rename: dict[str, str] | None = None,
                       substitutions: Sequence[tuple[str, str]] = ()) -> set[str]:
    """Loads every checkpoint tensor into its parameter; returns the parameter names loaded.
    An unknown tensor name or a shape that does not fit is a ValueError naming the tensor.
    `substitutions` are (regex, replacement) pairs applied in order after `rename`, so a
    family whose checkpoint names differ from the shared blocks' names needs no loader."""
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded: set[str] = set()
    for ckpt_name, tensor in weights:
        name = _rename(ckpt_name, rename or {})
        for pattern, replacement in substitutions:
            name = re.sub(pattern, replacement, name)
        if name.endswith(_ALWAYS_SKIPPED) or name.startswith(tuple(skip_prefixes)):
            continue
        target, shard_id = name, None
        for param_part, ckpt_part, sid in stacked:
            if f".{ckpt_part}." in name:
                target, shard_id = name.replace(f".{ckpt_part}.", f".{param_part}."), sid
                break
        if target not in params:
            raise ValueError(f"checkpoint tensor {ckpt_name!r} matches no parameter of "
                             f"{type(model).__name__}")
        param = params[target]
        loader = getattr(param, "weight_loader", default_weight_loader)
        try:
            if shard_id is None:
                loader(param, tensor)
            else:
                loader(param, tensor, shard_id)
        except ValueError as exc:
            raise ValueError(f"checkpoint tensor {ckpt_name!r}: {exc}") from exc
        except (RuntimeError, IndexError) as exc:  # a loader's slicing hit a wrong shape
            raise ValueError(f"checkpoint tensor {ckpt_name!r} of shape {tuple(tensor.shape)} "
                             f"does not fit parameter {target!r} of shape "
                             f"{tuple(param.shape)}: {exc}") from exc
        loaded.add(target)
    return loaded


def _rename(name: str, rename: dict[str, str]) -> str:
    for old, new in rename.items():
        if name.startswith(old):
            return new + name[len(old):]
    return name


def check_all_loaded(model: nn.Module, loaded: set[str], where: str) -> None:
    missing = [n for n, _ in model.named_parameters() if n not in loaded]
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise ValueError(f"{where}: no checkpoint tensor for {len(missing)} parameters: {shown}")
