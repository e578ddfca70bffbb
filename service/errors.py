"""One error format for every 4xx and 5xx: JSON `{"detail": "...", "request_id": "..."}`.

- `ApiError` carries a status code and a message that says what to do; routes raise it.
- Validation errors (a missing or mistyped field) name the field and never echo the input.
- Starlette's own HTTP errors (404 route, 405, 400 from a malformed multipart body) get the format.
- Anything else is a 500 whose traceback is logged with the request id and never sent.
Every response carries `X-Request-ID` (the client's, when it sent a sane one, else a new one).
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ace_model.preprocess import ImageDecodeError
from service.schemas import ErrorResponse

log = logging.getLogger("ace.service")

REQUEST_ID_HEADER = "X-Request-ID"
CLIENT_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")  # anything else is replaced, not logged
DECODE_STATUS = {
    "unsupported": 415,  # not an image format we read
    "corrupt": 422,  # a known format whose content is broken or truncated
    "multiframe": 422,
    "too_large": 413,  # too many pixels once decoded
}


ERROR_MEANING = {
    400: "the request is not well-formed (e.g. a broken multipart body)",
    401: "missing or wrong API key",
    403: "admin routes are disabled: no API key is configured",
    404: "not found",
    408: "the request did not arrive in time",
    413: "too large: request body, image pixels or this request's share of the memory budget",
    415: "an upload that is not an image this service reads",
    422: "a field is missing or invalid, or an image is corrupt; `detail` names it",
    429: "busy (inference queue or memory budget full); retry after Retry-After seconds",
    500: "internal error, logged under `request_id`",
    503: "not ready (no index served yet, or the inference worker is down)",
}


def documented(*codes: int, has_inputs: bool = True) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for a route's errors: every route may answer 500, one with inputs 422."""
    always = {422, 500} if has_inputs else {500}
    return {code: {"model": ErrorResponse, "description": ERROR_MEANING[code]}
            for code in sorted({*codes, *always})}


class ApiError(Exception):
    def __init__(self, status_code: int, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status_code = status_code
        self.detail = detail
        self.headers = headers


def invalid(detail: str) -> ApiError:
    return ApiError(422, detail)


def from_decode_error(err: ImageDecodeError, what: str) -> ApiError:
    return ApiError(DECODE_STATUS.get(err.kind, 422), f"{what}: {err}")


def request_id(request: Request) -> str:
    return str(request.scope.get("state", {}).get("request_id", ""))


def error_response(request: Request, status: int, detail: str,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail, "request_id": request_id(request)}, status_code=status,
                        headers=headers)


async def _api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return error_response(request, exc.status_code, exc.detail, exc.headers)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
    return error_response(request, exc.status_code, detail, dict(exc.headers) if exc.headers else None)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return error_response(request, 422, describe_validation(exc.errors()))


def describe_validation(errors: Sequence[Any]) -> str:
    """FastAPI's error list as one sentence per field, without the values that were sent."""
    parts = [f"{_field(e.get('loc', ()))}: {_reason(e)}" for e in errors[:5]]
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return "; ".join(parts) + more


def _field(location: Sequence[Any]) -> str:
    where = [str(part) for part in location]
    if where and where[0] in ("body", "query", "header", "path", "cookie"):
        kind, name = where[0], ".".join(where[1:]) or "(the whole body)"
        return f"{kind} field `{name}`" if kind != "body" else f"form field `{name}`"
    return ".".join(where) or "request"


def _reason(error: Any) -> str:
    if error.get("type") == "missing":
        return "is required"
    return str(error.get("msg", "is invalid")).removeprefix("Value error, ")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)


class RequestIdMiddleware:
    """Outermost layer: gives each request an id, and turns an unhandled exception into a logged
    500 with that id (a response already started cannot be replaced; the connection is closed)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = _incoming_id(scope) or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        started = False

        async def with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
            await send(message)

        try:
            await self.app(scope, receive, with_id)
        except Exception:
            log.exception("request %s %s failed (request id %s)", scope.get("method"), scope.get("path"), rid)
            if started:  # too late for a 500: let the server close the connection as it sees fit
                raise
            await _send_500(send, rid)


def _incoming_id(scope: Scope) -> str | None:
    for name, value in scope.get("headers", []):
        if name == b"x-request-id":
            text = value.decode("latin-1")
            return text if CLIENT_REQUEST_ID.fullmatch(text) else None
    return None


async def _send_500(send: Send, rid: str) -> None:
    detail = f"internal error; it has been logged with request id {rid}: please report that id"
    await send_error(send, 500, detail, rid, [(b"x-request-id", rid.encode())])


def error_body(detail: str, rid: str) -> bytes:
    """The one error format, for answers sent below FastAPI's handlers."""
    return json.dumps({"detail": detail, "request_id": rid}).encode()


def json_headers(body: bytes) -> list[tuple[bytes, bytes]]:
    return [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]


async def send_error(send: Send, status: int, detail: str, rid: str,
                     headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
    """An error answer from ASGI middleware (no Request object there)."""
    body = error_body(detail, rid)
    await send({"type": "http.response.start", "status": status, "headers": [*json_headers(body), *headers]})
    await send({"type": "http.response.body", "body": body})
