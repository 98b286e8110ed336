"""OpenAI's error envelope `{"error": {"message", "type", "param", "code"}}` for every failure.

Messages are short and never repeat the client's input back (a 1 MB prompt must not come
back in an error body, nor land in a log line)."""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)

MAX_MESSAGE_CHARS = 300
_TYPES = {400: "invalid_request_error", 401: "authentication_error",
          404: "not_found_error", 405: "invalid_request_error",
          413: "invalid_request_error", 431: "invalid_request_error",
          503: "service_unavailable", 500: "internal_server_error"}


class OpenAIError(Exception):
    def __init__(self, message: str, status: int = 400, param: Optional[str] = None):
        super().__init__(message)
        self.message, self.status, self.param = message, status, param


def clip(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


def error_body(message: str, status: int, param: Optional[str] = None) -> dict:
    return {"error": {"message": clip(message), "type": _TYPES.get(status, "error"),
                      "param": param, "code": status}}


def error_response(message: str, status: int = 400, param: Optional[str] = None,
                   headers: Optional[dict] = None) -> JSONResponse:
    return JSONResponse(error_body(message, status, param), status_code=status,
                        headers=headers)


def _validation_message(exc: RequestValidationError) -> tuple[str, Optional[str]]:
    """'field.path: what is wrong' for the first error; pydantic's `input` is left out."""
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    kind = first.get("type", "")
    if kind in ("json_invalid", "json_type"):
        return "request body is not valid JSON", None
    if kind == "model_attributes_type" or (kind == "dict_type" and not loc):
        return "request body must be a JSON object", None
    message = f"{param}: {first.get('msg', 'invalid value')}" if param else first.get("msg")
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more error(s))"
    return message, param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return error_response(message, 400, param)

    @app.exception_handler(OpenAIError)
    async def _openai(request: Request, exc: OpenAIError):
        return error_response(exc.message, exc.status, exc.param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        status = exc.status_code
        message = exc.detail if isinstance(exc.detail, str) else HTTPStatus(status).phrase
        return error_response(message, status, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        logger.exception("unhandled error on %s", request.url.path)
        return error_response("internal server error", 500)
