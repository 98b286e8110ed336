"""Host time per engine step with no model: the scheduler and the output processor at a
given batch, the Python that a GPU step cannot hide. Every request decodes one random token
per step (final-only outputs, as LLM.generate asks for).

    python benchmarks/host_overhead.py --tokenizer DIR [--batch 256] [--steps 300]
"""

from __future__ import annotations

import argparse
import random
import time

from pagoda.config import CacheConfig, SchedulerConfig
from pagoda.core.request import Request
from pagoda.core.sched_output import ModelRunnerOutput
from pagoda.core.scheduler import Scheduler
from pagoda.engine.output_processor import OutputProcessor
from pagoda.sampling_params import RequestOutputKind, SamplingParams


def measure(tokenizer, batch: int, steps: int, prompt_len: int = 100) -> dict[str, float]:
    """Mean ms per step of schedule(), update_from_output() and process_outputs()."""
    sched = Scheduler(SchedulerConfig(batch, 16384, prompt_len + steps + 16),
                      CacheConfig(block_size=16, enable_prefix_caching=True),
                      batch * ((prompt_len + steps) // 16 + 2))
    outputs = OutputProcessor(tokenizer)
    rng = random.Random(0)
    vocab = len(tokenizer) if tokenizer is not None else 30000
    for i in range(batch):
        params = SamplingParams(max_tokens=steps + 8, ignore_eos=True,
                                output_kind=RequestOutputKind.FINAL_ONLY)
        prompt = [rng.randrange(3, vocab) for _ in range(prompt_len)]
        sched.add_request(Request(str(i), prompt, params, eos_token_id=0))
        outputs.add_request(str(i), str(i), 0, None, prompt, params, time.time())
    totals = {"schedule": 0.0, "update": 0.0, "outputs": 0.0}
    warmup = 5  # the first steps are the prefill
    for step in range(steps):
        t0 = time.perf_counter()
        out = sched.schedule()
        t1 = time.perf_counter()
        ids = list(out.num_scheduled_tokens)
        result = ModelRunnerOutput(ids, [[rng.randrange(3, vocab)] for _ in ids],
                                   [None] * len(ids), {})
        t2 = time.perf_counter()
        core_outputs = sched.update_from_output(out, result)
        t3 = time.perf_counter()
        outputs.process_outputs(core_outputs)
        t4 = time.perf_counter()
        if step >= warmup:
            totals["schedule"] += t1 - t0
            totals["update"] += t3 - t2
            totals["outputs"] += t4 - t3
    return {k: 1000 * v / (steps - warmup) for k, v in totals.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", help="tokenizer folder (default: no detokenization)")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=3, help="best of this many runs")
    args = parser.parse_args()
    tokenizer = None
    if args.tokenizer:
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    runs = [measure(tokenizer, args.batch, args.steps) for _ in range(args.repeat)]
    best = {k: min(r[k] for r in runs) for k in runs[0]}
    print(f"batch {args.batch}, ms per step: " + ", ".join(f"{k} {v:.3f}" for k, v in best.items())
          + f", total {sum(best.values()):.3f}")


if __name__ == "__main__":
    main()
