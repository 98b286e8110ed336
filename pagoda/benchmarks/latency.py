"""`pagoda bench latency`: end-to-end latency of one batch, as vLLM's `bench latency`.

A batch of `batch_size` random prompts of `input_len` tokens generates `output_len` tokens
each (ignore_eos); after `num_iters_warmup` untimed runs, `num_iters` runs are timed. Reports
the mean and percentiles of the batch's end-to-end latency and, from the engine's own steps,
the decode time per token (the mean time of steps that only decode) and prefill time.
The prefix cache is reset before every iteration, so each one computes its prompts.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np

from pagoda.benchmarks import common
from pagoda.benchmarks.metrics import DEFAULT_PERCENTILES, summarize
from pagoda.benchmarks.recorder import StepRecorder


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--n", type=int, default=1, help="samples per prompt")
    parser.add_argument("--num-iters-warmup", type=int, default=10)
    parser.add_argument("--num-iters", type=int, default=30)
    parser.add_argument("--output-json", type=str, default=None)
    parser.add_argument("--measure-ceilings", action="store_true",
                        help="measure copy bandwidth and matmul rate for the roofline")
    parser.add_argument("--disable-tqdm", action="store_true")
    common.add_engine_args(parser)


def _iteration(llm, prompts: list, params, recorder: StepRecorder) -> dict[str, float]:
    reset = getattr(llm.engine.core, "reset_prefix_cache", None)
    if reset is not None:
        reset()  # every iteration computes its prompts: no hits from the previous one
    recorder.reset()
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    latency = time.perf_counter() - start
    totals = recorder.totals()
    prefill_s = sum(r.time_s for r in recorder.records if not r.is_decode_only)
    return {"latency": latency, "prefill_s": prefill_s,
            "decode_steps": totals.decode_only_steps,
            "decode_s": totals.decode_only_time_s,
            "prompt_tokens": totals.prompt_tokens,
            "generated_tokens": totals.generated_tokens,
            "output_tokens": sum(len(c.token_ids) for o in outputs for c in o.outputs)}


def run_latency(llm, input_len: int, output_len: int, batch_size: int, n: int = 1,
                num_iters_warmup: int = 1, num_iters: int = 3, seed: int = 0,
                ceilings=None, progress: bool = False) -> dict[str, Any]:
    """Runs the benchmark on an existing `LLM`; returns the result dict."""
    from pagoda.sampling_params import SamplingParams
    if min(input_len, output_len, batch_size, n, num_iters) < 1 or num_iters_warmup < 0:
        raise ValueError("lengths, batch size, n and num_iters must be >= 1")
    vocab = min(common.engine_vocab_size(llm), 10000)
    rng = np.random.default_rng(seed)
    prompts = [{"prompt_token_ids": rng.integers(0, vocab, size=input_len).tolist()}
               for _ in range(batch_size)]
    params = SamplingParams(n=n, temperature=1.0, top_p=1.0, ignore_eos=True,
                            max_tokens=output_len)
    recorder = StepRecorder(llm)
    try:
        for i in range(num_iters_warmup):
            _iteration(llm, prompts, params, recorder)
        runs = []
        for i in range(num_iters):
            runs.append(_iteration(llm, prompts, params, recorder))
            if progress:
                print(f"iteration {i + 1}/{num_iters}: {runs[-1]['latency']:.4f} s")
    finally:
        recorder.detach()
    return _result(llm, runs, input_len, output_len, batch_size, n, ceilings)


def _result(llm, runs: list[dict], input_len: int, output_len: int, batch_size: int,
            n: int, ceilings) -> dict[str, Any]:
    latencies = [r["latency"] for r in runs]
    decode_steps = sum(r["decode_steps"] for r in runs)
    decode_ms = 1000.0 * sum(r["decode_s"] for r in runs) / decode_steps if decode_steps else 0.0
    stats = summarize(latencies, DEFAULT_PERCENTILES)
    result = {
        "input_len": input_len, "output_len": output_len, "batch_size": batch_size, "n": n,
        "num_iters": len(runs), "avg_latency": stats["mean"], "latencies": latencies,
        "percentiles": {k: v for k, v in stats.items() if k.startswith("p")},
        "decode_ms_per_token": decode_ms,
        "decode_tok_per_s": batch_size * n * 1000.0 / decode_ms if decode_ms else 0.0,
        "prefill_ms": 1000.0 * float(np.mean([r["prefill_s"] for r in runs])),
        "engine_prompt_tokens_per_iter": runs[0]["prompt_tokens"],
        "engine_generated_tokens_per_iter": runs[0]["generated_tokens"],
        "output_tokens_per_iter": runs[0]["output_tokens"],
    }
    if ceilings is not None:
        from pagoda.benchmarks import roofline
        config = llm.engine.config.model_config
        shape = roofline.model_shape(config.hf_config, config.dtype)
        floor = roofline.decode_floor_ms(shape, ceilings, batch_size * n,
                                         input_len + output_len // 2)
        result["roofline"] = {"ceilings": ceilings.to_dict(), "decode_floor_ms": floor,
                              "decode_efficiency": floor / decode_ms if decode_ms else 0.0,
                              "weight_bytes": shape.weight_bytes}
    return result


def print_result(result: dict[str, Any]) -> None:
    rows = [("Batch size x n", f"{result['batch_size']} x {result['n']}"),
            ("Input / output tokens", f"{result['input_len']} / {result['output_len']}"),
            ("Avg latency (s)", result["avg_latency"])]
    rows += [(f"{k} latency (s)", v) for k, v in result["percentiles"].items()]
    rows += [("Prefill (ms)", result["prefill_ms"]),
             ("Decode (ms/token per sequence)", result["decode_ms_per_token"]),
             ("Decode throughput (tok/s)", result["decode_tok_per_s"]),
             ("Engine prompt tokens / iter", result["engine_prompt_tokens_per_iter"]),
             ("Engine generated tokens / iter", result["engine_generated_tokens_per_iter"])]
    if "roofline" in result:
        rows += [("Decode floor (ms/step)", result["roofline"]["decode_floor_ms"]),
                 ("Decode roofline efficiency",
                  f"{100 * result['roofline']['decode_efficiency']:.2f}%")]
    common.print_table("Latency Benchmark Result", rows)


def main(args: argparse.Namespace) -> dict[str, Any]:
    ceilings = None
    if args.measure_ceilings:
        from pagoda.benchmarks.roofline import measure_ceilings
        from pagoda.platform import resolve_device
        ceilings = measure_ceilings(str(resolve_device(args.device)))
    llm = common.make_llm(common.engine_kwargs(args))
    result = run_latency(llm, args.input_len, args.output_len, args.batch_size, args.n,
                         args.num_iters_warmup, args.num_iters, args.seed, ceilings,
                         progress=not args.disable_tqdm)
    print_result(result)
    common.write_json(args.output_json, result)
    return result
