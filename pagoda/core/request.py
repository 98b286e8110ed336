"""The engine core's view of one sequence: tokens, progress and status."""

from __future__ import annotations

import enum
import time
from typing import Optional

from pagoda.sampling_params import SamplingParams


class RequestStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    FINISHED_STOPPED = 3
    FINISHED_LENGTH_CAPPED = 4
    FINISHED_ABORTED = 5

    @property
    def finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED

    def finish_reason(self) -> Optional[str]:
        return _FINISH_REASONS.get(self)


# Looked up for every running request at every step: built once.
_FINISH_REASONS = {RequestStatus.FINISHED_STOPPED: "stop",
                   RequestStatus.FINISHED_LENGTH_CAPPED: "length",
                   RequestStatus.FINISHED_ABORTED: "abort"}


class Request:
    """Progress is one number, `num_computed_tokens`: prefill, chunks, cache hits and decode
    all just move it towards `num_tokens` (prompt + generated so far)."""

    def __init__(self, request_id: str, prompt_token_ids: list[int],
                 sampling_params: SamplingParams, eos_token_id: Optional[int] = None,
                 arrival_time: Optional[float] = None, cache_salt: Optional[str] = None):
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.sampling_params = sampling_params
        self.eos_token_id = eos_token_id
        self.arrival_time = arrival_time if arrival_time is not None else time.time()
        self.cache_salt = cache_salt
        self.output_token_ids: list[int] = []
        self.all_token_ids: list[int] = list(prompt_token_ids)
        self.num_computed_tokens = 0
        self.num_cached_tokens = -1  # prefix-cache hit of the first scheduling, -1 = not yet
        self.status = RequestStatus.WAITING
        self.stop_reason: Optional[int | str] = None
        self.num_preemptions = 0
        self.first_scheduled_time: Optional[float] = None
        self.block_hashes: list[bytes] = []  # hashes of the full blocks of all_token_ids
        self.rope_long = False  # longrope: its KV is computed with the long factors

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def max_tokens(self) -> int:
        return self.sampling_params.max_tokens or 1 << 62

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    def is_finished(self) -> bool:
        return self.status.finished

    def finish_reason(self) -> Optional[str]:
        return self.status.finish_reason()

    def __repr__(self) -> str:
        return (f"Request({self.request_id!r}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens}, {self.status.name})")
