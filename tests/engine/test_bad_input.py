"""Bad input fails fast with a ValueError naming the problem; the engine keeps serving."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from pagoda import LLM, EngineArgs, SamplingParams


@pytest.mark.parametrize("prompt, message", [
    ("", "empty"),
    ({"prompt_token_ids": []}, "empty"),
    ({"prompt_token_ids": [1] * 300}, "max_model_len"),
    ({"prompt_token_ids": [1, 99999]}, "vocabulary"),
    ({"prompt_token_ids": [-1]}, "vocabulary"),
    ({"prompt_token_ids": ["a"]}, "integers"),
    (123, "prompt must be"),
])
def test_bad_prompts_raise_before_anything_runs(tiny_llm, prompt, message):
    before = tiny_llm.engine.core.scheduler.kv.pool.num_free_blocks()
    with pytest.raises(ValueError, match=message):
        tiny_llm.generate(["fine prompt", prompt], SamplingParams(max_tokens=2),
                          use_tqdm=False)
    assert not tiny_llm.engine.has_unfinished_requests()
    assert tiny_llm.engine.core.scheduler.kv.pool.num_free_blocks() == before
    out = tiny_llm.generate("still serving", SamplingParams(max_tokens=3, ignore_eos=True),
                            use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3


@pytest.mark.parametrize("params, message", [
    (SamplingParams(logprobs=50), "maximum"),
    (SamplingParams(logit_bias={10**6: 1.0}), "vocabulary"),
    (SamplingParams(stop_token_ids=[10**6]), "vocabulary"),
])
def test_sampling_values_checked_against_the_model(tiny_llm, params, message):
    with pytest.raises(ValueError, match=message):
        tiny_llm.generate("hi", params, use_tqdm=False)


def test_mismatched_params_list(tiny_llm):
    with pytest.raises(ValueError, match="sampling params"):
        tiny_llm.generate(["a", "b"], [SamplingParams()], use_tqdm=False)


@pytest.mark.parametrize("kwargs, name", [
    ({"dtype": "int3"}, "dtype"), ({"block_size": 12}, "block_size"),
    ({"max_num_seqs": 0}, "max_num_seqs"), ({"gpu_memory_utilization": 1.5},
                                            "gpu_memory_utilization"),
    ({"load_format": "zip"}, "load_format"), ({"device": "tpu"}, "device"),
    ({"max_model_len": 10**6}, "max_model_len"), ({"num_gpu_blocks_override": 0},
                                                  "num_gpu_blocks_override"),
])
def test_engine_args_name_the_bad_argument(tiny_llama_path, kwargs, name):
    with pytest.raises(ValueError, match=name):
        EngineArgs(model=tiny_llama_path, **kwargs).create_engine_config()


def test_unknown_engine_argument(tiny_llama_path):
    with pytest.raises(ValueError, match="unknown engine argument"):
        LLM(tiny_llama_path, not_an_arg=1)


def test_missing_model_and_unknown_architecture(tiny_llama_path, tmp_path):
    with pytest.raises(ValueError, match="not a local folder"):
        EngineArgs(model=str(tmp_path / "nope")).create_engine_config()
    bad = tmp_path / "bad-arch"
    shutil.copytree(tiny_llama_path, bad)
    config = json.loads((bad / "config.json").read_text())
    config["architectures"] = ["TotallyNewForCausalLM"]
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="TotallyNewForCausalLM"):
        EngineArgs(model=str(bad)).create_engine_config()


def test_kv_pool_too_small_for_one_sequence(tiny_llama_path):
    with pytest.raises(ValueError, match="max_model_len"):
        LLM(tiny_llama_path, max_model_len=256, num_gpu_blocks_override=4)
