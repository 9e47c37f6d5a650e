"""Request bodies bounded in size and in time, for both services' HTTP APIs.

uvicorn puts no bound on a request body and FastAPI reads a JSON body whole into
memory before anything else runs, so without this a single request could fill
the server's memory, and a sender that stops half-way (or trickles one byte a
minute) would hold its connection for ever. ``BodyLimit`` is an ASGI middleware:

* a ``Content-Length`` over the route's limit is answered ``413`` at once,
  before a byte of the body is read (nor its caller checked: nothing is spent on
  it); a body without one (chunked) is counted as it arrives and refused the
  same way once it passes the limit;
* a body that stops arriving for ``idle_timeout_s`` is answered ``408``;
* either way the answer is the shared ``ErrorBody`` (``request_too_large``,
  ``request_timeout``, retryable only for the timeout), the connection is closed,
  and the route has not run — or, where it was already reading, whatever it was
  about to answer is replaced.

What each route may take is the caller's ``limit`` function (an upload's file
chunks are larger than a JSON document).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class _RefusedError(Exception):
    """Raised from ``receive`` to stop the route reading a body that is refused."""


@dataclass
class _Refusal:
    status: int
    code: str
    message: str
    retryable: bool


def _mib(limit: int) -> str:
    return f"{limit / 2**20:g} MiB"


class BodyLimit:
    """Refuse request bodies over ``limit(scope)`` bytes or idle for ``idle_timeout_s``."""

    def __init__(self, app: ASGIApp, limit: Callable[[Scope], int], idle_timeout_s: float) -> None:
        self.app = app
        self.limit = limit
        self.idle_timeout_s = idle_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit(scope)
        declared = _content_length(scope)
        if declared is not None and (declared < 0 or declared > limit):
            await _answer(send, _too_large(limit))
            return
        refused: list[_Refusal] = []
        started = [False]
        received = [0]
        done = [False]

        async def limited() -> Message:
            if refused:
                raise _RefusedError
            if done[0]:
                # the body is in: what is left to hear is a disconnect, with no deadline
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.idle_timeout_s)
            except TimeoutError:
                refused.append(
                    _Refusal(
                        408,
                        "request_timeout",
                        f"the request body stopped arriving for {self.idle_timeout_s:g} s; "
                        "send it again",
                        True,
                    )
                )
                raise _RefusedError from None
            if message["type"] == "http.request":
                received[0] += len(message.get("body", b""))
                if received[0] > limit:
                    refused.append(_too_large(limit))
                    raise _RefusedError
                done[0] = not message.get("more_body", False)
            else:
                done[0] = True
            return message

        async def answering(message: Message) -> None:
            if refused:
                # The route failed on the refused body (its own error for it is a
                # 400 or a 500): what it would answer is replaced by the refusal.
                if message["type"] == "http.response.start" and not started[0]:
                    started[0] = True
                    await _answer(send, refused[0])
                return
            if message["type"] == "http.response.start":
                started[0] = True
            await send(message)

        try:
            await self.app(scope, limited, answering)
        except _RefusedError:
            if not started[0]:
                started[0] = True
                await _answer(send, refused[0])
        except Exception:
            if not refused:
                raise
            if not started[0]:
                started[0] = True
                await _answer(send, refused[0])


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name.lower() == b"content-length":
            try:
                return int(value)
            except ValueError:
                return -1
    return None


def _too_large(limit: int) -> _Refusal:
    return _Refusal(
        413,
        "request_too_large",
        f"the request body is larger than this route takes ({_mib(limit)})",
        False,
    )


async def _answer(send: Send, refusal: _Refusal) -> None:
    body = json.dumps(
        {"code": refusal.code, "message": refusal.message, "retryable": refusal.retryable}
    ).encode("utf-8")
    await send(
        {
            "type": "http.response.start",
            "status": refusal.status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode("ascii")),
                # the rest of the body is not read: this connection cannot carry another request
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
