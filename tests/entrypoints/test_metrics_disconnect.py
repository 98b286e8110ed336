"""/metrics parses and moves; a client that goes away has its request aborted and its KV
blocks freed within about a second."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx

from tests.entrypoints.conftest import MODEL_NAME, metric, metric_values

REQUIRED = ["pagoda:num_requests_running", "pagoda:num_requests_waiting",
            "pagoda:kv_cache_usage_perc", "pagoda:prefix_cache_queries_total",
            "pagoda:prefix_cache_hits_total", "pagoda:num_preemptions_total",
            "pagoda:prompt_tokens_total", "pagoda:generation_tokens_total",
            "pagoda:request_success_total", "pagoda:time_to_first_token_seconds_count",
            "pagoda:inter_token_latency_seconds_count", "pagoda:e2e_request_latency_seconds_count",
            "pagoda:request_queue_time_seconds_count", "pagoda:request_prompt_tokens_count",
            "pagoda:request_generation_tokens_count"]


def _complete(server, **body):
    resp = httpx.post(server.url + "/v1/completions", timeout=60,
                      json={"model": MODEL_NAME, "prompt": "Hello there", **body})
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_metrics_parse_and_move(server):
    before = metric_values(server.url)
    names = {name for name, _ in before}
    assert not [n for n in REQUIRED if n not in names]
    _complete(server, max_tokens=5, ignore_eos=True)
    _complete(server, max_tokens=5, ignore_eos=True)  # same prompt: prefix-cache queries
    after = metric_values(server.url)
    assert metric(after, "pagoda:generation_tokens_total") >= metric(
        before, "pagoda:generation_tokens_total") + 10
    assert metric(after, "pagoda:prompt_tokens_total") > metric(before,
                                                                "pagoda:prompt_tokens_total")
    assert metric(after, "pagoda:request_success_total", finished_reason="length") >= metric(
        before, "pagoda:request_success_total", finished_reason="length") + 2
    assert metric(after, "pagoda:e2e_request_latency_seconds_count") >= metric(
        before, "pagoda:e2e_request_latency_seconds_count") + 2
    assert metric(after, "pagoda:prefix_cache_queries_total") > metric(
        before, "pagoda:prefix_cache_queries_total")


def _wait_idle(server, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        values = metric_values(server.url)
        if (metric(values, "pagoda:num_requests_running") == 0
                and metric(values, "pagoda:kv_cache_usage_perc") == 0.0):
            return values
        if time.monotonic() > deadline:
            return values
        time.sleep(0.1)


def _raw_post(server, path: str, body: dict) -> socket.socket:
    payload = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
    return sock


def _assert_aborted_quickly(server, sock: socket.socket, before: dict) -> None:
    deadline = time.monotonic() + 30
    while metric(metric_values(server.url), "pagoda:num_requests_running") == 0:
        assert time.monotonic() < deadline, "the request never started"
        time.sleep(0.05)
    sock.close()
    closed = time.monotonic()
    values = _wait_idle(server, timeout=5)
    assert metric(values, "pagoda:num_requests_running") == 0
    assert metric(values, "pagoda:kv_cache_usage_perc") == 0.0
    assert time.monotonic() - closed < 2.5  # "within a second", plus scrape overhead
    assert metric(values, "pagoda:request_success_total", finished_reason="abort") > metric(
        before, "pagoda:request_success_total", finished_reason="abort")


def test_disconnect_mid_stream_frees_blocks(server):
    before = _wait_idle(server, timeout=10)
    sock = _raw_post(server, "/v1/completions",
                     {"model": MODEL_NAME, "prompt": "Stream me", "max_tokens": 240,
                      "ignore_eos": True, "stream": True, "n": 2})
    assert sock.recv(64).startswith(b"HTTP/1.1 200")
    _assert_aborted_quickly(server, sock, before)


def test_disconnect_mid_request_frees_blocks(server):
    before = _wait_idle(server, timeout=10)
    sock = _raw_post(server, "/v1/chat/completions",
                     {"model": MODEL_NAME, "max_tokens": 200, "ignore_eos": True,
                      "messages": [{"role": "user", "content": "a long answer please"}]})
    _assert_aborted_quickly(server, sock, before)


def test_concurrent_requests(server):
    results = []

    def worker(i):
        results.append(_complete(server, max_tokens=4, seed=i, ignore_eos=True))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 6
    assert all(r["usage"]["completion_tokens"] == 4 for r in results)
