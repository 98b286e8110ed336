"""The engine core: scheduler + executor. One `step()` = schedule, execute, update.

Runs in the caller's process for `LLM`, and in its own process behind ZMQ when serving."""

from __future__ import annotations

import logging
import time

from pagoda.config import EngineConfig
from pagoda.core.request import Request, RequestStatus
from pagoda.core.scheduler import Scheduler
from pagoda.engine.messages import EngineCoreOutput, EngineCoreRequest, EngineCoreStats
from pagoda.executor import make_executor

logger = logging.getLogger(__name__)


class EngineCore:
    def __init__(self, config: EngineConfig):
        start = time.perf_counter()
        self.config = config
        self.executor = make_executor(config)
        self.scheduler = Scheduler(config.scheduler_config, config.cache_config,
                                   self.executor.num_blocks)
        logger.info("engine core ready in %.1fs: %d KV blocks of %d tokens",
                    time.perf_counter() - start, self.executor.num_blocks,
                    config.cache_config.block_size)

    def add_request(self, req: EngineCoreRequest) -> None:
        self.scheduler.add_request(Request(req.request_id, req.prompt_token_ids,
                                           req.sampling_params, req.eos_token_id,
                                           req.arrival_time or None, req.cache_salt))

    def abort_requests(self, request_ids: list[str]) -> None:
        self.scheduler.finish_requests(request_ids, RequestStatus.FINISHED_ABORTED)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def step(self) -> list[EngineCoreOutput]:
        if not self.scheduler.has_unfinished_requests():
            return []
        sched = self.scheduler.schedule()
        result = self.executor.execute(sched)
        return self.scheduler.update_from_output(sched, result)

    def stats(self) -> EngineCoreStats:
        return self.scheduler.stats()

    def reset_prefix_cache(self) -> bool:
        return self.scheduler.kv.reset_prefix_cache()

    def shutdown(self) -> None:
        self.executor.shutdown()
