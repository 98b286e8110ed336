"""Benchmark workloads as lists of `SampleRequest` (prompt token ids + output length).

- random: uniform lengths in [len * (1 - ratio), len * (1 + ratio)], random token ids, an
  optional shared random prefix of `prefix_len` tokens (vLLM's RandomDataset).
- sharegpt-like: log-normal prompt and output lengths fitted to ShareGPT's published means,
  filtered as vLLM filters ShareGPT (see docs/bench_datasets.md).
- prefix-repetition: `num_prefixes` random prefixes of `prefix_len` tokens, each prompt one
  of them plus a random suffix (exercises the prefix cache).
- nano: nano-vllm's bench.py workload exactly (PERF.md P4), with Python's `random`.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Optional

import numpy as np

DATASET_NAMES = ("random", "sharegpt-like", "prefix-repetition", "nano")

# sharegpt-like: log-normal(mu, sigma) of token counts. The means match the ShareGPT figures
# of the vLLM paper (Kwon et al., SOSP 2023, Fig. 11: mean input 161.31, mean output 337.99
# tokens); the sigmas are our choice (docs/bench_datasets.md).
SHAREGPT_IN_MEAN, SHAREGPT_IN_SIGMA = 161.31, 1.0
SHAREGPT_OUT_MEAN, SHAREGPT_OUT_SIGMA = 337.99, 0.8
SHAREGPT_MIN_LEN, SHAREGPT_MAX_PROMPT, SHAREGPT_MAX_TOTAL = 4, 1024, 2048


@dataclass
class SampleRequest:
    prompt_token_ids: list[int]
    expected_output_len: int
    temperature: float = 1.0

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)


def lognormal_mu(mean: float, sigma: float) -> float:
    """mu of a log-normal with the given mean and sigma: mean = exp(mu + sigma^2 / 2)."""
    return math.log(mean) - sigma * sigma / 2.0


def _lengths(rng: np.random.Generator, length: int, ratio: float, n: int) -> np.ndarray:
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"--random-range-ratio must be in [0, 1); got {ratio}")
    low = max(1, int(length * (1 - ratio)))
    high = max(low, int(length * (1 + ratio)))
    return rng.integers(low, high + 1, size=n)


def random_dataset(num_prompts: int, input_len: int, output_len: int, vocab_size: int,
                   range_ratio: float = 0.0, prefix_len: int = 0, seed: int = 0,
                   temperature: float = 1.0) -> list[SampleRequest]:
    """input_len counts the random part; a shared prefix of prefix_len tokens comes first."""
    rng = np.random.default_rng(seed)
    prefix = rng.integers(0, vocab_size, size=prefix_len).tolist()
    in_lens = _lengths(rng, input_len, range_ratio, num_prompts)
    out_lens = _lengths(rng, output_len, range_ratio, num_prompts)
    return [SampleRequest(prefix + rng.integers(0, vocab_size, size=int(n_in)).tolist(),
                          int(n_out), temperature)
            for n_in, n_out in zip(in_lens, out_lens)]


def sharegpt_like_lengths(num_prompts: int, seed: int = 0,
                          max_model_len: Optional[int] = None) -> list[tuple[int, int]]:
    """(prompt_len, output_len) pairs: log-normal draws, rounded, kept when vLLM's ShareGPT
    filter keeps them (both >= 4, prompt <= 1024, prompt + output <= 2048, and within
    max_model_len when given); rejected draws are redrawn."""
    rng = np.random.default_rng(seed)
    mu_in = lognormal_mu(SHAREGPT_IN_MEAN, SHAREGPT_IN_SIGMA)
    mu_out = lognormal_mu(SHAREGPT_OUT_MEAN, SHAREGPT_OUT_SIGMA)
    max_total = min(SHAREGPT_MAX_TOTAL, max_model_len or SHAREGPT_MAX_TOTAL)
    pairs: list[tuple[int, int]] = []
    while len(pairs) < num_prompts:
        n = 2 * (num_prompts - len(pairs)) + 8
        ins = np.rint(rng.lognormal(mu_in, SHAREGPT_IN_SIGMA, size=n)).astype(int)
        outs = np.rint(rng.lognormal(mu_out, SHAREGPT_OUT_SIGMA, size=n)).astype(int)
        for p, o in zip(ins.tolist(), outs.tolist()):
            if (p >= SHAREGPT_MIN_LEN and o >= SHAREGPT_MIN_LEN and p <= SHAREGPT_MAX_PROMPT
                    and p + o <= max_total and len(pairs) < num_prompts):
                pairs.append((p, o))
    return pairs


def sharegpt_like_dataset(num_prompts: int, vocab_size: int, seed: int = 0,
                          max_model_len: Optional[int] = None,
                          temperature: float = 1.0) -> list[SampleRequest]:
    rng = np.random.default_rng(seed + 1)
    return [SampleRequest(rng.integers(0, vocab_size, size=p).tolist(), o, temperature)
            for p, o in sharegpt_like_lengths(num_prompts, seed, max_model_len)]


def prefix_repetition_dataset(num_prompts: int, prefix_len: int, suffix_len: int,
                              output_len: int, vocab_size: int, num_prefixes: int = 10,
                              seed: int = 0, temperature: float = 1.0
                              ) -> list[SampleRequest]:
    """Prompts i = prefix[i % num_prefixes] + random suffix, shuffled with the seed."""
    if num_prefixes < 1:
        raise ValueError("--num-prefixes must be >= 1")
    rng = np.random.default_rng(seed)
    prefixes = [rng.integers(0, vocab_size, size=prefix_len).tolist()
                for _ in range(num_prefixes)]
    requests = [SampleRequest(prefixes[i % num_prefixes]
                              + rng.integers(0, vocab_size, size=suffix_len).tolist(),
                              output_len, temperature)
                for i in range(num_prompts)]
    order = rng.permutation(num_prompts)
    return [requests[i] for i in order]


def nano_dataset(num_prompts: int = 256, max_input_len: int = 1024,
                 max_output_len: int = 1024) -> list[SampleRequest]:
    """nano-vllm's bench.py: random.seed(0); all prompts first (length randint(100, 1024),
    ids randint(0, 10000)), then all max_tokens (randint(100, 1024)); temperature 0.6."""
    random.seed(0)
    prompts = [[random.randint(0, 10000) for _ in range(random.randint(100, max_input_len))]
               for _ in range(num_prompts)]
    max_tokens = [random.randint(100, max_output_len) for _ in range(num_prompts)]
    return [SampleRequest(p, m, 0.6) for p, m in zip(prompts, max_tokens)]


def get_dataset(name: str, num_prompts: int, input_len: int, output_len: int,
                vocab_size: int, range_ratio: float = 0.0, prefix_len: int = 0,
                num_prefixes: int = 10, seed: int = 0,
                max_model_len: Optional[int] = None) -> list[SampleRequest]:
    """The one entry point the CLI uses."""
    if num_prompts < 1:
        raise ValueError("--num-prompts must be >= 1")
    if name == "random":
        return random_dataset(num_prompts, input_len, output_len, vocab_size, range_ratio,
                              prefix_len, seed)
    if name == "sharegpt-like":
        return sharegpt_like_dataset(num_prompts, vocab_size, seed, max_model_len)
    if name == "prefix-repetition":
        suffix = max(input_len - prefix_len, 0)
        return prefix_repetition_dataset(num_prompts, prefix_len, suffix, output_len,
                                         vocab_size, num_prefixes, seed)
    if name == "nano":
        return nano_dataset(num_prompts)
    raise ValueError(f"--dataset-name must be one of {', '.join(DATASET_NAMES)}; got {name!r}")
