"""Programmatic dependent launch (PDL, compute capability 9.0+).

In a decode step at small batch each kernel is a few microseconds, and the GPU idles between
one kernel's last blocks and the next kernel's first: launch latency and block scheduling.
With PDL a kernel launched with `launch_pdl=True` may be scheduled while the previous kernel
in the stream is still running; it must then wait (`griddepcontrol.wait`, which returns once
the previous grid has completed and its writes are visible) before it touches memory another
kernel writes. Our kernels wait first thing and then allow their own dependents to launch,
so only the launch and scheduling overlap, never a read or write. The one exception is the
decode attention, which reads old KV-cache entries and the step's inputs before its wait
(kernels/paged_attention.py): since every kernel releases its dependents only after its own
wait, when a kernel starts, all but the kernel just before it have completed, so only that
kernel's output is off limits. CUDA graphs keep the programmatic edges. Kernels not
launched this way (cuBLAS, PyTorch's) keep full ordering.

PAGODA_PDL=0 turns it off; Triton's interpreter and pre-Hopper GPUs never use it.
"""

from __future__ import annotations

import os
from functools import lru_cache

import torch
import triton
import triton.language as tl


@lru_cache(maxsize=None)
def _supported(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def enabled(device: torch.device) -> bool:
    if device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    if os.environ.get("PAGODA_PDL", "1") == "0":
        return False
    return _supported(device.index if device.index is not None else
                      torch.cuda.current_device())


def launch_args(device: torch.device) -> dict:
    """Keyword arguments for a kernel with a USE_PDL constexpr: the flag and, when on, the
    launch option."""
    if enabled(device):
        return {"USE_PDL": True, "launch_pdl": True}
    return {"USE_PDL": False}


@triton.jit
def wait_then_release(USE_PDL: tl.constexpr):
    """Called first in a kernel: wait for the previous grid, then let the next one launch."""
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
