"""Executors run a step on the model's workers: `execute(scheduler_output) -> output`."""

from __future__ import annotations

from pagoda.config import EngineConfig


def make_executor(config: EngineConfig):
    """One worker in this process, or one process per tensor-parallel rank."""
    if config.parallel_config.tensor_parallel_size > 1:
        from pagoda.executor.multiproc import MultiprocExecutor
        return MultiprocExecutor(config)
    from pagoda.executor.uniproc import UniprocExecutor
    return UniprocExecutor(config)
