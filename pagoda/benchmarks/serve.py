"""`pagoda bench serve`: an asyncio + httpx streaming load generator for any
OpenAI-compatible server (/v1/completions or /v1/chat/completions), with vLLM's metric
definitions (pagoda/benchmarks/metrics.py).

Requests arrive at gamma-distributed gaps (Poisson at burstiness 1; rate inf = all at once),
at most `max_concurrency` in flight. The run is bounded: `num_prompts` requests, a per-request
timeout, and `max_duration` seconds for the whole run, after which pending requests are
cancelled and counted as failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import httpx

from pagoda.benchmarks.datasets import SampleRequest
from pagoda.benchmarks.metrics import (RequestResult, arrival_offsets,
                                       compute_serving_metrics, pct_name)


@dataclass
class ServeConfig:
    base_url: str = "http://127.0.0.1:8000"
    endpoint: str = "/v1/completions"
    model: Optional[str] = None
    request_rate: float = float("inf")
    burstiness: float = 1.0
    max_concurrency: Optional[int] = None
    seed: int = 0
    goodput: dict = field(default_factory=dict)  # {"ttft": seconds, ...}
    request_timeout: float = 600.0
    max_duration: float = 3600.0
    ignore_eos: bool = True
    temperature: float = 0.0
    percentiles: tuple = (50, 99)
    test_request: bool = True

    @property
    def url(self) -> str:
        return self.base_url.rstrip("/") + "/" + self.endpoint.lstrip("/")

    @property
    def is_chat(self) -> bool:
        return "chat" in self.endpoint


@dataclass
class Prompt:
    """What gets sent: token ids (completions) or text (either endpoint)."""

    prompt: Any
    prompt_len: int
    output_len: int


def build_payload(cfg: ServeConfig, prompt: Prompt) -> dict[str, Any]:
    payload: dict[str, Any] = {"model": cfg.model, "stream": True,
                               "stream_options": {"include_usage": True},
                               "temperature": cfg.temperature}
    if cfg.is_chat:
        payload["messages"] = [{"role": "user", "content": prompt.prompt}]
        payload["max_completion_tokens"] = prompt.output_len
    else:
        payload["prompt"] = prompt.prompt
        payload["max_tokens"] = prompt.output_len
    if cfg.ignore_eos:
        payload["ignore_eos"] = True
    return payload


def _chunk_text(obj: dict, is_chat: bool) -> str:
    choices = obj.get("choices") or []
    if not choices:
        return ""
    if is_chat:
        return (choices[0].get("delta") or {}).get("content") or ""
    return choices[0].get("text") or ""


async def _consume(resp: httpx.Response, result: RequestResult, is_chat: bool) -> float:
    """Reads the SSE stream; returns the time of the last content chunk."""
    last = result.start
    chunks = 0
    async for line in resp.aiter_lines():
        line = line.strip()
        if not line.startswith("data:"):
            continue
        data = line[len("data:"):].strip()
        if data == "[DONE]":
            break
        obj = json.loads(data)
        if obj.get("error"):
            raise RuntimeError(str(obj["error"]))
        text = _chunk_text(obj, is_chat)
        if text:
            now = time.perf_counter()
            if chunks == 0:
                result.ttft = now - result.start
            else:
                result.itl.append(now - last)
            last = now
            chunks += 1
            result.generated_text += text
        usage = obj.get("usage")
        if usage:
            result.output_tokens = usage.get("completion_tokens") or result.output_tokens
            result.prompt_len = usage.get("prompt_tokens") or result.prompt_len
    if not result.output_tokens:
        result.output_tokens = chunks  # no usage block: one token per chunk
    return last if chunks else 0.0


async def send_request(client: httpx.AsyncClient, cfg: ServeConfig,
                       prompt: Prompt) -> RequestResult:
    result = RequestResult(prompt_len=prompt.prompt_len, start=time.perf_counter())
    try:
        async with client.stream("POST", cfg.url, json=build_payload(cfg, prompt),
                                 timeout=cfg.request_timeout) as resp:
            if resp.status_code != 200:
                body = (await resp.aread()).decode(errors="replace")[:500]
                result.error = f"HTTP {resp.status_code}: {body}"
                return result
            last = await _consume(resp, result, cfg.is_chat)
        if last:
            result.latency = last - result.start
            result.success = True
        else:
            result.error = "the stream ended without content"
    except Exception as exc:  # a failed request is a result, not a crash
        result.error = f"{type(exc).__name__}: {exc}"
    return result


async def _limited(sem: Optional[asyncio.Semaphore], client, cfg, prompt) -> RequestResult:
    if sem is None:
        return await send_request(client, cfg, prompt)
    async with sem:
        return await send_request(client, cfg, prompt)


async def _dispatch(client: httpx.AsyncClient, cfg: ServeConfig, prompts: list[Prompt],
                    deadline: float) -> list[asyncio.Task]:
    """Creates one task per request at its arrival time; stops at the deadline."""
    sem = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else None
    offsets = arrival_offsets(len(prompts), cfg.request_rate, cfg.burstiness, cfg.seed)
    start = time.perf_counter()
    tasks = []
    for prompt, offset in zip(prompts, offsets):
        delay = start + offset - time.perf_counter()
        if start + offset > deadline:
            break
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(_limited(sem, client, cfg, prompt)))
    return tasks


async def _collect(tasks: list[asyncio.Task], num_prompts: int,
                   deadline: float) -> list[RequestResult]:
    done, pending = await asyncio.wait(tasks, timeout=max(0.0, deadline - time.perf_counter())) \
        if tasks else (set(), set())
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.gather(*pending, return_exceptions=True)
    results = [t.result() if t in done else RequestResult(error="cancelled: max duration")
               for t in tasks]
    results += [RequestResult(error="not sent: max duration")] * (num_prompts - len(tasks))
    return results


async def resolve_model(client: httpx.AsyncClient, cfg: ServeConfig) -> str:
    if cfg.model:
        return cfg.model
    resp = await client.get(cfg.base_url.rstrip("/") + "/v1/models", timeout=30.0)
    resp.raise_for_status()
    return resp.json()["data"][0]["id"]


async def run_benchmark(cfg: ServeConfig, prompts: list[Prompt]) -> dict[str, Any]:
    """Runs the load; returns metrics + per-request details."""
    limits = httpx.Limits(max_connections=cfg.max_concurrency or max(len(prompts), 1),
                          max_keepalive_connections=cfg.max_concurrency or 100)
    async with httpx.AsyncClient(limits=limits, timeout=cfg.request_timeout) as client:
        cfg.model = await resolve_model(client, cfg)
        if cfg.test_request and prompts:
            first = prompts[0]  # reversed, so that it warms no prefix of the workload
            body = first.prompt[::-1] if isinstance(first.prompt, list) else first.prompt
            probe = Prompt(body, first.prompt_len, min(first.output_len, 4))
            test = await send_request(client, cfg, probe)
            if not test.success:
                raise RuntimeError(f"the test request to {cfg.url} failed: {test.error}")
        begin = time.perf_counter()
        deadline = begin + cfg.max_duration
        tasks = await _dispatch(client, cfg, prompts, deadline)
        results = await _collect(tasks, len(prompts), deadline)
        duration = time.perf_counter() - begin
    metrics = compute_serving_metrics(results, duration, cfg.goodput, cfg.percentiles)
    return {"config": {k: v for k, v in asdict(cfg).items()}, **metrics,
            "input_lens": [r.prompt_len for r in results],
            "output_lens": [r.output_tokens for r in results],
            "ttfts": [r.ttft for r in results], "itls": [r.itl for r in results],
            "e2els": [r.latency for r in results],
            "errors": [r.error for r in results if r.error]}


def make_prompts(requests: list[SampleRequest], tokenizer=None,
                 as_text: bool = False) -> list[Prompt]:
    """Token ids as they are, or decoded to text with the tokenizer (needed for chat)."""
    prompts = []
    for r in requests:
        if as_text:
            if tokenizer is None:
                raise ValueError("text prompts (chat endpoint) need --tokenizer")
            prompts.append(Prompt(tokenizer.decode(r.prompt_token_ids), r.prompt_len,
                                  r.expected_output_len))
        else:
            prompts.append(Prompt(list(r.prompt_token_ids), r.prompt_len,
                                  r.expected_output_len))
    return prompts


def print_metrics(m: dict[str, Any], cfg: ServeConfig) -> None:
    from pagoda.benchmarks.common import print_table
    rows: list[tuple[str, Any]] = [
        ("Successful requests", m["completed"]), ("Failed requests", m["failed"]),
        ("Request rate configured (RPS)", cfg.request_rate),
        ("Maximum request concurrency", cfg.max_concurrency or "none"),
        ("Benchmark duration (s)", m["duration"]),
        ("Total input tokens", m["total_input_tokens"]),
        ("Total generated tokens", m["total_output_tokens"]),
        ("Request throughput (req/s)", m["request_throughput"]),
        ("Output token throughput (tok/s)", m["output_throughput"]),
        ("Total token throughput (tok/s)", m["total_token_throughput"]),
        ("Peak concurrent requests", m["max_concurrency_observed"])]
    if "goodput" in m:
        rows.append(("Request goodput (req/s)", m["goodput"]))
    for name, title in (("ttft", "TTFT"), ("tpot", "TPOT"), ("itl", "ITL"), ("e2el", "E2EL")):
        rows += [(f"Mean {title} (ms)", m[f"mean_{name}_ms"]),
                 (f"Median {title} (ms)", m[f"median_{name}_ms"])]
        rows += [(f"P{pct_name(p)} {title} (ms)", m[f"p{pct_name(p)}_{name}_ms"])
                 for p in cfg.percentiles]
    print_table("Serving Benchmark Result", rows)


# -- command line -------------------------------------------------------------------------
def parse_rate(text: str) -> float:
    rate = float(text)
    if rate <= 0:
        raise ValueError(f"request rate must be > 0 or inf; got {text}")
    return rate


def add_cli_args(parser) -> None:
    from pagoda.benchmarks.datasets import DATASET_NAMES
    parser.add_argument("--base-url", type=str, default=None,
                        help="server root, e.g. http://127.0.0.1:8000")
    parser.add_argument("--host", type=str, default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--endpoint", type=str, default="/v1/completions",
                        help="/v1/completions or /v1/chat/completions")
    parser.add_argument("--model", type=str, default=None,
                        help="model name sent to the server (default: first of /v1/models)")
    parser.add_argument("--tokenizer", type=str, default=None,
                        help="tokenizer folder: decode prompts to text (needed for chat)")
    parser.add_argument("--dataset-name", choices=DATASET_NAMES, default="random")
    parser.add_argument("--num-prompts", type=int, default=1000)
    parser.add_argument("--input-len", type=int, default=1024)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--random-range-ratio", type=float, default=0.0)
    parser.add_argument("--prefix-len", type=int, default=0)
    parser.add_argument("--num-prefixes", type=int, default=10)
    parser.add_argument("--vocab-size", type=int, default=None,
                        help="random token ids are drawn below this (default: the "
                             "tokenizer's size, else 256)")
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--request-rate", type=str, default="inf",
                        help="requests/s (Poisson at burstiness 1); inf = all at once")
    parser.add_argument("--burstiness", type=float, default=1.0,
                        help="gamma shape of the arrival gaps: 1 Poisson, <1 burstier")
    parser.add_argument("--max-concurrency", type=int, default=None)
    parser.add_argument("--goodput", nargs="+", default=None, metavar="KEY:MS",
                        help="SLOs, e.g. ttft:200 tpot:50 (keys ttft, tpot, e2el)")
    parser.add_argument("--metric-percentiles", type=str, default="50,99",
                        help="percentiles reported for TTFT, TPOT, ITL and E2EL")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction,
                        default=True, help="send ignore_eos (a vLLM extension)")
    parser.add_argument("--request-timeout", type=float, default=600.0)
    parser.add_argument("--max-duration", type=float, default=3600.0,
                        help="seconds; requests still pending then are cancelled")
    parser.add_argument("--no-test-request", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save-result", action="store_true")
    parser.add_argument("--result-dir", type=str, default=".")
    parser.add_argument("--result-filename", type=str, default=None)


def config_from_args(args, request_rate: Optional[float] = None) -> ServeConfig:
    from pagoda.benchmarks.metrics import parse_goodput
    return ServeConfig(
        base_url=args.base_url or f"http://{args.host}:{args.port}", endpoint=args.endpoint,
        model=args.model, request_rate=request_rate if request_rate is not None
        else parse_rate(args.request_rate), burstiness=args.burstiness,
        max_concurrency=args.max_concurrency, seed=args.seed,
        goodput=parse_goodput(args.goodput), request_timeout=args.request_timeout,
        max_duration=args.max_duration, ignore_eos=args.ignore_eos,
        temperature=args.temperature,
        percentiles=tuple(float(p) for p in args.metric_percentiles.split(",") if p.strip()),
        test_request=not args.no_test_request)


def prompts_from_args(args, is_chat: bool) -> list[Prompt]:
    from pagoda.benchmarks.datasets import get_dataset
    tokenizer = None
    if args.tokenizer:
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    vocab = args.vocab_size or (len(tokenizer) if tokenizer is not None else 256)
    requests = get_dataset(args.dataset_name, args.num_prompts, args.input_len,
                           args.output_len, vocab, args.random_range_ratio, args.prefix_len,
                           args.num_prefixes, args.seed, args.max_model_len)
    return make_prompts(requests, tokenizer, as_text=is_chat or tokenizer is not None)


def jsonable(result: dict[str, Any]) -> dict[str, Any]:
    config = dict(result.get("config", {}))
    if config.get("request_rate") == float("inf"):
        config["request_rate"] = "inf"
    return {**result, "config": config}


def main(args) -> dict[str, Any]:
    from pagoda.benchmarks.common import write_json
    cfg = config_from_args(args)
    prompts = prompts_from_args(args, cfg.is_chat)
    result = asyncio.run(run_benchmark(cfg, prompts))
    print_metrics(result, cfg)
    if args.save_result:
        name = args.result_filename or (
            f"serve-{args.request_rate}qps-{time.strftime('%Y%m%d-%H%M%S')}.json")
        write_json(os.path.join(args.result_dir, name), jsonable(result))
    return result
