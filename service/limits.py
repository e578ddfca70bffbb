"""Request body limit enforced while the body streams in (not after it has been buffered)."""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import send_error


class BodyLimitMiddleware:
    """413 with a JSON detail as soon as Content-Length or the bytes received pass `max_bytes`."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await _send_413(send, self._message(declared), scope)
            return
        await self.app(scope, self._counting(receive), send)

    def _counting(self, receive: Receive) -> Receive:
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                # FastAPI re-raises HTTPExceptions from body parsing, so this becomes the response
                raise HTTPException(413, self._message(received))
            return message

        return counted

    def _message(self, size: int) -> str:
        return (f"request body of {size} bytes or more exceeds the limit of {self.max_bytes} bytes "
                "(ACE_MAX_UPLOAD_BYTES); send smaller or fewer images")


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _send_413(send: Send, detail: str, scope: Scope) -> None:
    rid = scope.get("state", {}).get("request_id", "")
    await send_error(send, 413, detail, rid, [(b"connection", b"close")])
