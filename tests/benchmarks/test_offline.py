"""bench throughput (pagoda and hf) and bench latency on a tiny model, on the CPU."""

import json

import pytest

from pagoda.benchmarks import cli, common, latency, throughput
from pagoda.benchmarks.datasets import random_dataset
from pagoda.benchmarks.recorder import StepRecorder
from tests.benchmarks.conftest import ENGINE_KWARGS


@pytest.fixture(scope="module")
def llm(tiny_model):
    return common.make_llm(dict(model=tiny_model, **ENGINE_KWARGS))


def test_step_recorder_counts_come_from_the_engine(llm):
    from pagoda.sampling_params import SamplingParams
    prompts = [{"prompt_token_ids": list(range(10 + i, 30 + 3 * i))} for i in range(3)]
    recorder = StepRecorder(llm)
    try:
        llm.generate(prompts, SamplingParams(max_tokens=5, ignore_eos=True), use_tqdm=False)
    finally:
        recorder.detach()
    totals = recorder.totals()
    assert totals.prompt_tokens == sum(len(p["prompt_token_ids"]) for p in prompts)
    assert totals.generated_tokens == 3 * (5 - 1)  # the last sampled token is never fed
    assert totals.decode_only_steps == 4 and totals.steps == 5
    first = recorder.records[0]
    assert first.num_sampled == 3 and first.context_tokens == first.num_tokens


def test_throughput_pagoda_and_hf_agree_on_token_counts(llm, tiny_model):
    requests = random_dataset(5, 12, 6, vocab_size=384, range_ratio=0.5, seed=0)
    pagoda, recorder = throughput.run_pagoda(llm, requests)
    hf = throughput.run_hf_backend(dict(model=tiny_model, **ENGINE_KWARGS), requests, None)
    expected = [r.expected_output_len for r in requests]
    assert pagoda["per_request_output_tokens"] == expected == hf["per_request_output_tokens"]
    assert pagoda["total_prompt_tokens"] == hf["total_prompt_tokens"]
    assert pagoda["total_output_tokens"] == hf["total_output_tokens"] == sum(expected)
    assert pagoda["num_cached_tokens"] == 0  # the warm-up leaves no prefix-cache hits
    assert pagoda["engine_prompt_tokens"] == pagoda["total_prompt_tokens"]
    assert pagoda["engine_generated_tokens"] == sum(expected) - len(requests)
    for res in (pagoda, hf):
        assert res["output_tokens_per_second"] > 0 and res["requests_per_second"] > 0
    assert hf["hf_batch_size"] == 5 and hf["hf_generated_tokens_with_padding"] >= sum(expected)


def test_hf_batches_halve_on_oom(monkeypatch):
    import torch
    from pagoda.benchmarks import hf_backend
    calls = []

    def fake_generate(model, batch, pad_id, device):
        calls.append(len(batch))
        if len(batch) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return max(r.expected_output_len for r in batch), 0.01

    monkeypatch.setattr(hf_backend, "_generate_batch", fake_generate)
    model = type("M", (), {"config": type("C", (), {"pad_token_id": 0})()})()
    run = hf_backend.run_hf(model, random_dataset(5, 4, 3, 10), torch.device("cpu"))
    assert calls == [5, 2, 2, 1]
    assert run.batch_size == 2 and run.oom_retries == 1 and run.output_tokens == 15


def test_latency_runs(llm):
    result = latency.run_latency(llm, input_len=8, output_len=4, batch_size=2,
                                 num_iters_warmup=1, num_iters=2)
    assert len(result["latencies"]) == 2 and result["avg_latency"] > 0
    assert set(result["percentiles"]) == {"p10", "p25", "p50", "p75", "p90", "p99"}
    assert result["engine_prompt_tokens_per_iter"] == 16  # no prefix-cache hits
    assert result["engine_generated_tokens_per_iter"] == 2 * 3
    assert result["output_tokens_per_iter"] == 8
    assert result["decode_ms_per_token"] > 0


def test_cli_throughput_with_roofline(tiny_model, tmp_path, capsys):
    out = tmp_path / "tp.json"
    argv = ["throughput", "--model", tiny_model, "--num-prompts", "3", "--input-len", "8",
            "--output-len", "3", "--disable-tqdm", "--bandwidth-gbps", "10",
            "--matmul-tflops", "0.1", "--output-json", str(out)]
    for key, value in ENGINE_KWARGS.items():
        argv += ["--" + key.replace("_", "-"), str(value)]
    assert cli.main(argv) == 0
    report = json.loads(out.read_text())
    assert report["pagoda"]["total_output_tokens"] == 9
    assert 0 < report["pagoda"]["roofline"]["roofline_efficiency"] < 1
    assert "Output tok/s" in capsys.readouterr().out
