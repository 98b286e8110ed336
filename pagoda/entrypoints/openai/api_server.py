"""The OpenAI-compatible HTTP server (FastAPI + uvicorn) behind `pagoda serve`."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import signal
from argparse import Namespace
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

import pagoda
from pagoda.engine.async_llm import AsyncLLM
from pagoda.entrypoints.openai.errors import OpenAIError, error_body, install_error_handlers
from pagoda.entrypoints.openai.protocol import (ChatCompletionRequest, CompletionRequest,
                                                DetokenizeRequest, DetokenizeResponse,
                                                ErrorResponse, ModelCard, ModelList,
                                                TokenizeRequest, TokenizeResponse)
from pagoda.entrypoints.openai.serving import OpenAIServing
from pagoda.entrypoints.openai.serving_chat import ServingChat
from pagoda.entrypoints.openai.serving_completion import ServingCompletion
from pagoda.gc_tuning import SERVER_GEN0_THRESHOLD, freeze_startup_heap

logger = logging.getLogger("pagoda.api_server")

DEFAULT_MAX_BODY_BYTES = 8 << 20
DEFAULT_MAX_HEADER_BYTES = 32 << 10
OPEN_PATHS = ("/health", "/metrics")  # reachable without the API key (probes, scrapers)
_ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 413, 503)}


async def _send_error(send, status: int, message: str, headers=()) -> None:
    body = JSONResponse(error_body(message, status)).body
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()), *headers]})
    await send({"type": "http.response.body", "body": body})


class GuardMiddleware:
    """Pure ASGI (runs before any routing or parsing): the header cap, the API key, then the
    body cap. The body is read here, up to the cap, and replayed to the app. (h11's own
    limit only applies to headers that arrive in several pieces.)"""

    def __init__(self, app, api_key: Optional[str], max_body_bytes: int,
                 max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES):
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        self.max_body_bytes = max_body_bytes
        self.max_header_bytes = max_header_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if sum(len(k) + len(v) for k, v in scope["headers"]) > self.max_header_bytes:
            return await _send_error(send, 431, "request headers are too large")
        if self.api_key is not None and scope["path"] not in OPEN_PATHS:
            auth = dict(scope["headers"]).get(b"authorization", b"")
            # compare_digest: the time taken must not tell how much of a guess was right.
            if not secrets.compare_digest(auth, b"Bearer " + self.api_key):
                return await _send_error(send, 401, "invalid or missing API key",
                                         [(b"www-authenticate", b"Bearer")])
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            return await _send_error(send, 413, f"request body is larger than "
                                                f"{self.max_body_bytes} bytes")
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body_bytes:
                return await _send_error(send, 413, f"request body is larger than "
                                                    f"{self.max_body_bytes} bytes")
            if not message.get("more_body"):
                break
        await self.app(scope, _replay(b"".join(chunks), receive), send)


def _replay(body: bytes, receive):
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # after the body: only http.disconnect comes
    return replay


def build_app(engine: AsyncLLM, served_model_names: list[str],
              chat_template: Optional[str] = None, api_key: Optional[str] = None,
              max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
              max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES) -> FastAPI:
    app = FastAPI(title="Pagoda OpenAI-compatible API", version=pagoda.__version__)
    install_error_handlers(app)
    app.add_middleware(GuardMiddleware, api_key=api_key, max_body_bytes=max_body_bytes,
                       max_header_bytes=max_header_bytes)
    completion = ServingCompletion(engine, served_model_names)
    chat = ServingChat(engine, served_model_names, chat_template)
    app.state.engine = engine

    @app.get("/health", responses={503: {"model": ErrorResponse}})
    async def health():
        if engine.errored:
            return JSONResponse(error_body("engine core is not running", 503), 503)
        return Response(status_code=200)

    @app.get("/metrics", include_in_schema=False)
    async def metrics():
        return Response(generate_latest(engine.prometheus.registry),
                        media_type=CONTENT_TYPE_LATEST)

    @app.get("/version")
    async def version():
        return {"version": pagoda.__version__}

    @app.get("/v1/models", response_model=ModelList)
    async def models():
        cards = [ModelCard(id=name, root=engine.model_config.model,
                           max_model_len=engine.model_config.max_model_len)
                 for name in served_model_names]
        return ModelList(data=cards)

    @app.post("/v1/completions", responses=_ERRORS)
    async def create_completion(body: CompletionRequest, raw: Request):
        return _as_response(await completion.create(body, raw))

    @app.post("/v1/chat/completions", responses=_ERRORS)
    async def create_chat_completion(body: ChatCompletionRequest, raw: Request):
        return _as_response(await chat.create(body, raw))

    @app.post("/tokenize", response_model=TokenizeResponse, responses=_ERRORS)
    async def tokenize(body: TokenizeRequest):
        return await _tokenize(chat, body)

    @app.post("/detokenize", response_model=DetokenizeResponse, responses=_ERRORS)
    async def detokenize(body: DetokenizeRequest):
        return _detokenize(completion, body)

    _document_400_not_422(app)
    return app


def _document_400_not_422(app: FastAPI) -> None:
    """Validation errors are 400 here, so the schema must not promise FastAPI's 422."""
    build = app.openapi

    def openapi():
        if app.openapi_schema is None:
            schema = build()
            for path in schema.get("paths", {}).values():
                for operation in path.values():
                    operation.get("responses", {}).pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
        return app.openapi_schema
    app.openapi = openapi


def _as_response(result):
    if isinstance(result, Response):
        return result
    return JSONResponse(result.model_dump())


async def _tokenize(chat: ServingChat, body: TokenizeRequest) -> TokenizeResponse:
    chat.check_model(body.model)
    if (body.prompt is None) == (body.messages is None):
        raise OpenAIError("give exactly one of prompt or messages", param="prompt")
    if body.messages is not None:
        _, ids = await chat.render(body.messages, body.add_generation_prompt)
    else:
        ids = await chat.encode(body.prompt, body.add_special_tokens)
    return TokenizeResponse(count=len(ids), max_model_len=chat.max_model_len, tokens=ids)


def _detokenize(serving: OpenAIServing, body: DetokenizeRequest) -> DetokenizeResponse:
    serving.check_model(body.model)
    tokenizer = serving.require_tokenizer()
    vocab = serving.engine.model_config.vocab_size
    bad = next((t for t in body.tokens if not 0 <= t < vocab), None)
    if bad is not None:
        raise OpenAIError(f"token id {bad} is out of the vocabulary (size {vocab})",
                          param="tokens")
    return DetokenizeResponse(prompt=tokenizer.decode(body.tokens))


def load_chat_template(value: Optional[str]) -> Optional[str]:
    """--chat-template takes a file path or the template itself (as vLLM's does)."""
    if value is None:
        return None
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            return f.read()
    if any(c in value for c in "{}\n"):
        return value
    raise ValueError(f"--chat-template: {value!r} is neither a file nor a Jinja template")


async def serve(engine: AsyncLLM, args: Namespace, served_model_names: list[str]) -> None:
    import uvicorn
    api_key = args.api_key or os.environ.get("PAGODA_API_KEY") or None
    app = build_app(engine, served_model_names, load_chat_template(args.chat_template),
                        api_key, args.max_request_body_bytes, args.max_request_header_bytes)
    config = uvicorn.Config(app, host=args.host, port=args.port, http="h11",
                            h11_max_incomplete_event_size=args.max_request_header_bytes,
                            log_level=args.uvicorn_log_level, timeout_keep_alive=5,
                            root_path=args.root_path or "")
    server = uvicorn.Server(config)
    logger.info("serving %s on http://%s:%d (API key %s)", ", ".join(served_model_names),
                args.host, args.port, "required" if api_key else "off")
    await server.serve()


def _exit_on_sigterm(*_) -> None:
    raise SystemExit(0)


def run_server(args: Namespace, engine_args) -> None:
    names = args.served_model_name or [engine_args.model]
    engine_args.served_model_name = names[0]
    engine = AsyncLLM.from_engine_args(engine_args, log_stats=not args.disable_log_stats)
    freeze_startup_heap(SERVER_GEN0_THRESHOLD)
    # uvicorn re-raises SIGTERM after its graceful shutdown; turning it into SystemExit lets
    # the `finally` below stop the engine core instead of leaving it to notice it is orphaned.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        _event_loop_runner()(serve(engine, args, names))
    finally:
        engine.shutdown()


def _event_loop_runner():
    """uvloop's runner where it is installed (as vLLM's server): at 512 streams of a trivial
    model on the 2-core development machine the API server spent 50-52 us of CPU per streamed
    chunk on it against 54-61 on asyncio's own loop (docs/benchmarks.md)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run
    return uvloop.run
