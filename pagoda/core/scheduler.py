"""The token-budget scheduler.

There is no prefill phase and no decode phase. Every request has `num_computed_tokens` and
`num_tokens`; each step hands out up to `max_num_batched_tokens` new tokens, first to the
running requests (in order), then to waiting ones (FCFS). A prompt larger than what is left
of the budget is chunked; a prefix-cache hit simply starts `num_computed_tokens` higher.
When the block pool runs dry, the newest running request is preempted: its blocks are freed
and it is recomputed later (cheaply, thanks to the prefix cache). Nothing is lost.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Iterable, Optional

from pagoda.config import CacheConfig, SchedulerConfig
from pagoda.core.kv_cache_manager import KVCacheManager
from pagoda.core.request import Request, RequestStatus
from pagoda.core.sched_output import (CachedRequestData, ModelRunnerOutput, NewRequestData,
                                      SchedulerOutput)
from pagoda.engine.messages import EngineCoreOutput, EngineCoreStats


class Scheduler:
    def __init__(self, scheduler_config: SchedulerConfig, cache_config: CacheConfig,
                 num_blocks: int):
        self.config = scheduler_config
        self.block_size = cache_config.block_size
        self.kv = KVCacheManager(num_blocks, cache_config.block_size,
                                 cache_config.enable_prefix_caching)
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.finished_req_ids: set[str] = set()  # to tell the runner on the next step
        self.num_preemptions = 0

    # -- requests in and out ------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already running")
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def finish_requests(self, request_ids: Iterable[str], status: RequestStatus) -> None:
        for req_id in request_ids:
            request = self.requests.get(req_id)
            if request is None or request.is_finished():
                continue
            if request.status == RequestStatus.RUNNING:
                self.running.remove(request)
            else:
                self.waiting.remove(request)
            self._free(request, status)

    def _free(self, request: Request, status: RequestStatus) -> None:
        request.status = status
        self.kv.free(request)
        self.finished_req_ids.add(request.request_id)
        del self.requests[request.request_id]

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    # -- scheduling ---------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        num_scheduled: dict[str, int] = {}
        new_blocks: dict[str, list[int]] = {}
        preempted: list[Request] = []
        restarted = self._restart_for_long_rope()
        budget = self._schedule_running(budget, num_scheduled, new_blocks, preempted)
        resumed: set[str] = {r.request_id for r in preempted + restarted}
        new_reqs: list[Request] = []
        if not preempted:
            self._schedule_waiting(budget, num_scheduled, new_blocks, new_reqs)
        return self._build_output(num_scheduled, new_blocks, new_reqs, resumed)

    def _restart_for_long_rope(self) -> list[Request]:
        """longrope: a running request that has grown past the original context is put back
        at the head of the queue to be recomputed from its first token with the long factors,
        as transformers drops its KV cache at that step. Unlike a preemption it does not keep
        the waiting queue from being scheduled in the same step."""
        limit = self.config.rope_long_after
        if limit is None:
            return []
        restarted = [r for r in self.running if not r.rope_long and r.num_tokens > limit]
        for request in reversed(restarted):  # appendleft: keep their order at the head
            self.running.remove(request)
            self._requeue(request)
        return restarted

    def _set_rope_mode(self, request: Request) -> None:
        """A request with nothing computed takes the long factors once it is longer than the
        original context; its block hashes are redone with the long-mode key."""
        limit = self.config.rope_long_after
        if limit is not None and not request.rope_long and request.num_tokens > limit:
            request.rope_long = True
            request.block_hashes.clear()

    def _schedule_running(self, budget: int, num_scheduled: dict, new_blocks: dict,
                          preempted: list) -> int:
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            num_new = min(request.num_tokens - request.num_computed_tokens, budget,
                          self.config.max_model_len - request.num_computed_tokens)
            if num_new <= 0:
                i += 1
                continue
            while True:
                blocks = self.kv.allocate_slots(request, num_new)
                if blocks is not None:
                    break
                victim = self.running.pop()
                self._preempt(victim)
                preempted.append(victim)
                if victim is request:
                    break
            if blocks is None:
                break
            num_scheduled[request.request_id] = num_new
            new_blocks[request.request_id] = [b.block_id for b in blocks]
            budget -= num_new
            i += 1
        return budget

    def _schedule_waiting(self, budget: int, num_scheduled: dict, new_blocks: dict,
                          new_reqs: list) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            hits, num_hit_tokens = [], 0
            if request.num_computed_tokens == 0:
                self._set_rope_mode(request)
                hits, num_hit_tokens = self.kv.get_computed_blocks(request)
            num_new = min(request.num_tokens - request.num_computed_tokens - num_hit_tokens,
                          budget)
            blocks = self.kv.allocate_slots(request, num_new, hits)
            if blocks is None:
                break
            self.waiting.popleft()
            request.num_computed_tokens += num_hit_tokens
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = num_hit_tokens
                request.first_scheduled_time = time.time()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            new_reqs.append(request)
            num_scheduled[request.request_id] = num_new
            new_blocks[request.request_id] = self.kv.block_ids(request.request_id)
            budget -= num_new

    def _preempt(self, request: Request) -> None:
        request.num_preemptions += 1
        self.num_preemptions += 1
        self._requeue(request)

    def _requeue(self, request: Request) -> None:
        """Frees the request's blocks and puts it back at the head of the queue, to be
        computed again from its first token."""
        self.kv.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        self.waiting.appendleft(request)

    def _build_output(self, num_scheduled: dict, new_blocks: dict, new_reqs: list,
                      preempted_ids: set) -> SchedulerOutput:
        new_ids = {r.request_id for r in new_reqs}
        new_data = [NewRequestData(r.request_id, r.prompt_token_ids, list(r.output_token_ids),
                                   r.sampling_params, new_blocks[r.request_id],
                                   r.num_computed_tokens) for r in new_reqs]
        cached_data = [CachedRequestData(req_id, new_blocks[req_id],
                                         self.requests[req_id].num_computed_tokens)
                       for req_id in num_scheduled if req_id not in new_ids]
        finished = self.finished_req_ids | preempted_ids
        self.finished_req_ids = set()
        out = SchedulerOutput(new_data, cached_data, num_scheduled,
                              sum(num_scheduled.values()), finished)
        for req_id, n in num_scheduled.items():
            self.requests[req_id].num_computed_tokens += n
        return out

    # -- results ------------------------------------------------------------------------
    def update_from_output(self, sched: SchedulerOutput,
                           result: ModelRunnerOutput) -> list[EngineCoreOutput]:
        outputs = []
        for i, req_id in enumerate(result.req_ids):
            request = self.requests.get(req_id)
            if request is None:
                continue  # aborted while the step ran
            new_ids = result.sampled_token_ids[i]
            for token_id in new_ids:
                request.append_output_token(token_id)
                if self._check_stop(request, token_id):
                    break
            prompt_lps = result.prompt_logprobs.get(req_id)
            if not new_ids and prompt_lps is None:
                continue
            logprobs = result.logprobs[i] if result.logprobs else None
            status = request.status
            outputs.append(EngineCoreOutput(
                request_id=req_id, new_token_ids=new_ids, new_logprobs=logprobs,
                new_prompt_logprobs=prompt_lps, finish_reason=status.finish_reason(),
                stop_reason=request.stop_reason, num_cached_tokens=request.num_cached_tokens))
            if status.finished:
                self.running.remove(request)
                self._free(request, status)
        return outputs

    def _check_stop(self, request: Request, token_id: int) -> bool:
        params = request.sampling_params
        status: Optional[RequestStatus] = None
        num_output = len(request.output_token_ids)  # runs per request per step: no properties
        if num_output >= params.min_tokens:
            if not params.ignore_eos and token_id == request.eos_token_id:
                status = RequestStatus.FINISHED_STOPPED
            elif token_id in params.all_stop_token_ids:
                status = RequestStatus.FINISHED_STOPPED
                request.stop_reason = token_id
        if status is None and (num_output >= request.max_tokens
                               or len(request.all_token_ids) >= self.config.max_model_len):
            status = RequestStatus.FINISHED_LENGTH_CAPPED
        if status is not None:
            request.status = status
        return status is not None

    def stats(self) -> EngineCoreStats:
        pool = self.kv.pool
        return EngineCoreStats(len(self.running), len(self.waiting), pool.usage(),
                              pool.num_queries, pool.num_hits, self.num_preemptions)
