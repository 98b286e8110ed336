"""Tensor parallelism over two GPUs (NCCL): fp32 greedy ids and logprobs equal to one GPU's,
with CUDA graphs on. Needs a machine with at least two GPUs (device kind nvidia-h200-x2)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")

PROMPTS = [{"prompt_token_ids": list(range(10 + i, 40 + 5 * i))} for i in range(6)]


def _run(path, tp):
    from pagoda import LLM, SamplingParams
    llm = LLM(path, dtype="float32", device="cuda", max_model_len=256, max_num_seqs=16,
              tensor_parallel_size=tp, kv_cache_memory_bytes=256 * 2**20)
    try:
        params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=2)
        return [o.outputs[0] for o in llm.generate(PROMPTS, params, use_tqdm=False)]
    finally:
        llm.engine.core.shutdown()


def test_tp2_matches_one_gpu(tiny_llama_gpu_path):
    one, two = _run(tiny_llama_gpu_path, 1), _run(tiny_llama_gpu_path, 2)
    for a, b in zip(one, two):
        assert a.token_ids == b.token_ids
        for step_a, step_b in zip(a.logprobs, b.logprobs):
            for token, lp in step_a.items():
                assert abs(lp.logprob - step_b[token].logprob) < 1e-3
