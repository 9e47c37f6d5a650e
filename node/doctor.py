"""``radfed node doctor``: can this node reach its coordinator, and if not, why.

Each check says what it looked at, whether it passed, and — when it did not —
what is wrong and how to fix it. The checks run in order and stop being
meaningful after the first network failure (a TLS handshake cannot succeed
without a TCP connection), so later ones are skipped rather than piled on.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import json
import os
import shutil
import socket
import ssl
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass

from cryptography import x509

from node import federation
from node.settings import NodeSettings
from protocols.storage import private_dir
from protocols.version import PROTOCOL_VERSION

#: Node tokens live two minutes; a clock further off than this breaks them.
MAX_SKEW_S = 60
MIN_FREE_BYTES = 2 * 1024**3
CERT_WARN_DAYS = 30


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    skipped: bool = False


def run(settings: NodeSettings) -> list[Check]:
    """Every check, in order."""
    checks: list[Check] = [_disk(settings)]
    files = federation.files(settings)
    if not federation.enrolled(settings):
        checks.append(
            Check(
                "enrollment",
                False,
                f"no federation key and certificate in {files.root}",
                "ask the coordinator operator for a token (`radfed coordinator site add NAME`), "
                "then run `radfed node enroll URL TOKEN`",
            )
        )
        return checks
    config = json.loads(files.config.read_text(encoding="utf-8"))
    url = urllib.parse.urlsplit(config["url"])
    host, port = url.hostname or "", url.port or 443
    checks.append(Check("enrollment", True, f"site {config['site']} at {config['url']}"))
    checks.append(_certificate(files))
    checks.append(_proxy(settings, config["url"]))
    steps: list[tuple[str, Callable[[], Check]]] = [
        ("name resolution", lambda: _resolve(host)),
        ("TCP connection", lambda: _tcp(host, port, settings)),
        ("TLS handshake", lambda: _tls(host, port, files, settings)),
        ("coordinator", lambda: _coordinator(settings)),
    ]
    failed = False
    for name, step in steps:
        if failed:
            checks.append(Check(name, True, "skipped: an earlier check failed", skipped=True))
            continue
        result = step()
        checks.append(result)
        failed = not result.ok
    return checks


def _disk(settings: NodeSettings) -> Check:
    private_dir(settings.home)
    usage = shutil.disk_usage(settings.home)
    free_gb = usage.free / 1024**3
    if usage.free < MIN_FREE_BYTES:
        return Check(
            "free disk",
            False,
            f"{free_gb:.1f} GB free under {settings.home}",
            "free space or move the node home to a larger disk (RADFED_NODE_HOME): "
            "ingest and uploads stop when the disk is full",
        )
    return Check("free disk", True, f"{free_gb:.1f} GB free under {settings.home}")


def _certificate(files: federation.FederationFiles) -> Check:
    cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
    left = cert.not_valid_after_utc - dt.datetime.now(dt.UTC)
    if left.total_seconds() <= 0:
        return Check(
            "node certificate",
            False,
            f"expired on {cert.not_valid_after_utc:%Y-%m-%d}",
            "ask the operator for a new token (`radfed coordinator site token NAME`) "
            "and enroll again",
        )
    if left.days < CERT_WARN_DAYS:
        return Check(
            "node certificate",
            False,
            f"expires in {left.days} days ({cert.not_valid_after_utc:%Y-%m-%d})",
            "renew it now: `radfed coordinator site token NAME`, then `radfed node enroll`",
        )
    return Check(
        "node certificate",
        True,
        f"valid until {cert.not_valid_after_utc:%Y-%m-%d} ({left.days} days)",
    )


def _proxy(settings: NodeSettings, url: str) -> Check:
    if settings.proxy_url:
        return Check("proxy", True, f"coordinator traffic goes through {settings.proxy_url}")
    from_env = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    bypass = os.environ.get("NO_PROXY") or os.environ.get("no_proxy") or ""
    if from_env:
        host = urllib.parse.urlsplit(url).hostname or ""
        skipped = any(host.endswith(p.strip().lstrip(".")) for p in bypass.split(",") if p.strip())
        return Check(
            "proxy",
            True,
            f"HTTPS_PROXY={from_env}" + (f" (bypassed for {host} by NO_PROXY)" if skipped else ""),
        )
    return Check("proxy", True, "none (direct connection)")


def _resolve(host: str) -> Check:
    try:
        addresses = sorted({str(info[4][0]) for info in socket.getaddrinfo(host, None)})
    except socket.gaierror as exc:
        return Check(
            "name resolution",
            False,
            f"{host} does not resolve: {exc.strerror}",
            "check the coordinator URL and this machine's DNS (or /etc/hosts)",
        )
    return Check("name resolution", True, f"{host} -> {', '.join(addresses)}")


def _tcp(host: str, port: int, settings: NodeSettings) -> Check:
    if settings.proxy_url or os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy"):
        return Check(
            "TCP connection", True, "skipped: connections go through the proxy", skipped=True
        )
    try:
        with socket.create_connection((host, port), timeout=10):
            pass
    except OSError as exc:
        return Check(
            "TCP connection",
            False,
            f"cannot connect to {host}:{port}: {exc.strerror or exc}",
            "is the coordinator running? is the port open in the hospital firewall "
            "(outbound to the coordinator only)?",
        )
    return Check("TCP connection", True, f"{host}:{port} accepts connections")


def _tls(host: str, port: int, files: federation.FederationFiles, settings: NodeSettings) -> Check:
    if settings.proxy_url or os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy"):
        return Check("TLS handshake", True, "checked through the proxy below", skipped=True)
    context = ssl.create_default_context(cafile=str(files.ca))
    context.load_cert_chain(str(files.cert), str(files.key))
    try:
        with (
            socket.create_connection((host, port), timeout=10) as raw,
            context.wrap_socket(raw, server_hostname=host) as tls,
        ):
            version = tls.version()
    except ssl.SSLCertVerificationError as exc:
        return Check(
            "TLS handshake",
            False,
            f"the coordinator's certificate is not trusted: {exc.verify_message}",
            "the URL's host name must be one the coordinator's certificate names "
            "(`radfed coordinator init --server-name`), and the CA must be this federation's",
        )
    except (ssl.SSLError, OSError) as exc:
        return Check(
            "TLS handshake",
            False,
            f"TLS with {host}:{port} failed: {exc}",
            "a TLS-inspecting proxy or firewall may be in the way; the coordinator must be reached "
            "directly or through a plain CONNECT proxy",
        )
    return Check("TLS handshake", True, f"{version}, server and node certificates accepted")


def _coordinator(settings: NodeSettings) -> Check:
    try:
        with federation.CoordinatorClient(settings) as client:
            health = client.request("GET", "/healthz")
            whoami = client.request("GET", "/api/v1/node/whoami")
    except Exception as exc:
        return Check(
            "coordinator",
            False,
            f"no answer: {exc}",
            "see the checks above; then the coordinator log",
        )
    problems: list[str] = []
    fixes: list[str] = []
    stamp = health.headers.get("date")
    if stamp:
        skew = (email.utils.parsedate_to_datetime(stamp) - dt.datetime.now(dt.UTC)).total_seconds()
        if abs(skew) > MAX_SKEW_S:
            problems.append(f"this clock is {abs(skew):.0f} s {'behind' if skew > 0 else 'ahead'}")
            fixes.append("enable NTP (timedatectl set-ntp true)")
    theirs = str(health.json().get("protocol_version", "?"))
    if theirs.split(".")[0] != PROTOCOL_VERSION.split(".")[0]:
        problems.append(f"protocol {theirs} there, {PROTOCOL_VERSION} here")
        fixes.append("upgrade the older side; major versions must match")
    if whoami.status_code != 200:
        body = whoami.json() if whoami.content else {}
        problems.append(
            f"refused: {body.get('code', whoami.status_code)}: {body.get('message', '')}"
        )
        fixes.append(
            "a revoked site must be added again by the operator"
            if body.get("code") == "site_revoked"
            else "re-enroll with a new token"
        )
    if problems:
        return Check("coordinator", False, "; ".join(problems), "; ".join(fixes))
    return Check(
        "coordinator",
        True,
        f"protocol {theirs}, clock within {MAX_SKEW_S} s, "
        f"this node is site {whoami.json()['site']}",
    )
