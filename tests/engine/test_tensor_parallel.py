"""Tensor parallelism over two CPU processes (gloo) against one process: the same greedy ids
and logprobs, the same seeded and unseeded samples, and clear errors for impossible splits."""

from __future__ import annotations

import pytest

from pagoda import LLM, SamplingParams

PROMPTS = [{"prompt_token_ids": list(range(10 + i, 30 + 3 * i))} for i in range(5)]


@pytest.fixture(scope="module")
def runs(tiny_llama_path):
    """(tp=1, tp=2) outputs of the same requests: greedy with logprobs, seeded, unseeded."""
    params = [SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=3),
              SamplingParams(temperature=1.0, seed=7, max_tokens=10, ignore_eos=True),
              SamplingParams(temperature=0.8, top_k=20, max_tokens=10, ignore_eos=True)]
    results = []
    for tp in (1, 2):
        llm = LLM(tiny_llama_path, dtype="float32", device="cpu", max_model_len=128,
                  tensor_parallel_size=tp, seed=3)
        results.append([llm.generate(PROMPTS, p, use_tqdm=False) for p in params])
        llm.engine.core.shutdown()
        del llm
    return results


def test_greedy_ids_and_logprobs_match_one_process(runs):
    one, two = runs[0][0], runs[1][0]
    for a, b in zip(one, two):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for step_a, step_b in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert step_a.keys() == step_b.keys()
            for token, lp in step_a.items():
                assert abs(lp.logprob - step_b[token].logprob) < 1e-4


def test_sampling_matches_one_process(runs):
    for kind in (1, 2):  # seeded, then the engine-seeded global generator
        assert ([o.outputs[0].token_ids for o in runs[0][kind]]
                == [o.outputs[0].token_ids for o in runs[1][kind]])


def test_impossible_splits_are_refused(tiny_llama_path):
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        LLM(tiny_llama_path, device="cpu", tensor_parallel_size=3)  # 4 heads


def test_a_failing_rank_is_reported_while_another_waits():
    """Rank 0 still inside a collective (no reply) must not hide rank 1's error: the
    executor takes replies as they arrive, over real pipes."""
    import multiprocessing
    import time

    import msgspec

    from pagoda.executor.multiproc import MultiprocExecutor, _Reply

    executor = object.__new__(MultiprocExecutor)  # only the reply side, no ranks spawned
    executor._reply_decoder = msgspec.msgpack.Decoder(_Reply)
    pipes = [multiprocessing.Pipe() for _ in range(2)]
    executor.conns = [ours for ours, _ in pipes]
    pipes[1][1].send_bytes(msgspec.msgpack.encode(_Reply(ok=False, error="Traceback\nBoom")))
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="rank 1 failed: Boom"):
        executor._gather()
    assert time.monotonic() - start < 5
    pipes[0][1].send_bytes(msgspec.msgpack.encode(_Reply(ok=True, num_blocks=3)))
    pipes[1][1].send_bytes(msgspec.msgpack.encode(_Reply(ok=True, num_blocks=5)))
    assert [r.num_blocks for r in executor._gather()] == [3, 5]  # rank order kept
