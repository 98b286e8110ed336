"""`pagoda bench throughput`: offline throughput, as vLLM's `bench throughput`.

All requests are submitted at once. Reports requests/s, total tok/s (prompt + output) and
output tok/s over the wall time of the generate call, the engine's own prompt/decode token
counts, and the roofline efficiency of the run when ceilings are known. `--backend pagoda,hf`
runs `transformers` first and Pagoda second on the same requests and reports the ratio.
"""

from __future__ import annotations

import argparse
import time
from typing import Any, Optional

from pagoda.benchmarks import common
from pagoda.benchmarks.datasets import DATASET_NAMES, SampleRequest, get_dataset
from pagoda.benchmarks.recorder import StepRecorder

BACKENDS = ("pagoda", "hf")


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", type=str, default="pagoda",
                        help="pagoda, hf, or both as 'hf,pagoda' (same requests, one run)")
    parser.add_argument("--dataset-name", choices=DATASET_NAMES, default="random")
    parser.add_argument("--num-prompts", type=int, default=1000)
    parser.add_argument("--input-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--random-range-ratio", type=float, default=0.0)
    parser.add_argument("--prefix-len", type=int, default=0)
    parser.add_argument("--num-prefixes", type=int, default=10,
                        help="prefix-repetition: number of distinct prefixes")
    parser.add_argument("--hf-max-batch-size", type=int, default=None,
                        help="start of the hf batch size search (default: all requests)")
    parser.add_argument("--output-json", type=str, default=None)
    parser.add_argument("--measure-ceilings", action="store_true")
    parser.add_argument("--bandwidth-gbps", type=float, default=None,
                        help="known copy bandwidth (GB/s) instead of measuring")
    parser.add_argument("--matmul-tflops", type=float, default=None,
                        help="known matmul rate (TFLOP/s) instead of measuring")
    parser.add_argument("--no-warmup", action="store_true")
    parser.add_argument("--disable-tqdm", action="store_true")
    common.add_engine_args(parser)


def _rates(num_requests: int, prompt_tokens: int, output_tokens: int,
           elapsed: float) -> dict[str, Any]:
    dur = max(elapsed, 1e-9)
    return {"elapsed_time": elapsed, "num_requests": num_requests,
            "total_prompt_tokens": prompt_tokens, "total_output_tokens": output_tokens,
            "requests_per_second": num_requests / dur,
            "tokens_per_second": (prompt_tokens + output_tokens) / dur,
            "output_tokens_per_second": output_tokens / dur}


def run_pagoda(llm, requests: list[SampleRequest], warmup: bool = True,
               use_tqdm: bool = False) -> tuple[dict[str, Any], StepRecorder]:
    from pagoda.sampling_params import SamplingParams
    prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in requests]
    params = [SamplingParams(temperature=r.temperature, top_p=1.0, ignore_eos=True,
                             max_tokens=r.expected_output_len) for r in requests]
    if warmup:  # a small untimed request, as nano-vllm's bench does
        llm.generate([{"prompt_token_ids": requests[0].prompt_token_ids[:16]}],
                     SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
        reset = getattr(llm.engine.core, "reset_prefix_cache", None)
        if reset is not None:
            reset()  # the warm-up must not give the workload prefix-cache hits
    recorder = StepRecorder(llm)
    try:
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=use_tqdm)
        elapsed = time.perf_counter() - start
    finally:
        recorder.detach()
    out_tokens = [sum(len(c.token_ids) for c in o.outputs) for o in outputs]
    result = _rates(len(requests), sum(r.prompt_len for r in requests), sum(out_tokens),
                    elapsed)
    totals = recorder.totals()
    result.update({"backend": "pagoda", "per_request_output_tokens": out_tokens,
                   "num_cached_tokens": sum(o.num_cached_tokens for o in outputs),
                   "engine_steps": totals.steps,
                   "engine_prompt_tokens": totals.prompt_tokens,
                   "engine_generated_tokens": totals.generated_tokens,
                   "engine_decode_only_steps": totals.decode_only_steps,
                   # Wall time inside executor.execute (model, sampling, waiting for the GPU)
                   # and outside it (scheduling, output processing, detokenization): when the
                   # outside share nears the whole, the host paces the engine.
                   "engine_time_s": totals.step_time_s,
                   "outside_execute_s": elapsed - totals.step_time_s})
    return result, recorder


def run_hf_backend(kwargs: dict[str, Any], requests: list[SampleRequest],
                   max_batch_size: Optional[int]) -> dict[str, Any]:
    from pagoda.benchmarks import hf_backend
    from pagoda.config import EngineArgs
    kwargs = common.prepare_model(kwargs)
    config = EngineArgs(**kwargs).create_engine_config()
    mc = config.model_config
    model = hf_backend.load_hf_model(mc.model, mc.hf_config, mc.dtype, config.device,
                                     dummy=mc.load_format == "dummy")
    try:
        run = hf_backend.run_hf(model, requests, config.device, max_batch_size)
    finally:
        hf_backend.free_model(model)
        del model
    result = _rates(run.num_requests, run.prompt_tokens, run.output_tokens, run.elapsed_s)
    result.update({"backend": "hf", "per_request_output_tokens": run.per_request_output_tokens,
                   "hf_batch_size": run.batch_size, "hf_oom_retries": run.oom_retries,
                   "hf_generated_tokens_with_padding": run.generated_tokens_with_padding})
    return result


def _dataset(args: argparse.Namespace, vocab_size: int,
             max_model_len: Optional[int]) -> list[SampleRequest]:
    return get_dataset(args.dataset_name, args.num_prompts, args.input_len, args.output_len,
                       vocab_size, args.random_range_ratio, args.prefix_len,
                       args.num_prefixes, args.seed, max_model_len)


def _ceilings(args: argparse.Namespace, device: str):
    from pagoda.benchmarks.roofline import Ceilings, measure_ceilings
    if args.bandwidth_gbps and args.matmul_tflops:
        return Ceilings(args.bandwidth_gbps, args.matmul_tflops, device="given")
    if args.measure_ceilings:
        return measure_ceilings(device)
    return None


def _parse_backends(spec: str) -> list[str]:
    backends = [b.strip() for b in spec.split(",") if b.strip()]
    bad = [b for b in backends if b not in BACKENDS]
    if not backends or bad:
        raise ValueError(f"--backend: expected pagoda, hf or hf,pagoda; got {spec!r}")
    return sorted(set(backends), key=lambda b: b != "hf")  # hf first: it frees its memory


def _pagoda_with_roofline(args, kwargs: dict, requests: list[SampleRequest],
                          ceilings) -> dict[str, Any]:
    llm = common.make_llm(kwargs)
    result, recorder = run_pagoda(llm, requests, not args.no_warmup, not args.disable_tqdm)
    if ceilings is not None:
        from pagoda.benchmarks import roofline
        mc = llm.engine.config.model_config
        shape = roofline.model_shape(mc.hf_config, mc.dtype)
        result["roofline"] = roofline.roofline_summary(recorder.records, shape, ceilings,
                                                       result["elapsed_time"])
    return result


def main(args: argparse.Namespace) -> dict[str, Any]:
    from pagoda.config import EngineArgs
    backends = _parse_backends(args.backend)
    kwargs = common.prepare_model(common.engine_kwargs(args))
    config = EngineArgs(**kwargs).create_engine_config()
    requests = _dataset(args, config.model_config.vocab_size, config.model_config.max_model_len)
    ceilings = _ceilings(args, str(config.device))
    report: dict[str, Any] = {"dataset": args.dataset_name, "num_prompts": len(requests)}
    if ceilings is not None:
        report["ceilings"] = ceilings.to_dict()
    for backend in backends:
        if backend == "hf":
            report["hf"] = run_hf_backend(kwargs, requests, args.hf_max_batch_size)
        else:
            report["pagoda"] = _pagoda_with_roofline(args, kwargs, requests, ceilings)
        print_report({backend: report[backend]})  # at once: a later failure keeps it
        common.write_json(args.output_json, report)
    if "hf" in report and "pagoda" in report:
        report["speedup_vs_hf"] = (report["pagoda"]["output_tokens_per_second"]
                                   / max(report["hf"]["output_tokens_per_second"], 1e-9))
        print(f"Pagoda / transformers output tok/s: {report['speedup_vs_hf']:.2f}x")
    common.write_json(args.output_json, report)
    return report


def print_report(report: dict[str, Any]) -> None:
    for backend in BACKENDS:
        res = report.get(backend)
        if res is None:
            continue
        rows = [("Requests", res["num_requests"]), ("Elapsed (s)", res["elapsed_time"]),
                ("Prompt / output tokens", f"{res['total_prompt_tokens']} / "
                                           f"{res['total_output_tokens']}"),
                ("Requests/s", res["requests_per_second"]),
                ("Total tok/s", res["tokens_per_second"]),
                ("Output tok/s", res["output_tokens_per_second"])]
        if backend == "pagoda":
            rows += [("Engine prompt tokens computed", res["engine_prompt_tokens"]),
                     ("Engine generated tokens computed", res["engine_generated_tokens"]),
                     ("Prefix-cache hit tokens", res["num_cached_tokens"])]
        if "roofline" in res:
            rows += [("Roofline time (s)", res["roofline"]["roofline_time_s"]),
                     ("Roofline efficiency",
                      f"{100 * res['roofline']['roofline_efficiency']:.2f}%")]
        if backend == "hf":
            rows += [("HF batch size", res["hf_batch_size"])]
        common.print_table(f"Throughput ({backend})", rows)
