"""Persistent step buffers and the CUDA graphs of decode steps.

`StepBuffers` holds a step's inputs twice: host arrays the runner fills with numpy (pinned on
CUDA, so uploads are asynchronous) and device tensors that never move, so a CUDA graph
captured over them stays valid. On the CPU both are the same tensors and nothing is copied.

`CudaGraphRunner` captures the model's forward for decode-only batches at padded sizes
(1, 2, 4, 8, 16, 24, 32, ...); a step of n sequences replays the smallest graph of size >= n
with the tail padded: padding tokens have slot -1 (the KV write skips them), padding
sequences have no query tokens (the attention kernel skips them).
"""

from __future__ import annotations

import bisect
import logging
import time
from typing import Callable, Optional

import numpy as np
import torch

logger = logging.getLogger(__name__)


def capture_sizes(max_num_seqs: int, max_num_tokens: int, limit: int = 512) -> list[int]:
    top = min(max_num_seqs, max_num_tokens, limit)
    sizes = [s for s in (1, 2, 4, 8) if s <= top] + list(range(16, top + 1, 8))
    if top not in sizes:
        sizes.append(top)
    return sizes


class StepBuffers:
    """Named 1-D step inputs plus the block table, each as (host numpy, device tensor)."""

    TOKEN_FIELDS = {"input_ids": torch.int64, "positions": torch.int64,
                    "slot_mapping": torch.int64}
    REQ_FIELDS = {"query_start_loc": torch.int32, "seq_lens": torch.int32,
                  "logits_indices": torch.int64}

    def __init__(self, max_tokens: int, max_reqs: int, max_blocks: int, device: torch.device):
        self.device = device
        self.on_cuda = device.type == "cuda"
        self.max_blocks = max_blocks
        self.host: dict[str, np.ndarray] = {}
        self.dev: dict[str, torch.Tensor] = {}
        self._host_t: dict[str, torch.Tensor] = {}
        sizes = {**{k: max_tokens for k in self.TOKEN_FIELDS},
                 **{k: max_reqs + 1 for k in self.REQ_FIELDS},
                 "block_table": max_reqs * max_blocks}
        dtypes = {**self.TOKEN_FIELDS, **self.REQ_FIELDS, "block_table": torch.int32}
        for name, size in sizes.items():
            host = torch.zeros(size, dtype=dtypes[name], pin_memory=self.on_cuda)
            self._host_t[name] = host
            self.host[name] = host.numpy()
            self.dev[name] = torch.zeros_like(host, device=device) if self.on_cuda else host
        # The graphs read the block table at a fixed row stride; host rows are staged compact.
        self.block_table = torch.zeros(max_reqs, max_blocks, dtype=torch.int32, device=device)
        self._uploaded = torch.cuda.Event() if self.on_cuda else None

    def wait_host_free(self) -> None:
        """The host buffers may be rewritten only once last step's uploads have run."""
        if self._uploaded is not None:
            self._uploaded.synchronize()

    def mark_uploaded(self) -> None:
        if self._uploaded is not None:
            self._uploaded.record()

    def fill(self, name: str, values: np.ndarray, length: int, pad: int = 0) -> torch.Tensor:
        """host[:len(values)] = values, host[len(values):length] = pad; returns dev[:length]."""
        host = self.host[name]
        n = len(values)
        host[:n] = values
        if length > n:
            host[n:length] = pad
        if not self.on_cuda:
            return self.dev[name][:length]
        dev = self.dev[name][:length]
        dev.copy_(self._host_t[name][:length], non_blocking=True)
        return dev

    def fill_block_table(self, rows: np.ndarray, length: int) -> torch.Tensor:
        """rows: [n, width] int32 block ids. Returns a [length, >= width] device table."""
        n, width = rows.shape
        if not self.on_cuda:
            self.block_table.numpy()[:n, :width] = rows
            return self.block_table[:length]
        self.host["block_table"][:n * width] = rows.reshape(-1)
        stage_dev = self.dev["block_table"][:n * width]
        stage_dev.copy_(self._host_t["block_table"][:n * width], non_blocking=True)
        self.block_table[:n, :width].copy_(stage_dev.view(n, width))
        return self.block_table[:length]

    def set_dummy_decode(self, size: int) -> None:
        """Device buffers for a harmless decode batch of `size` (graph warm-up and capture):
        one token per sequence at position 0, no cache slot written, block 0 read."""
        self.dev["input_ids"][:size].zero_()
        self.dev["positions"][:size].zero_()
        self.dev["slot_mapping"][:size].fill_(-1)
        self.dev["query_start_loc"][:size + 1].copy_(
            torch.arange(size + 1, dtype=torch.int32, device=self.device))
        self.dev["seq_lens"][:size].fill_(1)
        self.block_table[:size].zero_()


class CudaGraphRunner:
    def __init__(self, sizes: list[int]):
        self.sizes = sorted(sizes)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}

    def padded_size(self, num_reqs: int) -> int:
        """The captured size a decode batch of num_reqs replays, or 0 (run eagerly)."""
        if not self.graphs:
            return 0
        i = bisect.bisect_left(self.sizes, num_reqs)
        return self.sizes[i] if i < len(self.sizes) else 0

    def capture(self, forward: Callable[[int], torch.Tensor]) -> None:
        """forward(size) runs the model on the persistent buffers; captured largest first so
        the smaller graphs reuse the largest one's memory pool."""
        start = time.perf_counter()
        pool: Optional[tuple] = None
        for size in reversed(self.sizes):
            forward(size)  # warm-up: compiles this shape's kernels outside the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[size] = forward(size)
            pool = graph.pool() if pool is None else pool
            self.graphs[size] = graph
        torch.cuda.synchronize()
        logger.info("captured %d CUDA graphs (batch sizes %d..%d) in %.1fs", len(self.graphs),
                    self.sizes[0], self.sizes[-1], time.perf_counter() - start)

    def replay(self, size: int) -> torch.Tensor:
        self.graphs[size].replay()
        return self.outputs[size]
