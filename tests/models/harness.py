"""Greedy equivalence with `transformers` (DESIGN.md, "Correctness rule")."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

NEAR_TIE = 0.05
LOGPROB_TOL = 1e-4


@dataclass
class Reference:
    token_ids: list[int]
    logprobs: torch.Tensor  # [steps, vocab] log-softmax of transformers' logits


def make_prompts(vocab_size: int, lengths=(1, 3, 17, 40, 64, 130, 200, 300), shared=96,
                 seed: int = 0) -> list[list[int]]:
    """Prompts of many lengths; the last three share a long prefix with another one, so
    prefix caching has hits to find."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(2, vocab_size) for _ in range(n)] for n in lengths]
    base = prompts[-1]
    for i in range(len(prompts) - 3, len(prompts)):
        prompts[i] = base[:shared] + prompts[i][shared:]
    return prompts


@torch.inference_mode()
def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> Reference:
    ids = torch.tensor([prompt])
    out = model.generate(ids, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                         do_sample=False, output_logits=True, return_dict_in_generate=True,
                         pad_token_id=0)
    logits = torch.stack(out.logits)[:, 0].float()
    return Reference(out.sequences[0, len(prompt):].tolist(), torch.log_softmax(logits, -1))


def check_close(ref: Reference, token_ids: list[int], logprobs: list[float], label: str) -> int:
    """Returns 1 if the sequences part at a near tie (allowed), 0 if identical; fails
    otherwise."""
    for step, (want, got) in enumerate(zip(ref.token_ids, token_ids)):
        if want != got:
            gap = abs(ref.logprobs[step, want] - ref.logprobs[step, got]).item()
            assert gap < NEAR_TIE, (f"{label}: step {step} token {got} != {want} "
                                    f"(logprob gap {gap:.4f} is no near tie)")
            return 1
        diff = abs(ref.logprobs[step, want].item() - logprobs[step])
        assert diff < LOGPROB_TOL, f"{label}: step {step} logprob off by {diff:.2e}"
    assert len(token_ids) == len(ref.token_ids), f"{label}: length differs"
    return 0


def check_top_logprobs(ref: Reference, completion, label: str) -> None:
    """The chosen token's logprob is near 0 once greedy is decisive, so it says little; the
    runners-up's logprobs must match too (up to where the sequences part)."""
    for step, (want, got) in enumerate(zip(ref.token_ids, completion.token_ids)):
        if want != got:
            return
        for token, entry in completion.logprobs[step].items():
            expected = ref.logprobs[step, token].item()
            tol = LOGPROB_TOL * max(1.0, abs(expected))
            assert abs(entry.logprob - expected) < tol, (
                f"{label}: step {step} token {token} logprob {entry.logprob} != {expected}")


def check_run(llm, refs: list[Reference], outputs, label: str, setting: str) -> None:
    """Every output against its reference (at most one near tie per run), then the
    engine's own evidence that the setting did what it is for."""
    ties = 0
    for i, (ref, out) in enumerate(zip(refs, outputs)):
        completion = out.outputs[0]
        logprobs = [completion.logprobs[s][t].logprob
                    for s, t in enumerate(completion.token_ids)]
        ties += check_close(ref, completion.token_ids, logprobs, f"{label}/{i}")
        check_top_logprobs(ref, completion, f"{label}/{i}")
    assert ties <= 1, f"{label}: {ties} near ties: a real numerical difference"
    scheduler = llm.engine.core.scheduler
    if setting == "preempt":
        assert scheduler.num_preemptions > 0, "the small pool should have forced preemption"
    if setting == "default":
        assert scheduler.kv.pool.num_hits > 0, "shared prefixes should hit the prefix cache"
    if not llm.engine.config.cache_config.enable_prefix_caching:
        assert scheduler.kv.pool.num_hits == 0
