"""A real scheduler with no model: a fake runner that 'samples' a chosen token."""

from __future__ import annotations

from pagoda.config import CacheConfig, SchedulerConfig
from pagoda.core.request import Request
from pagoda.core.scheduler import Scheduler
from pagoda.core.sched_output import ModelRunnerOutput, SchedulerOutput
from pagoda.sampling_params import SamplingParams

EOS = 0


def make_scheduler(num_blocks=16, block_size=4, max_num_seqs=8, budget=32, max_model_len=64,
                   caching=True) -> Scheduler:
    return Scheduler(SchedulerConfig(max_num_seqs, budget, max_model_len),
                     CacheConfig(block_size=block_size, enable_prefix_caching=caching),
                     num_blocks)


def make_request(req_id: str, tokens: list[int], max_tokens: int = 4, **kw) -> Request:
    return Request(req_id, tokens, SamplingParams(max_tokens=max_tokens, **kw), eos_token_id=EOS)


def fake_output(scheduler: Scheduler, sched: SchedulerOutput, token: int = 7
                ) -> ModelRunnerOutput:
    """Samples `token` for every request whose scheduled tokens reach its end."""
    req_ids = list(sched.num_scheduled_tokens)
    sampled = []
    for req_id in req_ids:
        req = scheduler.requests[req_id]
        sampled.append([token] if req.num_computed_tokens == req.num_tokens else [])
    return ModelRunnerOutput(req_ids, sampled, [None] * len(req_ids))


def step(scheduler: Scheduler, token: int = 7):
    sched = scheduler.schedule()
    return sched, scheduler.update_from_output(sched, fake_output(scheduler, sched, token))
