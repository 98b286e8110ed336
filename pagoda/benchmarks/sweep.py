"""`pagoda bench sweep`: `bench serve` at several request rates; writes a JSON of every
point and a PNG (matplotlib, Agg) of TTFT and TPOT percentiles against the request rate.
Rate i draws its prompts with seed `--seed + i`: the same lengths distribution, but not the
same prompts, which the server's prefix cache would answer (on the H200 the second and later
rates of a sweep that resent them hit 92-95% of prompt tokens)."""

from __future__ import annotations

import argparse
import asyncio
import os
from typing import Any

from pagoda.benchmarks import serve
from pagoda.benchmarks.common import write_json
from pagoda.benchmarks.metrics import pct_name

_POINT_KEYS = ("completed", "failed", "duration", "request_throughput", "output_throughput",
               "total_token_throughput", "max_concurrency_observed", "goodput")


def add_cli_args(parser) -> None:
    serve.add_cli_args(parser)
    parser.add_argument("--request-rates", type=str, default="1,2,4,8,inf",
                        help="comma-separated rates (req/s); inf = all at once")
    parser.add_argument("--output-dir", type=str, default="bench-sweep")
    parser.add_argument("--plot-name", type=str, default="sweep.png")


def parse_rates(text: str) -> list[float]:
    rates = [serve.parse_rate(r.strip()) for r in text.split(",") if r.strip()]
    if not rates:
        raise ValueError("--request-rates: give at least one rate")
    return rates


def point(rate: float, result: dict[str, Any]) -> dict[str, Any]:
    """The summary of one rate: throughputs plus every *_ms latency statistic."""
    row: dict[str, Any] = {"request_rate": "inf" if rate == float("inf") else rate}
    row.update({k: result[k] for k in _POINT_KEYS if k in result})
    row.update({k: v for k, v in result.items() if k.endswith("_ms")})
    return row


def _x_positions(points: list[dict]) -> tuple[list[float], list[str]]:
    finite = [p["request_rate"] for p in points if p["request_rate"] != "inf"]
    inf_x = 2 * max(finite) if finite else 1.0
    xs = [inf_x if p["request_rate"] == "inf" else p["request_rate"] for p in points]
    labels = ["inf" if p["request_rate"] == "inf" else f"{p['request_rate']:g}"
              for p in points]
    return xs, labels


def plot(points: list[dict], path: str, percentiles: tuple = (50, 99)) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    xs, labels = _x_positions(points)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, metric, title in ((axes[0], "ttft", "TTFT"), (axes[1], "tpot", "TPOT")):
        ax.plot(xs, [p[f"mean_{metric}_ms"] for p in points], "o-", label="mean")
        for pct in percentiles:
            name = f"p{pct_name(pct)}_{metric}_ms"
            if name in points[0]:
                ax.plot(xs, [p[name] for p in points], "o--", label=name.split("_")[0])
        if max(xs) / min(xs) > 4:
            ax.set_xscale("log", base=2)
        ax.set_xticks(xs, labels)
        ax.minorticks_off()
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel(f"{title} (ms)")
        ax.set_title(f"{title} vs request rate")
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_sweep(args) -> dict[str, Any]:
    rates = parse_rates(args.request_rates)
    base = serve.config_from_args(args, request_rate=rates[0])
    points, runs = [], []
    for i, rate in enumerate(rates):
        prompts = serve.prompts_from_args(argparse.Namespace(**{**vars(args),
                                                                "seed": args.seed + i}),
                                          base.is_chat)
        cfg = serve.config_from_args(args, request_rate=rate)
        cfg.test_request = base.test_request and not points  # probe the server once
        result = asyncio.run(serve.run_benchmark(cfg, prompts))
        serve.print_metrics(result, cfg)
        points.append(point(rate, result))
        runs.append(serve.jsonable(result))
    out = {"points": points, "config": runs[0]["config"] if runs else {}}
    write_json(os.path.join(args.output_dir, "sweep.json"), out)
    out["plot"] = plot(points, os.path.join(args.output_dir, args.plot_name),
                       base.percentiles)
    if args.save_result:
        write_json(os.path.join(args.output_dir, "sweep-runs.json"), {"runs": runs})
    print(f"wrote {os.path.join(args.output_dir, 'sweep.json')} and {out['plot']}")
    return out


def main(args) -> dict[str, Any]:
    return run_sweep(args)
