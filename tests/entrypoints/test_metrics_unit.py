"""Stats tracking, Prometheus collectors and the periodic log line, without an engine."""

from __future__ import annotations

import logging

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from pagoda.engine.messages import EngineCoreOutput, EngineCoreOutputs, EngineCoreStats
from pagoda.metrics.loggers import LoggingStatLogger, PrometheusStatLogger, buckets_1_2_5
from pagoda.metrics.stats import IterationStats, RequestStatsTracker


def _samples(registry) -> dict:
    text = generate_latest(registry).decode()
    return {(s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k != "model_name"))):
            s.value for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_tracker_ttft_itl_finish():
    tracker = RequestStatsTracker()
    tracker.add("a", arrival_time=100.0, num_prompt_tokens=7)
    first = tracker.on_outputs(EngineCoreOutputs(
        [EngineCoreOutput("a", [1])], scheduled={"a": 100.5}), now=101.0)
    assert first.num_prompt_tokens == 7 and first.time_to_first_tokens == [1.0]
    second = tracker.on_outputs(EngineCoreOutputs(
        [EngineCoreOutput("a", [2], finish_reason="length")]), now=101.25)
    assert second.inter_token_latencies == [0.25] and second.num_generation_tokens == 1
    (fin,) = second.finished
    assert fin.finish_reason == "length" and fin.queue_time == 0.5
    assert fin.e2e_latency == 1.25 and fin.num_generation_tokens == 2
    assert tracker.requests == {}
    it = IterationStats()
    tracker.finish("unknown", "abort", it)  # already gone: nothing counted twice
    assert it.finished == []


def test_prometheus_names_and_deltas():
    prom = PrometheusStatLogger("m", max_model_len=100)
    prom.record(EngineCoreStats(2, 1, 0.5, 10, 4, 1), None)
    prom.record(EngineCoreStats(1, 0, 0.25, 30, 14, 1), IterationStats(num_prompt_tokens=5,
                                                                       num_generation_tokens=3))
    samples = _samples(prom.registry)
    assert samples[("pagoda:num_requests_running", ())] == 1
    assert samples[("pagoda:kv_cache_usage_perc", ())] == 0.25
    assert samples[("pagoda:prefix_cache_queries_total", ())] == 30  # totals, not sums
    assert samples[("pagoda:prefix_cache_hits_total", ())] == 14
    assert samples[("pagoda:num_preemptions_total", ())] == 1
    assert samples[("pagoda:prompt_tokens_total", ())] == 5
    assert samples[("pagoda:request_success_total", (("finished_reason", "stop"),))] == 0
    assert buckets_1_2_5(100) == [1, 2, 5, 10, 20, 50, 100]


def test_log_line_only_while_busy(caplog):
    log = LoggingStatLogger(interval=5.0)
    with caplog.at_level(logging.INFO, logger="pagoda.metrics"):
        assert log.log() is None  # idle: quiet
        log.record(EngineCoreStats(3, 2, 0.125, 100, 25, 0),
                   IterationStats(num_prompt_tokens=50, num_generation_tokens=20))
        line = log.log()
    assert line is not None and line in caplog.text
    for part in ("prompt throughput", "generation throughput", "Running: 3 reqs",
                 "Waiting: 2 reqs", "KV cache usage: 12.5%", "Prefix cache hit rate: 25.0%"):
        assert part in line
