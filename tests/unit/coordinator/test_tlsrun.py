"""``coordinator.tlsrun``: the uvicorn contexts of a program it runs follow ``protocols.tlsconfig``.

The running SuperLink is checked with real handshakes in
``tests/integration/test_security_auth.py``; this pins the mechanism.
"""

from __future__ import annotations

import ssl
import subprocess
import sys
from pathlib import Path

import pytest
import uvicorn.config

from coordinator import pki
from coordinator.tlsrun import harden_uvicorn
from protocols.tlsconfig import TLS12_CIPHERS


@pytest.fixture
def server_pem(tmp_path: Path) -> tuple[Path, Path]:
    paths = pki.Paths(tmp_path / "pki")
    pki.create(paths, "Test federation", ["localhost", "127.0.0.1"])
    return paths.server_cert, paths.server_key


def _uvicorn_context(cert: Path, key: Path) -> ssl.SSLContext:
    """The context uvicorn makes for a server given only a certificate and key (as Flower's)."""
    config = uvicorn.Config(app=None, ssl_certfile=str(cert), ssl_keyfile=str(key))
    context = uvicorn.config.create_ssl_context(
        certfile=str(cert),
        keyfile=str(key),
        password=None,
        ssl_version=config.ssl_version,
        cert_reqs=config.ssl_cert_reqs,
        ca_certs=None,
        ciphers=config.ssl_ciphers,
    )
    return context


def _tls12_suites(context: ssl.SSLContext) -> set[str]:
    return {c["name"] for c in context.get_ciphers() if c["protocol"] == "TLSv1.2"}


def test_uvicorn_contexts_are_hardened_once_tlsrun_wrapped_them(
    monkeypatch: pytest.MonkeyPatch, server_pem: tuple[Path, Path]
) -> None:
    # Prepare: uvicorn's factory is put back after the test
    monkeypatch.setattr(uvicorn.config, "create_ssl_context", uvicorn.config.create_ssl_context)
    before = _uvicorn_context(*server_pem)

    # Execute
    harden_uvicorn()
    harden_uvicorn()  # twice is once
    after = _uvicorn_context(*server_pem)

    # Assert: uvicorn's defaults let CBC suites in; wrapped, only ours remain
    assert "ECDHE-ECDSA-AES256-SHA384" in _tls12_suites(before)
    assert _tls12_suites(after) == set(TLS12_CIPHERS.split(":"))
    assert after.minimum_version == ssl.TLSVersion.TLSv1_2


def test_tlsrun_runs_the_program_with_its_arguments(tmp_path: Path) -> None:
    # Prepare: a console-script-like program that reports what it sees
    program = tmp_path / "program"
    program.write_text(
        "#!/usr/bin/env python\n"
        "import sys, uvicorn.config\n"
        "print(sys.argv[1:], uvicorn.config.create_ssl_context.radfed_hardened)\n"
        "sys.exit(3)\n"
    )

    # Execute
    done = subprocess.run(
        [sys.executable, "-m", "coordinator.tlsrun", str(program), "--port", "9"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )

    # Assert
    assert done.returncode == 3, done.stderr
    assert done.stdout.strip() == "['--port', '9'] True"
