"""The executor for one device in this process."""

from __future__ import annotations

from pagoda.config import EngineConfig
from pagoda.core.sched_output import ModelRunnerOutput, SchedulerOutput
from pagoda.worker.worker import Worker


class UniprocExecutor:
    def __init__(self, config: EngineConfig):
        self.worker = Worker(config)
        self.num_blocks = self.worker.determine_num_blocks()
        self.worker.initialize_kv_cache(self.num_blocks)

    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        return self.worker.execute_model(sched)

    def shutdown(self) -> None:
        pass
