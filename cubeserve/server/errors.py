"""OpenAI-style error responses: ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from cubeserve.engine.tokenizer_manager import EngineDeadError

logger = logging.getLogger(__name__)

CLIENT_CLOSED_REQUEST = 499  # nginx's status for a request whose client disconnected

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    503: "server_overloaded",
}


class APIError(Exception):
    """An error the client should see as an OpenAI error body with ``status_code``."""

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers


class ClientDisconnected(Exception):
    """The client went away before its response was ready."""


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


def error_body(status_code: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {
        "error": {
            "message": message,
            "type": _ERROR_TYPES.get(status_code, "internal_error" if status_code >= 500 else "invalid_request_error"),
            "param": param,
            "code": code,
        }
    }


def error_response(
    status_code: int,
    message: str,
    *,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(error_body(status_code, message, param, code), status_code, headers=headers)


# Pydantic labels union members in error locations ("str", "list[int]", "constrained-str",
# "tagged-union[...]"); they are types, not fields of the request.
_UNION_MEMBER_LABEL = re.compile(r"^(str|int|float|bool)$|[\[\]-]")


def field_path(loc: Sequence[Any]) -> str:
    """``("body", "messages", 0, "content", "list[...]", 0, "image_url", "image_url", "url")``
    -> ``"messages.0.content.0.image_url.url"``.

    A tagged union (content parts) also puts the tag into the location; OpenAI's schema names
    the part's payload field after its tag, so a repeated component is that tag and is dropped.
    """
    parts: list[str] = []
    for item in loc:
        part = str(item)
        if (part == "body" and not parts) or _UNION_MEMBER_LABEL.search(part):
            continue
        if parts and parts[-1] == part:
            continue
        parts.append(part)
    return ".".join(parts)


def _most_relevant(errors: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """For a value that matches no member of a union pydantic reports one error per member;
    the member that got furthest, other than by a plain type mismatch, explains it best."""

    def rank(error: dict[str, Any]) -> tuple[bool, int]:
        return error["type"].endswith("_type"), -len(error.get("loc", ()))

    return min(errors, key=rank)


def validation_message(errors: Sequence[dict[str, Any]]) -> tuple[str, str | None]:
    """The client-facing message and the offending field (``param``) of a validation failure."""
    error = _most_relevant(errors)
    if error["type"] == "json_invalid":
        return f"request body is not valid JSON: {error.get('ctx', {}).get('error', error['msg'])}", None
    param = field_path(error.get("loc", ())) or None
    message = error["msg"].removeprefix("Value error, ")
    return (message if param is None else f"{param}: {message}"), param


async def _api_error_handler(_: Request, exc: APIError) -> JSONResponse:
    return error_response(exc.status_code, exc.message, param=exc.param, code=exc.code, headers=exc.headers)


async def _validation_error_handler(_: Request, exc: RequestValidationError) -> JSONResponse:
    message, param = validation_message(exc.errors())
    return error_response(400, message, param=param)


async def _http_error_handler(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    message = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
    return error_response(exc.status_code, message, headers=exc.headers)


async def _engine_dead_handler(_: Request, exc: EngineDeadError) -> JSONResponse:
    return error_response(503, str(exc))


async def _client_disconnected_handler(_: Request, exc: ClientDisconnected) -> Response:
    return Response(status_code=CLIENT_CLOSED_REQUEST)  # nobody reads it; logs and metrics do


async def _unexpected_error_handler(_: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error while serving a request")
    return error_response(500, f"internal server error: {type(exc).__name__}")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _api_error_handler)
    app.add_exception_handler(RequestValidationError, _validation_error_handler)
    app.add_exception_handler(StarletteHTTPException, _http_error_handler)
    app.add_exception_handler(EngineDeadError, _engine_dead_handler)
    app.add_exception_handler(ClientDisconnected, _client_disconnected_handler)
    app.add_exception_handler(Exception, _unexpected_error_handler)
