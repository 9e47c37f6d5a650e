"""``python -m coordinator.tlsrun PROGRAM ARGS…``: a Python program whose uvicorn TLS follows
``protocols.tlsconfig``.

The Flower SuperLink serves its Fleet, Control and Runtime APIs with uvicorn
and takes only a certificate and key: no TLS version or cipher options, so
uvicorn's defaults apply (Python's default suites, ECDHE with AES-CBC in TLS 1.2
among them, and TLS 1.0/1.1 wherever the system's OpenSSL still allows them).
``coordinator.flower`` starts ``flower-superlink`` through this module, which
wraps uvicorn's context factory so that every server context it makes gets
``protocols.tlsconfig.harden`` (TLS 1.2+, ECDHE + AEAD), then runs the program
as its own console script would. The handshake tests check the running
SuperLink, so a Flower or uvicorn upgrade that bypasses the wrapper fails them.
"""

from __future__ import annotations

import runpy
import shutil
import ssl
import sys
from collections.abc import Callable
from typing import Any

from protocols.tlsconfig import harden


def harden_uvicorn() -> None:
    """Make every TLS context uvicorn creates from here on follow ``protocols.tlsconfig``."""
    import uvicorn.config

    made: Callable[..., ssl.SSLContext] = uvicorn.config.create_ssl_context
    if getattr(made, "radfed_hardened", False):
        return

    def hardened(*args: Any, **kwargs: Any) -> ssl.SSLContext:
        return harden(made(*args, **kwargs))

    hardened.radfed_hardened = True  # type: ignore[attr-defined]
    uvicorn.config.create_ssl_context = hardened


def main(argv: list[str]) -> None:
    """Run ``argv[0]`` (a path or a program on ``PATH``) with ``argv[1:]`` as its arguments."""
    if not argv:
        sys.exit("usage: python -m coordinator.tlsrun PROGRAM [ARGS…]")
    program = argv[0] if "/" in argv[0] else shutil.which(argv[0])
    if program is None:
        sys.exit(f"{argv[0]}: not found")
    harden_uvicorn()
    sys.argv = [program, *argv[1:]]
    runpy.run_path(program, run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
