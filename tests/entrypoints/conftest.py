"""Fixtures: one tiny random Llama checkpoint per session, and real `pagoda serve` processes
on 127.0.0.1 (free ports picked at run time, ready when /health answers 200)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from pagoda.benchmarks.common import stop_process, wait_healthy
from pagoda.netutil import free_port
from tests.utils import make_model, tiny_llama_config

REPO = Path(__file__).resolve().parents[2]
MODEL_NAME = "tiny"
MAX_MODEL_LEN = 256


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("tiny-llama"))
    make_model(path, tiny_llama_config())
    return path


class ServerProcess:
    def __init__(self, model: str, extra_args=(), env=None, log_path=None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "pagoda.entrypoints.cli", "serve", model,
               "--host", "127.0.0.1", "--port", str(self.port), "--served-model-name",
               MODEL_NAME, "--max-model-len", str(MAX_MODEL_LEN), "--max-num-seqs", "64",
               "--kv-cache-memory-bytes", str(64 << 20), "--uvicorn-log-level", "warning",
               *extra_args]
        full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
        self.log = open(log_path, "w") if log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=self.log,
                                     stderr=subprocess.STDOUT)
        self.wait_ready()

    def wait_ready(self, timeout: float = 180.0) -> None:
        try:
            wait_healthy(self.url, self.proc, timeout)
        except TimeoutError:
            self.stop()
            raise

    def core_pid(self) -> int:
        """The engine-core process: the server's child started by multiprocessing spawn."""
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmdline = f.read()
            except (OSError, ValueError, IndexError):
                continue
            if ppid == self.proc.pid and b"spawn_main" in cmdline:
                return int(entry)
        raise RuntimeError("engine-core process not found")

    def stop(self) -> None:
        stop_process(self.proc)
        if self.log is not subprocess.DEVNULL:
            self.log.close()


@pytest.fixture(scope="session")
def server(tiny_model, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "server.log"
    proc = ServerProcess(tiny_model, log_path=log)
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def client(server):
    import openai
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0,
                         timeout=60)


def metric_values(url: str, headers=None) -> dict:
    """{(name, frozenset(labels)): value} of every sample on /metrics."""
    from prometheus_client.parser import text_string_to_metric_families
    text = httpx.get(url + "/metrics", headers=headers, timeout=10).text
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = {k: v for k, v in sample.labels.items() if k != "model_name"}
            values[(sample.name, frozenset(labels.items()))] = sample.value
    return values


def metric(values: dict, name: str, **labels) -> float:
    return values.get((name, frozenset(labels.items())), 0.0)
