"""A small OpenAI-compatible streaming server on 127.0.0.1 with known timings, to test the
load generator without an engine: first chunk after `first_delay`, then one token per `gap`."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route


class FakeOpenAIServer:
    def __init__(self, first_delay: float = 0.05, gap: float = 0.01, fail_every: int = 0):
        self.first_delay, self.gap, self.fail_every = first_delay, gap, fail_every
        self.in_flight = self.max_in_flight = self.num_requests = 0
        self.payloads: list[dict] = []
        app = Starlette(routes=[
            Route("/v1/models", self._models),
            Route("/v1/completions", self._complete, methods=["POST"]),
            Route("/v1/chat/completions", self._complete, methods=["POST"])])
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started and time.time() < deadline:
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)

    async def _models(self, request: Request):
        return JSONResponse({"object": "list", "data": [{"id": "fake-model"}]})

    async def _complete(self, request: Request):
        body = await request.json()
        self.payloads.append(body)
        self.num_requests += 1
        if self.fail_every and self.num_requests % self.fail_every == 0:
            return JSONResponse({"error": "boom"}, status_code=500)
        chat = "messages" in body
        n = body.get("max_completion_tokens") or body["max_tokens"]
        return StreamingResponse(self._stream(n, chat, body), media_type="text/event-stream")

    async def _stream(self, n: int, chat: bool, body: dict):
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.first_delay)
            for i in range(n):
                choice = {"index": 0, "delta": {"content": f"t{i} "}} if chat else \
                    {"index": 0, "text": f"t{i} "}
                yield f"data: {json.dumps({'choices': [choice]})}\n\n"
                if i + 1 < n:
                    await asyncio.sleep(self.gap)
            prompt = body.get("prompt") or body["messages"][0]["content"]
            usage = {"prompt_tokens": len(prompt), "completion_tokens": n}
            yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            self.in_flight -= 1
