"""TLS for ``radfed coordinator serve``: the server context and the client certificate.

uvicorn verifies a client certificate against the federation CA when one is
presented (``CERT_OPTIONAL``: operators and researchers use API tokens without
one), but does not hand it to the application. ``PeerCertProtocol`` is uvicorn's
h11 protocol (with the header deadline of ``protocols.api.slowheaders``) with one
addition: when a connection is made it reads the peer's
certificate from the TLS object and puts its DER into every request's ASGI
scope as the TLS extension (``scope["extensions"]["tls"]["client_cert_der"]``).
"""

from __future__ import annotations

import asyncio
from typing import Any

from protocols.api.slowheaders import HeaderDeadlineProtocol

TLS_EXTENSION = "tls"


def peer_certificate(scope: dict[str, Any]) -> bytes | None:
    """The DER of the client certificate the TLS layer verified, if any."""
    extension = scope.get("extensions", {}).get(TLS_EXTENSION) or {}
    der = extension.get("client_cert_der")
    return der if isinstance(der, bytes) else None


class PeerCertProtocol(HeaderDeadlineProtocol):
    """uvicorn's h11 protocol, passing the verified client certificate to the app."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        ssl_object = transport.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        inner = self.app

        async def with_peer(scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] in ("http", "websocket"):
                scope.setdefault("extensions", {})[TLS_EXTENSION] = {"client_cert_der": der}
            await inner(scope, receive, send)

        self.app = with_peer
