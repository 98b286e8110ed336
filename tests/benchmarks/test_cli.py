"""The command line: every subcommand, every engine flag, `python -m` on its own."""

import argparse
import subprocess
import sys

from pagoda.benchmarks import cli

ENGINE_FLAGS = ["--model", "--dtype", "--load-format", "--max-model-len", "--max-num-seqs",
                "--max-num-batched-tokens", "--enforce-eager", "--device",
                "--gpu-memory-utilization", "--enable-prefix-caching"]


def test_subcommands_and_engine_flags():
    parser = cli.make_parser()
    for name in ("latency", "throughput"):
        args = parser.parse_args([name, "--model", "m", "--dtype", "bfloat16", "--load-format",
                                  "dummy", "--max-model-len", "4096", "--max-num-seqs", "64",
                                  "--max-num-batched-tokens", "2048", "--enforce-eager",
                                  "--device", "cuda", "--gpu-memory-utilization", "0.8",
                                  "--no-enable-prefix-caching"])
        assert args.bench_command == name and args.enforce_eager is True
        assert args.enable_prefix_caching is False and args.max_num_seqs == 64
        assert args.gpu_memory_utilization == 0.8 and args.load_format == "dummy"
    args = parser.parse_args(["serve", "--request-rate", "4", "--burstiness", "0.5",
                              "--goodput", "ttft:200", "tpot:50", "--max-concurrency", "8"])
    assert args.goodput == ["ttft:200", "tpot:50"] and args.max_concurrency == 8
    args = parser.parse_args(["sweep", "--request-rates", "1,2,inf"])
    assert args.bench_command == "sweep"
    for name in ("latency", "throughput"):
        text = cli.add_bench_subparsers(argparse.ArgumentParser().add_subparsers())[
            name].format_help()
        assert all(flag in text for flag in ENGINE_FLAGS)


def test_add_bench_subparsers_into_another_parser():
    top = argparse.ArgumentParser(prog="pagoda")
    bench = top.add_subparsers(dest="cmd").add_parser("bench")
    parsers = cli.add_bench_subparsers(bench.add_subparsers(dest="bench_command"))
    assert set(parsers) == {"latency", "throughput", "serve", "sweep"}
    args = top.parse_args(["bench", "throughput", "--backend", "hf", "--dataset-name", "nano"])
    assert args.bench_command == "throughput" and args.dataset_name == "nano"


def test_bad_values_are_reported(capsys):
    assert cli.main(["serve", "--request-rate", "0", "--num-prompts", "1"]) == 2
    assert "request rate" in capsys.readouterr().err
    assert cli.main([]) == 2


def test_python_dash_m_runs_on_its_own():
    out = subprocess.run([sys.executable, "-m", "pagoda.benchmarks.cli", "--help"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    for name in ("latency", "throughput", "serve", "sweep"):
        assert name in out.stdout
