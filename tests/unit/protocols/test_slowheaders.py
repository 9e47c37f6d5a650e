"""The header deadline of ``protocols.api.slowheaders``, on a real uvicorn server on 127.0.0.1."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import uvicorn

from protocols.api.slowheaders import HeaderDeadlineProtocol, with_header_deadline

DEADLINE = 0.6


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    headers = [(b"content-length", b"2")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b"ok"})


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free = int(probe.getsockname()[1])
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=free,
        http=with_header_deadline(HeaderDeadlineProtocol, DEADLINE),
        log_config=None,
        lifespan="off",
        timeout_keep_alive=30,  # longer than the deadline: only the deadline closes
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.05)
    yield free
    server.should_exit = True
    thread.join(10)


def answer(sock: socket.socket) -> bytes:
    """One whole response (the app's body is ``ok``)."""
    sock.settimeout(10)
    data = b""
    while not data.endswith(b"\r\n\r\nok"):
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def closed_within(sock: socket.socket, limit: float) -> float | None:
    """Seconds until the peer closed without a byte; None if it sent something."""
    started = time.monotonic()
    sock.settimeout(limit)
    try:
        data = sock.recv(1)
    except TimeoutError:
        return float("inf")
    return time.monotonic() - started if data == b"" else None


def test_a_connection_that_sends_nothing_is_closed_at_the_deadline(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        closed = closed_within(sock, 10)
    assert closed is not None and DEADLINE * 0.5 < closed < DEADLINE + 3


def test_headers_sent_a_byte_at_a_time_are_cut_off(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        started = time.monotonic()
        sent = 0
        try:
            for byte in b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100:
                sock.sendall(bytes([byte]))
                sent += 1
                time.sleep(0.05)
        except OSError:
            pass
        closed = closed_within(sock, 10)
        waited = time.monotonic() - started
    assert closed is not None and waited < DEADLINE + 3
    assert sent < 100  # cut off long before the headers could have been finished


def test_each_request_on_a_kept_connection_gets_the_deadline_again(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        for _ in range(3):  # answered requests, each well inside the deadline
            time.sleep(DEADLINE / 3)
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert answer(sock).startswith(b"HTTP/1.1 200")
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")  # never finished
        closed = closed_within(sock, 10)
    assert closed is not None and closed < DEADLINE + 3


def test_a_body_after_complete_headers_is_not_the_deadline_s_business(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\n")
        time.sleep(DEADLINE * 2)  # the body is slow, the headers were in time
        sock.sendall(b"body")
        assert answer(sock).startswith(b"HTTP/1.1 200")


def test_the_deadline_must_be_positive() -> None:
    with pytest.raises(ValueError, match='"seconds"'):
        with_header_deadline(HeaderDeadlineProtocol, 0)
