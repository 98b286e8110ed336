"""The start-up warm-up (worker/warm_up.py) runs real steps of dummy requests; on the CPU it
must leave nothing behind: no request state, and the same tokens from the requests after."""

from __future__ import annotations

import pytest

from pagoda import LLM, SamplingParams
from pagoda.worker import warm_up as warm_up_module
from tests.models.harness import make_prompts

PROMPTS = make_prompts(384, lengths=(3, 17, 40, 5), seed=11)


def _generate(llm):
    params = [SamplingParams(max_tokens=12, ignore_eos=True, temperature=0.0),
              SamplingParams(max_tokens=12, ignore_eos=True, temperature=0.9, seed=5),
              SamplingParams(max_tokens=12, ignore_eos=True, temperature=0.9, top_p=0.8,
                             seed=6),
              SamplingParams(max_tokens=12, ignore_eos=True, temperature=0.0,
                             repetition_penalty=1.2)]  # seeded or greedy: the warm-up moves the RNG
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def test_warm_up_leaves_no_trace(tiny_llama_path, monkeypatch):
    steps = []
    plain = LLM(tiny_llama_path, dtype="float32", max_model_len=256)
    want = _generate(plain)
    del plain
    warmed = LLM(tiny_llama_path, dtype="float32", max_model_len=256)
    runner = warmed.engine.core.executor.worker.runner
    execute = runner.execute_model

    def counting(sched):
        out = execute(sched)
        steps.append((sched.total_num_scheduled_tokens, sum(map(len, out.sampled_token_ids))))
        return out

    monkeypatch.setattr(runner, "execute_model", counting)
    warm_up_module.warm_up(runner)  # as the worker does on CUDA, before any request
    monkeypatch.undo()
    # per sampler path: a 23-token prefill sampling 2, a 7-token mixed step sampling 3, a
    # decode step, the end
    assert steps == [(23, 2), (7, 3), (3, 3), (0, 0)] * len(warm_up_module.SAMPLER_PATHS)
    assert not runner.batch.states and runner.lookahead.pending is None
    assert _generate(warmed) == want


def test_warm_up_skips_engines_too_small_for_it(tiny_llama_path, monkeypatch):
    """Two sequences a step (or a step of 16 tokens) cannot hold the dummy batches: no step
    runs, rather than one that overflows the step buffers."""
    for limits in (dict(max_num_seqs=2), dict(max_num_batched_tokens=16, max_model_len=16)):
        llm = LLM(tiny_llama_path, dtype="float32", **{"max_model_len": 256, **limits})
        runner = llm.engine.core.executor.worker.runner
        monkeypatch.setattr(runner, "execute_model", lambda sched: pytest.fail("ran a step"))
        warm_up_module.warm_up(runner)
        monkeypatch.undo()


def test_warm_up_compiles_moe_tiles_for_the_longest_step(tmp_path, monkeypatch):
    """MoE layers' kernel variants follow the rows per expert, which a few dummy steps do not
    reach: the warm-up hands each MoE block the engine's longest step."""
    from pagoda.layers.moe import SparseMoeBlock
    from tests.models.test_families import FAMILIES
    from tests.utils import make_model
    make_model(str(tmp_path), FAMILIES["mixtral"]())
    llm = LLM(str(tmp_path), dtype="float32", max_model_len=128, max_num_batched_tokens=384)
    runner = llm.engine.core.executor.worker.runner
    seen = []
    monkeypatch.setattr(SparseMoeBlock, "warm_up_kernels",
                        lambda self, max_tokens: seen.append((self.top_k, max_tokens)))
    warm_up_module.warm_up(runner)
    layers = runner.model.config.num_hidden_layers
    assert seen == [(2, 384)] * layers
