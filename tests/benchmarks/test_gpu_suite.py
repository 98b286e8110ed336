"""The GPU suite's serving (P5), nano-vllm (P4) and A/B stages and its table, as dry runs on
the CPU at toy sizes (`--quick`): the plumbing that the H200 run depends on, without the H200."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SUITE = os.path.join(ROOT, "benchmarks", "gpu_suite.py")


def _run_stage(tmp_path, stage: str, model_env: str, env_extra: dict = None,
               **config) -> tuple[dict, list[str]]:
    """Runs one stage --quick on a tiny Llama (named by `model_env`), then the table stage.
    Returns the stage's JSON and the table's lines."""
    from tests.utils import tiny_llama_config
    path = tmp_path / "tiny.json"
    tiny_llama_config(**config).to_json_file(str(path))
    env = {**os.environ, model_env: str(path), "PYTHONPATH": ROOT,
           "TOKENIZERS_PARALLELISM": "false", **(env_extra or {})}
    out = str(tmp_path / "out")
    run = subprocess.run([sys.executable, SUITE, stage, "--quick", "--out", out], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    table = subprocess.run([sys.executable, SUITE, "table", "--out", out], env=env,
                           capture_output=True, text=True, timeout=60)
    return json.loads((tmp_path / "out" / f"{stage}.json").read_text()), table.stdout.splitlines()


def test_p5_stage_and_table_dry_run(tmp_path):
    p5, table = _run_stage(tmp_path, "p5", "SUITE_LLAMA")
    assert [p["request_rate"] for p in p5["points"]] == [20.0, "inf"]
    assert all(p["completed"] == 4 and p["failed"] == 0 for p in p5["points"])
    rows = [line for line in table if line.startswith("| P5")]
    assert len(rows) == 2 and "TTFT" in rows[0], table


def test_p4_stage_reports_host_time(tmp_path):
    """P4's table rows include the wall time spent outside executor.execute per step, which
    says whether the host paces the engine, and the batch-decode profile's timing."""
    # nano-vllm's prompt ids go up to 10000
    p4, table = _run_stage(tmp_path, "p4", "SUITE_QWEN3", max_position_embeddings=4096,
                           vocab_size=10240)
    assert 0 < p4["outside_execute_s"] < p4["elapsed_time"]
    assert p4["engine_time_s"] + p4["outside_execute_s"] == pytest.approx(p4["elapsed_time"])
    rows = [line for line in table if line.startswith("| P4")]
    assert len(rows) == 3 and "outside execute" in rows[1], table
    # the batch-decode piece: timed steps, then a per-op profile of as many more
    assert p4["batch_decode"]["wall_ms_per_step"] > 0 and "ms/step wall" in rows[2]
    profile = (tmp_path / "out" / "profile_p4.txt").read_text()
    assert "decode steps, batch" in profile and "Self CPU" in profile


def test_ab_stage_runs_each_setting(tmp_path):
    """The A/B stage runs P1 as is and once per AB setting, each in its own process, and the
    table shows one row per run."""
    ab, table = _run_stage(tmp_path, "ab", "SUITE_LLAMA", {"AB": "PAGODA_SKINNY_ALL=1"},
                           max_position_embeddings=4096)  # the llama stage's max_model_len
    assert [r["setting"] for r in ab["rows"]] == ["as is", "PAGODA_SKINNY_ALL=1"]
    assert all(r["decode_ms_per_step"] > 0 for r in ab["rows"])
    assert len([line for line in table if line.startswith("| AB")]) == 2
