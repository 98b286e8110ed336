"""`StepRecorder`: what the engine actually scheduled, step by step.

It wraps the engine core's executor so that, for every step, it sees the SchedulerOutput
and the scheduler's requests, and records how many tokens were prompt tokens (prefill,
including chunks and prefix-cache misses), how many were generated tokens fed back (decode,
including recomputation after preemption), how much KV context was read, and the wall time
of the step (the executor returns sampled ids, so the device work is finished by then).
Prefill and decode counts therefore come from the engine, never from the workload's spec.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class StepRecord:
    num_reqs: int = 0
    num_tokens: int = 0          # all tokens computed this step
    prompt_tokens: int = 0       # of those, prompt positions
    generated_tokens: int = 0    # of those, positions holding generated tokens
    context_tokens: int = 0      # sum over requests of tokens attended (KV read)
    attn_pairs: int = 0          # sum over new tokens of the positions each attends to
    num_sampled: int = 0         # requests that reached their last known token (sample)
    time_s: float = 0.0

    @property
    def is_decode_only(self) -> bool:
        return self.num_tokens > 0 and self.prompt_tokens == 0


@dataclass
class StepTotals:
    steps: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    decode_only_steps: int = 0
    decode_only_time_s: float = 0.0
    step_time_s: float = 0.0
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _step_record(sched: Any, requests: dict) -> StepRecord:
    """Called after `schedule()` advanced each request's num_computed_tokens by the number
    of tokens scheduled, so the scheduled span is [computed - n, computed)."""
    rec = StepRecord()
    for req_id, n in sched.num_scheduled_tokens.items():
        request = requests.get(req_id)
        if request is None or n <= 0:
            continue
        end = request.num_computed_tokens
        start = end - n
        prompt = max(0, min(end, request.num_prompt_tokens) - start)
        rec.num_reqs += 1
        rec.num_tokens += n
        rec.prompt_tokens += prompt
        rec.generated_tokens += n - prompt
        rec.context_tokens += end
        rec.attn_pairs += n * start + n * (n + 1) // 2
        rec.num_sampled += int(end >= request.num_tokens)
    return rec


class StepRecorder:
    """Attach to an `LLM` (or its LLMEngine / EngineCore); `records` grows one entry per
    executed step while `enabled`."""

    def __init__(self, llm_or_engine: Any):
        core = getattr(llm_or_engine, "engine", llm_or_engine)
        core = getattr(core, "core", core)
        if not hasattr(core, "executor") or not hasattr(core, "scheduler"):
            raise TypeError("StepRecorder needs an in-process engine core (LLM, LLMEngine or "
                            "EngineCore) with `executor` and `scheduler`")
        self.core = core
        self.records: list[StepRecord] = []
        self.enabled = True
        self._original = core.executor.execute
        core.executor.execute = self._execute

    def _execute(self, sched: Any) -> Any:
        if not self.enabled:
            return self._original(sched)
        rec = _step_record(sched, self.core.scheduler.requests)
        start = time.perf_counter()
        result = self._original(sched)
        rec.time_s = time.perf_counter() - start
        if rec.num_tokens:
            self.records.append(rec)
        return result

    def reset(self) -> None:
        self.records = []

    def detach(self) -> None:
        self.core.executor.execute = self._original

    def totals(self) -> StepTotals:
        totals = StepTotals()
        for rec in self.records:
            totals.steps += 1
            totals.prompt_tokens += rec.prompt_tokens
            totals.generated_tokens += rec.generated_tokens
            totals.step_time_s += rec.time_s
            if rec.is_decode_only:
                totals.decode_only_steps += 1
                totals.decode_only_time_s += rec.time_s
        return totals
