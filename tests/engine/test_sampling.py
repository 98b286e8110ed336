"""Sampling options end to end through `LLM` on a tiny model."""

from __future__ import annotations

import math

import pytest

from pagoda import SamplingParams

PROMPT = "The quick brown fox"


def _text(llm, prompt, **kw):
    return llm.generate(prompt, SamplingParams(**kw), use_tqdm=False)[0].outputs[0]


def test_seed_reproducible_across_batch_compositions(tiny_llm):
    params = SamplingParams(temperature=1.0, seed=1234, max_tokens=16, ignore_eos=True)
    alone = tiny_llm.generate(PROMPT, params, use_tqdm=False)[0].outputs[0].token_ids
    others = [SamplingParams(temperature=0.9, max_tokens=20, ignore_eos=True)] * 3
    batch = tiny_llm.generate(["Hello", PROMPT, "Once upon a time", "x y z"],
                              [others[0], params, others[1], others[2]], use_tqdm=False)
    assert batch[1].outputs[0].token_ids == alone
    different = _text(tiny_llm, PROMPT, temperature=1.0, seed=99, max_tokens=16,
                      ignore_eos=True)
    assert different.token_ids != alone


def test_n_returns_distinct_samples_sharing_the_prompt(tiny_llm):
    out = tiny_llm.generate(PROMPT, SamplingParams(n=4, temperature=1.0, seed=7,
                                                   max_tokens=12, ignore_eos=True),
                            use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2, 3]
    assert len({tuple(c.token_ids) for c in out.outputs}) == 4


def test_greedy_ignores_seed_and_is_deterministic(tiny_llm):
    a = _text(tiny_llm, PROMPT, temperature=0, max_tokens=10, seed=1)
    b = _text(tiny_llm, PROMPT, temperature=0, max_tokens=10, seed=2)
    assert a.token_ids == b.token_ids


def test_top_k_one_equals_greedy(tiny_llm):
    greedy = _text(tiny_llm, PROMPT, temperature=0, max_tokens=10, ignore_eos=True)
    topk = _text(tiny_llm, PROMPT, temperature=1.5, top_k=1, max_tokens=10, ignore_eos=True)
    tiny_p = _text(tiny_llm, PROMPT, temperature=1.5, top_p=1e-6, max_tokens=10,
                   ignore_eos=True)
    strict_min_p = _text(tiny_llm, PROMPT, temperature=1.5, min_p=1.0, max_tokens=10,
                         ignore_eos=True)
    assert greedy.token_ids == topk.token_ids == tiny_p.token_ids == strict_min_p.token_ids


def test_logprobs_include_sampled_token_with_rank(tiny_llm):
    out = _text(tiny_llm, PROMPT, temperature=1.0, seed=3, max_tokens=8, logprobs=3,
                ignore_eos=True)
    total = 0.0
    for token_id, position in zip(out.token_ids, out.logprobs):
        assert token_id in position and 3 <= len(position) <= 4
        top = sorted((lp for t, lp in position.items() if t != token_id or lp.rank <= 3),
                     key=lambda lp: lp.rank)
        assert [lp.rank for lp in top][:3] == [1, 2, 3]
        sampled = position[token_id]
        assert sum(lp.logprob > sampled.logprob for lp in position.values()) < sampled.rank
        total += sampled.logprob
    assert math.isclose(out.cumulative_logprob, total, rel_tol=1e-5)


def test_prompt_logprobs_match_a_full_forward(tiny_llm):
    out = tiny_llm.generate(PROMPT, SamplingParams(max_tokens=1, prompt_logprobs=2),
                            use_tqdm=False)[0]
    assert out.prompt_logprobs[0] is None
    assert len(out.prompt_logprobs) == len(out.prompt_token_ids)
    for token_id, position in zip(out.prompt_token_ids[1:], out.prompt_logprobs[1:]):
        assert token_id in position and len(position) <= 3


def test_stop_string_spanning_tokens_is_found_and_excluded(tiny_llm):
    full = _text(tiny_llm, PROMPT, temperature=0, max_tokens=24, ignore_eos=True)
    text = full.text
    assert len(text) > 8
    stop = text[5:9]  # almost surely spans a token boundary in a random model's output
    cut = _text(tiny_llm, PROMPT, temperature=0, max_tokens=24, ignore_eos=True, stop=[stop])
    assert cut.text == text[:text.index(stop)]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    kept = _text(tiny_llm, PROMPT, temperature=0, max_tokens=24, ignore_eos=True,
                 stop=[stop], include_stop_str_in_output=True)
    assert kept.text == text[:text.index(stop) + len(stop)]


def test_stop_token_ids_and_max_tokens(tiny_llm):
    full = _text(tiny_llm, PROMPT, temperature=0, max_tokens=10, ignore_eos=True)
    assert full.finish_reason == "length" and len(full.token_ids) == 10
    target = full.token_ids[4]
    first = full.token_ids.index(target)
    out = _text(tiny_llm, PROMPT, temperature=0, max_tokens=10, ignore_eos=True,
                stop_token_ids=[target])
    assert out.token_ids == full.token_ids[:first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == target


def test_min_tokens_blocks_eos(tiny_llm):
    eos = tiny_llm.get_tokenizer().eos_token_id
    out = _text(tiny_llm, PROMPT, temperature=1.0, seed=0, max_tokens=12, min_tokens=12,
                logit_bias={eos: 100.0})
    assert len(out.token_ids) == 12 and eos not in out.token_ids
    out = _text(tiny_llm, PROMPT, temperature=1.0, seed=0, max_tokens=12, min_tokens=3,
                logit_bias={eos: 100.0})
    assert out.token_ids[-1] == eos and len(out.token_ids) == 4


def test_logit_bias_and_allowed_token_ids(tiny_llm):
    out = _text(tiny_llm, PROMPT, temperature=1.0, seed=0, max_tokens=6, ignore_eos=True,
                logit_bias={42: 100.0})
    assert out.token_ids == [42] * 6
    out = _text(tiny_llm, PROMPT, temperature=1.0, seed=0, max_tokens=6, ignore_eos=True,
                allowed_token_ids=[50, 51])
    assert set(out.token_ids) <= {50, 51}


def test_penalties_change_repetition(tiny_llm):
    base = _text(tiny_llm, PROMPT, temperature=0, max_tokens=30, ignore_eos=True)
    freq = _text(tiny_llm, PROMPT, temperature=0, max_tokens=30, ignore_eos=True,
                 frequency_penalty=2.0, presence_penalty=2.0)
    rep = _text(tiny_llm, PROMPT, temperature=0, max_tokens=30, ignore_eos=True,
                repetition_penalty=2.0)
    distinct = lambda ids: len(set(ids))  # noqa: E731
    assert distinct(freq.token_ids) >= distinct(base.token_ids)
    assert freq.token_ids != base.token_ids or rep.token_ids != base.token_ids


def test_detokenize_false_and_skip_tokenizer(tiny_llm):
    out = _text(tiny_llm, PROMPT, temperature=0, max_tokens=5, detokenize=False)
    assert out.text == "" and len(out.token_ids) == 5


@pytest.mark.parametrize("kwargs", [
    {"temperature": -1}, {"top_p": 0}, {"top_p": 1.5}, {"n": 0}, {"top_k": -2},
    {"max_tokens": 0}, {"min_p": 2}, {"repetition_penalty": 0}, {"presence_penalty": 3},
    {"min_tokens": 5, "max_tokens": 2}, {"logprobs": -1}, {"stop": [""]},
])
def test_impossible_sampling_values_raise(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)


def test_seeded_text_survives_preemption(tiny_llama_path):
    """A preempted request replays its generator's draws when it resumes."""
    from pagoda import LLM
    prompts = [{"prompt_token_ids": list(range(3 + i, 40 + i))} for i in range(6)]
    params = [SamplingParams(temperature=1.0, seed=100 + i, max_tokens=40, ignore_eos=True)
              for i in range(6)]
    roomy = LLM(tiny_llama_path, dtype="float32", max_model_len=128)
    tight = LLM(tiny_llama_path, dtype="float32", max_model_len=128, block_size=8,
                num_gpu_blocks_override=24)
    expected = [o.outputs[0].token_ids for o in roomy.generate(prompts, params, use_tqdm=False)]
    got = [o.outputs[0].token_ids for o in tight.generate(prompts, params, use_tqdm=False)]
    assert tight.engine.core.scheduler.num_preemptions > 0
    assert got == expected


def _two_token_word(tokenizer):
    """A word that tokenizes as two tokens (a, b) when it starts the text."""
    for a in range(300, 1000):
        for b in range(300, 320):
            word = tokenizer.decode([a, b])
            if word.strip() == word and tokenizer.encode(word, add_special_tokens=False) == [a, b]:
                return word, a, b
    raise AssertionError("no two-token word in the tiny vocabulary")


def test_bad_words_ban_the_completing_token(tiny_llm):
    tok = tiny_llm.get_tokenizer()
    word, a, b = _two_token_word(tok)
    kw = dict(temperature=1.0, seed=3, max_tokens=40, ignore_eos=True, allowed_token_ids=[a, b])
    pairs = lambda ids: list(zip(ids, ids[1:]))  # noqa: E731
    free = _text(tiny_llm, PROMPT, **kw).token_ids
    assert (a, b) in pairs(free)  # without the ban the word appears
    banned = _text(tiny_llm, PROMPT, bad_words=[word], **kw).token_ids
    assert (a, b) not in pairs(banned) and b in banned  # b alone is still allowed
    single = tok.decode([a])
    if tok.encode(single, add_special_tokens=False) == [a]:
        out = _text(tiny_llm, PROMPT, bad_words=[single], **kw).token_ids
        assert a not in out  # a one-token word is banned everywhere


def test_truncate_prompt_tokens_keeps_the_tail(tiny_llm):
    ids = [i % 300 + 50 for i in range(300)]  # longer than max_model_len (256)
    params = SamplingParams(max_tokens=2, truncate_prompt_tokens=5)
    out = tiny_llm.generate({"prompt_token_ids": ids}, params, use_tqdm=False)[0]
    assert out.prompt_token_ids == ids[-5:]
    params = SamplingParams(max_tokens=1, truncate_prompt_tokens=-1)
    out = tiny_llm.generate({"prompt_token_ids": ids}, params, use_tqdm=False)[0]
    assert out.prompt_token_ids == ids[-255:] and len(out.outputs[0].token_ids) == 1
    with pytest.raises(ValueError, match="truncate_prompt_tokens"):
        SamplingParams(truncate_prompt_tokens=0)
    with pytest.raises(ValueError, match="bad_words"):
        SamplingParams(bad_words=["  "])


def test_half_precision_logits_reach_every_sampling_path(tiny_llama_path):
    """In bf16 the LM head's logits stay bf16 (no fp32 copy a step); the sampler converts
    what it needs. Greedy equals the argmax of the fp32 logits, and every path (greedy,
    plain temperature, seeded, top-k/top-p, logprobs, prompt logprobs) runs."""
    import torch
    from pagoda import LLM
    llm = LLM(tiny_llama_path, dtype="bfloat16", seed=0)
    runner = llm.engine.core.executor.worker.runner
    hidden = torch.randn(3, runner.model.config.hidden_size, dtype=torch.bfloat16)
    logits = runner.model.compute_logits(hidden)
    assert logits.dtype == torch.bfloat16
    greedy = runner.sampler(logits, _greedy_metadata(3)).sampled
    assert torch.equal(greedy, logits.float().argmax(-1))
    for kwargs in (dict(temperature=0), dict(temperature=0.8), dict(temperature=0.8, seed=3),
                   dict(temperature=0.8, top_k=5, top_p=0.9), dict(logprobs=2),
                   dict(prompt_logprobs=1)):
        out = llm.generate(PROMPT, SamplingParams(max_tokens=6, ignore_eos=True, **kwargs),
                           use_tqdm=False)[0]
        assert len(out.outputs[0].token_ids) == 6, kwargs
        for step in out.outputs[0].logprobs or []:
            assert all(math.isfinite(lp.logprob) for lp in step.values())
        assert all(math.isfinite(lp.logprob) for step in (out.prompt_logprobs or [])[1:]
                   for lp in step.values())


def _greedy_metadata(rows: int):
    import torch
    from pagoda.layers.sampler import SamplingMetadata
    return SamplingMetadata(temperature=torch.zeros(rows), all_greedy=True)
