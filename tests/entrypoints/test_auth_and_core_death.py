"""A second server, with the API key from $PAGODA_API_KEY: 401 without the key (except
/health and /metrics); then its engine core is killed: /health turns 503 and an in-flight
request fails instead of hanging."""

from __future__ import annotations

import inspect
import os
import signal
import threading
import time

import httpx
import openai
import pytest

from pagoda.entrypoints.openai import api_server
from tests.entrypoints.conftest import MODEL_NAME, ServerProcess, metric, metric_values

KEY = "sk-test-pagoda-123"


@pytest.fixture(scope="module")
def keyed_server(tiny_model, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "keyed-server.log"
    proc = ServerProcess(tiny_model, env={"PAGODA_API_KEY": KEY}, log_path=log)
    yield proc
    proc.stop()


def test_api_key_required(keyed_server):
    url = keyed_server.url
    body = {"model": MODEL_NAME, "prompt": "hi", "max_tokens": 2}
    for path in ("/v1/models", "/version", "/openapi.json"):
        resp = httpx.get(url + path)
        assert resp.status_code == 401, path
        assert resp.json()["error"]["code"] == 401
    assert httpx.post(url + "/v1/completions", json=body).status_code == 401
    wrong = {"Authorization": "Bearer sk-wrong"}
    assert httpx.post(url + "/v1/completions", json=body, headers=wrong).status_code == 401
    assert httpx.post(url + "/tokenize", json={"prompt": "x"}).status_code == 401
    # Probes and scrapers need no key.
    assert httpx.get(url + "/health").status_code == 200
    assert httpx.get(url + "/metrics").status_code == 200
    good = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=30)
    assert good.completions.create(model=MODEL_NAME, prompt="hi", max_tokens=2).usage
    bad = openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0, timeout=30)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_key_compared_in_constant_time():
    assert "secrets.compare_digest" in inspect.getsource(api_server.GuardMiddleware)


def _wait_running(url: str, count: int) -> None:
    deadline = time.monotonic() + 30
    while metric(metric_values(url), "pagoda:num_requests_running") < count:
        assert time.monotonic() < deadline, "requests did not start"
        time.sleep(0.05)


def test_engine_core_death_is_reported(keyed_server):
    url = keyed_server.url
    headers = {"Authorization": f"Bearer {KEY}"}
    long_body = {"model": MODEL_NAME, "prompt": "hi", "max_tokens": 240, "ignore_eos": True,
                 "n": 4}
    outcome = {}

    def long_request():
        try:
            outcome["response"] = httpx.post(url + "/v1/completions", headers=headers,
                                             timeout=60, json=long_body)
        except httpx.HTTPError as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=long_request)
    with httpx.stream("POST", url + "/v1/completions", headers=headers, timeout=60,
                      json={**long_body, "stream": True}) as stream:
        lines = stream.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
        thread.start()
        _wait_running(url, 8)  # both requests are in the engine (4 samples each)
        os.kill(keyed_server.core_pid(), signal.SIGKILL)
        start = time.monotonic()
        rest = [line for line in lines if line.startswith("data: ")]
    # The stream ends with an in-band error (its 200 header was sent long ago).
    assert any('"error"' in line for line in rest) and rest[-1] == "data: [DONE]"
    thread.join(timeout=20)
    assert not thread.is_alive(), "the in-flight request hung after the core died"
    assert time.monotonic() - start < 10
    assert "response" in outcome, outcome
    assert outcome["response"].status_code == 503
    assert "engine" in outcome["response"].json()["error"]["message"]
    assert httpx.get(url + "/health").status_code == 503
    # New requests fail fast with an error, not a hang.
    resp = httpx.post(url + "/v1/completions", headers=headers, timeout=10,
                      json={"model": MODEL_NAME, "prompt": "hi", "max_tokens": 2})
    assert resp.status_code == 503
