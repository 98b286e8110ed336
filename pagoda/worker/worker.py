"""One device's worker: loads the model, sizes the KV cache (by profiling on a GPU, from a
byte budget on the CPU) and allocates it."""

from __future__ import annotations

import logging

import torch

from pagoda.config import EngineConfig
from pagoda.core.sched_output import ModelRunnerOutput, SchedulerOutput
from pagoda.worker.model_runner import ModelRunner
from pagoda.worker.warm_up import warm_up

logger = logging.getLogger(__name__)


class Worker:
    def __init__(self, config: EngineConfig):
        self.config = config
        torch.manual_seed(config.model_config.seed)
        self.runner = ModelRunner(config)

    def determine_num_blocks(self) -> int:
        cache = self.config.cache_config
        per_block = self.runner.kv_bytes_per_block()
        # The decode lookahead's scratch blocks come out of the same memory budget.
        scratch = self.runner.num_scratch_blocks()
        if cache.num_gpu_blocks_override is not None:
            num_blocks = cache.num_gpu_blocks_override
        elif self.config.device.type == "cuda":
            num_blocks = max(self._profile_gpu_blocks(per_block) - scratch, 0)
        else:
            num_blocks = max(cache.kv_cache_memory_bytes // per_block - scratch, 0)
        self._check_fits(num_blocks)
        return num_blocks

    def _profile_gpu_blocks(self, per_block: int) -> int:
        device = self.config.device
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        self.runner.profile_run(self.config.scheduler_config.max_num_batched_tokens)
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        free, total = torch.cuda.mem_get_info(device)
        used_by_others = total - free - torch.cuda.memory_reserved(device)
        budget = total * self.config.cache_config.gpu_memory_utilization - peak - used_by_others
        if self.config.cache_config.kv_cache_memory_bytes:
            budget = self.config.cache_config.kv_cache_memory_bytes
        logger.info("memory profile: peak %.2f GiB, KV budget %.2f GiB",
                    peak / 2**30, budget / 2**30)
        torch.cuda.empty_cache()
        return max(int(budget // per_block), 0)

    def _check_fits(self, num_blocks: int) -> None:
        max_len = self.config.model_config.max_model_len
        needed = -(-max_len // self.config.cache_config.block_size)
        if num_blocks < needed:
            raise ValueError(
                f"the KV cache holds {num_blocks} blocks of {self.config.cache_config.block_size}"
                f" tokens, fewer than the {needed} one sequence of max_model_len={max_len} "
                "needs; raise the KV cache size (gpu_memory_utilization, kv_cache_memory_bytes, "
                "num_gpu_blocks_override) or lower max_model_len")

    def initialize_kv_cache(self, num_blocks: int) -> None:
        self.config.cache_config.num_blocks = num_blocks
        self.runner.initialize_kv_cache(num_blocks)
        self.runner.capture_cudagraphs()
        if self.config.device.type == "cuda":  # the CPU path compiles nothing
            warm_up(self.runner)

    def execute_model(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        return self.runner.execute_model(sched)
