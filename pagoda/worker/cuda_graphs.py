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
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch

from pagoda.kernels.step_advance import advance_decode_inputs

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

    def set_block_entries(self, rows: np.ndarray, cols: np.ndarray, values: np.ndarray) -> None:
        """block_table[rows[i], cols[i]] = values[i] on the device, asynchronously (a fresh
        pinned staging tensor, so no shared host buffer is involved)."""
        if not self.on_cuda:
            self.block_table.numpy()[rows, cols] = values
            return
        packed = torch.from_numpy(np.stack([rows, cols, values]).astype(np.int64))
        packed = packed.pin_memory().to(self.device, non_blocking=True)
        self.block_table[packed[0], packed[1]] = packed[2].to(torch.int32)

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


def wait_host(host: torch.Tensor, event: Optional[torch.cuda.Event]) -> np.ndarray:
    """Waits for a device-to-host copy (its event) and returns the values."""
    if event is not None:
        event.synchronize()
    return host.numpy().copy()


# -- decode lookahead ------------------------------------------------------------------------
# After a decode step's sampling is launched, the next decode step of the same requests is
# launched too (its inputs advanced on the device from this step's by kernels/step_advance.py,
# the samples becoming input ids) before the host reads the samples back. While the host then
# updates the scheduler and builds outputs, the GPU already runs step N+1. If the scheduler's
# next step is that one, or that one minus requests that finished (kept as dead rows: no KV
# write, output dropped), its result is just read back and the step after is launched the same
# way. A request whose next token opens a new KV block (not allocated yet) writes that token's
# KV into its own scratch block (past the scheduler's blocks); once the scheduler has
# allocated the real block, the KV is copied there. Anything else (new requests, chunked
# prompts, ...) drops the lookahead. A dropped lookahead only wrote next-token KV into a block
# its request owned alone (partly filled, so never shared through the prefix cache) or into
# scratch, and draws no seeded randomness (only steps without seeds, logprobs or penalties
# look ahead): it changes nothing observable.
@dataclass
class Lookahead:
    req_ids: list[str]  # the layout: entry i is row i of the padded graph batch
    rows: np.ndarray  # InputBatch row of each entry
    live: np.ndarray  # bool: entries that are still requests
    positions: np.ndarray  # position of each entry's input token
    num_blocks: np.ndarray  # blocks each entry held at launch
    scratch: np.ndarray  # bool: entries whose token's KV went to their scratch block
    size: int
    md: Any
    sampled: torch.Tensor  # device: the next lookahead's input ids
    host: torch.Tensor
    event: Optional[torch.cuda.Event]


class DecodeLookahead:
    """Launches and redeems lookahead steps for a ModelRunner (`runner`)."""

    def __init__(self, runner: Any, num_scratch: int):
        self.r = runner
        self.num_scratch = num_scratch  # scratch blocks sit after the scheduler's blocks
        self.pending: Optional[Lookahead] = None
        # one kernel advances the inputs (kernels/step_advance.py) instead of three uploads
        # and a copy; =0 for A/B runs
        self.advance_on_device = (runner.device.type == "cuda"
                                  and os.environ.get("PAGODA_ADVANCE_ON_DEVICE", "1") != "0")

    def warm_up(self) -> None:
        """Compile the KV move out of scratch blocks before serving (worker/warm_up.py): its
        first use comes at the first block crossing, mid-run. Moves the first scratch block
        onto itself."""
        r = self.r
        if self.num_scratch and r.kv_all is not None:
            first = np.array([r.num_kv_blocks])
            _copy_slot0(r.kv_all, first, first, r.device)

    def launch(self, req_ids: list[str], rows: np.ndarray, live: np.ndarray,
               positions: np.ndarray, size: int, md: Any, input_ids: torch.Tensor) -> None:
        r, buf, bs = self.r, self.r.buffers, self.r.block_size
        batch, n = r.batch, len(req_ids)
        num_blocks = batch.num_blocks[rows]
        blocks = positions // bs
        cross = live & (blocks >= num_blocks)
        if (not live.any() or (live & (blocks > num_blocks)).any()
                or (live & (positions >= r.max_model_len)).any()
                or (cross.any() and (r.kv_all is None or n > self.num_scratch))):
            return
        if cross.any():  # attention must read the scratch block at that position
            c = np.flatnonzero(cross)
            buf.set_block_entries(c, blocks[c], r.num_kv_blocks + c)
        # query_start_loc and the rest of the block table on the device are still right.
        if self.advance_on_device and live.all() and r.rope_long_offset is None:
            # the device inputs are the last step's for these rows: each moves one token on
            advance_decode_inputs(buf.dev["input_ids"], input_ids, buf.dev["positions"],
                                  buf.dev["slot_mapping"], buf.dev["seq_lens"],
                                  buf.block_table, n, bs)
        else:
            self._upload_inputs(rows, live, positions, blocks, cross, size, input_ids)
        hidden = r.graphs.replay(size)
        out = r.sample_logits(r.model.compute_logits(hidden[:n]), md)
        host, event = r.copy_to_host(out.sampled)
        self.pending = Lookahead(req_ids, rows, live.copy(), positions, num_blocks.copy(), cross,
                                 size, md, out.sampled, host, event)

    def _upload_inputs(self, rows: np.ndarray, live: np.ndarray, positions: np.ndarray,
                       blocks: np.ndarray, cross: np.ndarray, size: int,
                       input_ids: torch.Tensor) -> None:
        """The next step's inputs from the host, where the device kernel cannot advance them
        (dead rows: no KV write, no keys; a longrope model's position index) or is off (the
        CPU, PAGODA_ADVANCE_ON_DEVICE=0)."""
        r, buf, n = self.r, self.r.buffers, len(rows)
        buf.wait_host_free()
        table_blocks = r.batch.block_table[rows, np.minimum(blocks, r.batch.max_blocks - 1)]
        slots = np.where(cross, r.num_kv_blocks + np.arange(n), table_blocks)
        slots = np.where(live, slots.astype(np.int64) * r.block_size + positions % r.block_size,
                         -1)
        buf.fill("positions", np.where(live, r.rope_index(positions, positions + 1), 0), size)
        buf.fill("slot_mapping", slots, size, pad=-1)
        buf.fill("seq_lens", np.where(live, positions + 1, 1).astype(np.int32), size)
        buf.mark_uploaded()
        buf.dev["input_ids"][:n].copy_(input_ids)

    def take(self, sched: Any):
        """The pending lookahead's result if `sched` is that step (or a subset of it), else
        None (and the lookahead is dropped)."""
        p, self.pending = self.pending, None
        if p is None:
            return None
        keep = self._match(p, sched)
        if keep is None:
            return None
        return self._finish(p, keep)

    def _match(self, p: Lookahead, sched: Any) -> Optional[np.ndarray]:
        scheduled = list(sched.num_scheduled_tokens)
        if (sched.scheduled_new_reqs or not scheduled
                or sched.total_num_scheduled_tokens != len(scheduled)
                or 2 * len(scheduled) < len(p.req_ids)):  # mostly dead: re-layout instead
            return None
        keep = np.zeros(len(p.req_ids), dtype=bool)
        j = 0
        for i in np.flatnonzero(p.live).tolist():  # scheduled must be a subsequence
            if j < len(scheduled) and p.req_ids[i] == scheduled[j]:
                keep[i] = True
                j += 1
        if j != len(scheduled):
            return None
        batch = self.r.batch
        rows = p.rows[keep]
        expected = (p.num_blocks + p.scratch)[keep]  # a crossing request got one new block
        if not (np.array_equal(batch.num_computed[rows], p.positions[keep])
                and np.array_equal(batch.num_blocks[rows], expected)):
            return None
        return keep

    def _finish(self, p: Lookahead, keep: np.ndarray):
        from pagoda.core.sched_output import ModelRunnerOutput
        r, bs = self.r, self.r.block_size
        moved = np.flatnonzero(p.scratch & keep)
        if len(moved):  # the scheduler has allocated the real blocks now: move the KV there
            cols = p.positions[moved] // bs
            real = r.batch.block_table[p.rows[moved], cols]
            r.buffers.set_block_entries(moved, cols, real)
            _copy_slot0(r.kv_all, r.num_kv_blocks + moved, real, r.device)
        self.launch(p.req_ids, p.rows, keep, p.positions + 1, p.size, p.md, p.sampled)
        tokens = wait_host(p.host, p.event)[keep]  # the step's one host sync
        r.batch.append_sampled(p.rows[keep], tokens)
        req_ids = [p.req_ids[i] for i in np.flatnonzero(keep).tolist()]
        return ModelRunnerOutput(req_ids, [[t] for t in tokens.tolist()],
                                 [None] * len(req_ids), {})


def _copy_slot0(kv_all: torch.Tensor, src: np.ndarray, dst: np.ndarray,
                device: torch.device) -> None:
    """kv_all [layers, 2, blocks, block_size, heads, dim]: slot 0 of blocks src -> dst."""
    src_t = torch.from_numpy(src.astype(np.int64))
    dst_t = torch.from_numpy(dst.astype(np.int64))
    if device.type == "cuda":
        from pagoda.kernels.kv_cache import copy_first_slot
        copy_first_slot(kv_all, src_t.pin_memory().to(device, non_blocking=True),
                        dst_t.pin_memory().to(device, non_blocking=True))
        return
    slot0 = kv_all.select(3, 0)  # [layers, 2, blocks, heads, dim]
    slot0.index_copy_(2, dst_t, slot0.index_select(2, src_t))
