"""uvicorn's HTTP/1.1 protocol with a deadline on request headers.

uvicorn times out an idle keep-alive connection only after a response, and the
first byte of the next request cancels that: a client that connects and sends
nothing, or sends its headers a byte every few seconds (slow-loris), holds a
connection and a file descriptor for as long as it likes. Bodies are bounded by
``protocols.api.bodylimit``; this bounds what comes before them.

``HeaderDeadlineProtocol`` gives every request ``header_timeout_s`` from the
moment the connection is ready for it (made, or the previous response sent) to
its complete headers; a connection that misses it is closed (nothing was routed,
so there is no one to answer). Set the deadline with ``with_header_deadline``.
"""

from __future__ import annotations

import asyncio
from typing import Any, ClassVar

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

#: Seconds a client has to send a request's headers.
HEADER_TIMEOUT_S = 20.0


class HeaderDeadlineProtocol(H11Protocol):
    """uvicorn's h11 protocol; a request's headers must be complete in time."""

    header_timeout_s: ClassVar[float] = HEADER_TIMEOUT_S

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_deadline: asyncio.TimerHandle | None = None

    def _arm(self) -> None:
        if self._header_deadline is None:
            self._header_deadline = self.loop.call_later(
                self.header_timeout_s, self._headers_too_slow
            )

    def _disarm(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _headers_too_slow(self) -> None:
        self._header_deadline = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.logger.info("closing %s: no complete request headers in time", self.client)
            self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:
            self._disarm()  # headers are in: the body has its own limits

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self._arm()  # waiting for the next request on this connection

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)


def with_header_deadline(
    base: type[HeaderDeadlineProtocol], seconds: float
) -> type[HeaderDeadlineProtocol]:
    """``base`` with a header deadline of ``seconds`` (a setting of the service)."""
    if seconds <= 0:
        raise ValueError('Argument "seconds" must be positive.')
    return type(base.__name__, (base,), {"header_timeout_s": float(seconds)})
