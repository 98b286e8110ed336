"""Workload generators: PERF.md P4's recipe exactly, and the documented distributions."""

import math
import random

import numpy as np
import pytest

from pagoda.benchmarks.datasets import (SHAREGPT_IN_MEAN, SHAREGPT_IN_SIGMA, get_dataset,
                                        lognormal_mu, nano_dataset, prefix_repetition_dataset,
                                        random_dataset, sharegpt_like_lengths)


def test_nano_matches_perf_p4_recipe():
    """nano-vllm's bench.py, written out as PERF.md P4 states it."""
    random.seed(0)
    prompts = [[random.randint(0, 10000) for _ in range(random.randint(100, 1024))]
               for _ in range(256)]
    max_tokens = [random.randint(100, 1024) for _ in range(256)]
    random.seed(123)  # the generator must reseed itself
    data = nano_dataset()
    assert [r.prompt_token_ids for r in data] == prompts
    assert [r.expected_output_len for r in data] == max_tokens
    assert all(r.temperature == 0.6 for r in data)
    assert len(data) == 256 and all(100 <= r.prompt_len <= 1024 for r in data)
    assert get_dataset("nano", 256, 0, 0, 1)[5].prompt_token_ids == prompts[5]


def test_random_dataset_lengths_prefix_and_seed():
    data = random_dataset(200, 100, 50, vocab_size=384, range_ratio=0.5, prefix_len=8, seed=1)
    prefix = data[0].prompt_token_ids[:8]
    assert all(r.prompt_token_ids[:8] == prefix for r in data)
    assert all(50 <= r.prompt_len - 8 <= 150 and 25 <= r.expected_output_len <= 75
               for r in data)
    assert all(0 <= t < 384 for r in data for t in r.prompt_token_ids)
    assert len({r.prompt_len for r in data}) > 20
    again = random_dataset(200, 100, 50, vocab_size=384, range_ratio=0.5, prefix_len=8, seed=1)
    assert [r.prompt_token_ids for r in again] == [r.prompt_token_ids for r in data]
    fixed = random_dataset(5, 16, 4, vocab_size=10)
    assert all(r.prompt_len == 16 and r.expected_output_len == 4 for r in fixed)
    with pytest.raises(ValueError):
        random_dataset(5, 16, 4, vocab_size=10, range_ratio=1.0)


def test_sharegpt_like_distribution():
    assert math.exp(lognormal_mu(100.0, 0.7) + 0.7 ** 2 / 2) == pytest.approx(100.0)
    pairs = sharegpt_like_lengths(4000, seed=0)
    ins = np.array([p for p, _ in pairs])
    outs = np.array([o for _, o in pairs])
    assert len(pairs) == 4000
    assert ins.min() >= 4 and outs.min() >= 4 and ins.max() <= 1024
    assert (ins + outs).max() <= 2048
    # medians of the log-normals (exp(mu)); the filter trims only the far tails
    assert np.median(ins) == pytest.approx(
        math.exp(lognormal_mu(SHAREGPT_IN_MEAN, SHAREGPT_IN_SIGMA)), rel=0.1)
    assert 120 < ins.mean() < 170 and 250 < outs.mean() < 350
    assert sharegpt_like_lengths(4000, seed=0) == pairs
    short = sharegpt_like_lengths(200, seed=2, max_model_len=256)
    assert max(p + o for p, o in short) <= 256
    data = get_dataset("sharegpt-like", 30, 0, 0, vocab_size=100, seed=3)
    assert all(0 <= t < 100 for r in data for t in r.prompt_token_ids)


def test_prefix_repetition():
    data = prefix_repetition_dataset(40, prefix_len=32, suffix_len=8, output_len=5,
                                     vocab_size=384, num_prefixes=4, seed=0)
    prefixes = {tuple(r.prompt_token_ids[:32]) for r in data}
    assert len(prefixes) == 4 and all(r.prompt_len == 40 for r in data)
    via_cli = get_dataset("prefix-repetition", 40, 40, 5, 384, prefix_len=32,
                          num_prefixes=4)
    assert [r.prompt_token_ids for r in via_cli] == [r.prompt_token_ids for r in data]


def test_get_dataset_errors():
    with pytest.raises(ValueError):
        get_dataset("sharegpt", 1, 1, 1, 10)
    with pytest.raises(ValueError):
        get_dataset("random", 0, 1, 1, 10)
