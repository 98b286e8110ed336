"""Stages of benchmarks/gpu_suite.sh (PERF.md P1-P5, the two ceilings, a decode profile).

Each stage runs in its own process (`python benchmarks/gpu_suite.py STAGE --out DIR`) and
writes DIR/STAGE.json; `table` reads them all and prints the summary table last.
Models use dummy weights with the real config.json (benchmarks/model_configs/).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
LLAMA = os.path.join(HERE, "model_configs", "llama-3.1-8b.json")
QWEN3 = os.path.join(HERE, "model_configs", "qwen3-0.6b.json")
P3_HF_SUBSET = 256  # transformers runs the first 256 of P3's 1000 requests (one batch)
# Workload sizes; --quick shrinks them for a dry run of the plumbing on the CPU.
# P5: requests per rate (PERF.md asks 1000; 200 keeps the four rates inside one device call,
# about 50 s at 4 req/s) and the rates.
SIZES = {"device": "cuda", "p1": (128, 256, 2, 5), "p2": (32, 128, 10, 30),
         "p3": (1000, 512, 256), "p4": 256, "p4_decode": (256, 768, 24), "hf": P3_HF_SUBSET,
         "graphs": (1, 8, 64, 256),
         "p5": (int(os.environ.get("P5_PROMPTS", 200)), "4,8,16,inf", 4096)}
QUICK = {"device": "cpu", "p1": (16, 8, 1, 1), "p2": (8, 8, 1, 2), "p3": (12, 32, 8), "p4": 4,
         "p4_decode": (4, 16, 2), "hf": 4, "graphs": (1,), "p5": (4, "20,inf", 512)}


def _save(out: str, stage: str, data: dict) -> None:
    with open(os.path.join(out, f"{stage}.json"), "w") as f:
        json.dump(data, f, indent=2, default=str)


def _load(out: str, stage: str) -> dict:
    path = os.path.join(out, f"{stage}.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def _ceilings(out: str):
    """The ceilings stage's figures; measured here when a stage runs without it."""
    from pagoda.benchmarks.roofline import Ceilings
    c = _load(out, "ceilings")
    if not c:
        c = stage_ceilings(out)
        _save(out, "ceilings", c)
    return Ceilings(c["bandwidth_gbps"], c["matmul_tflops"], c.get("device", ""))


def _runner(llm):
    return llm.engine.core.executor.worker.runner


def stage_ceilings(out: str) -> dict:
    from pagoda.benchmarks.roofline import measure_ceilings
    return measure_ceilings(SIZES["device"]).to_dict()


def _graph_gpu_ms(llm, size: int, iters: int = 50) -> float:
    """Pure GPU time of one decode step's graph (no host work): replays timed by events."""
    graphs = _runner(llm).graphs
    if size not in graphs.graphs or SIZES["device"] != "cuda":
        return 0.0
    graphs.replay(size)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        graphs.replay(size)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / iters


def _graph_kernel_us(llm, size: int = 1, replays: int = 5) -> dict:
    """One decode graph's kernels, replayed under the profiler: for each kernel of a decoder
    layer (in order, counted from the layer's attention kernel), its median duration and the
    median gap before it, in us. Under PDL (the default) a kernel's duration includes the
    time it waited for its predecessor; with PAGODA_PDL=0 durations are the kernels' own."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    graphs = _runner(llm).graphs
    if size not in graphs.graphs or SIZES["device"] != "cuda":
        return {}
    graphs.replay(size)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            graphs.replay(size)
        torch.cuda.synchronize()
    kernels = sorted((e for e in prof.events() if e.device_type == DeviceType.CUDA
                      and not e.name.startswith(("Memcpy", "Memset"))),
                     key=lambda e: e.time_range.start)
    attn = [i for i, e in enumerate(kernels) if "attention" in e.name]
    if len(attn) < 3:
        return {"kernels": len(kernels)}
    period = attn[1] - attn[0]
    rows = []
    for offset in range(-1, period - 1):  # the GEMM before attention to the layer's last
        idx = [a + offset for a in attn if 1 <= a + offset < len(kernels)]
        durations = [kernels[i].time_range.elapsed_us() for i in idx]
        gaps = [kernels[i].time_range.start - kernels[i - 1].time_range.end for i in idx]
        rows.append({"offset": offset, "name": kernels[idx[0]].name[:40],
                     "us": statistics.median(durations), "gap_us": statistics.median(gaps)})
    span = kernels[-1].time_range.end - kernels[0].time_range.start
    return {"per_layer": rows, "kernels_per_replay": len(kernels) / replays,
            "replay_span_us": span / replays}


def _profiler_activities() -> list:
    from torch.profiler import ProfilerActivity
    return [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if SIZES["device"] == "cuda"
                                     else [])


def _profile_decode(llm, path: str, tokens: int = 32) -> None:
    from torch.profiler import profile
    tokens = min(tokens, SIZES["p1"][1])
    from pagoda import SamplingParams
    params = SamplingParams(max_tokens=tokens, ignore_eos=True, temperature=1.0)
    prompt = [{"prompt_token_ids": list(range(100, 228))}]
    llm.generate(prompt, params, use_tqdm=False)
    with profile(activities=_profiler_activities()) as prof:
        llm.generate(prompt, params, use_tqdm=False)
    averages = prof.key_averages()
    with open(path, "w") as f:
        for key in ("self_cuda_time_total", "self_device_time_total", "self_cpu_time_total"):
            try:
                f.write(f"== sorted by {key} ({tokens} tokens, batch 1, 128 in) ==\n")
                f.write(averages.table(sort_by=key, row_limit=30) + "\n")
            except Exception as exc:  # the key's name changed across torch versions
                f.write(f"(not available: {exc})\n")


def _profile_batch_decode(llm, path: str, batch: int, prompt_len: int, steps: int) -> dict:
    """Where a large-batch decode step goes, GPU or host: `batch` requests of `prompt_len`
    tokens are stepped past their prefill; then `steps` decode steps are timed (wall and
    executor time: the rest is host work the lookahead did not hide), and `steps` more run
    under the profiler (per-kernel GPU time to $OUT/`path`)."""
    from torch.profiler import profile
    from pagoda import SamplingParams
    from pagoda.benchmarks.recorder import StepRecorder
    engine, vocab = llm.engine, llm.engine.config.model_config.vocab_size
    params = SamplingParams(max_tokens=2 * steps + 64, ignore_eos=True, temperature=1.0)
    for i in range(batch):
        ids = [(i * 7919 + j * 31) % (vocab - 512) + 256 for j in range(prompt_len)]
        engine.add_request(f"profile-{i}", {"prompt_token_ids": ids}, params)
    recorder = StepRecorder(llm)
    while not recorder.records or not recorder.records[-1].is_decode_only:
        engine.step()
    for _ in range(4):  # past the first decode steps (graph replay, lookahead chain)
        engine.step()
    recorder.reset()
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    wall_ms = 1000 * (time.perf_counter() - start) / steps
    exec_ms = 1000 * recorder.totals().step_time_s / steps
    with profile(activities=_profiler_activities()) as prof:
        for _ in range(steps):
            engine.step()
    recorder.detach()
    engine.abort_request([f"profile-{i}" for i in range(batch)])
    while engine.has_unfinished_requests():
        engine.step()
    with open(path, "w") as f:
        f.write(f"== {steps} decode steps, batch {batch}, context ~{prompt_len}: "
                f"wall {wall_ms:.2f} ms/step, executor {exec_ms:.2f} ==\n")
        f.write(prof.key_averages().table(sort_by="self_cuda_time_total"
                                          if SIZES["device"] == "cuda" else
                                          "self_cpu_time_total", row_limit=25))
    result = {"batch": batch, "context": prompt_len, "wall_ms_per_step": wall_ms,
              "executor_ms_per_step": exec_ms}
    print("P4 batch decode:", json.dumps(result))
    return result


def _latency(llm, ceilings, input_len, output_len, batch, warmup, iters) -> dict:
    from pagoda.benchmarks.latency import run_latency
    res = run_latency(llm, input_len, output_len, batch, 1, warmup, iters, 0, ceilings)
    res["e2e_tok_per_s_per_seq"] = output_len / res["avg_latency"]
    decode_s = res["avg_latency"] - res["prefill_ms"] / 1000.0
    res["decode_wall_ms_per_step"] = 1000.0 * decode_s / max(output_len - 1, 1)
    res.pop("latencies", None)
    print(json.dumps({k: v for k, v in res.items() if not isinstance(v, (list, dict))}))
    return res


QUIET_MARKER = "quiet_part_done"


def _guarded(result: dict, out: str, name: str, fn) -> None:
    """Runs one piece; a failure is logged and the later pieces still run. Saves as it goes.
    SUITE_ONLY (space-separated piece names, e.g. "p1 p2 graph_gpu_ms") skips the others."""
    only = os.environ.get("SUITE_ONLY")
    if only and name not in only.split():
        return
    try:
        result[name] = fn()
    except Exception:
        traceback.print_exc()
        result[name + "_error"] = traceback.format_exc(limit=3)
    _save(out, "llama", result)


def stage_llama(out: str) -> dict:
    """P1, P2, the graph GPU times, the profile, an eager P1 and P3, on one engine."""
    from pagoda.benchmarks import common
    ceilings = _ceilings(out)
    start = time.perf_counter()
    llm = common.make_llm(dict(model=LLAMA, max_model_len=4096, max_num_seqs=256,
                               max_num_batched_tokens=8192, device=SIZES["device"]))
    result: dict = {"startup_s": time.perf_counter() - start,
                    "num_kv_blocks": llm.engine.config.cache_config.num_blocks}
    print(f"llama ready in {result['startup_s']:.1f}s, {result['num_kv_blocks']} KV blocks")
    _guarded(result, out, "p1", lambda: _latency(llm, ceilings, *SIZES["p1"][:2], 1, *SIZES["p1"][2:]))
    _guarded(result, out, "p2", lambda: _latency(llm, ceilings, *SIZES["p2"][:2], 8, *SIZES["p2"][2:]))
    _guarded(result, out, "graph_gpu_ms",
             lambda: {s: _graph_gpu_ms(llm, s) for s in SIZES["graphs"]})
    print("graph GPU ms per decode step:", result.get("graph_gpu_ms"))
    # gpu_suite.sh holds the tests on the other GPU until here: P1, P2 and the graph times
    # are measured with the host to themselves (tests beside them cost P1 ~1%)
    open(os.path.join(out, QUIET_MARKER), "w").close()
    _guarded(result, out, "profile",
             lambda: _profile_decode(llm, os.path.join(out, "profile.txt")))
    _guarded(result, out, "graph_kernels", lambda: _graph_kernel_us(llm))
    print("batch-1 graph, one layer's kernels:", json.dumps(result.get("graph_kernels")))
    _guarded(result, out, "p1_no_lookahead", lambda: _no_lookahead_latency(llm, ceilings))
    _guarded(result, out, "p1_eager", lambda: _eager_latency(llm, ceilings))
    _guarded(result, out, "p3", lambda: _p3(llm, ceilings))
    return result


def _no_lookahead_latency(llm, ceilings) -> dict:
    runner = _runner(llm)
    saved, runner.look_ahead = runner.look_ahead, False
    try:
        return _latency(llm, ceilings, SIZES["p1"][0], SIZES["p1"][1] // 2, 1, 1, 2)
    finally:
        runner.look_ahead = saved


def _eager_latency(llm, ceilings) -> dict:
    graphs = _runner(llm).graphs
    saved, graphs.graphs = graphs.graphs, {}
    try:
        return _latency(llm, ceilings, SIZES["p1"][0], 64 if SIZES["device"] == "cuda" else 4,
                        1, 1, 1)
    finally:
        graphs.graphs = saved


def _p3(llm, ceilings) -> dict:
    from pagoda.benchmarks import roofline
    from pagoda.benchmarks.datasets import get_dataset
    from pagoda.benchmarks.throughput import run_pagoda
    requests = get_dataset("random", *SIZES["p3"], llm.engine.config.model_config.vocab_size)
    p3, recorder = run_pagoda(llm, requests)
    shape = roofline.model_shape(llm.engine.config.model_config.hf_config, torch.bfloat16)
    p3["roofline"] = roofline.roofline_summary(recorder.records, shape, ceilings,
                                               p3["elapsed_time"])
    p3.pop("per_request_output_tokens", None)
    print("P3:", json.dumps({k: v for k, v in p3.items() if not isinstance(v, list)}))
    return p3


def stage_hf(out: str) -> dict:
    """P3 through transformers generate on the first P3_HF_SUBSET requests, one batch."""
    from pagoda.benchmarks.datasets import get_dataset
    from pagoda.benchmarks.throughput import run_hf_backend
    from pagoda.benchmarks.roofline import load_config_json
    vocab = load_config_json(LLAMA).vocab_size
    requests = get_dataset("random", *SIZES["p3"], vocab)[:SIZES["hf"]]
    res = run_hf_backend(dict(model=LLAMA, max_model_len=4096, device=SIZES["device"]),
                         requests, SIZES["hf"])
    res.pop("per_request_output_tokens", None)
    res["subset"] = SIZES["hf"]
    print("HF P3 subset:", json.dumps(res))
    return res


def stage_p4(out: str) -> dict:
    from pagoda.benchmarks import common, roofline
    from pagoda.benchmarks.datasets import get_dataset
    from pagoda.benchmarks.throughput import run_pagoda
    ceilings = _ceilings(out)
    llm = common.make_llm(dict(model=QWEN3, max_model_len=4096, max_num_seqs=512,
                               max_num_batched_tokens=16384, device=SIZES["device"]))
    requests = get_dataset("nano", SIZES["p4"], 0, 0, llm.engine.config.model_config.vocab_size)
    res, recorder = run_pagoda(llm, requests)
    # nano-vllm's figure: sum(max_tokens) / wall time
    res["nano_out_tok_per_s"] = sum(r.expected_output_len for r in requests) / res[
        "elapsed_time"]
    shape = roofline.model_shape(llm.engine.config.model_config.hf_config, torch.bfloat16)
    res["roofline"] = roofline.roofline_summary(recorder.records, shape, ceilings,
                                                res["elapsed_time"])
    res.pop("per_request_output_tokens", None)
    print("P4:", json.dumps(res))
    try:  # P4's mean context is ~800 tokens at 256 sequences
        res["batch_decode"] = _profile_batch_decode(
            llm, os.path.join(out, "profile_p4.txt"), *SIZES["p4_decode"])
    except Exception:
        traceback.print_exc()
    return res


def stage_p5(out: str) -> dict:
    """P5, scaled: Llama-3.1-8B (dummy weights, synthetic tokenizer) behind `pagoda serve`,
    sharegpt-like lengths, Poisson arrivals at each rate (`pagoda bench sweep`)."""
    import subprocess
    import tempfile
    from pagoda.benchmarks import cli
    from pagoda.benchmarks.common import stop_process, wait_healthy
    from pagoda.netutil import free_port
    from pagoda.benchmarks.dummy_model import make_dummy_model_dir
    folder = make_dummy_model_dir(LLAMA, tempfile.mkdtemp(prefix="p5-"))
    port = free_port()
    num_prompts, rates, max_len = SIZES["p5"]
    cmd = [sys.executable, "-m", "pagoda.entrypoints.cli", "serve", folder, "--load-format",
           "dummy", "--host", "127.0.0.1", "--port", str(port), "--max-model-len", str(max_len),
           "--device", SIZES["device"]]
    start = time.perf_counter()
    log = open(os.path.join(out, "p5_server.log"), "w")
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", server, timeout=240)
        startup = time.perf_counter() - start
        argv = ["sweep", "--base-url", f"http://127.0.0.1:{port}", "--dataset-name",
                "sharegpt-like", "--num-prompts", str(num_prompts), "--max-model-len",
                str(max_len),
                "--request-rates", rates, "--output-dir", out, "--max-duration", "240"]
        if cli.main(argv) != 0:
            raise RuntimeError("bench sweep failed")
    finally:
        stop_process(server, timeout=30)
        log.close()
    points = _load(out, "sweep").get("points", [])
    print(f"P5: server healthy after {startup:.1f} s;", json.dumps(points)[:2000])
    return {"startup_s": startup, "num_prompts": num_prompts, "points": points}


def _row(name, figure, target, roof) -> str:
    return f"| {name:<4} | {figure:<44} | {target:<14} | {roof:<26} |"


def stage_table(out: str) -> dict:
    c, llama, hf, p4, p5 = (_load(out, s) for s in ("ceilings", "llama", "hf", "p4", "p5"))
    lines = [f"ceilings: copy {c.get('bandwidth_gbps', 0):.0f} GB/s, "
             f"bf16 matmul {c.get('matmul_tflops', 0):.0f} TFLOP/s ({c.get('device', '?')})",
             _row("id", "measured", "target", "vs roofline"), _row("-" * 4, "-" * 44, "-" * 14,
                                                                   "-" * 26)]
    p1, p2, p3 = llama.get("p1"), llama.get("p2"), llama.get("p3")
    if p1:
        eff = p1.get("roofline", {}).get("decode_efficiency", 0)
        floor = p1.get("roofline", {}).get("decode_floor_ms", 0)
        lines.append(_row("P1", f"{p1['decode_ms_per_token']:.2f} ms/tok step, "
                                f"{1000 / p1['decode_wall_ms_per_step']:.0f} tok/s e2e-decode",
                          ">= 240 tok/s", f"floor {floor:.2f} ms: {100 * eff:.0f}%"))
        lines.append(_row("", f"{p1['e2e_tok_per_s_per_seq']:.0f} tok/s incl. prefill; "
                              f"graph GPU {llama.get('graph_gpu_ms', {}).get('1', 0):.2f} ms",
                          "", ""))
    if p2:
        eff = p2.get("roofline", {}).get("decode_efficiency", 0)
        lines.append(_row("P2", f"{1000 * p2['avg_latency']:.0f} ms mean e2e "
                                f"({p2['decode_ms_per_token']:.2f} ms/step)",
                          "<= 600 ms", f"decode {100 * eff:.0f}%"))
    if p3:
        eff = p3["roofline"]["roofline_efficiency"]
        ratio = ""
        if hf:
            ratio = f", {p3['output_tokens_per_second'] / hf['output_tokens_per_second']:.1f}x HF"
        lines.append(_row("P3", f"{p3['requests_per_second']:.2f} req/s, "
                                f"{p3['output_tokens_per_second']:.0f} out tok/s{ratio}",
                          ">= 50% roof", f"{100 * eff:.0f}% "
                                         f"({p3['roofline']['roofline_time_s']:.1f}s floor)"))
        lines.append(_row("", f"{p3['tokens_per_second']:.0f} total tok/s, "
                              f"{p3['elapsed_time']:.1f} s", "", ""))
    if hf:
        lines.append(_row("P3hf", f"{hf['output_tokens_per_second']:.0f} out tok/s "
                                  f"({hf['subset']} reqs, batch {hf['hf_batch_size']})", "", ""))
    if p4:
        eff = p4["roofline"]["roofline_efficiency"]
        lines.append(_row("P4", f"{p4['nano_out_tok_per_s']:.0f} out tok/s "
                                f"({p4['elapsed_time']:.1f} s)", "record",
                          f"{100 * eff:.0f}%"))
    for name, res in (("P3", p3), ("P4", p4)):
        if res and "outside_execute_s" in res:  # host-bound when outside ~ the step time
            steps = max(res["engine_steps"], 1)
            lines.append(_row(f"{name}h", f"{1000 * res['elapsed_time'] / steps:.2f} ms/step: "
                                          f"{1000 * res['outside_execute_s'] / steps:.2f} "
                                          "outside execute", "", ""))
    decode = (p4 or {}).get("batch_decode")
    if decode:
        lines.append(_row("P4d", f"b{decode['batch']} ctx {decode['context']}: "
                                 f"{decode['wall_ms_per_step']:.2f} ms/step wall, "
                                 f"{decode['executor_ms_per_step']:.2f} exec", "", ""))
    for row in _load(out, "ab").get("rows", []):
        graph = (row.get("graph_gpu_ms") or {}).get("1", 0)
        lines.append(_row("AB", f"{row['decode_ms_per_step'] or 0:.2f} ms/step, "
                                f"{row.get('wall_ms_per_token') or 0:.2f} wall, "
                                f"graph {graph:.2f} ms", "", row["setting"][:26]))
    for point in (p5 or {}).get("points", []):
        lines.append(_row("P5", f"{point['request_rate']} req/s: TTFT {point['mean_ttft_ms']:.0f}"
                                f" ms, TPOT {point['mean_tpot_ms']:.1f} ms, "
                                f"{point.get('output_throughput', 0):.0f} tok/s",
                          "record", f"p99 TPOT {point.get('p99_tpot_ms', 0):.1f} ms"))
    print("\n".join(lines))
    return {"table": lines}


def stage_ab(out: str) -> dict:
    """A/B of environment settings (AB="NAME=VALUE[,NAME=VALUE];..." in the environment):
    P1 and the decode graph times as the llama stage measures them, once as is and once per
    setting, each in a fresh process (settings read at import or capture time take effect)."""
    import subprocess
    import tempfile
    settings = [""] + [a.strip() for a in os.environ.get("AB", "").split(";") if a.strip()]
    _ceilings(out)  # measured once, shared by every run
    ceilings = _load(out, "ceilings")
    rows = []
    for setting in settings:
        env = {**os.environ, "SUITE_ONLY": "p1 graph_gpu_ms"}
        env.update(kv.split("=", 1) for kv in setting.split(",") if kv)
        with tempfile.TemporaryDirectory() as tmp:
            _save(tmp, "ceilings", ceilings)
            args = [sys.executable, os.path.abspath(__file__), "llama", "--out", tmp]
            if SIZES["device"] != "cuda":
                args.append("--quick")
            subprocess.run(args, env=env, timeout=150, check=False)
            llama = _load(tmp, "llama")
        p1 = llama.get("p1") or {}
        rows.append({"setting": setting or "as is",
                     "decode_ms_per_step": p1.get("decode_ms_per_token"),
                     "tok_per_s": p1.get("decode_tok_per_s"),
                     "wall_ms_per_token": p1.get("decode_wall_ms_per_step"),
                     "graph_gpu_ms": llama.get("graph_gpu_ms")})
        print("AB:", json.dumps(rows[-1]))
    return {"rows": rows}


STAGES = {"ceilings": stage_ceilings, "llama": stage_llama, "hf": stage_hf, "p4": stage_p4,
          "p5": stage_p5, "ab": stage_ab, "table": stage_table}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("stage", choices=sorted(STAGES))
    parser.add_argument("--out", default=os.environ.get("OUT", "/tmp/pagoda-gpu-suite"))
    parser.add_argument("--quick", action="store_true",
                        help="CPU dry run at tiny sizes (SUITE_LLAMA / SUITE_QWEN3 configs)")
    args = parser.parse_args()
    if args.quick:
        global LLAMA, QWEN3
        SIZES.update(QUICK)
        LLAMA = os.environ.get("SUITE_LLAMA", LLAMA)
        QWEN3 = os.environ.get("SUITE_QWEN3", QWEN3)
    os.makedirs(args.out, exist_ok=True)
    try:
        data = STAGES[args.stage](args.out)
    except Exception:
        traceback.print_exc()
        return 1
    if args.stage != "table":
        _save(args.out, args.stage, data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
