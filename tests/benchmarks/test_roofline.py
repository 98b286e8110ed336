"""Roofline arithmetic against PERF.md's figures."""

import pytest

from pagoda.benchmarks.recorder import StepRecord
from pagoda.benchmarks.roofline import (Ceilings, decode_floor_ms, load_config_json,
                                        measure_ceilings, model_shape, step_floor,
                                        workload_floor)

H200 = Ceilings(bandwidth_gbps=4250.0, matmul_tflops=779.0)


@pytest.fixture(scope="module")
def llama8b():
    return model_shape(load_config_json("benchmarks/model_configs/llama-3.1-8b.json"))


def test_llama_8b_decode_floor_matches_perf_md(llama8b):
    """PERF.md: 15.0 GB of weights (embedding excluded) -> 3.53 ms -> 283 tok/s."""
    assert llama8b.weight_bytes / 1e9 == pytest.approx(15.0, abs=0.05)
    assert not llama8b.tied_embeddings and llama8b.num_experts == 0
    ms = decode_floor_ms(llama8b, H200)
    assert ms == pytest.approx(3.53, abs=0.01)
    assert 1000 / ms == pytest.approx(283, abs=1)
    # KV: 32 layers x 8 kv heads x 128 x 2 (k, v) x 2 bytes = 128 KiB per token
    assert llama8b.kv_bytes_per_token == 131072


def test_prefill_is_compute_bound(llama8b):
    tokens = 8192
    step = StepRecord(num_reqs=16, num_tokens=tokens, prompt_tokens=tokens,
                      attn_pairs=16 * 512 * 513 // 2, num_sampled=16)
    dense = 2 * llama8b.body_params * tokens / 779e12
    assert step_floor(step, llama8b, H200) > dense
    assert step_floor(step, llama8b, H200) == pytest.approx(dense, rel=0.1)
    assert workload_floor([step, step], llama8b, H200) == pytest.approx(
        2 * step_floor(step, llama8b, H200))


def test_tied_and_moe_models():
    qwen = model_shape(load_config_json("benchmarks/model_configs/qwen3-0.6b.json"))
    assert qwen.tied_embeddings and qwen.lm_head_params == qwen.embed_params
    mixtral = model_shape(load_config_json("benchmarks/model_configs/mixtral-8x7b.json"))
    assert mixtral.num_experts == 8 and mixtral.experts_per_tok == 2
    one = decode_floor_ms(mixtral, H200, batch=1)
    many = decode_floor_ms(mixtral, H200, batch=64)
    assert one < many  # batch 1 reads 2 of 8 experts per layer, batch 64 nearly all


def test_measure_ceilings_cpu():
    c = measure_ceilings("cpu", copy_bytes=8 << 20, matmul_n=256)
    assert c.bandwidth_gbps > 0 and c.matmul_tflops > 0 and c.matmul_dtype == "float32"
