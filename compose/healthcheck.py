#!/usr/bin/env python3
"""Container healthcheck: ``GET /healthz`` of the RadFed service in this container.

``radfed-healthcheck coordinator`` asks ``https://127.0.0.1:<api port>/healthz`` and
verifies the answer's certificate chain against the federation CA in the home (not the
host name: the server certificate names the coordinator's public name first).
``radfed-healthcheck node`` asks ``http://127.0.0.1:<api port>/healthz``. Ports and
homes come from the same ``RADFED_…`` variables the service reads. Exit 0 when healthy.
Standard library only; proxies from the environment are ignored (the service is local).
"""

from __future__ import annotations

import os
import ssl
import sys
import urllib.request


def target(service: str) -> tuple[str, ssl.SSLContext | None]:
    """The URL to ask and the TLS context to ask it with."""
    if service == "coordinator":
        home = os.environ.get("RADFED_COORDINATOR_HOME", "/var/lib/radfed/coordinator")
        port = os.environ.get("RADFED_COORDINATOR_API_PORT", "8443")
        context = ssl.create_default_context(cafile=os.path.join(home, "pki", "ca.crt"))
        context.check_hostname = False
        return f"https://127.0.0.1:{port}/healthz", context
    if service == "node":
        port = os.environ.get("RADFED_NODE_API_PORT", "8080")
        return f"http://127.0.0.1:{port}/healthz", None
    raise SystemExit(f'Argument "service" must be coordinator or node, not {service!r}.')


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        sys.stderr.write("usage: radfed-healthcheck coordinator|node\n")
        return 2
    url, context = target(argv[1])
    handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler({})]
    if context is not None:
        handlers.append(urllib.request.HTTPSHandler(context=context))
    try:
        with urllib.request.build_opener(*handlers).open(url, timeout=5) as answer:
            healthy = answer.status == 200
    except (OSError, ssl.SSLError) as exc:
        sys.stderr.write(f"{url}: {exc}\n")
        return 1
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
