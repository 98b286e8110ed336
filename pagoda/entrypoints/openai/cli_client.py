"""`pagoda chat` and `pagoda complete`: small interactive clients for a running server
(httpx, streaming over SSE)."""

from __future__ import annotations

import json
import os
import sys
from argparse import Namespace
from typing import Iterator, Optional

import httpx


def _headers(args: Namespace) -> dict:
    key = args.api_key or os.environ.get("PAGODA_API_KEY") or os.environ.get("OPENAI_API_KEY")
    return {"Authorization": f"Bearer {key}"} if key else {}


def _model(client: httpx.Client, args: Namespace) -> str:
    if args.model_name:
        return args.model_name
    resp = client.get("/models")
    resp.raise_for_status()
    return resp.json()["data"][0]["id"]


def _stream(client: httpx.Client, path: str, body: dict) -> Iterator[dict]:
    """Yields the JSON events of an SSE response until [DONE]."""
    with client.stream("POST", path, json=body) as resp:
        if resp.status_code != 200:
            resp.read()
            message = resp.json().get("error", {}).get("message", resp.text)
            raise RuntimeError(f"server said {resp.status_code}: {message}")
        for line in resp.iter_lines():
            if not line.startswith("data: "):
                continue
            data = line[len("data: "):]
            if data == "[DONE]":
                return
            event = json.loads(data)
            if "error" in event:
                raise RuntimeError(event["error"].get("message", "stream failed"))
            yield event


def _sampling(args: Namespace) -> dict:
    body = {}
    if args.max_tokens is not None:
        body["max_tokens"] = args.max_tokens
    if args.temperature is not None:
        body["temperature"] = args.temperature
    return body


def _ask(client: httpx.Client, args: Namespace, model: str, history: list,
         text: str) -> str:
    """Sends one turn, prints the answer as it streams, returns it."""
    out = []
    if args.client_mode == "chat":
        history.append({"role": "user", "content": text})
        body = {"model": model, "messages": history, "stream": True, **_sampling(args)}
        events = _stream(client, "/chat/completions", body)
        pieces = (e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
    else:
        body = {"model": model, "prompt": text, "stream": True, **_sampling(args)}
        events = _stream(client, "/completions", body)
        pieces = (e["choices"][0]["text"] for e in events if e["choices"])
    for piece in pieces:
        out.append(piece)
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    answer = "".join(out)
    if args.client_mode == "chat":
        history.append({"role": "assistant", "content": answer})
    return answer


def run_client(args: Namespace, stdin=None) -> None:
    stdin = stdin or sys.stdin
    base = args.url.rstrip("/")
    if not base.endswith("/v1"):  # accept the server's root as well as its /v1 (vLLM's form)
        base += "/v1"
    with httpx.Client(base_url=base, headers=_headers(args),
                      timeout=httpx.Timeout(600.0, connect=10.0)) as client:
        model = _model(client, args)
        history: list = []
        if getattr(args, "system_prompt", None):
            history.append({"role": "system", "content": args.system_prompt})
        if args.quick is not None:
            _ask(client, args, model, history, args.quick)
            return
        prompt: Optional[str] = "> " if stdin.isatty() else ""
        while True:
            sys.stdout.write(prompt)
            sys.stdout.flush()
            line = stdin.readline()
            if not line:
                return
            if line.strip():
                _ask(client, args, model, history, line.rstrip("\n"))
