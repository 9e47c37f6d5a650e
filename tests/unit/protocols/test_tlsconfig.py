"""The TLS policy (``protocols.tlsconfig``) in real handshakes on 127.0.0.1.

Each weak offer is first shown to succeed against a permissive server (so the
client really makes it), then refused by a server with ``server_context``.
"""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from protocols.tlsconfig import TLS12_CIPHERS, client_context, harden, server_context
from tests.tls_probe import (
    STRONG,
    WEAK,
    V,
    offer,
    permissive_context,
    pin,
    refused,
    self_signed,
    serving,
)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """An EC P-384 certificate (as RadFed's) and an RSA one (for the control server)."""
    directory = tmp_path_factory.mktemp("tls")
    return {
        "ec": self_signed(directory, "ec", ec.generate_private_key(ec.SECP384R1())),
        "rsa": self_signed(
            directory, "rsa", rsa.generate_private_key(public_exponent=65537, key_size=2048)
        ),
    }


def _name(case: tuple[ssl.TLSVersion, str]) -> str:
    return f"{case[0].name}-{case[1]}"


@pytest.mark.parametrize("case", WEAK, ids=_name)
def test_the_server_context_refuses_weak_offers_a_permissive_server_accepts(
    certs: dict[str, tuple[Path, Path]], case: tuple[ssl.TLSVersion, str]
) -> None:
    # Prepare
    version, ciphers = case
    ours = server_context(*certs["ec"])

    # Execute
    with serving(permissive_context(certs["ec"], certs["rsa"])) as port:
        control = offer("127.0.0.1", port, version, ciphers)
    with serving(ours) as port:
        answer = offer("127.0.0.1", port, version, ciphers)

    # Assert: the client made the offer (the control took it); our server refused it
    assert control.accepted, control
    assert refused(answer), answer


@pytest.mark.parametrize("case", STRONG, ids=_name)
def test_the_server_context_accepts_tls13_and_ecdhe_aead_suites(
    certs: dict[str, tuple[Path, Path]], case: tuple[ssl.TLSVersion, str]
) -> None:
    # Prepare
    version, ciphers = case

    # Execute
    with serving(server_context(*certs["ec"])) as port:
        answer = offer("127.0.0.1", port, version, ciphers)

    # Assert
    assert answer.accepted, answer
    assert answer.version == {V.TLSv1_2: "TLSv1.2", V.TLSv1_3: "TLSv1.3"}[version]
    if version is V.TLSv1_2:
        assert answer.cipher == ciphers


def test_the_policy_offers_only_ecdhe_aead_suites_in_tls12() -> None:
    # Prepare / Execute
    context = harden(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    tls12 = [c for c in context.get_ciphers() if c["protocol"] == "TLSv1.2"]

    # Assert
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert {c["name"] for c in tls12} == set(TLS12_CIPHERS.split(":"))
    assert all(c["aead"] and c["kea"] == "kx-ecdhe" for c in tls12)
    assert context.options & ssl.OP_NO_COMPRESSION and context.options & ssl.OP_NO_RENEGOTIATION


@pytest.mark.parametrize(
    ("version", "ciphers"),
    [(V.TLSv1, "ALL"), (V.TLSv1_1, "ALL"), (V.TLSv1_2, "ECDHE-ECDSA-AES256-SHA384")],
    ids=["TLSv1", "TLSv1_1", "TLSv1_2-CBC"],
)
def test_the_client_context_will_not_talk_to_a_weak_server(
    certs: dict[str, tuple[Path, Path]], version: ssl.TLSVersion, ciphers: str
) -> None:
    # Prepare: a server that speaks only the weak protocol (a permissive client gets in)
    weak = permissive_context(certs["ec"])
    pin(weak, version, lowest=False)
    weak.set_ciphers(f"{ciphers}:@SECLEVEL=0")
    ours = client_context(cafile=certs["ec"][0])

    # Execute
    with serving(weak) as port:
        control = offer("127.0.0.1", port, version, ciphers)
        answer = _handshake(ours, port)

    # Assert
    assert control.accepted, control
    assert answer is not None


def test_the_client_context_verifies_and_talks_to_our_server(
    certs: dict[str, tuple[Path, Path]],
) -> None:
    # Prepare
    ours = client_context(cafile=certs["ec"][0])
    stranger = client_context(cafile=certs["rsa"][0])

    # Execute
    with serving(server_context(*certs["ec"])) as port:
        trusted = _handshake(ours, port)
        untrusted = _handshake(stranger, port)

    # Assert
    assert trusted is None
    assert untrusted is not None and "CERTIFICATE_VERIFY_FAILED" in untrusted


def _handshake(context: ssl.SSLContext, port: int) -> str | None:
    """None if a verified handshake completes, else the error."""
    import socket

    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            context.wrap_socket(raw, server_hostname="localhost"),
        ):
            return None
    except (ssl.SSLError, OSError) as exc:
        return str(exc)
