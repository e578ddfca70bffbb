"""Connection limits (service/protocol.py) over real sockets: oversized headers, slow headers and
slow bodies are cut off, while normal requests, keep-alive and /health go on (short timeouts).
Then `ace serve`: it runs that protocol, exports the limits and warns when bound beyond loopback
without an API key."""

from __future__ import annotations

import contextlib
import itertools
import json
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
import uvicorn
from uvicorn.importer import import_from_string

from service.config import ConnectionSettings, Settings
from service.protocol import ConnectionLimitsProtocol
from tests.service.helpers import TEST_DEVICE, block_texture, png_bytes, running_server
from training import cmd_serve
from training.cli import build_parser

HEADER_TIMEOUT_S = 1.0
BODY_TIMEOUT_S = 1.5
MARGIN_S = 2.0  # scheduling slack on a loaded 2-core machine
GIVE_UP_S = HEADER_TIMEOUT_S + MARGIN_S + 1  # a client waits no longer for the server to act
LIMITS = ConnectionSettings(max_header_bytes=16384, header_timeout_s=HEADER_TIMEOUT_S,
                            body_timeout_s=BODY_TIMEOUT_S)
IMAGE = png_bytes(block_texture(5, 96, 80))


@pytest.fixture(scope="module")
def address(encoder_dir: Path) -> Iterator[tuple[str, int]]:
    """(host, port) of one server with the short limits, shared by the module's tests."""
    settings = Settings(encoder=encoder_dir, device=TEST_DEVICE, poll_interval_s=0)  # type: ignore[call-arg]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ConnectionLimitsProtocol, "limits", LIMITS)
        with running_server(settings) as url:
            parts = urlsplit(url)
            assert parts.hostname is not None and parts.port is not None
            yield parts.hostname, parts.port


def connect(address: tuple[str, int]) -> socket.socket:
    sock = socket.create_connection(address, timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response with a Content-Length body: (status, headers, body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    headers = {name.lower(): value for name, value in headers.items()}
    while len(body) < int(headers["content-length"]):
        chunk = sock.recv(65536)
        assert chunk, "connection closed inside the body"
        body += chunk
    return int(lines[0].split()[1]), headers, body


def closed_by_server(sock: socket.socket) -> bool:
    """Reads to the end of the stream: True when the server ended it (EOF or reset)."""
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    except TimeoutError:
        return False
    return True


def get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode()


def test_an_8_mib_header_gets_a_431_naming_the_setting(address: tuple[str, int]) -> None:
    with connect(address) as sock:
        request = get("/health").replace(b"\r\n\r\n", b"\r\nX-Big: " + b"a" * (8 * 1024 * 1024) + b"\r\n\r\n")
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(request)  # the server answers after ~16 KiB and drops the rest
        status, headers, body = read_response(sock)
        assert status == 431 and headers["content-type"] == "application/json"
        assert headers["connection"] == "close"
        detail = json.loads(body)
        assert "ACE_MAX_HEADER_BYTES" in detail["detail"] and detail["request_id"]
        assert closed_by_server(sock)


def test_a_large_head_in_one_read_is_refused_too(address: tuple[str, int]) -> None:
    with connect(address) as sock:  # 20 KiB arrive in one read: h11 parses it whole
        sock.sendall(get("/health").replace(b"\r\n\r\n", b"\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n"))
        assert read_response(sock)[0] == 431
    with connect(address) as sock:  # just under the limit still passes
        sock.sendall(get("/health").replace(b"\r\n\r\n", b"\r\nX-Big: " + b"a" * 15000 + b"\r\n\r\n"))
        assert read_response(sock)[0] == 200


def trickle(sock: socket.socket, pieces: Iterator[bytes], give_up_at: float) -> bytes:
    """Send `pieces` one at a time (the socket's timeout paces them) until the server answers and
    closes, the pieces run out or `give_up_at`; returns what the server sent."""
    received = b""
    for piece in pieces:
        if time.monotonic() > give_up_at:
            break
        try:
            sock.send(piece)
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except (BrokenPipeError, ConnectionResetError):
            break
        if not chunk:
            break
        received += chunk
    return received


def test_slow_headers_are_cut_off_while_health_answers(address: tuple[str, int]) -> None:
    clients = 32
    closed_after: list[float] = []
    answers: list[bytes] = []
    lock = threading.Lock()

    def slow_client() -> None:  # a byte every 50 ms, never finishing its headers
        with connect(address) as sock:
            sock.settimeout(0.05)
            started = time.monotonic()
            partial = get("/health").rstrip(b"\r\n") + b"\r\nX-Slow: " + b"s" * 10_000
            received = trickle(sock, (bytes([b]) for b in partial), started + GIVE_UP_S)
            with lock:
                closed_after.append(time.monotonic() - started)
                answers.append(received)

    threads = [threading.Thread(target=slow_client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    health_seconds = []
    with httpx.Client(base_url=f"http://{address[0]}:{address[1]}", timeout=10) as client:
        while any(thread.is_alive() for thread in threads):
            started = time.monotonic()
            assert client.get("/health").status_code == 200
            health_seconds.append(time.monotonic() - started)
            time.sleep(0.05)
    for thread in threads:
        thread.join()
    assert len(closed_after) == clients
    assert max(closed_after) < HEADER_TIMEOUT_S + MARGIN_S, closed_after
    assert min(closed_after) > HEADER_TIMEOUT_S * 0.9, closed_after
    assert all(answer.startswith(b"HTTP/1.1 408 ") and b"ACE_HEADER_TIMEOUT_S" in answer
               for answer in answers)
    assert len(health_seconds) >= 5 and max(health_seconds) < 1.0, health_seconds


def test_a_connection_that_sends_nothing_is_closed_silently(address: tuple[str, int]) -> None:
    with connect(address) as sock:
        sock.settimeout(GIVE_UP_S)
        started = time.monotonic()
        assert sock.recv(65536) == b""
        assert HEADER_TIMEOUT_S * 0.9 < time.monotonic() - started < HEADER_TIMEOUT_S + MARGIN_S


def test_a_slow_body_is_cut_off_with_a_408(address: tuple[str, int]) -> None:
    with connect(address) as sock:
        sock.sendall(b"POST /match HTTP/1.1\r\nHost: test\r\n"
                     b"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 100000\r\n\r\n"
                     b'--b\r\nContent-Disposition: form-data; name="image"; filename="q.png"\r\n\r\n')
        started = time.monotonic()
        sock.settimeout(0.05)
        received = trickle(sock, itertools.repeat(b"x"), started + BODY_TIMEOUT_S + MARGIN_S + 1)
        elapsed = time.monotonic() - started
    assert BODY_TIMEOUT_S * 0.9 < elapsed < BODY_TIMEOUT_S + MARGIN_S, elapsed
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 "), received
    assert "ACE_BODY_TIMEOUT_S" in json.loads(body)["detail"]


def test_a_normal_match_and_keep_alive_still_work(address: tuple[str, int]) -> None:
    with httpx.Client(base_url=f"http://{address[0]}:{address[1]}", timeout=60) as client:
        answer = client.post("/match", files=[("image", ("q.png", IMAGE, "image/png"))],
                             data={"points": "[[40, 48]]"})
        assert answer.status_code == 200, answer.text
    with connect(address) as sock:  # three requests on one connection, an idle pause between them
        for pause in (0.0, HEADER_TIMEOUT_S * 1.5, 0.0):
            time.sleep(pause)  # idle between requests is keep-alive time, not header time
            sock.sendall(get("/health"))
            status, _, body = read_response(sock)
            assert status == 200 and json.loads(body) == {"status": "ok"}


def test_concurrent_normal_requests_are_unaffected(address: tuple[str, int]) -> None:
    url = f"http://{address[0]}:{address[1]}"
    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(lambda _: httpx.get(f"{url}/health", timeout=10).status_code, range(32)))
    assert statuses == [200] * 32


# ----------------------------------------------------------------------------- ace serve


@pytest.mark.parametrize(("host", "key", "warned"), [
    ("127.0.0.1", None, False), ("127.0.0.2", None, False), ("::1", None, False), ("[::1]", None, False),
    ("localhost", None, False), ("0.0.0.0", None, True), ("::", None, True), ("10.1.2.3", None, True),
    ("ace.hospital.example", None, True), ("0.0.0.0", "k3y", False), ("0.0.0.0", "", True),
])
def test_the_exposure_warning_needs_a_public_bind_and_no_key(host: str, key: str | None, warned: bool,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert cmd_serve.warn_if_exposed(host, key) is warned
    out = capsys.readouterr()
    assert out.out == ""
    if warned:
        assert host in out.err and "403" in out.err and "ACE_API_KEY" in out.err and "--api-key" in out.err
    else:
        assert out.err == ""


def test_ace_serve_runs_the_protocol_exports_the_limits_and_warns(monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    for variable in (*cmd_serve.ENV_OPTIONS.values(), "ACE_HOST"):
        monkeypatch.delenv(variable, raising=False)  # restored, as they were, after the test
    calls: list[dict[str, object]] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: calls.append({"app": app, **kwargs}))
    args = build_parser().parse_args(["serve", "--encoder", "enc", "--host", "0.0.0.0", "--max-header-bytes",
                                      "32768", "--header-timeout-s", "5", "--body-timeout-s", "30"])
    assert cmd_serve.run_serve(args) == 0
    assert "WARNING" in capsys.readouterr().err
    assert calls and calls[0]["http"] == cmd_serve.PROTOCOL and calls[0]["host"] == "0.0.0.0"
    assert import_from_string(cmd_serve.PROTOCOL) is ConnectionLimitsProtocol
    assert ConnectionSettings() == ConnectionSettings(max_header_bytes=32768, header_timeout_s=5,
                                                      body_timeout_s=30)  # read from the ACE_ variables
    monkeypatch.setenv("ACE_API_KEY", "k3y")
    assert cmd_serve.run_serve(build_parser().parse_args(["serve", "--host", "0.0.0.0"])) == 0
    assert capsys.readouterr().err == ""
