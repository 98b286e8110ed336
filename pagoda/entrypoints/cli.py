"""`pagoda serve | generate | chat | complete | bench`, with vLLM's flag names.

Every EngineArgs field is a flag (`max_num_seqs` -> `--max-num-seqs`; booleans also get
`--no-...`), generated from the dataclass so new engine arguments show up by themselves."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import typing
from typing import Any, Optional

from pagoda.config import EngineArgs

_ENGINE_ALIASES = {"tensor_parallel_size": ["-tp"]}
_FRONTEND_ONLY = {"served_model_name"}  # serve takes several names; the engine keeps one


def _base_type(hint: Any) -> Any:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if typing.get_origin(hint) is typing.Union and len(args) == 1 else hint


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("engine arguments")
    hints = typing.get_type_hints(EngineArgs)
    for field in dataclasses.fields(EngineArgs):
        if field.name in ("model", *_FRONTEND_ONLY):
            continue
        names = [f"--{field.name.replace('_', '-')}", *_ENGINE_ALIASES.get(field.name, [])]
        default = (field.default if field.default is not dataclasses.MISSING
                   else field.default_factory())
        base = _base_type(hints[field.name])
        if base is bool:
            group.add_argument(*names, action=argparse.BooleanOptionalAction, default=default)
        elif base in (int, float, str):
            group.add_argument(*names, type=base, default=default)
        else:  # dicts such as hf_overrides: JSON on the command line
            group.add_argument(*names, type=json.loads, default=default,
                               help="JSON object")


def engine_args_from(args: argparse.Namespace) -> EngineArgs:
    kwargs = {f.name: getattr(args, f.name) for f in dataclasses.fields(EngineArgs)
              if hasattr(args, f.name) and f.name not in _FRONTEND_ONLY}
    model = getattr(args, "model_tag", None) or getattr(args, "model", None)
    if model is None:
        from pagoda.model_loader.default_model import default_model_path
        model = default_model_path()
    kwargs["model"] = model
    return EngineArgs(**kwargs)


def _add_model(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_tag", nargs="?", default=None,
                        help="model folder or .gguf file (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--model", default=None, help="same as the positional MODEL")


def add_serve_parser(sub) -> None:
    from pagoda.entrypoints.openai.api_server import (DEFAULT_MAX_BODY_BYTES,
                                                      DEFAULT_MAX_HEADER_BYTES)
    p = sub.add_parser("serve", help="start the OpenAI-compatible server")
    _add_model(p)
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' (also $PAGODA_API_KEY)")
    p.add_argument("--served-model-name", nargs="+", default=None)
    p.add_argument("--chat-template", default=None, help="a file or the template itself")
    p.add_argument("--root-path", default=None)
    p.add_argument("--uvicorn-log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug", "trace"])
    p.add_argument("--disable-log-stats", action="store_true")
    p.add_argument("--max-request-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES)
    p.add_argument("--max-request-header-bytes", type=int, default=DEFAULT_MAX_HEADER_BYTES)
    add_engine_args(p)
    p.set_defaults(func=cmd_serve)


def add_generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate from one prompt in this process")
    _add_model(p)
    p.add_argument("--prompt", "-p", required=True)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--n", type=int, default=1)
    p.add_argument("--sample-seed", type=int, default=None, help="the request's seed")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    add_engine_args(p)
    p.set_defaults(func=cmd_generate)


def add_client_parsers(sub) -> None:
    for name, help_text in (("chat", "chat with a running server"),
                            ("complete", "complete text against a running server")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--url", default="http://localhost:8000/v1")
        p.add_argument("--model-name", default=None, help="default: the server's first model")
        p.add_argument("--api-key", default=None, help="also $PAGODA_API_KEY / $OPENAI_API_KEY")
        p.add_argument("--max-tokens", type=int, default=None)
        p.add_argument("--temperature", type=float, default=None)
        p.add_argument("--quick", "-q", default=None, metavar="TEXT",
                       help="send one message / prompt, print the answer and exit")
        if name == "chat":
            p.add_argument("--system-prompt", default=None)
        p.set_defaults(func=cmd_client, client_mode=name)


def make_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pagoda", description="Pagoda LLM engine")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_serve_parser(sub)
    add_generate_parser(sub)
    add_client_parsers(sub)
    bench = sub.add_parser("bench", help="benchmarks (latency, throughput, serve, sweep)")
    if argv[:1] == ["bench"]:  # the benchmark parsers import a lot: only when asked for
        try:
            from pagoda.benchmarks.cli import add_bench_subparsers
        except ImportError as exc:
            # `exc` is unbound once the except block ends: keep the message, not the name
            message = f"pagoda bench is unavailable: {exc}"
            bench.set_defaults(func=lambda _: sys.exit(message))
        else:
            add_bench_subparsers(bench.add_subparsers(dest="bench_command"))
            bench.set_defaults(func=cmd_bench)
    return parser


def cmd_serve(args: argparse.Namespace) -> None:
    from pagoda.entrypoints.openai.api_server import run_server
    engine_args = engine_args_from(args)
    if not (args.model_tag or args.model or args.served_model_name):
        # The default model is a file deep in site-packages: serve it under a short name.
        args.served_model_name = [os.path.basename(engine_args.model).split(".")[0]]
    run_server(args, engine_args)


def cmd_generate(args: argparse.Namespace) -> None:
    from pagoda.entrypoints.llm import LLM
    from pagoda.sampling_params import SamplingParams
    engine_args = engine_args_from(args)
    kwargs = {k: v for k, v in dataclasses.asdict(engine_args).items() if k != "model"}
    llm = LLM(engine_args.model, **kwargs)
    params = SamplingParams(n=args.n, max_tokens=args.max_tokens, temperature=args.temperature,
                            top_p=args.top_p, top_k=args.top_k, seed=args.sample_seed)
    if args.chat:
        outputs = llm.chat([{"role": "user", "content": args.prompt}], params, use_tqdm=False)
    else:
        outputs = llm.generate(args.prompt, params, use_tqdm=False)
    for completion in outputs[0].outputs:
        print(completion.text)


def cmd_client(args: argparse.Namespace) -> None:
    from pagoda.entrypoints.openai.cli_client import run_client
    run_client(args)


def cmd_bench(args: argparse.Namespace) -> Any:
    from pagoda.benchmarks.cli import run
    return run(args)


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(asctime)s %(name)s: "
                        "%(message)s", datefmt="%H:%M:%S")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    parser = make_parser(argv)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        result = args.func(args)
    except (ValueError, FileNotFoundError) as exc:  # bad arguments: no traceback
        print(f"pagoda {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
