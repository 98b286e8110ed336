"""Messages between the front end and the engine core.

msgspec Structs: the same types serve the in-process client and the ZMQ client, where they
travel as msgpack (never pickle)."""

from __future__ import annotations

from typing import Optional, Union

import msgspec

from pagoda.sampling_params import SamplingParams

# One sampled position's logprobs: (token ids, logprobs, ranks); the sampled token first.
LogprobsRow = tuple[list[int], list[float], list[int]]


class EngineCoreRequest(msgspec.Struct, array_like=True, omit_defaults=True):
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_id: Optional[int] = None
    arrival_time: float = 0.0
    cache_salt: Optional[str] = None


class EngineCoreOutput(msgspec.Struct, array_like=True, omit_defaults=True):
    request_id: str
    new_token_ids: list[int]
    new_logprobs: Optional[list[LogprobsRow]] = None
    new_prompt_logprobs: Optional[list[LogprobsRow]] = None
    finish_reason: Optional[str] = None
    stop_reason: Union[int, str, None] = None
    num_cached_tokens: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


# -- front end <-> engine-core process (added for the ZMQ client) ------------------------------

class EngineCoreStats(msgspec.Struct, array_like=True, omit_defaults=True):
    """The scheduler's state after a step (counters are totals since start)."""

    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    num_preemptions: int = 0


class EngineCoreOutputs(msgspec.Struct, array_like=True, omit_defaults=True):
    """One message from the core: a step's outputs plus the scheduler state after it.

    `scheduled` maps core request ids to the time they were first scheduled (for queue-time
    metrics); `error` is set once, when the core is about to die."""

    outputs: list[EngineCoreOutput] = []
    stats: Optional[EngineCoreStats] = None
    scheduled: dict[str, float] = {}
    ready: bool = False
    error: Optional[str] = None


class EngineCoreAbort(msgspec.Struct, array_like=True):
    request_ids: list[str]
