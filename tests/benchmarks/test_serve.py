"""bench serve / sweep against a fake server with known timings, and end to end against a
real `pagoda serve` of a tiny model (skipped until the server exists). Loopback only."""

import asyncio
import importlib.util
import json
import os
import subprocess
import sys
import time

import pytest

from pagoda.benchmarks import cli, serve
from pagoda.benchmarks.common import stop_process, wait_healthy
from pagoda.netutil import free_port
from pagoda.benchmarks.datasets import random_dataset
from tests.benchmarks.fake_server import FakeOpenAIServer


def _prompts(n=6, input_len=8, output_len=5):
    return serve.make_prompts(random_dataset(n, input_len, output_len, vocab_size=100))


def test_metrics_against_known_timings():
    with FakeOpenAIServer(first_delay=0.05, gap=0.02) as fake:
        cfg = serve.ServeConfig(base_url=fake.base_url, max_concurrency=2,
                                goodput={"ttft": 10.0})
        result = asyncio.run(serve.run_benchmark(cfg, _prompts()))
    assert cfg.model == "fake-model"  # taken from /v1/models
    assert result["completed"] == 6 and result["failed"] == 0
    assert result["total_output_tokens"] == 30 and result["total_input_tokens"] == 6 * 8
    assert fake.max_in_flight <= 2 and result["max_concurrency_observed"] == 2
    assert 45 <= result["median_ttft_ms"] < 500
    assert 15 <= result["median_itl_ms"] < 300
    assert result["mean_tpot_ms"] >= 15
    assert result["mean_e2el_ms"] >= 50 + 4 * 20 - 5
    assert result["goodput"] == pytest.approx(result["request_throughput"])
    sent = fake.payloads[-1]
    assert sent["stream"] and sent["ignore_eos"] and sent["max_tokens"] == 5
    assert isinstance(sent["prompt"], list)  # token ids


def test_chat_endpoint_and_failures():
    with FakeOpenAIServer(first_delay=0.0, gap=0.0, fail_every=3) as fake:
        prompts = [serve.Prompt("hello there", 2, 3) for _ in range(5)]
        cfg = serve.ServeConfig(base_url=fake.base_url, endpoint="/v1/chat/completions",
                                model="m", request_rate=50.0, test_request=False)
        result = asyncio.run(serve.run_benchmark(cfg, prompts))
    assert result["completed"] + result["failed"] == 5 and result["failed"] == 1
    assert any("HTTP 500" in e for e in result["errors"])
    assert fake.payloads[0]["messages"][0]["content"] == "hello there"


def test_run_is_bounded_in_time():
    with FakeOpenAIServer(first_delay=5.0) as fake:
        cfg = serve.ServeConfig(base_url=fake.base_url, model="m", max_duration=0.5,
                                test_request=False)
        start = time.perf_counter()
        result = asyncio.run(serve.run_benchmark(cfg, _prompts(3)))
    assert time.perf_counter() - start < 4
    assert result["failed"] == 3 and result["completed"] == 0


def test_sweep_writes_json_and_png(tmp_path):
    pytest.importorskip("matplotlib")
    with FakeOpenAIServer(first_delay=0.01, gap=0.005) as fake:
        argv = ["sweep", "--base-url", fake.base_url, "--num-prompts", "4", "--input-len",
                "6", "--output-len", "3", "--request-rates", "20,inf", "--output-dir",
                str(tmp_path), "--goodput", "ttft:1000"]
        assert cli.main(argv) == 0
    data = json.loads((tmp_path / "sweep.json").read_text())
    assert [p["request_rate"] for p in data["points"]] == [20.0, "inf"]
    assert all(p["completed"] == 4 and "p99_tpot_ms" in p for p in data["points"])
    png = (tmp_path / "sweep.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    # Each rate sends its own prompts (a repeat would be served from the prefix cache);
    # the first payload is the one-off probe request.
    sent = [str(p.get("prompt")) for p in fake.payloads[1:]]
    assert len(sent) == 8 and not set(sent[:4]) & set(sent[4:])


def _server_missing() -> bool:
    try:
        return (importlib.util.find_spec("pagoda.entrypoints.openai.api_server") is None
                or importlib.util.find_spec("pagoda.entrypoints.cli") is None)
    except ImportError:
        return True


@pytest.mark.skipif(_server_missing(), reason="`pagoda serve` is not written yet")
def test_bench_serve_against_pagoda_serve(tiny_model, tmp_path):
    port = free_port()
    cmd = [sys.executable, "-m", "pagoda.entrypoints.cli", "serve", tiny_model, "--host",
           "127.0.0.1", "--port", str(port), "--dtype", "float32", "--device", "cpu",
           "--max-model-len", "256"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    try:
        wait_healthy(f"http://127.0.0.1:{port}", proc)
        out = tmp_path / "serve.json"
        argv = ["serve", "--base-url", f"http://127.0.0.1:{port}", "--num-prompts", "4",
                "--input-len", "8", "--output-len", "4", "--vocab-size", "300",
                "--request-rate", "inf", "--max-duration", "120", "--save-result",
                "--result-dir", str(tmp_path), "--result-filename", out.name]
        assert cli.main(argv) == 0
        result = json.loads(out.read_text())
        assert result["completed"] == 4 and result["failed"] == 0
        assert result["total_output_tokens"] == 16
        assert result["mean_ttft_ms"] > 0 and result["mean_tpot_ms"] > 0
        args = cli.make_parser().parse_args([
            "serve", "--base-url", f"http://127.0.0.1:{port}", "--endpoint",
            "/v1/chat/completions", "--tokenizer", tiny_model, "--num-prompts", "3",
            "--input-len", "8", "--output-len", "3", "--request-rate", "20",
            "--max-concurrency", "2", "--goodput", "ttft:60000", "--max-duration", "120"])
        chat = cli.run(args)
        assert chat["completed"] == 3 and chat["total_output_tokens"] == 9, chat["errors"]
        assert chat["goodput"] == pytest.approx(chat["request_throughput"])
        assert chat["max_concurrency_observed"] <= 2
    finally:
        stop_process(proc)
