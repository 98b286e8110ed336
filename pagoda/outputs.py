"""What the engine returns: RequestOutput / CompletionOutput / Logprob, shaped as vLLM's."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union


@dataclass
class Logprob:
    logprob: float
    rank: Optional[int] = None
    decoded_token: Optional[str] = None


# One dict per position: token id -> Logprob (the sampled token plus the top-k).
SampleLogprobs = list[dict[int, Logprob]]
PromptLogprobs = list[Optional[dict[int, Logprob]]]


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: Optional[float]
    logprobs: Optional[SampleLogprobs]
    finish_reason: Optional[str] = None  # "stop" | "length" | "abort"
    stop_reason: Union[int, str, None] = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: Optional[float] = None
    first_token_time: Optional[float] = None
    last_token_time: Optional[float] = None
    finished_time: Optional[float] = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: Optional[str]
    prompt_token_ids: list[int]
    prompt_logprobs: Optional[PromptLogprobs]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    metrics: Optional[RequestMetrics] = None
    extra: dict = field(default_factory=dict)

    def add_delta(self, later: "RequestOutput") -> None:
        """Folds a later delta output of the same request into this one (a reader that fell
        behind gets one output instead of several): text and tokens are appended per
        completion index, the rest is taken from the later output."""
        by_index = {c.index: c for c in self.outputs}
        for comp in later.outputs:
            mine = by_index.get(comp.index)
            if mine is None:
                self.outputs.append(comp)
                by_index[comp.index] = comp
                continue
            mine.text += comp.text
            mine.token_ids.extend(comp.token_ids)
            if mine.logprobs is not None and comp.logprobs is not None:
                mine.logprobs.extend(comp.logprobs)
            mine.cumulative_logprob = comp.cumulative_logprob
            mine.finish_reason, mine.stop_reason = comp.finish_reason, comp.stop_reason
        self.outputs.sort(key=lambda c: c.index)
        if self.prompt_logprobs is None:
            self.prompt_logprobs = later.prompt_logprobs
        self.finished = later.finished
        self.num_cached_tokens = later.num_cached_tokens
        self.metrics = later.metrics
