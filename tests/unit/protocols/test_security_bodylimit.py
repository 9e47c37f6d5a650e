"""Request bodies bounded in size and time (``protocols.api.bodylimit``), on a real FastAPI app.

The app is driven through the ASGI interface the way uvicorn drives it: the body
arrives in pieces, possibly without a ``Content-Length``, possibly never. The
integration suite (``tests/integration/test_security.py``) does the same against
the running coordinator and node over sockets.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from protocols.api.bodylimit import BodyLimit

LIMIT = 1000


class Doc(BaseModel):
    text: str


def app_under_test(seen: list[str]) -> Any:
    app = FastAPI()

    @app.post("/doc")
    def doc(body: Doc) -> dict[str, int]:
        seen.append("doc")
        return {"length": len(body.text)}

    @app.put("/raw")
    async def raw(request: Request) -> dict[str, int]:
        data = bytearray()
        async for piece in request.stream():
            data.extend(piece)
        seen.append("raw")
        return {"length": len(data)}

    @app.get("/slow")
    def slow() -> StreamingResponse:
        async def parts() -> Any:
            for _ in range(6):
                await asyncio.sleep(0.1)
                yield b"x"

        return StreamingResponse(parts())

    return BodyLimit(app, limit=lambda _: LIMIT, idle_timeout_s=0.3)


def call(
    app: Any,
    method: str,
    path: str,
    pieces: list[bytes],
    content_length: int | None = None,
    then: Callable[[], Awaitable[None]] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """One request: ``pieces`` of body, then ``then`` (say, wait for ever) instead of the end."""
    headers = [(b"content-type", b"application/json")]
    if content_length is not None:
        headers.append((b"content-length", str(content_length).encode()))
    scope = {
        "type": "http",
        "http_version": "1.1",
        "method": method,
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "scheme": "http",
        "headers": headers,
        "client": ("127.0.0.1", 1234),
        "server": ("127.0.0.1", 80),
    }
    queue = list(pieces)
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if queue:
            piece = queue.pop(0)
            return {"type": "http.request", "body": piece, "more_body": bool(queue) or bool(then)}
        if then is not None:
            await then()
        await asyncio.Event().wait()  # the client went quiet: a disconnect never comes
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(asyncio.wait_for(app(scope, receive, send), 10))
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return (
        start["status"],
        {k.decode(): v.decode() for k, v in start["headers"]},
        body,
    )


async def _forever() -> None:
    await asyncio.Event().wait()


def test_a_body_within_the_limit_reaches_the_route() -> None:
    seen: list[str] = []
    app = app_under_test(seen)
    body = json.dumps({"text": "a" * 500}).encode()

    status, _, answer = call(app, "POST", "/doc", [body[:100], body[100:]], len(body))

    assert (status, json.loads(answer), seen) == (200, {"length": 500}, ["doc"])


@pytest.mark.parametrize("declared", [LIMIT + 1, 10**15, -1])
def test_a_declared_length_over_the_limit_is_refused_before_anything_is_read(
    declared: int,
) -> None:
    seen: list[str] = []
    app = app_under_test(seen)

    status, headers, answer = call(app, "POST", "/doc", [], declared, then=_forever)

    assert status == 413 and seen == []
    assert json.loads(answer)["code"] == "request_too_large"
    assert headers["connection"] == "close"


@pytest.mark.parametrize("route", [("POST", "/doc"), ("PUT", "/raw")])
def test_a_chunked_body_that_grows_past_the_limit_is_refused(route: tuple[str, str]) -> None:
    seen: list[str] = []
    app = app_under_test(seen)

    # no Content-Length: chunked transfer encoding, and the chunks never end
    status, _, answer = call(app, *route, [b"x" * 400] * 10, then=_forever)

    assert (status, json.loads(answer)["code"], seen) == (413, "request_too_large", [])


@pytest.mark.parametrize("route", [("POST", "/doc"), ("PUT", "/raw")])
def test_a_body_that_stops_arriving_is_cut_off(route: tuple[str, str]) -> None:
    seen: list[str] = []
    app = app_under_test(seen)

    # a Content-Length that lies: 500 bytes promised, 10 sent, then nothing
    status, headers, answer = call(app, *route, [b'{"text":"a'], 500, then=_forever)

    body = json.loads(answer)
    assert (status, body["code"], body["retryable"], seen) == (408, "request_timeout", True, [])
    assert headers["connection"] == "close"


def test_a_response_streamed_after_the_body_is_not_cut_by_the_body_timeout() -> None:
    app = app_under_test([])

    status, _, answer = call(app, "GET", "/slow", [b""])

    assert (status, answer) == (200, b"xxxxxx")
