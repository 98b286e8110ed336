"""Compile, before the first request, the Triton kernels that a step launches outside the CUDA
graphs (graph capture compiles the decode forward's).

A compile in the middle of serving stalls every request in flight: about a second on the
H200's host per kernel variant, and a P4 run lost 3 s to the sampler's alone
(docs/benchmarks.md, 2026-11-30). So the worker runs a few real steps of dummy requests
through `ModelRunner.execute_model` at start-up: a prefill of more rows than the skinny GEMM
takes, a mixed step (a new prompt beside two decoding requests) of fewer, and a decode step
(a CUDA graph, or with enforce_eager the eager decode grid), once per sampler path.
Their KV lands in the first few blocks, which the scheduler has not handed out yet (so this
runs only before the first request); each request writes its own KV before it reads any,
so nothing stale is read later. The lookahead's KV move, which runs only when a token opens
a new block, is compiled by a no-op move of its own, and layers whose kernels follow the step
size in ways a few dummy steps cannot reach (MoE tiles by rows per expert) compile theirs
through their own `warm_up_kernels(max_tokens)`.
"""

from __future__ import annotations

from typing import Any

from pagoda.core.sched_output import CachedRequestData, NewRequestData, SchedulerOutput
from pagoda.sampling_params import SamplingParams

# One batch per path of layers/sampler.py: the vocabulary-parallel argmax (greedy, in-kernel
# noise, a seeded row's own noise), the truncating sampler, and each again on the fp32
# logits that a logits processor (here a repetition penalty) leaves.
SAMPLER_PATHS = [
    dict(temperature=0.0), dict(temperature=0.8), dict(temperature=0.8, seed=0),
    dict(temperature=0.8, top_p=0.9), dict(temperature=0.0, repetition_penalty=1.1),
    dict(temperature=0.8, repetition_penalty=1.1),
    dict(temperature=0.8, seed=0, repetition_penalty=1.1),
    dict(temperature=0.8, top_p=0.9, repetition_penalty=1.1),
]
# Prompt lengths: the first two prefill together (23 rows: cuBLAS-sized GEMMs), the third
# joins them while they decode (7 rows: the skinny GEMM's range).
PROMPTS = {"long": 20, "short": 3, "late": 5}


def warm_up(runner: Any) -> None:
    runner.lookahead.warm_up()  # the KV move out of scratch blocks: no dummy step crosses one
    max_tokens = runner.config.scheduler_config.max_num_batched_tokens
    for module in runner.model.modules():
        if hasattr(module, "warm_up_kernels"):
            module.warm_up_kernels(max_tokens)
    blocks = _block_ids(runner.block_size)
    if not _fits(runner, sum(len(ids) for ids in blocks.values())):
        return  # an engine this small keeps its first-use compiles
    for i, path in enumerate(SAMPLER_PATHS):
        params = SamplingParams(max_tokens=4, **path)
        ids = {name: f"warm-up-{i}-{name}" for name in PROMPTS}
        new = {name: NewRequestData(ids[name], [1] * PROMPTS[name], [], params, blocks[name], 0)
               for name in PROMPTS}
        runner.execute_model(_step([new["long"], new["short"]], [],
                                   {ids["long"]: PROMPTS["long"],
                                    ids["short"]: PROMPTS["short"]}))
        decoding = [CachedRequestData(ids[name], [], PROMPTS[name]) for name in ("long", "short")]
        runner.execute_model(_step([new["late"]], decoding,
                                   {ids["long"]: 1, ids["short"]: 1,
                                    ids["late"]: PROMPTS["late"]}))
        done = {"long": PROMPTS["long"] + 1, "short": PROMPTS["short"] + 1,
                "late": PROMPTS["late"]}
        runner.execute_model(_step([], [CachedRequestData(ids[name], [], done[name])
                                        for name in PROMPTS], {ids[name]: 1 for name in PROMPTS}))
        finished = _step([], [], {})
        finished.finished_req_ids = set(ids.values())
        runner.execute_model(finished)


def _fits(runner: Any, num_blocks: int) -> bool:
    """Whether the dummy steps fit the engine's limits: its KV blocks, batch rows, step
    tokens and sequence length (the persistent step buffers are sized by these)."""
    sched = runner.config.scheduler_config
    return (num_blocks <= runner.num_kv_blocks and sched.max_num_seqs >= len(PROMPTS)
            and sched.max_num_batched_tokens >= PROMPTS["long"] + PROMPTS["short"]
            and runner.max_model_len >= PROMPTS["long"] + 2)


def _block_ids(block_size: int) -> dict[str, list[int]]:
    """Consecutive blocks from 0, enough for each prompt and two decoded tokens."""
    result, next_id = {}, 0
    for name, length in PROMPTS.items():
        count = -(-(length + 2) // block_size)
        result[name] = list(range(next_id, next_id + count))
        next_id += count
    return result


def _step(new: list[NewRequestData], cached: list[CachedRequestData],
          tokens: dict[str, int]) -> SchedulerOutput:
    return SchedulerOutput(new, cached, tokens, sum(tokens.values()))
