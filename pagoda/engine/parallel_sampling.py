"""`n > 1`: one user request runs as n core requests whose outputs the output processor
gathers again. The children share the prompt's KV blocks through the prefix cache."""

from __future__ import annotations

from typing import Optional

import msgspec

from pagoda.engine.messages import EngineCoreRequest
from pagoda.engine.output_processor import OutputProcessor
from pagoda.sampling_params import SamplingParams


def child_requests(request_id: str, params: SamplingParams) -> list[tuple[str, int,
                                                                          SamplingParams]]:
    """`n > 1` runs as n core requests; they share the prompt's KV blocks through the
    prefix cache. A seed s gives sample i the seed s + i, so samples differ."""
    if params.n == 1:
        return [(request_id, 0, params)]
    children = []
    for index in range(params.n):
        child = params.clone()
        child.n = 1
        if params.seed is not None:
            child.seed = params.seed + index
        children.append((f"{index}_{request_id}", index, child))
    return children


def fan_out(req: EngineCoreRequest, prompt_text: Optional[str],
            output_processor: OutputProcessor) -> list[EngineCoreRequest]:
    """Registers a validated request with the output processor and returns the core
    requests to send: `n > 1` runs as n child requests."""
    if req.request_id in output_processor.parents:
        raise ValueError(f"request id {req.request_id!r} is already in use")
    core_reqs = []
    for core_id, index, child_params in child_requests(req.request_id, req.sampling_params):
        output_processor.add_request(req.request_id, core_id, index, prompt_text,
                                     req.prompt_token_ids, child_params, req.arrival_time)
        core_reqs.append(msgspec.structs.replace(req, request_id=core_id,
                                                 sampling_params=child_params))
    return core_reqs
