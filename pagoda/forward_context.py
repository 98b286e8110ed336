"""Per-step context: attention metadata, KV caches and the backend.

The model runner sets it around each forward; attention layers read it, so model files
never carry block tables or slot mappings."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch


@dataclass
class ForwardContext:
    attn_metadata: Any
    kv_caches: Optional[list[torch.Tensor]]
    backend: Any


_current: Optional[ForwardContext] = None


def get_forward_context() -> ForwardContext:
    if _current is None:
        raise RuntimeError("attention ran outside a forward context")
    return _current


@contextlib.contextmanager
def set_forward_context(attn_metadata: Any, kv_caches: Optional[list[torch.Tensor]],
                        backend: Any) -> Iterator[None]:
    global _current
    previous = _current
    _current = ForwardContext(attn_metadata, kv_caches, backend)
    try:
        yield
    finally:
        _current = previous
