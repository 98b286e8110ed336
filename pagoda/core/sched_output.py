"""What the scheduler tells the model runner each step: new requests once, then only diffs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from pagoda.sampling_params import SamplingParams


@dataclass
class NewRequestData:
    """Sent the first time a request is scheduled, and again when it resumes after
    preemption (the runner dropped its state then)."""

    req_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    sampling_params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int


@dataclass
class CachedRequestData:
    req_id: str
    new_block_ids: list[int]
    num_computed_tokens: int


@dataclass
class SchedulerOutput:
    scheduled_new_reqs: list[NewRequestData]
    scheduled_cached_reqs: list[CachedRequestData]
    num_scheduled_tokens: dict[str, int]
    total_num_scheduled_tokens: int
    finished_req_ids: set[str] = field(default_factory=set)  # finished, aborted or preempted

    @property
    def is_empty(self) -> bool:
        return self.total_num_scheduled_tokens == 0


@dataclass
class ModelRunnerOutput:
    """Per scheduled request: the sampled ids (empty while a prompt is still being
    chunked) and, when asked for, logprobs."""

    req_ids: list[str]
    sampled_token_ids: list[list[int]]
    # per request: list over sampled tokens of (token ids, logprobs, ranks) rows, or None
    logprobs: list[Optional[list[tuple[list[int], list[float], list[int]]]]] = field(
        default_factory=list)
    # per request with prompt_logprobs: rows for the prompt positions computed this step
    prompt_logprobs: dict[str, list[tuple[list[int], list[float], list[int]]]] = field(
        default_factory=dict)
