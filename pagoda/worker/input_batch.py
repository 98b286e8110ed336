"""The runner's persistent per-request state and the per-step sampling metadata built from it.

State arrives once (new request) and is then only updated by diffs. Every request owns one
row of `InputBatch`'s numpy arrays (its token ids, block table, counts), so a step's inputs
are gathered for the whole batch with a few vectorised numpy operations instead of a Python
loop per token."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from pagoda.core.sched_output import CachedRequestData, NewRequestData
from pagoda.layers.sampler import SamplingMetadata, draw_exponential
from pagoda.sampling_params import SamplingParams


@dataclass
class RequestState:
    req_id: str
    row: int  # this request's row in the InputBatch arrays
    num_prompt_tokens: int
    params: SamplingParams
    generator: Optional[torch.Generator] = None

    @property
    def dynamic_sampling(self) -> bool:
        """Whether its sampling metadata changes from step to step (penalties read the
        output so far; min_tokens bans stop tokens until enough were generated; bad words
        ban a token when the output ends with the rest of the word)."""
        p = self.params
        return (p.repetition_penalty != 1.0 or p.frequency_penalty != 0.0
                or p.presence_penalty != 0.0 or (p.min_tokens > 0 and bool(p.all_stop_token_ids))
                or bool(p.bad_words_token_ids))


def _make_generator(data: NewRequestData, vocab_size: int,
                    device: torch.device) -> Optional[torch.Generator]:
    if data.sampling_params.seed is None:
        return None
    generator = torch.Generator(device=device).manual_seed(data.sampling_params.seed)
    # A resumed request replays the draws it already made (one vocabulary-sized draw per
    # sampled token), so a seed gives the same text after a preemption too.
    for _ in range(len(data.output_token_ids)):
        draw_exponential((vocab_size,), device, generator)
    return generator


class InputBatch:
    """Per-request rows: token ids (prompt + sampled so far), block table, counts."""

    def __init__(self, max_reqs: int, max_model_len: int, block_size: int):
        self.width = max_model_len + 1
        self.max_blocks = -(-max_model_len // block_size) + 1
        self.states: dict[str, RequestState] = {}
        self.version = 0  # bumped whenever a request joins or leaves
        self.prompt_lp_reqs: set[str] = set()  # requests that asked for prompt logprobs
        self._free_rows: list[int] = []
        self.token_ids = np.zeros((0, self.width), np.int32)
        self.num_tokens = np.zeros(0, np.int32)
        self.num_computed = np.zeros(0, np.int32)
        self.block_table = np.zeros((0, self.max_blocks), np.int32)
        self.num_blocks = np.zeros(0, np.int32)
        self._grow(max_reqs)

    def _grow(self, rows: int) -> None:
        old = len(self.num_tokens)
        self.token_ids = _resized(self.token_ids, rows)
        self.num_tokens = _resized(self.num_tokens, rows)
        self.num_computed = _resized(self.num_computed, rows)
        self.block_table = _resized(self.block_table, rows)
        self.num_blocks = _resized(self.num_blocks, rows)
        self._free_rows.extend(range(rows - 1, old - 1, -1))

    def add(self, data: NewRequestData, vocab_size: int, device: torch.device) -> None:
        if not self._free_rows:
            self._grow(2 * len(self.num_tokens))
        row = self._free_rows.pop()
        self.version += 1
        tokens = data.prompt_token_ids + data.output_token_ids
        self.token_ids[row, :len(tokens)] = tokens
        self.num_tokens[row] = len(tokens)
        self.num_computed[row] = data.num_computed_tokens
        self.num_blocks[row] = 0
        self._add_blocks(row, data.block_ids)
        self.states[data.req_id] = RequestState(
            data.req_id, row, len(data.prompt_token_ids), data.sampling_params,
            _make_generator(data, vocab_size, device))
        if data.sampling_params.prompt_logprobs is not None:
            self.prompt_lp_reqs.add(data.req_id)

    def remove(self, req_id: str) -> None:
        state = self.states.pop(req_id, None)
        if state is not None:
            self._free_rows.append(state.row)
            self.prompt_lp_reqs.discard(req_id)
            self.version += 1

    def update(self, data: CachedRequestData) -> None:
        row = self.states[data.req_id].row
        if data.new_block_ids:
            self._add_blocks(row, data.new_block_ids)
        self.num_computed[row] = data.num_computed_tokens

    def _add_blocks(self, row: int, block_ids: list[int]) -> None:
        start = int(self.num_blocks[row])
        end = start + len(block_ids)
        if end > self.max_blocks:
            raise ValueError(f"a request holds {end} blocks, more than the "
                             f"{self.max_blocks} that max_model_len allows")
        self.block_table[row, start:end] = block_ids
        self.num_blocks[row] = end

    def append_sampled(self, rows: np.ndarray, tokens: np.ndarray) -> None:
        """Vectorised: the sampled token of each row goes after its last token."""
        ends = self.num_tokens[rows]
        ok = ends < self.width  # a full row never computes again: nothing to keep
        self.token_ids[rows[ok], ends[ok]] = tokens[ok]
        self.num_tokens[rows] = ends + 1

    def tokens(self, state: RequestState) -> np.ndarray:
        return self.token_ids[state.row, :self.num_tokens[state.row]]

    def num_output_tokens(self, state: RequestState) -> int:
        return int(self.num_tokens[state.row]) - state.num_prompt_tokens


def _resized(array: np.ndarray, rows: int) -> np.ndarray:
    out = np.zeros((rows,) + array.shape[1:], array.dtype)
    out[:len(array)] = array
    return out


# -- sampling metadata ---------------------------------------------------------------------
def _to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    host = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host


def _padded(rows: list[np.ndarray], pad: int, device: torch.device) -> torch.Tensor:
    width = max(1, max(len(r) for r in rows))
    out = np.full((len(rows), width), pad, dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    host = torch.from_numpy(out)
    if device.type == "cuda":  # pinned + asynchronous: no host-device sync
        return host.pin_memory().to(device, non_blocking=True)
    return host


def build_sampling_metadata(states: list[RequestState], batch: InputBatch, vocab_size: int,
                            device: torch.device) -> SamplingMetadata:
    params = [s.params for s in states]
    temps = [p.temperature for p in params]
    md = SamplingMetadata(temperature=_to_device(temps, torch.float32, device),
                          all_greedy=all(t < 1e-5 for t in temps))
    if any(p.top_k > 0 for p in params):
        md.top_k = _to_device([p.top_k for p in params], torch.int64, device)
    if any(p.top_p < 1.0 for p in params):
        md.top_p = _to_device([p.top_p for p in params], torch.float32, device)
    if any(p.min_p > 0.0 for p in params):
        md.min_p = _to_device([p.min_p for p in params], torch.float32, device)
    md.generators = {i: s.generator for i, s in enumerate(states) if s.generator is not None}
    _add_penalties(md, states, batch, vocab_size, device)
    for i, s in enumerate(states):
        p = s.params
        if p.logit_bias:
            md.logit_bias.append((i, list(p.logit_bias), list(p.logit_bias.values())))
        if p.allowed_token_ids:
            md.allowed_token_ids.append((i, list(p.allowed_token_ids)))
        if batch.num_output_tokens(s) < p.min_tokens and p.all_stop_token_ids:
            md.banned_tokens.append((i, sorted(p.all_stop_token_ids)))
        if p.bad_words_token_ids:
            banned = _bad_word_completions(p.bad_words_token_ids,
                                           batch.tokens(s)[s.num_prompt_tokens:])
            if banned:
                md.banned_tokens.append((i, banned))
    wanted = [p.logprobs for p in params if p.logprobs is not None]
    md.max_num_logprobs = max(wanted) if wanted else None
    return md


def _bad_word_completions(sequences: list[list[int]], output: np.ndarray) -> list[int]:
    """The tokens that would complete a bad word: the last token of each sequence whose
    other tokens end the output so far (one-token words are always banned)."""
    banned = set()
    for seq in sequences:
        head = len(seq) - 1
        if head == 0 or (len(output) >= head and list(output[len(output) - head:]) == seq[:-1]):
            banned.add(seq[-1])
    return sorted(banned)


def _add_penalties(md: SamplingMetadata, states: list[RequestState], batch: InputBatch,
                   vocab_size: int, device: torch.device) -> None:
    params = [s.params for s in states]
    has_rep = any(p.repetition_penalty != 1.0 for p in params)
    has_freq = any(p.frequency_penalty != 0.0 for p in params)
    has_pres = any(p.presence_penalty != 0.0 for p in params)
    if not (has_rep or has_freq or has_pres):
        return
    tokens = [batch.tokens(s) for s in states]
    md.output_token_ids = _padded([t[s.num_prompt_tokens:] for t, s in zip(tokens, states)],
                                  vocab_size, device)
    md.prompt_token_ids = _padded([t[:s.num_prompt_tokens] for t, s in zip(tokens, states)],
                                  vocab_size, device)
    f32 = torch.float32
    md.repetition_penalty = _to_device([p.repetition_penalty for p in params], f32,
                                       device) if has_rep else None
    md.frequency_penalty = _to_device([p.frequency_penalty for p in params], f32,
                                      device) if has_freq else None
    md.presence_penalty = _to_device([p.presence_penalty for p in params], f32,
                                     device) if has_pres else None
    if md.presence_penalty is None:  # apply_penalties gates on these two
        md.presence_penalty = torch.zeros(len(states), device=device)


class SamplingMetadataCache:
    """Reuses the last step's metadata while the sampling requests stay the same and none
    of them has step-dependent options (the common decode case)."""

    def __init__(self, batch: InputBatch, vocab_size: int, device: torch.device):
        self.batch, self.vocab_size, self.device = batch, vocab_size, device
        self._key: Optional[tuple] = None
        self._md: Optional[SamplingMetadata] = None

    def is_cached(self, md: SamplingMetadata) -> bool:
        return md is self._md

    def get(self, states: list[RequestState]) -> SamplingMetadata:
        key = (self.batch.version, tuple(s.row for s in states))
        if key == self._key and self._md is not None:
            return self._md
        md = build_sampling_metadata(states, self.batch, self.vocab_size, self.device)
        dynamic = any(s.dynamic_sampling for s in states)
        self._key, self._md = (None, None) if dynamic else (key, md)
        return md
