"""Serving metrics with vLLM's `bench serve` definitions (see docs PERF.md).

All times are in seconds inside this module; reports convert to milliseconds.

- TTFT: request sent -> first streamed chunk with content.
- TPOT: per request with more than one output token, (E2EL - TTFT) / (output tokens - 1).
- ITL: gaps between consecutive content chunks, pooled over all requests.
- E2EL: request sent -> last chunk.
- Throughputs divide by the wall time of the whole run.
- Goodput: requests per second that meet every SLO given (a request with one output token
  has TPOT 0 for this purpose, as in vLLM).
Percentiles use linear interpolation between closest ranks (numpy's default), as vLLM.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

import numpy as np

DEFAULT_PERCENTILES = (10, 25, 50, 75, 90, 99)
_GOODPUT_KEYS = ("ttft", "tpot", "e2el")


@dataclass
class RequestResult:
    """What one streamed request produced. `start` is when it was sent (perf_counter)."""

    success: bool = False
    prompt_len: int = 0
    output_tokens: int = 0
    start: float = 0.0
    ttft: float = 0.0
    latency: float = 0.0  # E2EL
    itl: list[float] = field(default_factory=list)
    error: str = ""
    generated_text: str = ""


def percentile(values: Sequence[float], p: float) -> float:
    """numpy's linear-interpolation percentile; 0.0 for an empty list (as vLLM)."""
    if len(values) == 0:
        return 0.0
    return float(np.percentile(np.asarray(values, dtype=np.float64), p))


def summarize(values: Sequence[float], percentiles: Iterable[float] = DEFAULT_PERCENTILES,
              scale: float = 1.0) -> dict[str, float]:
    """mean, median, std, min, max and the given percentiles, each times `scale`."""
    arr = np.asarray(values, dtype=np.float64) * scale
    if arr.size == 0:
        out = {"mean": 0.0, "median": 0.0, "std": 0.0, "min": 0.0, "max": 0.0}
        out.update({f"p{pct_name(p)}": 0.0 for p in percentiles})
        return out
    out = {"mean": float(arr.mean()), "median": float(np.median(arr)),
           "std": float(arr.std()), "min": float(arr.min()), "max": float(arr.max())}
    out.update({f"p{pct_name(p)}": float(np.percentile(arr, p)) for p in percentiles})
    return out


def pct_name(p: float) -> str:
    return str(int(p)) if float(p).is_integer() else str(p)


def request_tpot(result: RequestResult) -> Optional[float]:
    """TPOT of one request, or None when it produced at most one token."""
    if result.output_tokens <= 1:
        return None
    return (result.latency - result.ttft) / (result.output_tokens - 1)


def parse_goodput(specs: Optional[Sequence[str]]) -> dict[str, float]:
    """['ttft:200', 'tpot:50'] -> {'ttft': 0.2, 'tpot': 0.05} (SLOs given in ms)."""
    slos: dict[str, float] = {}
    for spec in specs or ():
        key, sep, value = spec.partition(":")
        key = key.strip().lower()
        if not sep or key not in _GOODPUT_KEYS:
            raise ValueError(f"--goodput: expected KEY:MS with KEY in {_GOODPUT_KEYS}; "
                             f"got {spec!r}")
        try:
            ms = float(value)
        except ValueError:
            raise ValueError(f"--goodput: {value!r} is not a number of ms") from None
        if ms < 0:
            raise ValueError(f"--goodput: {spec!r} must not be negative")
        slos[key] = ms / 1000.0
    return slos


def meets_slos(result: RequestResult, slos: dict[str, float]) -> bool:
    if not result.success:
        return False
    values = {"ttft": result.ttft, "tpot": request_tpot(result) or 0.0,
              "e2el": result.latency}
    return all(values[key] <= limit for key, limit in slos.items())


def peak_concurrency(intervals: Iterable[tuple[float, float]]) -> int:
    """The most requests in flight at once, from (start, end) pairs; an end at the same
    instant as a start is counted first (the finished one left before the new one came)."""
    events = []
    for start, end in intervals:
        events.append((start, 1))
        events.append((end, -1))
    events.sort(key=lambda e: (e[0], e[1]))
    live = peak = 0
    for _, delta in events:
        live += delta
        peak = max(peak, live)
    return peak


def compute_serving_metrics(results: Sequence[RequestResult], duration: float,
                            slos: Optional[dict[str, float]] = None,
                            percentiles: Iterable[float] = (50, 99)) -> dict:
    """The figures `bench serve` reports, from per-request results and the run's wall time.
    Latency figures are in ms."""
    ok = [r for r in results if r.success]
    ttfts = [r.ttft for r in ok]
    tpots = [t for t in (request_tpot(r) for r in ok) if t is not None]
    itls = [gap for r in ok for gap in r.itl]
    e2els = [r.latency for r in ok]
    total_in = sum(r.prompt_len for r in ok)
    total_out = sum(r.output_tokens for r in ok)
    dur = max(duration, 1e-9)
    out = {
        "completed": len(ok), "failed": len(results) - len(ok), "duration": duration,
        "total_input_tokens": total_in, "total_output_tokens": total_out,
        "request_throughput": len(ok) / dur, "output_throughput": total_out / dur,
        "total_token_throughput": (total_in + total_out) / dur,
        "max_concurrency_observed": peak_concurrency(
            (r.start, r.start + r.latency) for r in ok),
    }
    if slos:
        out["goodput"] = sum(meets_slos(r, slos) for r in results) / dur
    pcts = tuple(percentiles)
    for name, values in (("ttft", ttfts), ("tpot", tpots), ("itl", itls), ("e2el", e2els)):
        stats = summarize(values, pcts, scale=1000.0)
        out[f"mean_{name}_ms"] = stats["mean"]
        out[f"median_{name}_ms"] = stats["median"]
        out[f"std_{name}_ms"] = stats["std"]
        for p in pcts:
            out[f"p{pct_name(p)}_{name}_ms"] = stats[f"p{pct_name(p)}"]
    return out


def arrival_offsets(num_requests: int, request_rate: float, burstiness: float = 1.0,
                    seed: int = 0) -> list[float]:
    """Send times (seconds from the start) of `num_requests` requests: gaps drawn from a
    gamma distribution with shape `burstiness` and mean 1 / rate (burstiness 1 = Poisson
    process; < 1 burstier; > 1 more regular). rate inf = everything at t = 0."""
    if num_requests < 0:
        raise ValueError("num_requests must be >= 0")
    if burstiness <= 0:
        raise ValueError(f"burstiness must be > 0; got {burstiness}")
    if request_rate == float("inf"):
        return [0.0] * num_requests
    if request_rate <= 0:
        raise ValueError(f"request rate must be > 0; got {request_rate}")
    rng = np.random.default_rng(seed)
    theta = 1.0 / (request_rate * burstiness)
    gaps = rng.gamma(shape=burstiness, scale=theta, size=num_requests)
    gaps[0] = 0.0  # the first request goes at once
    return [float(x) for x in np.cumsum(gaps)]
