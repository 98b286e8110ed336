"""The `LLM` surface: prompt forms, output order and fields, chat, weights formats."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pagoda import LLM, SamplingParams
from tests.utils import make_model, tiny_llama_config


def test_outputs_in_input_order_with_mixed_prompt_forms(tiny_llm):
    tok = tiny_llm.get_tokenizer()
    prompts = ["Hello, world!", {"prompt_token_ids": tok.encode("The quick")}, "x" * 40]
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (5, 2, 7)]
    outs = tiny_llm.generate(prompts, params, use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [5, 2, 7]
    assert outs[0].prompt == "Hello, world!"
    assert outs[0].prompt_token_ids == tok.encode("Hello, world!")
    assert outs[1].prompt_token_ids == tok.encode("The quick")
    for out in outs:
        completion = out.outputs[0]
        assert out.finished and completion.finish_reason == "length"
        assert completion.text == tok.decode(completion.token_ids, skip_special_tokens=True)


def test_n_samples_share_the_prompt_blocks(tiny_llm):
    pool = tiny_llm.engine.core.scheduler.kv.pool
    hits_before = pool.num_hits
    prompt = {"prompt_token_ids": list(range(5, 5 + 70))}
    out = tiny_llm.generate(prompt, SamplingParams(n=3, temperature=1.0, max_tokens=4),
                            use_tqdm=False)[0]
    assert len(out.outputs) == 3
    assert pool.num_hits - hits_before >= 2 * 64  # two children reuse 4 full blocks


def test_chat_uses_the_template(tiny_llm):
    tok = tiny_llm.get_tokenizer()
    messages = [{"role": "user", "content": "Hello!"}]
    out = tiny_llm.chat(messages, SamplingParams(temperature=0, max_tokens=4),
                        use_tqdm=False)[0]
    expected = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if not isinstance(expected, list):
        expected = expected["input_ids"]
    assert out.prompt_token_ids == list(expected)
    assert tok.decode(out.prompt_token_ids).endswith("<|assistant|>")


def test_reset_prefix_cache_when_idle(tiny_llm):
    assert tiny_llm.engine.core.reset_prefix_cache()
    assert not tiny_llm.engine.core.scheduler.kv.pool.cached


@pytest.mark.parametrize("fmt", ["bin", "sharded"])
def test_bin_and_sharded_checkpoints_load(tmp_path, fmt):
    path = str(tmp_path / fmt)
    model = make_model(path, tiny_llama_config(), safe_serialization=(fmt != "bin"),
                       tokenizer=False)
    if fmt == "sharded":
        model.save_pretrained(path, max_shard_size="100KB")
        assert any(p.name.endswith(".index.json") for p in tmp_path.joinpath(fmt).iterdir())
    prompt = [5, 6, 7, 8, 9]
    llm = LLM(path, dtype="float32", skip_tokenizer_init=True)
    out = llm.generate({"prompt_token_ids": prompt},
                       SamplingParams(temperature=0, max_tokens=6, ignore_eos=True,
                                      detokenize=False), use_tqdm=False)[0]
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ref = hf.generate(torch.tensor([prompt]), max_new_tokens=6, min_new_tokens=6,
                      do_sample=False, pad_token_id=0)[0, 5:].tolist()
    assert out.outputs[0].token_ids == ref


def test_dummy_weights_run(tiny_llama_path):
    llm = LLM(tiny_llama_path, load_format="dummy", max_model_len=128)
    out = llm.generate("hello", SamplingParams(max_tokens=3, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3


def test_missing_shard_and_wrong_shape_name_the_file_or_tensor(tmp_path):
    from safetensors.torch import load_file, save_file
    path = tmp_path / "broken"
    make_model(str(path), tiny_llama_config(), tokenizer=False)
    weights = load_file(str(path / "model.safetensors"))
    weights["model.norm.weight"] = torch.ones(7)
    save_file(weights, str(path / "model.safetensors"))
    with pytest.raises(ValueError, match="model.norm.weight"):
        LLM(str(path), skip_tokenizer_init=True)
    (path / "model.safetensors.index.json").write_text(
        '{"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}')
    with pytest.raises(ValueError, match="model-00002-of-00002"):
        LLM(str(path), skip_tokenizer_init=True)


def test_tokenizer_round_trip(tiny_llama_path):
    tok = AutoTokenizer.from_pretrained(tiny_llama_path)
    assert tok.decode(tok.encode("Hello, world!")) == "Hello, world!"
