"""Metric arithmetic on synthetic timelines with known answers (vLLM's definitions)."""

import math

import numpy as np
import pytest

from pagoda.benchmarks.metrics import (RequestResult, arrival_offsets,
                                       compute_serving_metrics, meets_slos, parse_goodput,
                                       peak_concurrency, percentile, request_tpot, summarize)


def _timeline(start, chunk_times, prompt_len=10, tokens=None):
    """A streamed request sent at `start` whose content chunks arrived at `chunk_times`."""
    r = RequestResult(success=True, prompt_len=prompt_len, start=start,
                      output_tokens=tokens or len(chunk_times))
    r.ttft = chunk_times[0] - start
    r.itl = [b - a for a, b in zip(chunk_times, chunk_times[1:])]
    r.latency = chunk_times[-1] - start
    return r


@pytest.fixture
def results():
    a = _timeline(0.0, [0.10, 0.15, 0.25, 0.30], prompt_len=10)   # 4 tokens
    b = _timeline(0.05, [0.20], prompt_len=20)                      # 1 token
    c = RequestResult(success=False, prompt_len=30, error="HTTP 500")
    return [a, b, c]


def test_ttft_tpot_itl_e2el(results):
    m = compute_serving_metrics(results, duration=1.0)
    assert m["completed"] == 2 and m["failed"] == 1
    assert m["mean_ttft_ms"] == pytest.approx(125.0)
    assert m["median_ttft_ms"] == pytest.approx(125.0)
    assert m["p99_ttft_ms"] == pytest.approx(100 + 0.99 * 50)
    # TPOT only for requests with > 1 token: (0.30 - 0.10) / 3
    assert m["mean_tpot_ms"] == pytest.approx(200 / 3)
    # ITL pooled over requests: [50, 100, 50] ms
    assert m["mean_itl_ms"] == pytest.approx(200 / 3)
    assert m["median_itl_ms"] == pytest.approx(50.0)
    assert m["p99_itl_ms"] == pytest.approx(50 + 0.98 * 50)
    assert m["mean_e2el_ms"] == pytest.approx(225.0)
    assert m["p50_e2el_ms"] == pytest.approx(225.0)


def test_throughputs_use_successful_requests_and_wall_time(results):
    m = compute_serving_metrics(results, duration=2.0)
    assert m["total_input_tokens"] == 30 and m["total_output_tokens"] == 5
    assert m["request_throughput"] == pytest.approx(1.0)
    assert m["output_throughput"] == pytest.approx(2.5)
    assert m["total_token_throughput"] == pytest.approx(17.5)
    assert m["max_concurrency_observed"] == 2


def test_goodput(results):
    assert compute_serving_metrics(results, 1.0, parse_goodput(["ttft:120"]))["goodput"] == 1
    # b has one token: its TPOT counts as 0 for goodput, a's 66.7 ms misses 50 ms
    assert compute_serving_metrics(results, 1.0, parse_goodput(["tpot:50"]))["goodput"] == 1
    slos = parse_goodput(["ttft:200", "tpot:70", "e2el:400"])
    assert compute_serving_metrics(results, 0.5, slos)["goodput"] == pytest.approx(4.0)
    assert not meets_slos(results[2], {})
    assert "goodput" not in compute_serving_metrics(results, 1.0)


def test_parse_goodput():
    assert parse_goodput(["ttft:200", "TPOT:50"]) == {"ttft": 0.2, "tpot": 0.05}
    assert parse_goodput(None) == {}
    for bad in (["ttft"], ["itl:5"], ["ttft:x"], ["tpot:-1"]):
        with pytest.raises(ValueError):
            parse_goodput(bad)


def test_percentiles_and_summary():
    assert percentile([1, 2, 3, 4], 50) == pytest.approx(2.5)
    assert percentile([1, 2, 3, 4], 25) == pytest.approx(1.75)
    assert percentile([], 99) == 0.0
    s = summarize([1.0, 2.0, 3.0, 4.0, 5.0], (10, 90), scale=1000)
    assert s["mean"] == 3000 and s["median"] == 3000
    assert s["p10"] == pytest.approx(1400) and s["p90"] == pytest.approx(4600)
    assert summarize([], (50,))["p50"] == 0.0


def test_request_tpot():
    assert request_tpot(_timeline(0, [0.1])) is None
    assert request_tpot(_timeline(0, [0.1, 0.3], tokens=5)) == pytest.approx(0.05)


def test_peak_concurrency():
    assert peak_concurrency([(0, 2), (1, 3), (2, 4)]) == 2   # end at 2 before start at 2
    assert peak_concurrency([(0, 5), (1, 2), (1.5, 3)]) == 3
    assert peak_concurrency([]) == 0


def test_arrivals_inf_and_validation():
    assert arrival_offsets(3, float("inf")) == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError):
        arrival_offsets(3, 0.0)
    with pytest.raises(ValueError):
        arrival_offsets(3, 1.0, burstiness=0)
    assert arrival_offsets(50, 4.0, seed=3) == arrival_offsets(50, 4.0, seed=3)
    assert arrival_offsets(50, 4.0, seed=3) != arrival_offsets(50, 4.0, seed=4)


@pytest.mark.parametrize("rate,burstiness", [(10.0, 1.0), (4.0, 4.0), (2.0, 0.25)])
def test_arrival_statistics(rate, burstiness):
    """Gaps: gamma(shape=burstiness, mean=1/rate) -> mean 1/rate, CV 1/sqrt(burstiness);
    burstiness 1 is a Poisson process (exponential gaps, counts per unit time ~ Poisson)."""
    offsets = arrival_offsets(20001, rate, burstiness, seed=0)
    gaps = np.diff(offsets)
    assert offsets[0] == 0.0 and np.all(gaps >= 0)
    assert gaps.mean() == pytest.approx(1 / rate, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1 / math.sqrt(burstiness), rel=0.05)
    if burstiness == 1.0:
        counts = np.bincount(np.floor(offsets).astype(int))[:-1]
        assert counts.var() / counts.mean() == pytest.approx(1.0, rel=0.1)
