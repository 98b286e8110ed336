"""The official `openai` client against a real `pagoda serve` (tiny random model, CPU)."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.entrypoints.conftest import MODEL_NAME

PROMPT = "The quick brown fox"
MESSAGES = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hello, how are you today?"}]


def test_models_version_health(server, client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL_NAME]
    assert httpx.get(server.url + "/version").json()["version"]
    assert httpx.get(server.url + "/health").status_code == 200


def test_completion_greedy_usage(client):
    resp = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=8,
                                     temperature=0, extra_body={"ignore_eos": True})
    choice = resp.choices[0]
    assert choice.finish_reason == "length"
    assert resp.usage.completion_tokens == 8
    assert resp.usage.prompt_tokens > 0
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + 8
    again = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=8,
                                      temperature=0, extra_body={"ignore_eos": True})
    assert again.choices[0].text == choice.text


def test_completion_stream_equals_full(client):
    kwargs = dict(model=MODEL_NAME, prompt=PROMPT, max_tokens=12, temperature=0,
                  extra_body={"ignore_eos": True})
    full = client.completions.create(**kwargs)
    chunks = list(client.completions.create(stream=True,
                                            stream_options={"include_usage": True}, **kwargs))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text
    assert chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_chat_stream_equals_full(client):
    kwargs = dict(model=MODEL_NAME, messages=MESSAGES, max_completion_tokens=10,
                  temperature=0, extra_body={"ignore_eos": True})
    full = client.chat.completions.create(**kwargs)
    assert full.choices[0].message.role == "assistant"
    assert full.usage.completion_tokens == 10
    chunks = list(client.chat.completions.create(stream=True,
                                                 stream_options={"include_usage": True},
                                                 **kwargs))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[-1].usage.total_tokens == full.usage.total_tokens


def test_n_and_seed(client):
    kwargs = dict(model=MODEL_NAME, prompt=PROMPT, max_tokens=10, temperature=1.0, n=2,
                  seed=1234, extra_body={"ignore_eos": True})
    first = client.completions.create(**kwargs)
    second = client.completions.create(**kwargs)
    assert sorted(c.index for c in first.choices) == [0, 1]
    assert [c.text for c in first.choices] == [c.text for c in second.choices]
    assert first.usage.completion_tokens == 20
    chat = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, n=2,
                                          max_tokens=5, seed=7)
    assert len(chat.choices) == 2


def test_streamed_n2(client):
    chunks = list(client.completions.create(model=MODEL_NAME, prompt=PROMPT, n=2,
                                            max_tokens=6, seed=3, stream=True,
                                            extra_body={"ignore_eos": True}))
    texts = {0: "", 1: ""}
    for c in chunks:
        for choice in c.choices:
            texts[choice.index] += choice.text
    full = client.completions.create(model=MODEL_NAME, prompt=PROMPT, n=2, max_tokens=6,
                                     seed=3, extra_body={"ignore_eos": True})
    assert texts == {c.index: c.text for c in full.choices}


def test_logprobs(client):
    resp = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=5,
                                     temperature=0, logprobs=3,
                                     extra_body={"ignore_eos": True})
    lp = resp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert all(v <= 0 for v in lp.token_logprobs)
    # Greedy: the chosen token is the best one.
    assert all(abs(max(top.values()) - chosen) < 1e-5
               for top, chosen in zip(lp.top_logprobs, lp.token_logprobs))
    chat = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=4,
                                          temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    assert all(len(item.top_logprobs) == 2 for item in content)


def test_echo_and_stop(client):
    resp = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=4,
                                     temperature=0, echo=True)
    assert resp.choices[0].text.startswith(PROMPT)
    base = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=20,
                                     temperature=0, extra_body={"ignore_eos": True})
    text = base.choices[0].text
    stop = next((text[i:i + 2] for i in range(3, len(text) - 2)
                 if text[i:i + 2].strip() and "\ufffd" not in text[i:i + 2]), None)
    if stop is None:
        pytest.skip("the random model produced no usable stop string")
    stopped = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=20,
                                        temperature=0, stop=[stop],
                                        extra_body={"ignore_eos": True})
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == text[:text.index(stop)]


def test_sampling_knobs_accepted(client):
    resp = client.completions.create(
        model=MODEL_NAME, prompt=PROMPT, max_tokens=4, temperature=0.7, top_p=0.9,
        presence_penalty=0.5, frequency_penalty=0.5, logit_bias={"5": 5.0},
        extra_body={"top_k": 5, "min_p": 0.05, "repetition_penalty": 1.2})
    assert resp.usage.completion_tokens >= 1


def test_truncate_prompt_tokens_and_bad_words(client):
    long_prompt = "word " * 400  # longer than the server's max_model_len
    resp = client.completions.create(model=MODEL_NAME, prompt=long_prompt, max_tokens=2,
                                     extra_body={"truncate_prompt_tokens": 16})
    assert resp.usage.prompt_tokens == 16
    resp = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=4,
                                          extra_body={"bad_words": ["the", "fox jumps"]})
    assert resp.usage.completion_tokens >= 1
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=2,
                                  extra_body={"truncate_prompt_tokens": 0})


def test_openai_errors(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="not-a-model", prompt=PROMPT, max_tokens=2)
    assert "does not exist" in info.value.message
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=10 ** 6)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, n=0)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL_NAME, prompt="word " * 400, max_tokens=2)


def test_echo_with_logprobs(client):
    resp = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=3,
                                     temperature=0, echo=True, logprobs=1,
                                     extra_body={"ignore_eos": True})
    lp = resp.choices[0].logprobs
    assert len(lp.tokens) == resp.usage.prompt_tokens + 3
    assert lp.token_logprobs[0] is None  # nothing predicts the first prompt token
    assert all(v is not None for v in lp.token_logprobs[1:])
    assert "".join(lp.tokens).startswith(PROMPT[:5])


def test_batch_of_prompts_streamed_and_not(client):
    kwargs = dict(model=MODEL_NAME, prompt=[PROMPT, "Hello world"], max_tokens=5, temperature=0,
                  extra_body={"ignore_eos": True})
    full = client.completions.create(**kwargs)
    assert sorted(c.index for c in full.choices) == [0, 1]
    texts = {0: "", 1: ""}
    for chunk in client.completions.create(stream=True, **kwargs):
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    assert texts == {c.index: c.text for c in full.choices}
    assert full.usage.completion_tokens == 10
