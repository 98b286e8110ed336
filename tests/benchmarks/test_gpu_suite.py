"""The GPU suite's serving (P5) and nano-vllm (P4) stages and its table, as dry runs on the
CPU at toy sizes (`--quick`): the plumbing that the H200 run depends on, without the H200."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_p5_stage_and_table_dry_run(tmp_path):
    from tests.utils import tiny_llama_config
    config = tmp_path / "tiny.json"
    tiny_llama_config().to_json_file(str(config))
    env = {**os.environ, "SUITE_LLAMA": str(config), "PYTHONPATH": ROOT,
           "TOKENIZERS_PARALLELISM": "false"}
    suite = os.path.join(ROOT, "benchmarks", "gpu_suite.py")
    out = str(tmp_path / "out")
    run = subprocess.run([sys.executable, suite, "p5", "--quick", "--out", out], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    p5 = json.loads((tmp_path / "out" / "p5.json").read_text())
    assert [p["request_rate"] for p in p5["points"]] == [20.0, "inf"]
    assert all(p["completed"] == 4 and p["failed"] == 0 for p in p5["points"])
    table = subprocess.run([sys.executable, suite, "table", "--out", out], env=env,
                           capture_output=True, text=True, timeout=60)
    rows = [line for line in table.stdout.splitlines() if line.startswith("| P5")]
    assert len(rows) == 2 and "TTFT" in rows[0], table.stdout


def test_p4_stage_reports_host_time(tmp_path):
    """P4's table rows include the wall time spent outside executor.execute per step, which
    says whether the host paces the engine."""
    from tests.utils import tiny_llama_config
    config = tmp_path / "tiny.json"
    # nano-vllm's prompt ids go up to 10000
    tiny_llama_config(max_position_embeddings=4096, vocab_size=10240).to_json_file(str(config))
    env = {**os.environ, "SUITE_QWEN3": str(config), "PYTHONPATH": ROOT,
           "TOKENIZERS_PARALLELISM": "false"}
    suite = os.path.join(ROOT, "benchmarks", "gpu_suite.py")
    out = str(tmp_path / "out")
    run = subprocess.run([sys.executable, suite, "p4", "--quick", "--out", out], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    p4 = json.loads((tmp_path / "out" / "p4.json").read_text())
    assert 0 < p4["outside_execute_s"] < p4["elapsed_time"]
    assert p4["engine_time_s"] + p4["outside_execute_s"] == pytest.approx(p4["elapsed_time"])
    table = subprocess.run([sys.executable, suite, "table", "--out", out], env=env,
                           capture_output=True, text=True, timeout=60)
    rows = [line for line in table.stdout.splitlines() if line.startswith("| P4")]
    assert len(rows) == 2 and "outside execute" in rows[1], table.stdout


def test_ab_stage_runs_each_setting(tmp_path):
    """The A/B stage runs P1 as is and once per AB setting, each in its own process, and the
    table shows one row per run."""
    from tests.utils import tiny_llama_config
    config = tmp_path / "tiny.json"
    tiny_llama_config(max_position_embeddings=4096).to_json_file(str(config))  # llama stage
    env = {**os.environ, "SUITE_LLAMA": str(config), "PYTHONPATH": ROOT,
           "TOKENIZERS_PARALLELISM": "false", "AB": "PAGODA_ATTN_SINGLE_KEYS=512"}
    suite = os.path.join(ROOT, "benchmarks", "gpu_suite.py")
    out = str(tmp_path / "out")
    run = subprocess.run([sys.executable, suite, "ab", "--quick", "--out", out], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    rows = json.loads((tmp_path / "out" / "ab.json").read_text())["rows"]
    assert [r["setting"] for r in rows] == ["as is", "PAGODA_ATTN_SINGLE_KEYS=512"]
    assert all(r["decode_ms_per_step"] > 0 for r in rows)
    table = subprocess.run([sys.executable, suite, "table", "--out", out], env=env,
                           capture_output=True, text=True, timeout=60)
    assert len([line for line in table.stdout.splitlines() if line.startswith("| AB")]) == 2
