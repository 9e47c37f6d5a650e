"""The TLS every RadFed server and client speaks: TLS 1.2 or newer, forward-secret AEAD only.

One policy for the coordinator API, the Flower SuperLink the coordinator runs,
and the clients we make (the node's coordinator client):

* TLS 1.2 is the minimum; TLS 1.3 is preferred where both sides have it.
* TLS 1.2 cipher suites are ECDHE key exchange with an AEAD cipher only
  (AES-GCM, ChaCha20-Poly1305): no RSA key exchange, no (EC)DH without
  forward secrecy, no CBC, no SHA-1 MAC. TLS 1.3's suites (OpenSSL's defaults,
  which Python cannot change) are all AEAD with forward secrecy already.
* No TLS compression (CRIME) and no renegotiation; the server picks the suite.

Set explicitly rather than left to the platform: uvicorn passes no cipher
string (older releases passed ``"TLSv1"``), and Python's default still allows
ECDHE with AES-CBC in TLS 1.2 (``ECDHE-ECDSA-AES256-SHA384`` was agreed before
this module); whether TLS 1.0/1.1 are refused otherwise depends on the system's
OpenSSL configuration (its security level), not on anything RadFed said.
"""

from __future__ import annotations

import ssl
from pathlib import Path

MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2
#: TLS 1.2 suites, strongest first: ECDHE + AEAD only (ECDSA for our P-384 keys, RSA for
#: a certificate an operator may put in front).
TLS12_CIPHERS = ":".join(
    (
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-RSA-CHACHA20-POLY1305",
        "ECDHE-RSA-AES128-GCM-SHA256",
    )
)


def harden(context: ssl.SSLContext) -> ssl.SSLContext:
    """Apply the policy to ``context`` (a server's or a client's) and return it."""
    context.minimum_version = MINIMUM_VERSION
    context.set_ciphers(TLS12_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    if context.protocol == ssl.PROTOCOL_TLS_SERVER:
        context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_SINGLE_ECDH_USE
    return context


def server_context(
    certfile: str | Path,
    keyfile: str | Path,
    cafile: str | Path | None = None,
    verify_mode: ssl.VerifyMode = ssl.CERT_NONE,
) -> ssl.SSLContext:
    """A server context with the policy: its certificate, and the CA client certificates
    are checked against when ``verify_mode`` asks for them."""
    context = harden(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    context.load_cert_chain(str(certfile), str(keyfile))
    if cafile is not None:
        context.load_verify_locations(str(cafile))
    context.verify_mode = verify_mode
    return context


def client_context(
    cafile: str | Path | None = None,
    cadata: str | None = None,
    certfile: str | Path | None = None,
    keyfile: str | Path | None = None,
) -> ssl.SSLContext:
    """A verifying client context with the policy, trusting ``cafile``/``cadata`` (the
    system's CAs when neither is given), presenting ``certfile`` if given."""
    context = ssl.create_default_context(
        cafile=str(cafile) if cafile is not None else None, cadata=cadata
    )
    harden(context)
    if certfile is not None:
        context.load_cert_chain(str(certfile), str(keyfile) if keyfile is not None else None)
    return context
