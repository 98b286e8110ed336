"""Per-request timing and per-iteration stats, computed in the front end from what the core
sends back (token counts, first-scheduled times) and the front end's own clock."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

from pagoda.engine.messages import EngineCoreOutputs


@dataclass
class FinishedRequestStats:
    finish_reason: str
    e2e_latency: float
    queue_time: float
    num_prompt_tokens: int
    num_generation_tokens: int


@dataclass
class IterationStats:
    """What happened since the last batch of core outputs."""

    num_prompt_tokens: int = 0  # prompts whose prefill completed (their first token came)
    num_generation_tokens: int = 0
    time_to_first_tokens: list[float] = field(default_factory=list)
    inter_token_latencies: list[float] = field(default_factory=list)
    finished: list[FinishedRequestStats] = field(default_factory=list)


@dataclass
class _RequestTimes:
    arrival_time: float
    num_prompt_tokens: int
    scheduled_time: Optional[float] = None
    first_token_time: Optional[float] = None
    last_token_time: Optional[float] = None
    num_generation_tokens: int = 0


class RequestStatsTracker:
    """Keyed by core request id (each of n samples is one core request, as in vLLM)."""

    def __init__(self):
        self.requests: dict[str, _RequestTimes] = {}

    def add(self, core_id: str, arrival_time: float, num_prompt_tokens: int) -> None:
        self.requests[core_id] = _RequestTimes(arrival_time, num_prompt_tokens)

    def on_outputs(self, batch: EngineCoreOutputs, now: Optional[float] = None
                   ) -> IterationStats:
        now = time.time() if now is None else now
        it = IterationStats()
        for core_id, when in batch.scheduled.items():
            req = self.requests.get(core_id)
            if req is not None and req.scheduled_time is None:
                req.scheduled_time = when
        for out in batch.outputs:
            req = self.requests.get(out.request_id)
            if req is None or not out.new_token_ids:
                continue
            if req.first_token_time is None:
                req.first_token_time = now
                it.num_prompt_tokens += req.num_prompt_tokens
                it.time_to_first_tokens.append(now - req.arrival_time)
            else:
                it.inter_token_latencies.append(now - req.last_token_time)
            req.last_token_time = now
            req.num_generation_tokens += len(out.new_token_ids)
            it.num_generation_tokens += len(out.new_token_ids)
            if out.finish_reason is not None:
                self.finish(out.request_id, out.finish_reason, it, now)
        return it

    def finish(self, core_id: str, reason: str, it: IterationStats,
               now: Optional[float] = None) -> None:
        """Ends a request (also for stop strings and aborts, which the core does not report)."""
        req = self.requests.pop(core_id, None)
        if req is None:
            return
        now = time.time() if now is None else now
        scheduled = req.scheduled_time if req.scheduled_time is not None else now
        it.finished.append(FinishedRequestStats(
            reason, now - req.arrival_time, max(0.0, scheduled - req.arrival_time),
            req.num_prompt_tokens, req.num_generation_tokens))
