"""Where stats go: Prometheus collectors (vLLM's metric names under `pagoda:`) and a log
line every few seconds while the engine is busy."""

from __future__ import annotations

import logging
import time
from typing import Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from pagoda.engine.messages import EngineCoreStats
from pagoda.metrics.stats import IterationStats

logger = logging.getLogger("pagoda.metrics")

# vLLM's buckets, so dashboards built for vLLM read the same.
_TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]
_ITL_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0]
_LATENCY_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
                    50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0]
FINISH_REASONS = ("stop", "length", "abort")


def buckets_1_2_5(max_value: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... up to max_value (token-count histograms)."""
    result, exponent = [], 0
    while True:
        for mantissa in (1, 2, 5):
            value = mantissa * 10 ** exponent
            if value > max_value:
                return result
            result.append(value)
        exponent += 1


class PrometheusStatLogger:
    """Owns its registry so several engines in one process (tests) do not collide."""

    def __init__(self, model_name: str, max_model_len: int,
                 registry: Optional[CollectorRegistry] = None):
        self.registry = registry or CollectorRegistry()
        labels = ["model_name"]
        self.model_name = model_name
        reg = self.registry

        def gauge(name, doc):
            return Gauge(f"pagoda:{name}", doc, labels, registry=reg).labels(model_name)

        def counter(name, doc):
            return Counter(f"pagoda:{name}", doc, labels, registry=reg).labels(model_name)

        def histogram(name, doc, buckets):
            return Histogram(f"pagoda:{name}", doc, labels, buckets=buckets,
                             registry=reg).labels(model_name)

        self.running = gauge("num_requests_running", "Requests in the running batch.")
        self.waiting = gauge("num_requests_waiting", "Requests waiting to be scheduled.")
        self.kv_usage = gauge("kv_cache_usage_perc", "KV-cache usage (1 = full).")
        self.prefix_queries = counter("prefix_cache_queries",
                                      "Prefix-cache queries, in tokens.")
        self.prefix_hits = counter("prefix_cache_hits", "Prefix-cache hits, in tokens.")
        self.preemptions = counter("num_preemptions", "Preemptions in the engine.")
        self.prompt_tokens = counter("prompt_tokens", "Prefill tokens processed.")
        self.generation_tokens = counter("generation_tokens", "Generation tokens processed.")
        success = Counter("pagoda:request_success", "Finished requests by finish reason.",
                          labels + ["finished_reason"], registry=reg)
        self.success = {r: success.labels(model_name, r) for r in FINISH_REASONS}
        self.ttft = histogram("time_to_first_token_seconds", "Time to first token.",
                              _TTFT_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds", "Inter-token latency.",
                             _ITL_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "End-to-end request latency.",
                             _LATENCY_BUCKETS)
        self.queue_time = histogram("request_queue_time_seconds",
                                    "Time requests spent waiting.", _LATENCY_BUCKETS)
        token_buckets = buckets_1_2_5(max_model_len)
        self.req_prompt = histogram("request_prompt_tokens", "Prompt tokens per request.",
                                    token_buckets)
        self.req_generation = histogram("request_generation_tokens",
                                        "Generation tokens per request.", token_buckets)
        self.last_core: EngineCoreStats = EngineCoreStats()

    def record(self, core: Optional[EngineCoreStats], it: Optional[IterationStats]) -> None:
        if core is not None:
            self.running.set(core.num_running)
            self.waiting.set(core.num_waiting)
            self.kv_usage.set(core.kv_cache_usage)
            # The core reports totals; Prometheus counters take increments.
            self.prefix_queries.inc(max(0, core.prefix_cache_queries
                                        - self.last_core.prefix_cache_queries))
            self.prefix_hits.inc(max(0, core.prefix_cache_hits - self.last_core.prefix_cache_hits))
            self.preemptions.inc(max(0, core.num_preemptions - self.last_core.num_preemptions))
            self.last_core = core
        if it is None:
            return
        self.prompt_tokens.inc(it.num_prompt_tokens)
        self.generation_tokens.inc(it.num_generation_tokens)
        for value in it.time_to_first_tokens:
            self.ttft.observe(value)
        for value in it.inter_token_latencies:
            self.itl.observe(value)
        for fin in it.finished:
            if fin.finish_reason in self.success:
                self.success[fin.finish_reason].inc()
            self.e2e.observe(fin.e2e_latency)
            self.queue_time.observe(fin.queue_time)
            self.req_prompt.observe(fin.num_prompt_tokens)
            self.req_generation.observe(fin.num_generation_tokens)


class LoggingStatLogger:
    """Accumulates token counts; `log()` (called every `interval` seconds) prints one line
    when something happened since the last one or requests are still in flight."""

    def __init__(self, interval: float = 5.0):
        self.interval = interval
        self.core = EngineCoreStats()
        self._reset(time.monotonic(), self.core)

    def _reset(self, now: float, core: EngineCoreStats) -> None:
        self.last_time = now
        self.num_prompt_tokens = 0
        self.num_generation_tokens = 0
        self.queries_at_last = core.prefix_cache_queries
        self.hits_at_last = core.prefix_cache_hits

    def record(self, core: Optional[EngineCoreStats], it: Optional[IterationStats]) -> None:
        if core is not None:
            self.core = core
        if it is not None:
            self.num_prompt_tokens += it.num_prompt_tokens
            self.num_generation_tokens += it.num_generation_tokens

    def log(self) -> Optional[str]:
        now = time.monotonic()
        core = self.core
        idle = core.num_running == 0 and core.num_waiting == 0
        if idle and self.num_prompt_tokens == 0 and self.num_generation_tokens == 0:
            self._reset(now, core)
            return None
        elapsed = max(now - self.last_time, 1e-6)
        queries = core.prefix_cache_queries - self.queries_at_last
        hits = core.prefix_cache_hits - self.hits_at_last
        line = (f"Avg prompt throughput: {self.num_prompt_tokens / elapsed:.1f} tokens/s, "
                f"Avg generation throughput: {self.num_generation_tokens / elapsed:.1f} "
                f"tokens/s, Running: {core.num_running} reqs, Waiting: {core.num_waiting} "
                f"reqs, KV cache usage: {100 * core.kv_cache_usage:.1f}%, "
                f"Prefix cache hit rate: {100 * hits / queries if queries else 0.0:.1f}%")
        logger.info("%s", line)
        self._reset(now, core)
        return line
