"""`pagoda bench latency | throughput | serve | sweep`.

`pagoda/entrypoints/cli.py` adds these under its `bench` command with
`add_bench_subparsers(subparsers)` and dispatches to `run(args)`. On its own:
`python -m pagoda.benchmarks.cli throughput --model ... --load-format dummy`.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Any, Optional

_COMMANDS = {
    "latency": ("pagoda.benchmarks.latency", "latency of one batch (vLLM bench latency)"),
    "throughput": ("pagoda.benchmarks.throughput",
                   "offline throughput, Pagoda and/or transformers (vLLM bench throughput)"),
    "serve": ("pagoda.benchmarks.serve",
              "load generator against an OpenAI-compatible server (vLLM bench serve)"),
    "sweep": ("pagoda.benchmarks.sweep",
              "bench serve at several request rates -> JSON + PNG of TTFT/TPOT"),
}


def add_bench_subparsers(subparsers) -> dict[str, argparse.ArgumentParser]:
    """Adds latency, throughput, serve and sweep to an argparse subparsers object; each
    sets `bench_command` so that `run(args)` can dispatch."""
    parsers = {}
    for name, (module_name, help_text) in _COMMANDS.items():
        parser = subparsers.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module_name).add_cli_args(parser)
        parser.set_defaults(bench_command=name)
        parsers[name] = parser
    return parsers


def run(args: argparse.Namespace) -> Any:
    name = getattr(args, "bench_command", None)
    if name not in _COMMANDS:
        raise SystemExit(f"pagoda bench: choose one of {', '.join(_COMMANDS)}")
    return importlib.import_module(_COMMANDS[name][0]).main(args)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pagoda bench",
                                     description="Pagoda benchmarks (vLLM's definitions)")
    add_bench_subparsers(parser.add_subparsers(dest="bench_command", metavar="COMMAND"))
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "bench_command", None):
        parser.print_help()
        return 2
    try:
        run(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:  # e.g. the server failed the test request
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
