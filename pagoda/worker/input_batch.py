"""The runner's persistent per-request state, and the per-step sampling metadata built
from it. State arrives once (new request) and is then only updated by diffs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from pagoda.core.sched_output import NewRequestData
from pagoda.layers.sampler import SamplingMetadata
from pagoda.sampling_params import SamplingParams


@dataclass
class RequestState:
    req_id: str
    token_ids: list[int]  # prompt + every token sampled so far
    num_prompt_tokens: int
    params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int
    generator: Optional[torch.Generator] = None
    prompt_logprob_rows: list = field(default_factory=list)

    @classmethod
    def from_new(cls, data: NewRequestData, vocab_size: int,
                 device: torch.device) -> "RequestState":
        generator = None
        if data.sampling_params.seed is not None:
            generator = torch.Generator(device=device).manual_seed(data.sampling_params.seed)
            # A resumed request replays the draws it already made (one vocabulary-sized draw
            # per sampled token), so a seed gives the same text after a preemption too.
            for _ in range(len(data.output_token_ids)):
                torch.empty(vocab_size, device=device).exponential_(generator=generator)
        return cls(data.req_id, data.prompt_token_ids + data.output_token_ids,
                   len(data.prompt_token_ids), data.sampling_params, list(data.block_ids),
                   data.num_computed_tokens, generator)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens


def _padded(rows: list[list[int]], pad: int, device: torch.device) -> torch.Tensor:
    width = max(1, max(len(r) for r in rows))
    out = torch.full((len(rows), width), pad, dtype=torch.int64)
    for i, r in enumerate(rows):
        if r:
            out[i, :len(r)] = torch.tensor(r, dtype=torch.int64)
    return out.to(device)


def build_sampling_metadata(states: list[RequestState], vocab_size: int,
                            device: torch.device) -> SamplingMetadata:
    params = [s.params for s in states]
    temps = [p.temperature for p in params]
    md = SamplingMetadata(
        temperature=torch.tensor(temps, dtype=torch.float32, device=device),
        all_greedy=all(t < 1e-5 for t in temps))
    if any(p.top_k > 0 for p in params):
        md.top_k = torch.tensor([p.top_k for p in params], dtype=torch.int64, device=device)
    if any(p.top_p < 1.0 for p in params):
        md.top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device)
    if any(p.min_p > 0.0 for p in params):
        md.min_p = torch.tensor([p.min_p for p in params], dtype=torch.float32, device=device)
    md.generators = {i: s.generator for i, s in enumerate(states) if s.generator is not None}
    _add_penalties(md, states, vocab_size, device)
    for i, s in enumerate(states):
        p = s.params
        if p.logit_bias:
            md.logit_bias.append((i, list(p.logit_bias), list(p.logit_bias.values())))
        if p.allowed_token_ids:
            md.allowed_token_ids.append((i, list(p.allowed_token_ids)))
        if s.num_output_tokens < p.min_tokens and p.all_stop_token_ids:
            md.banned_tokens.append((i, sorted(p.all_stop_token_ids)))
    wanted = [p.logprobs for p in params if p.logprobs is not None]
    md.max_num_logprobs = max(wanted) if wanted else None
    return md


def _add_penalties(md: SamplingMetadata, states: list[RequestState], vocab_size: int,
                   device: torch.device) -> None:
    params = [s.params for s in states]
    has_rep = any(p.repetition_penalty != 1.0 for p in params)
    has_freq = any(p.frequency_penalty != 0.0 for p in params)
    has_pres = any(p.presence_penalty != 0.0 for p in params)
    if not (has_rep or has_freq or has_pres):
        return
    md.output_token_ids = _padded([s.token_ids[s.num_prompt_tokens:] for s in states],
                                  vocab_size, device)
    md.prompt_token_ids = _padded([s.token_ids[:s.num_prompt_tokens] for s in states],
                                  vocab_size, device)
    md.repetition_penalty = torch.tensor([p.repetition_penalty for p in params],
                                         device=device) if has_rep else None
    md.frequency_penalty = torch.tensor([p.frequency_penalty for p in params],
                                        device=device) if has_freq else None
    md.presence_penalty = torch.tensor([p.presence_penalty for p in params],
                                       device=device) if has_pres else None
    if md.presence_penalty is None:  # apply_penalties gates on these two
        md.presence_penalty = torch.zeros(len(states), device=device)
