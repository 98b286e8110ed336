"""Everything that depends on the kind of device lives here (and behind the attention backend).

Models and the engine ask this module instead of testing `torch.cuda` themselves.
"""

from __future__ import annotations

import os
from functools import lru_cache

import torch


def cuda_available() -> bool:
    return torch.cuda.is_available()


def resolve_device(requested: str) -> torch.device:
    """Never initialises CUDA (the API-server process resolves the config too; only the
    engine-core process should hold a CUDA context)."""
    if requested == "cuda" and not cuda_available():
        raise ValueError("device: 'cuda' was asked for but no CUDA device is visible")
    if requested == "cpu" or not cuda_available():
        return torch.device("cpu")
    return torch.device("cuda", 0)


def default_attention_backend(device: torch.device) -> str:
    """Name of the attention backend for a device; PAGODA_ATTENTION_BACKEND overrides it."""
    forced = os.environ.get("PAGODA_ATTENTION_BACKEND")
    if forced:
        return forced
    return "triton" if device.type == "cuda" else "torch_ref"


def use_triton_kernels(device: torch.device) -> bool:
    """Fused Triton kernels (norm, rotary, activation) run on CUDA unless disabled."""
    if os.environ.get("PAGODA_DISABLE_TRITON") == "1":
        return False
    return device.type == "cuda"


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors, for kernels that size their grids to fill the GPU. The CPU
    (Triton's interpreter in tests) reports 4, so the same grid rules run there at tiny shapes."""
    return _cuda_sms(device.index or 0) if device.type == "cuda" else 4


@lru_cache(maxsize=None)
def _cuda_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def distributed_backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
