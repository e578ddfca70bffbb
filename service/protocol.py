"""Limits of the HTTP connection itself, enforced in uvicorn's HTTP/1.1 protocol (docs/service.md).

The app only sees a request once its request line and headers have arrived, and only the bytes of
a body it asks for, so these limits sit below it, in the protocol uvicorn runs per connection:

- request line + headers larger than `ACE_MAX_HEADER_BYTES` -> 431, then the connection closes;
- request line + headers not complete within `ACE_HEADER_TIMEOUT_S` (counted from the connection's
  start, or from the first byte of a later request on a kept-alive connection) -> 408 and close
  (a connection that has sent no byte of a request is closed without an answer);
- a body not complete within `ACE_BODY_TIMEOUT_S` (counted from the end of its headers) -> 408 and
  close (only a close when the app has already started its answer).

Answers are JSON `{"detail": ..., "request_id": ...}` like the app's errors. Idle kept-alive
connections keep uvicorn's own `timeout_keep_alive`. `ace serve` passes this class to uvicorn as
`http="service.protocol:ConnectionLimitsProtocol"` (each worker process imports it and reads the
`ACE_` variables once, so a bad value stops the start-up).
"""

from __future__ import annotations

import asyncio
import http
import logging
import uuid
from typing import Any, ClassVar

import h11
from uvicorn.config import Config
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.server import ServerState

from service.config import ConnectionSettings
from service.errors import error_body, json_headers

PROTOCOL = "service.protocol:ConnectionLimitsProtocol"  # uvicorn's `http` import string
LINGER_S = 2.0  # after a 408 / 431: how long what the client still sends is read and dropped

log = logging.getLogger("uvicorn.error")


class LimitedConnection(h11.Connection):
    """h11's server connection, refusing request heads larger than `max_head_bytes` with a 431 hint.

    h11 itself refuses an incomplete head once its buffer passes the limit; a head that arrived
    complete in one read is measured when it is parsed.
    """

    def __init__(self, max_head_bytes: int) -> None:
        super().__init__(h11.SERVER, max_incomplete_event_size=max_head_bytes)
        self.max_head_bytes = max_head_bytes
        self.head_too_large = False

    def next_event(self) -> h11.Event | type[h11.NEED_DATA] | type[h11.PAUSED]:
        try:
            event = super().next_event()
        except h11.RemoteProtocolError as err:
            self.head_too_large = err.error_status_hint == 431
            raise
        if isinstance(event, h11.Request) and head_size(event) > self.max_head_bytes:
            self.head_too_large = True
            raise h11.RemoteProtocolError("request head too large", error_status_hint=431)
        return event


def head_size(request: h11.Request) -> int:
    """Bytes of the request line and headers as sent in their canonical form (CRLFs included)."""
    line = len(request.method) + len(request.target) + len(b"  HTTP/1.1\r\n")
    fields = sum(len(name) + len(value) + 4 for name, value in request.headers.raw_items())
    return line + fields + 2


class ConnectionLimitsProtocol(H11Protocol):
    """uvicorn's h11 protocol plus the header size limit and the header and body timeouts."""

    # the ACE_ variables, read once at import; tests swap in their own ConnectionSettings
    limits: ClassVar[ConnectionSettings] = ConnectionSettings()  # type: ignore[call-arg]

    def __init__(self, config: Config, server_state: ServerState, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.conn: LimitedConnection = LimitedConnection(self.limits.max_header_bytes)
        self.header_timer: asyncio.TimerHandle | None = None
        self.body_timer: asyncio.TimerHandle | None = None
        self.head_started = False  # a byte of the current request's head has arrived
        self.lingering = False  # answered with a 408 / 431: the connection only waits to close

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.header_timer = self.loop.call_later(self.limits.header_timeout_s, self._header_timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        self._cancel_body_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.lingering:
            return
        if self.conn.their_state is h11.IDLE:  # bytes of a request head (the next one, after keep-alive)
            self.head_started = True
            if self.header_timer is None:
                self.header_timer = self.loop.call_later(self.limits.header_timeout_s,
                                                         self._header_timed_out)
        super().data_received(data)

    def handle_events(self) -> None:
        super().handle_events()
        if self.lingering:
            return
        state = self.conn.their_state
        if state is not h11.IDLE:  # the head is complete
            self._cancel_header_timer()
            self.head_started = False
        if state is h11.SEND_BODY:
            if self.body_timer is None:
                self.body_timer = self.loop.call_later(self.limits.body_timeout_s, self._body_timed_out)
        else:
            self._cancel_body_timer()

    def shutdown(self) -> None:
        if self.lingering:
            self.transport.close()
            return
        super().shutdown()

    def send_400_response(self, msg: str) -> None:
        if not self.conn.head_too_large:
            super().send_400_response(msg)
            return
        log.warning("%s: request head larger than %d bytes refused (431)", self._peer(),
                    self.limits.max_header_bytes)
        self._answer_and_close(431, f"request line and headers exceed {self.limits.max_header_bytes} bytes "
                                    "(ACE_MAX_HEADER_BYTES); send fewer or shorter headers")

    def _header_timed_out(self) -> None:
        self.header_timer = None
        if self.transport.is_closing() or self.lingering:
            return
        if not self.head_started:  # nothing sent: an unused (e.g. preconnected) connection
            self.transport.close()
            return
        log.warning("%s: request line and headers not complete within %g s: connection closed (408)",
                    self._peer(), self.limits.header_timeout_s)
        self._answer_and_close(408, "request line and headers did not arrive within "
                                    f"{self.limits.header_timeout_s:g} s (ACE_HEADER_TIMEOUT_S)")

    def _body_timed_out(self) -> None:
        self.body_timer = None
        if self.transport.is_closing() or self.lingering:
            return
        cycle = self.cycle
        answered = cycle is None or cycle.response_started
        if cycle is not None:  # the app's receive() now sees a disconnect and its answer is dropped
            cycle.disconnected = True
            cycle.message_event.set()
        log.warning("%s: request body not complete within %g s: connection closed%s", self._peer(),
                    self.limits.body_timeout_s, "" if answered else " (408)")
        if answered:
            self.transport.close()
            return
        self._answer_and_close(408, "request body did not arrive within "
                                    f"{self.limits.body_timeout_s:g} s (ACE_BODY_TIMEOUT_S)")

    def _answer_and_close(self, status: int, detail: str) -> None:
        request_id = uuid.uuid4().hex
        body = error_body(detail, request_id)
        headers = [*self.server_state.default_headers, *json_headers(body),
                   (b"x-request-id", request_id.encode()), (b"connection", b"close")]
        head = [f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}".encode()]
        head += [name + b": " + value for name, value in headers]
        self.transport.write(b"\r\n".join(head) + b"\r\n\r\n" + body)
        self._close_after_answer()

    def _close_after_answer(self) -> None:
        """A lingering close: closing with unread bytes from the client (the rest of an oversized
        head, a body) would reset the connection and could destroy the answer before the client
        reads it. So: end our side (FIN after the answer), drop what still arrives, and close at the
        client's end of stream or after LINGER_S."""
        self.lingering = True
        self._cancel_header_timer()
        self._cancel_body_timer()
        if not self.transport.can_write_eof():  # TLS: no half-close
            self.transport.close()
            return
        self.transport.write_eof()
        self.flow.resume_reading()
        self.loop.call_later(LINGER_S, self.transport.close)  # eof_received closes it sooner

    def _peer(self) -> str:
        return f"{self.client[0]}:{self.client[1]}" if self.client else "client"

    def _cancel_header_timer(self) -> None:
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None

    def _cancel_body_timer(self) -> None:
        if self.body_timer is not None:
            self.body_timer.cancel()
            self.body_timer = None
