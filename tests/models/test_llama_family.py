"""Llama, Mistral, Qwen2 and Qwen3 against `transformers`, float32 on the CPU: identical greedy
ids and logprobs within 1e-4 for prompts of 1..300 tokens, under prefix caching on and off,
small chunked-prefill budgets and a KV pool small enough to force preemption."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from pagoda import LLM, SamplingParams
from tests.models.harness import check_run, hf_greedy, make_prompts
from tests.utils import make_model, tiny_llama_config

MAX_NEW = 12

FAMILIES = {
    "llama3-gqa": lambda: tiny_llama_config(rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "llama-linear": lambda: tiny_llama_config(rope_scaling={"rope_type": "linear",
                                                            "factor": 2.0},
                                              tie_word_embeddings=True),
    "llama-dynamic": lambda: tiny_llama_config(rope_scaling={"rope_type": "dynamic",
                                                             "factor": 2.0},
                                               num_key_value_heads=1),
    "mistral": lambda: _config("MistralConfig", "MistralForCausalLM", sliding_window=None),
    "qwen2": lambda: _config("Qwen2Config", "Qwen2ForCausalLM", tie_word_embeddings=True),
    "qwen3": lambda: _config("Qwen3Config", "Qwen3ForCausalLM", head_dim=32),
}

ENGINE_SETTINGS = {
    "default": {},
    "no-prefix-cache": {"enable_prefix_caching": False},
    "chunked": {"max_num_batched_tokens": 24},
    "preempt": {"num_gpu_blocks_override": 40, "block_size": 8, "max_model_len": 320},
}


def _config(cls_name: str, arch: str, **overrides):
    import transformers
    base = tiny_llama_config().to_dict()
    for key in ("model_type", "transformers_version", "architectures", "rope_scaling",
                "rope_parameters", "pretraining_tp", "mlp_bias", "attention_bias", "head_dim"):
        base.pop(key, None)
    base.update(overrides, architectures=[arch])
    return getattr(transformers, cls_name)(**base)


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    path = str(tmp_path_factory.mktemp(request.param))
    config = FAMILIES[request.param]()
    make_model(path, config)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    prompts = make_prompts(config.vocab_size)
    refs = [hf_greedy(hf, p, MAX_NEW) for p in prompts]
    return request.param, path, prompts, refs


@pytest.mark.parametrize("setting", list(ENGINE_SETTINGS))
def test_greedy_matches_transformers(family, setting):
    name, path, prompts, refs = family
    llm = LLM(path, dtype="float32", seed=0, **ENGINE_SETTINGS[setting])
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW, logprobs=5, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    check_run(llm, refs, outputs, f"{name}/{setting}", setting)
