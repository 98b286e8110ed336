"""`pagoda` command line: flags, generate (in-process), chat / complete (against the server)."""

from __future__ import annotations

import dataclasses
import io

import pytest

from pagoda.config import EngineArgs
from pagoda.entrypoints import cli


def test_every_engine_arg_is_a_serve_flag():
    parser = cli.make_parser(["serve"])
    args = parser.parse_args(["serve", "some/model", "--max-num-seqs", "7",
                              "--no-enable-prefix-caching", "--dtype", "float32",
                              "--hf-overrides", '{"rope_theta": 5.0}', "-tp", "1",
                              "--served-model-name", "a", "b", "--port", "1234"])
    engine_args = cli.engine_args_from(args)
    assert engine_args.model == "some/model"
    assert engine_args.max_num_seqs == 7
    assert engine_args.enable_prefix_caching is False
    assert engine_args.hf_overrides == {"rope_theta": 5.0}
    assert args.served_model_name == ["a", "b"] and args.port == 1234
    defaults = cli.engine_args_from(parser.parse_args(["serve", "m"]))
    for field in dataclasses.fields(EngineArgs):
        if field.name not in ("model", "served_model_name"):
            assert getattr(defaults, field.name) == getattr(EngineArgs(), field.name), field.name
    flags = {a for action in parser._subparsers._group_actions[0].choices["serve"]._actions
             for a in action.option_strings}
    for flag in ("--host", "--port", "--api-key", "--served-model-name", "--chat-template",
                 "--max-model-len", "--max-num-seqs", "--max-num-batched-tokens",
                 "--gpu-memory-utilization", "--dtype", "--enable-prefix-caching",
                 "--no-enable-prefix-caching", "--seed", "--max-logprobs", "--load-format"):
        assert flag in flags


def test_generate_prints_text(tiny_model, capsys):
    code = cli.main(["generate", tiny_model, "--prompt", "Hello", "--max-tokens", "4",
                     "--max-model-len", "128", "--kv-cache-memory-bytes", str(8 << 20)])
    assert code == 0
    capsys.readouterr()  # random text: only that it ran and printed without error


def test_generate_bad_argument_is_a_clean_error(tiny_model, capsys):
    assert cli.main(["generate", tiny_model, "--prompt", "x", "--dtype", "int3"]) == 2
    assert "dtype" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["complete", "chat"])
def test_interactive_clients(server, mode, capsys):
    from pagoda.entrypoints.openai.cli_client import run_client
    args = cli.make_parser([mode]).parse_args(
        [mode, "--url", server.url + "/v1", "--max-tokens", "3", "--temperature", "0"])
    run_client(args, stdin=io.StringIO("Hello there\n\nsecond line\n"))
    out = capsys.readouterr().out
    assert out.count("\n") >= 2


def test_quick_mode(server, capsys):
    assert cli.main(["complete", "--url", server.url + "/v1", "--quick", "Hi",
                     "--max-tokens", "2"]) == 0
    assert cli.main(["chat", "--url", server.url, "--quick", "Hi", "--max-tokens", "2"]) == 0


def test_bench_is_dispatched():
    parser = cli.make_parser(["bench"])
    bench = parser._subparsers._group_actions[0].choices["bench"]
    if bench._subparsers is None:
        pytest.skip("pagoda.benchmarks is not available")
    assert {"latency", "throughput", "serve"} <= set(
        bench._subparsers._group_actions[0].choices)


def test_chat_template_flag(tmp_path):
    from pagoda.entrypoints.openai.api_server import load_chat_template
    path = tmp_path / "t.jinja"
    path.write_text("{{ messages[0]['content'] }}")
    assert load_chat_template(str(path)) == "{{ messages[0]['content'] }}"
    assert load_chat_template("{{ x }}") == "{{ x }}"
    assert load_chat_template(None) is None
    with pytest.raises(ValueError):
        load_chat_template("no-such-file.jinja")


def test_server_runs_on_uvloop_when_installed(monkeypatch):
    """uvloop where it imports (as vLLM's server), asyncio's own loop otherwise."""
    import asyncio
    import sys

    from pagoda.entrypoints.openai import api_server
    uvloop = pytest.importorskip("uvloop")
    assert api_server._event_loop_runner() is uvloop.run
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import now raises ImportError
    assert api_server._event_loop_runner() is asyncio.run
