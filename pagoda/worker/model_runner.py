"""Runs one scheduled step: keeps per-request state, builds the flat token batch and the
attention metadata, runs the model under the forward context and samples."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from pagoda.attention.backend import CommonAttentionMetadata, get_attention_backend
from pagoda.config import EngineConfig
from pagoda.core.sched_output import ModelRunnerOutput, SchedulerOutput
from pagoda.forward_context import set_forward_context
from pagoda.layers.attention import Attention
from pagoda.layers.sampler import Sampler, gather_logprobs
from pagoda.model_loader.loader import get_model
from pagoda import platform
from pagoda.worker.input_batch import RequestState, build_sampling_metadata


@dataclass
class StepInputs:
    req_ids: list[str]
    input_ids: torch.Tensor
    positions: torch.Tensor
    common: CommonAttentionMetadata
    logits_indices: torch.Tensor  # token index whose logits sample, one per sampling request
    sampling_rows: list[int]  # index into req_ids of each sampling request
    prompt_lp_spans: list[tuple[int, int, int, int]]  # (req idx, first tok, count, position)


class ModelRunner:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.device = config.device
        self.block_size = config.cache_config.block_size
        self.model = get_model(config.model_config, self.device)
        self.vocab_size = config.model_config.vocab_size
        self.backend = get_attention_backend(platform.default_attention_backend(self.device))
        self.sampler = Sampler()
        self.states: dict[str, RequestState] = {}
        self.kv_caches: Optional[list[torch.Tensor]] = None
        self.attn_layers = [m for m in self.model.modules() if isinstance(m, Attention)]

    # -- KV cache -----------------------------------------------------------------------
    def kv_bytes_per_block(self) -> int:
        itemsize = torch.empty(0, dtype=self.config.model_config.dtype).element_size()
        return sum(2 * self.block_size * layer.num_kv_heads * layer.head_dim * itemsize
                   for layer in self.attn_layers)

    def initialize_kv_cache(self, num_blocks: int) -> None:
        dtype = self.config.model_config.dtype
        self.kv_caches = [torch.zeros(2, num_blocks, self.block_size, layer.num_kv_heads,
                                      layer.head_dim, dtype=dtype, device=self.device)
                          for layer in sorted(self.attn_layers, key=lambda m: m.layer_idx)]

    @torch.inference_mode()
    def profile_run(self, num_tokens: int) -> None:
        """A forward at the largest step size with no KV cache, to measure peak memory."""
        max_len = self.config.model_config.max_model_len
        lens = [min(max_len, num_tokens - i) for i in range(0, num_tokens, max_len)]
        starts = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
        ids = torch.zeros(num_tokens, dtype=torch.long, device=self.device)
        positions = torch.from_numpy(np.concatenate([np.arange(n) for n in lens])).to(self.device)
        common = self._common_metadata(starts, np.array(lens, dtype=np.int32),
                                       np.zeros((len(lens), 1), np.int32),
                                       np.zeros(num_tokens, np.int64))
        with set_forward_context(self.backend.build_metadata(common), None, self.backend):
            hidden = self.model(ids, positions)
        self.model.compute_logits(hidden[starts[1:] - 1])

    # -- one step -----------------------------------------------------------------------
    @torch.inference_mode()
    def execute_model(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        self._update_states(sched)
        if sched.is_empty:
            return ModelRunnerOutput([], [])
        inputs = self._prepare_inputs(sched)
        metadata = self.backend.build_metadata(inputs.common)
        with set_forward_context(metadata, self.kv_caches, self.backend):
            hidden = self.model(inputs.input_ids, inputs.positions)
        return self._sample(inputs, hidden)

    def _update_states(self, sched: SchedulerOutput) -> None:
        for req_id in sched.finished_req_ids:
            self.states.pop(req_id, None)
        for data in sched.scheduled_new_reqs:
            self.states[data.req_id] = RequestState.from_new(data, self.vocab_size, self.device)
        for data in sched.scheduled_cached_reqs:
            state = self.states[data.req_id]
            state.block_ids.extend(data.new_block_ids)
            state.num_computed_tokens = data.num_computed_tokens

    def _prepare_inputs(self, sched: SchedulerOutput) -> StepInputs:
        req_ids = list(sched.num_scheduled_tokens)
        counts = np.array([sched.num_scheduled_tokens[r] for r in req_ids], dtype=np.int32)
        starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
        input_ids, positions, sampling_rows, lp_spans = [], [], [], []
        max_blocks = max(len(self.states[r].block_ids) for r in req_ids)
        block_table = np.zeros((len(req_ids), max_blocks), dtype=np.int32)
        seq_lens = np.empty(len(req_ids), dtype=np.int32)
        for i, req_id in enumerate(req_ids):
            state = self.states[req_id]
            first, n = state.num_computed_tokens, int(counts[i])
            input_ids.append(state.token_ids[first:first + n])
            positions.append(np.arange(first, first + n))
            block_table[i, :len(state.block_ids)] = state.block_ids
            seq_lens[i] = first + n
            if first + n == len(state.token_ids):
                sampling_rows.append(i)
            if state.params.prompt_logprobs is not None and first < state.num_prompt_tokens - 1:
                count = min(n, state.num_prompt_tokens - 1 - first)
                lp_spans.append((i, int(starts[i]), count, first))
        pos = np.concatenate(positions)
        token_rows = np.repeat(np.arange(len(req_ids)), counts)
        slots = block_table[token_rows, pos // self.block_size].astype(np.int64)
        slots = slots * self.block_size + pos % self.block_size
        common = self._common_metadata(starts, seq_lens, block_table, slots)
        ids = torch.tensor(np.concatenate(input_ids), dtype=torch.long).to(self.device)
        logits_indices = torch.tensor(starts[1:][sampling_rows] - 1, dtype=torch.long)
        return StepInputs(req_ids, ids, torch.from_numpy(pos).long().to(self.device), common,
                          logits_indices.to(self.device), sampling_rows, lp_spans)

    def _common_metadata(self, starts: np.ndarray, seq_lens: np.ndarray,
                         block_table: np.ndarray, slots: np.ndarray) -> CommonAttentionMetadata:
        starts_t, lens_t = torch.from_numpy(starts), torch.from_numpy(seq_lens)
        query_lens = starts[1:] - starts[:-1]
        return CommonAttentionMetadata(
            num_reqs=len(seq_lens), num_actual_tokens=int(starts[-1]),
            max_query_len=int(query_lens.max()), max_seq_len=int(seq_lens.max()),
            query_start_loc=starts_t.to(self.device), seq_lens=lens_t.to(self.device),
            block_table=torch.from_numpy(block_table).to(self.device),
            slot_mapping=torch.from_numpy(slots).to(self.device),
            query_start_loc_cpu=starts_t, seq_lens_cpu=lens_t)

    def _sample(self, inputs: StepInputs, hidden: torch.Tensor) -> ModelRunnerOutput:
        req_ids = inputs.req_ids
        sampled_lists: list[list[int]] = [[] for _ in req_ids]
        logprob_lists: list = [None] * len(req_ids)
        states = [self.states[req_ids[i]] for i in inputs.sampling_rows]
        if states:
            logits = self.model.compute_logits(hidden[inputs.logits_indices])
            md = build_sampling_metadata(states, self.vocab_size, self.device)
            out = self.sampler(logits, md)
            sampled = out.sampled.tolist()  # the step's one host sync
            rows = _logprob_rows(out, states)
            for j, i in enumerate(inputs.sampling_rows):
                sampled_lists[i] = [sampled[j]]
                states[j].token_ids.append(sampled[j])
                logprob_lists[i] = rows[j]
        prompt_lps = self._prompt_logprobs(inputs, hidden)
        return ModelRunnerOutput(req_ids, sampled_lists, logprob_lists, prompt_lps)

    def _prompt_logprobs(self, inputs: StepInputs, hidden: torch.Tensor) -> dict:
        result = {}
        for i, start, count, first_pos in inputs.prompt_lp_spans:
            state = self.states[inputs.req_ids[i]]
            logprobs = torch.log_softmax(self.model.compute_logits(hidden[start:start + count]),
                                         dim=-1)
            targets = torch.tensor(state.token_ids[first_pos + 1:first_pos + 1 + count],
                                   device=logprobs.device)
            ids, lps, ranks = gather_logprobs(logprobs, targets, state.params.prompt_logprobs)
            result[state.req_id] = list(zip(ids.tolist(), lps.tolist(), ranks.tolist()))
        return result


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
