"""What /v1/completions and /v1/chat/completions share: model-name and length checks,
logprob formatting, streaming over SSE and the race against a client that goes away."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import AsyncIterator, Optional

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from pagoda.engine.async_llm import AsyncLLM, RequestStream
from pagoda.engine.core_client import EngineDeadError
from pagoda.engine.input_processor import kept_prompt_tokens
from pagoda.entrypoints.openai.errors import OpenAIError, clip, error_body
from pagoda.entrypoints.openai.protocol import UsageInfo
from pagoda.outputs import Logprob, RequestOutput

logger = logging.getLogger(__name__)
MIN_LOGPROB = -9999.0  # JSON has no -inf; OpenAI clients expect a number (vLLM does this)
MAX_PROMPTS_PER_REQUEST = 256
MAX_SEQUENCES_PER_REQUEST = 1024  # prompts x n: one request must not fill the engine
_THREAD_TOKENIZE_CHARS = 16384


class OpenAIServing:
    def __init__(self, engine: AsyncLLM, served_model_names: list[str]):
        self.engine = engine
        self.served_model_names = served_model_names
        self.tokenizer = engine.get_tokenizer()
        self.max_model_len = engine.model_config.max_model_len

    def check_model(self, model: Optional[str]) -> str:
        if model is None or model in self.served_model_names:
            return self.served_model_names[0]
        raise OpenAIError(f"The model `{clip(model, 80)}` does not exist.", 400, "model")

    def require_tokenizer(self):
        if self.tokenizer is None:
            raise OpenAIError("this server runs without a tokenizer (--skip-tokenizer-init)")
        return self.tokenizer

    def max_tokens_for(self, num_prompt_tokens: int, requested: Optional[int],
                       truncate_prompt_tokens: Optional[int] = None) -> int:
        """truncate_prompt_tokens: the prompt is cut to its last k tokens by the engine
        (-1: to max_model_len - 1), so the room is counted after the cut."""
        keep = kept_prompt_tokens(truncate_prompt_tokens, self.max_model_len)
        if keep is not None and keep > 0:  # 0 is refused later, by SamplingParams
            num_prompt_tokens = min(num_prompt_tokens, keep)
        room = self.max_model_len - num_prompt_tokens
        if room < 1:
            raise OpenAIError(f"This model's maximum context length is {self.max_model_len} "
                              f"tokens; the prompt has {num_prompt_tokens} tokens.",
                              param="messages" if requested is None else "prompt")
        if requested is None:
            return room
        if requested > room:
            raise OpenAIError(f"This model's maximum context length is {self.max_model_len} "
                              f"tokens. However, you requested {requested + num_prompt_tokens}"
                              f" tokens ({num_prompt_tokens} in the prompt, {requested} for "
                              f"the completion).", param="max_tokens")
        return requested

    def add_requests(self, request_id: str, prompts: list[dict], params_list: list
                     ) -> list[RequestStream]:
        """Submits every prompt or none: a bad one aborts those already queued."""
        streams: list[RequestStream] = []
        try:
            for i, (prompt, params) in enumerate(zip(prompts, params_list)):
                streams.append(self.engine.add_request(f"{request_id}-{i}", prompt, params))
        except (ValueError, EngineDeadError) as exc:
            for stream in streams:
                stream.abort()
            if isinstance(exc, EngineDeadError):
                raise OpenAIError(f"engine is not running: {exc}", 503) from None
            raise OpenAIError(str(exc)) from None
        return streams

    async def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        """Long texts are tokenized in a worker thread (fast tokenizers release the GIL), so
        one huge prompt does not stall every other stream on the event loop."""
        tokenizer = self.require_tokenizer()
        if len(text) < _THREAD_TOKENIZE_CHARS:
            return tokenizer.encode(text, add_special_tokens=add_special_tokens)
        return await asyncio.to_thread(tokenizer.encode, text,
                                       add_special_tokens=add_special_tokens)

    def decode_token(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id]) if self.tokenizer is not None else ""


def usage_of(outputs: list[RequestOutput]) -> UsageInfo:
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    completion = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    return UsageInfo(prompt_tokens=prompt, completion_tokens=completion,
                     total_tokens=prompt + completion)


def safe_logprob(value: float) -> float:
    return max(value, MIN_LOGPROB)


def top_entries(entry: dict[int, Logprob], limit: Optional[int] = None) -> list:
    """(token id, Logprob) sorted by rank: the top-k, best first."""
    items = sorted(entry.items(), key=lambda kv: (kv[1].rank or 0, -kv[1].logprob))
    return items if limit is None else items[:limit]


async def final_outputs(streams: list[RequestStream]) -> list[RequestOutput]:
    """Waits for the finished output of every stream (FINAL_ONLY requests)."""
    results = []
    for stream in streams:
        output = None
        async for output in stream:
            pass
        results.append(output)
    return results


async def merge_streams(streams: list[RequestStream]
                        ) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(prompt index, output) from several streams in arrival order."""
    if len(streams) == 1:
        async for output in streams[0]:
            yield 0, output
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream: RequestStream) -> None:
        try:
            async for output in stream:
                await queue.put((i, output))
        except Exception as exc:  # e.g. EngineDeadError: the reader re-raises it
            await queue.put((i, exc))
            return
        await queue.put((i, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            i, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()


async def _wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def run_unless_disconnected(request: Request, work, streams: list[RequestStream]):
    """Runs `work` (a coroutine) but gives up, aborting the requests, if the client goes
    away first: a closed connection must free its KV blocks now, not when generation ends."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in (task, watcher):
            if not t.done():
                t.cancel()
        for stream in streams:
            stream.abort()  # no-op for finished ones
    if task in done:
        try:
            return task.result()
        except EngineDeadError as exc:
            raise OpenAIError(f"engine is not running: {exc}", 503) from None
    return Response(status_code=499)  # nobody reads it; nginx's "client closed request"


def sse(data) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def sse_error(exc: BaseException) -> str:
    status = 503 if isinstance(exc, EngineDeadError) else 500
    return sse(error_body(f"{type(exc).__name__}: {exc}", status))


class SSEResponse(StreamingResponse):
    """Streams while also listening for the client's disconnect (whatever the ASGI version),
    and always closes the body iterator, whose `finally` aborts the requests."""

    def __init__(self, content: AsyncIterator[str], streams: list[RequestStream]):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache"})
        self.streams = streams

    async def __call__(self, scope, receive, send) -> None:
        sender = asyncio.ensure_future(self._send_all(send))
        watcher = asyncio.ensure_future(_watch(receive))
        try:
            await asyncio.wait({sender, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (sender, watcher):
                if not t.done():
                    t.cancel()
            for stream in self.streams:
                stream.abort()
            await asyncio.gather(sender, watcher, return_exceptions=True)
            await self.body_iterator.aclose()

    async def _send_all(self, send) -> None:
        try:
            await self.stream_response(send)
        except OSError:
            pass  # the client went away mid-write


async def _watch(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
