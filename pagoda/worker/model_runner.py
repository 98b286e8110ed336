"""Runs one scheduled step: keeps per-request state, gathers the flat token batch into
persistent buffers, runs the model (a CUDA-graph replay for decode-only steps on the GPU,
eagerly otherwise) under the forward context, and samples.

A step has one host-device sync: reading back the sampled ids."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import os

import numpy as np
import torch

from pagoda import platform
from pagoda.attention.backend import CommonAttentionMetadata, get_attention_backend
from pagoda.config import EngineConfig
from pagoda.core.sched_output import ModelRunnerOutput, SchedulerOutput
from pagoda.forward_context import set_forward_context
from pagoda.layers.attention import Attention
from pagoda.layers.sampler import Sampler, SamplingMetadata, gather_logprobs
from pagoda.model_loader.loader import get_model
from pagoda.worker.cuda_graphs import (CudaGraphRunner, DecodeLookahead, StepBuffers,
                                       capture_sizes, wait_host)
from pagoda.worker.input_batch import InputBatch, RequestState, SamplingMetadataCache


@dataclass
class StepInputs:
    req_ids: list[str]
    rows: np.ndarray  # InputBatch row of each request
    graph_size: int  # > 0: replay the graph of this padded size
    input_ids: torch.Tensor
    positions: torch.Tensor
    common: CommonAttentionMetadata
    sampling_rows: np.ndarray  # index into req_ids of each request that samples
    logits_indices: Optional[torch.Tensor]  # None: hidden[:n] are the sampling rows
    prompt_lp_spans: list[tuple[int, int, int, int]]  # (req idx, first tok, count, position)
    positions_np: np.ndarray  # host copy of the positions


class ModelRunner:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.device = config.device
        self.block_size = config.cache_config.block_size
        self.model = get_model(config.model_config, self.device)
        self.vocab_size = config.model_config.vocab_size
        self.max_model_len = config.model_config.max_model_len
        self.backend = get_attention_backend(platform.default_attention_backend(self.device))
        self.sampler = Sampler()
        self.kv_caches: Optional[list[torch.Tensor]] = None
        self.attn_layers = [m for m in self.model.modules() if isinstance(m, Attention)]
        # longrope: where the long-factor rows of the cos/sin cache start (rope_index)
        self.rope_long_offset = next((m.long_offset for m in self.model.modules()
                                      if getattr(m, "long_offset", None)), None)
        sched = config.scheduler_config
        self.batch = InputBatch(sched.max_num_seqs, self.max_model_len, self.block_size)
        self.use_graphs = (self.device.type == "cuda" and not config.enforce_eager
                           and self.backend.name == "triton")
        sizes = capture_sizes(sched.max_num_seqs, sched.max_num_batched_tokens)
        self.graphs = CudaGraphRunner(sizes if self.use_graphs else [])
        self.buffers = StepBuffers(max(sched.max_num_batched_tokens, sizes[-1]),
                                   max(sched.max_num_seqs, sizes[-1]), self.batch.max_blocks,
                                   self.device)
        self.md_cache = SamplingMetadataCache(self.batch, self.vocab_size, self.device)
        # Decode lookahead: launch step N+1 while the host finishes step N (CUDA graphs;
        # PAGODA_LOOKAHEAD=0 turns it off, =force keeps it for CPU emulation tests).
        mode = os.environ.get("PAGODA_LOOKAHEAD", "1")
        self.look_ahead = (self.use_graphs and mode != "0") or mode == "force"
        self.lookahead = DecodeLookahead(self, sizes[-1] if self.look_ahead else 0)
        self.kv_all: Optional[torch.Tensor] = None  # all layers' caches, when shapes agree
        self.num_kv_blocks = 0  # the scheduler's blocks; scratch blocks follow them
        rows = max(sched.max_num_seqs, sizes[-1])
        self._d2h = [torch.zeros(rows, dtype=torch.int64, pin_memory=True)
                     for _ in range(2)] if self.device.type == "cuda" else []
        self._d2h_next = 0

    # -- KV cache, profiling, graphs -----------------------------------------------------
    def kv_bytes_per_block(self) -> int:
        itemsize = torch.empty(0, dtype=self.config.model_config.dtype).element_size()
        return sum(2 * self.block_size * layer.num_kv_heads * layer.head_dim * itemsize
                   for layer in self.attn_layers)

    def num_scratch_blocks(self) -> int:
        return self.lookahead.num_scratch

    def initialize_kv_cache(self, num_blocks: int) -> None:
        """num_blocks for the scheduler, plus the lookahead's scratch blocks after them. When
        every layer has the same KV shape, one tensor holds all layers (one copy moves a
        slot in every layer)."""
        dtype, bs = self.config.model_config.dtype, self.block_size
        self.num_kv_blocks = num_blocks
        total = num_blocks + self.lookahead.num_scratch
        layers = sorted(self.attn_layers, key=lambda m: m.layer_idx)
        shapes = {(layer.num_kv_heads, layer.head_dim) for layer in layers}
        if len(shapes) == 1:
            heads, dim = shapes.pop()
            self.kv_all = torch.zeros(len(layers), 2, total, bs, heads, dim, dtype=dtype,
                                      device=self.device)
            self.kv_caches = list(self.kv_all.unbind(0))
        else:
            self.kv_caches = [torch.zeros(2, total, bs, layer.num_kv_heads, layer.head_dim,
                                          dtype=dtype, device=self.device) for layer in layers]

    @torch.inference_mode()
    def profile_run(self, num_tokens: int) -> None:
        """A forward at the largest step size with no KV cache, then logits (in the model's
        dtype and in fp32) and sampling noise for the largest batch of sequences, to measure
        peak memory."""
        lens = [min(self.max_model_len, num_tokens - i)
                for i in range(0, num_tokens, self.max_model_len)]
        starts = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
        seq_lens = np.array(lens, dtype=np.int32)
        ids = torch.zeros(num_tokens, dtype=torch.long, device=self.device)
        positions = torch.from_numpy(np.concatenate([np.arange(n) for n in lens])).to(self.device)
        common = _common(len(lens), num_tokens, max(lens), starts, seq_lens,
                         torch.from_numpy(starts).to(self.device),
                         torch.from_numpy(seq_lens).to(self.device),
                         torch.zeros(len(lens), 1, dtype=torch.int32, device=self.device),
                         torch.full((num_tokens,), -1, dtype=torch.int64, device=self.device))
        with set_forward_context(self.backend.build_metadata(common), None, self.backend):
            hidden = self.model(ids, positions)
        rows = min(num_tokens, self.config.scheduler_config.max_num_seqs)
        logits = self.model.compute_logits(hidden[:rows])
        # the sampler's worst case: fp32 logits (top-k/top-p, logprobs) and fp32 noise
        logits_fp32 = logits.float()
        torch.empty_like(logits_fp32).exponential_()

    @torch.inference_mode()
    def capture_cudagraphs(self) -> None:
        if not self.use_graphs or self.kv_caches is None:
            return
        self.buffers.set_dummy_decode(self.graphs.sizes[-1])
        self.graphs.capture(self._graph_forward)

    def _graph_forward(self, size: int) -> torch.Tensor:
        buf = self.buffers
        qsl, seq_lens = buf.dev["query_start_loc"][:size + 1], buf.dev["seq_lens"][:size]
        # max_seq_len only picks the split-KV factor, frozen into the graph: plan for the
        # longest context so long sequences keep their parallelism.
        common = _common(size, size, 1, np.arange(size + 1, dtype=np.int32),
                         np.full(size, self.max_model_len, np.int32), qsl, seq_lens,
                         buf.block_table[:size], buf.dev["slot_mapping"][:size])
        with set_forward_context(self.backend.build_metadata(common), self.kv_caches,
                                 self.backend):
            return self.model(buf.dev["input_ids"][:size], buf.dev["positions"][:size])

    # -- one step -----------------------------------------------------------------------
    @torch.inference_mode()
    def execute_model(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        self._update_states(sched)
        if sched.is_empty:
            self.lookahead.pending = None
            return ModelRunnerOutput([], [])
        result = self.lookahead.take(sched)
        if result is not None:
            return result
        step = self._prepare_inputs(sched)
        if step.graph_size:
            hidden = self.graphs.replay(step.graph_size)
        else:
            metadata = self.backend.build_metadata(step.common)
            with set_forward_context(metadata, self.kv_caches, self.backend):
                hidden = self.model(step.input_ids, step.positions)
        return self._sample(step, hidden)

    def _update_states(self, sched: SchedulerOutput) -> None:
        for req_id in sched.finished_req_ids:
            self.batch.remove(req_id)
        for data in sched.scheduled_new_reqs:
            self.batch.remove(data.req_id)  # a resumed request starts over
            self.batch.add(data, self.vocab_size, self.device)
        for data in sched.scheduled_cached_reqs:
            self.batch.update(data)

    def _prepare_inputs(self, sched: SchedulerOutput) -> StepInputs:
        batch, bs = self.batch, self.block_size
        req_ids = list(sched.num_scheduled_tokens)
        n = len(req_ids)
        rows = np.fromiter((batch.states[r].row for r in req_ids), np.int64, n)
        counts = np.fromiter(sched.num_scheduled_tokens.values(), np.int32, n)
        starts = np.zeros(n + 1, np.int32)
        np.cumsum(counts, out=starts[1:])
        total = int(starts[-1])
        first = batch.num_computed[rows]
        seq_lens = first + counts
        if total == n:  # decode-only: one token per request
            token_rows, positions = rows, first.astype(np.int64)
        else:
            token_rows = np.repeat(rows, counts)
            positions = np.repeat((first - starts[:-1]).astype(np.int64), counts)
            positions += np.arange(total)
        slots = batch.block_table[token_rows, positions // bs].astype(np.int64) * bs
        slots += positions % bs
        sampling_rows = np.flatnonzero(seq_lens == batch.num_tokens[rows])
        size = self.graphs.padded_size(n) if total == n else 0
        buf = self.buffers
        buf.wait_host_free()
        padded, padded_reqs = size or total, size or n
        ids = buf.fill("input_ids", batch.token_ids[token_rows, positions], padded)
        pos = buf.fill("positions", self.rope_index(positions, batch.num_tokens[token_rows]),
                       padded)
        slot_mapping = buf.fill("slot_mapping", slots, padded, pad=-1)
        qsl = buf.fill("query_start_loc", starts, padded_reqs + 1, pad=total)
        lens = buf.fill("seq_lens", seq_lens, padded_reqs)
        width = max(1, int(batch.num_blocks[rows].max()))
        block_table = buf.fill_block_table(batch.block_table[rows, :width], padded_reqs)
        logits_indices = None
        if total != n or len(sampling_rows) != n:
            logits_indices = buf.fill("logits_indices", starts[1:][sampling_rows] - 1,
                                      len(sampling_rows))
        buf.mark_uploaded()
        common = _common(n, total, int(counts.max()), starts, seq_lens, qsl[:n + 1],
                         lens[:n], block_table[:n], slot_mapping[:total])
        return StepInputs(req_ids, rows, size, ids, pos, common, sampling_rows,
                          logits_indices, self._prompt_lp_spans(req_ids, starts, first),
                          positions)

    def rope_index(self, positions: np.ndarray, num_tokens: np.ndarray) -> np.ndarray:
        """The model's position input: the positions, except for longrope models, where it
        indexes the joined short + long cos/sin cache (layers/rotary.py). A request longer
        than the original context (num_tokens, per token) uses the long rows; the scheduler
        has recomputed any request that crossed that length."""
        offset = self.rope_long_offset
        if offset is None:
            return positions
        return positions + np.where(num_tokens > offset, offset, 0)

    def _prompt_lp_spans(self, req_ids: list[str], starts: np.ndarray, first: np.ndarray
                         ) -> list[tuple[int, int, int, int]]:
        spans = []
        if not self.batch.prompt_lp_reqs:
            return spans
        for i, req_id in enumerate(req_ids):
            state = self.batch.states[req_id]
            done = int(first[i])
            if state.params.prompt_logprobs is None or done >= state.num_prompt_tokens - 1:
                continue
            count = min(int(starts[i + 1] - starts[i]), state.num_prompt_tokens - 1 - done)
            spans.append((i, int(starts[i]), count, done))
        return spans

    # -- sampling -----------------------------------------------------------------------
    def _sample(self, step: StepInputs, hidden: torch.Tensor) -> ModelRunnerOutput:
        n = len(step.req_ids)
        sampled_lists: list[list[int]] = [[] for _ in range(n)]
        logprob_lists: list = [None] * n
        if len(step.sampling_rows):
            states = [self.batch.states[step.req_ids[i]] for i in step.sampling_rows]
            selected = hidden[:n] if step.logits_indices is None else hidden[step.logits_indices]
            logits = self.model.compute_logits(selected)
            md = self.md_cache.get(states)
            out = self.sample_logits(logits, md)
            host, event = self.copy_to_host(out.sampled)
            if self._can_look_ahead(step, md):
                self.lookahead.launch(step.req_ids, step.rows, np.ones(n, dtype=bool),
                                      step.positions_np + 1, step.graph_size, md, out.sampled)
            sampled = wait_host(host, event)  # the step's one host sync
            self.batch.append_sampled(step.rows[step.sampling_rows], sampled)
            rows = _logprob_rows(out, states)
            for j, (i, token) in enumerate(zip(step.sampling_rows.tolist(), sampled.tolist())):
                sampled_lists[i] = [token]
                logprob_lists[i] = rows[j]
        prompt_lps = self._prompt_logprobs(step, hidden)
        return ModelRunnerOutput(step.req_ids, sampled_lists, logprob_lists, prompt_lps)

    # -- decode lookahead (see cuda_graphs.DecodeLookahead) --------------------------------
    def _can_look_ahead(self, step: StepInputs, md: SamplingMetadata) -> bool:
        return (self.look_ahead and step.graph_size > 0
                and len(step.sampling_rows) == len(step.req_ids)
                and self.md_cache.is_cached(md) and not md.generators
                and md.max_num_logprobs is None and not self.batch.prompt_lp_reqs)

    def sample_logits(self, logits: torch.Tensor, md: SamplingMetadata):
        return self.sampler(logits, md)

    def copy_to_host(self, sampled: torch.Tensor
                      ) -> tuple[torch.Tensor, Optional[torch.cuda.Event]]:
        """Starts the copy of the sampled ids to the host; two pinned buffers alternate, so
        a lookahead's copy never lands where the host is still to read."""
        if not self._d2h or sampled.shape[0] > self._d2h[0].shape[0]:
            return sampled.cpu(), None
        host = self._d2h[self._d2h_next][:sampled.shape[0]]
        self._d2h_next ^= 1
        host.copy_(sampled, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return host, event

    def _prompt_logprobs(self, step: StepInputs, hidden: torch.Tensor) -> dict:
        result = {}
        for i, start, count, first_pos in step.prompt_lp_spans:
            state = self.batch.states[step.req_ids[i]]
            logits = self.model.compute_logits(hidden[start:start + count]).float()
            logprobs = torch.log_softmax(logits, dim=-1)
            tokens = self.batch.tokens(state)[first_pos + 1:first_pos + 1 + count]
            targets = torch.from_numpy(tokens.astype(np.int64)).to(logprobs.device)
            ids, lps, ranks = gather_logprobs(logprobs, targets, state.params.prompt_logprobs)
            result[state.req_id] = list(zip(ids.tolist(), lps.tolist(), ranks.tolist()))
        return result


def _common(num_reqs: int, num_tokens: int, max_query_len: int, starts: np.ndarray,
            seq_lens: np.ndarray, query_start_loc: torch.Tensor, seq_lens_dev: torch.Tensor,
            block_table: torch.Tensor, slot_mapping: torch.Tensor) -> CommonAttentionMetadata:
    return CommonAttentionMetadata(
        num_reqs=num_reqs, num_actual_tokens=num_tokens, max_query_len=max_query_len,
        max_seq_len=int(seq_lens.max()) if len(seq_lens) else 0,
        query_start_loc=query_start_loc, seq_lens=seq_lens_dev, block_table=block_table,
        slot_mapping=slot_mapping, query_start_loc_cpu=torch.from_numpy(starts),
        seq_lens_cpu=torch.from_numpy(seq_lens))


def _logprob_rows(out, states: list[RequestState]) -> list[Optional[list]]:
    """Per request: [(ids, logprobs, ranks)] trimmed to its own k, or None if not asked."""
    if out.logprobs is None:
        return [None] * len(states)
    ids, lps, ranks = out.logprob_token_ids.tolist(), out.logprobs.tolist(), out.ranks.tolist()
    rows = []
    for j, state in enumerate(states):
        k = state.params.logprobs
        rows.append(None if k is None else [(ids[j][:k + 1], lps[j][:k + 1], ranks[j][:k + 1])])
    return rows
