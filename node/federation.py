"""The node's membership of a federation: enrollment, its key, and talking to the coordinator.

``enroll`` takes the coordinator's URL and the one-time token its operator
printed. The token carries the SHA-256 of the federation CA: the node fetches
the CA certificate, refuses it unless the fingerprint matches, and from then
on trusts only that CA. It generates its EC P-384 key, sends a CSR, and stores
key (0600), certificate, CA certificate and the coordinator's address under
``<home>/keys/federation/``. Re-enrolling replaces them only once the new
certificate is in hand.

``CoordinatorClient`` is the node's HTTPS client: mutual TLS with that key and
certificate, and on every request a ``RadFed-Node`` token signed with the same
key (``protocols.nodeauth``).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

# Re-exported: where the enrollment files are, for the callers that also talk HTTPS.
from node.enrollment import FederationFiles as FederationFiles
from node.enrollment import enrolled as enrolled
from node.enrollment import files as files
from node.enrollment import site_name as site_name
from node.errors import NodeError
from node.settings import NodeSettings
from protocols.api.coordinator import EnrollRequest, EnrollResponse, Heartbeat
from protocols.nodeauth import make_token
from protocols.storage import private_dir, write_private
from protocols.tlsconfig import client_context
from protocols.version import PROTOCOL_VERSION, SOFTWARE_VERSION

log = logging.getLogger("radfed.node.federation")
TIMEOUT = httpx.Timeout(30.0, connect=10.0)


def _ca_fingerprint(token: str) -> str:
    parts = token.strip().split(".")
    if len(parts) != 3 or parts[0] != "rfe1" or len(parts[2]) != 64:
        raise NodeError(
            "bad_enrollment_token", 'Argument "token" is not a RadFed enrollment token.'
        )
    return parts[2].lower()


def _http_error(response: httpx.Response) -> NodeError:
    try:
        body = response.json()
        return NodeError(str(body.get("code", "coordinator_error")), str(body.get("message")))
    except ValueError:
        return NodeError("coordinator_error", f"HTTP {response.status_code} from the coordinator")


def enroll(settings: NodeSettings, url: str, token: str) -> EnrollResponse:
    """Join the federation at ``url`` with a one-time ``token``."""
    # The home holds the site key and the originals vault: only its owner may enter,
    # even when enrolling is the first thing done in it.
    private_dir(settings.keys_dir)
    url = url.rstrip("/")
    expected = _ca_fingerprint(token)
    try:
        # Fetched without verification, then pinned: only the token's fingerprint counts.
        answer = httpx.get(
            f"{url}/api/v1/enroll/ca",
            verify=False,  # noqa: S501 - pinned to the token's fingerprint below
            timeout=TIMEOUT,
            proxy=settings.proxy_url,
        )
        answer.raise_for_status()
        ca = x509.load_pem_x509_certificate(answer.content)
    except (httpx.HTTPError, ValueError) as exc:
        raise NodeError(
            "coordinator_unreachable", f"cannot fetch the federation CA from {url}: {exc}", True
        ) from exc
    if ca.fingerprint(hashes.SHA256()).hex() != expected:
        raise NodeError(
            "wrong_coordinator",
            f"{url} presented a CA that does not match the enrollment token; nothing was changed",
        )
    ca_pem = ca.public_bytes(serialization.Encoding.PEM)
    key = ec.generate_private_key(ec.SECP384R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "radfed-node")]))
        .sign(key, hashes.SHA384())
    )
    context = client_context(cadata=ca_pem.decode("ascii"))
    request = EnrollRequest(
        token=token.strip(), csr_pem=csr.public_bytes(serialization.Encoding.PEM).decode("ascii")
    )
    try:
        response = httpx.post(
            f"{url}/api/v1/enroll",
            json=request.model_dump(mode="json"),
            verify=context,
            timeout=TIMEOUT,
            proxy=settings.proxy_url,
        )
    except httpx.HTTPError as exc:
        raise NodeError("coordinator_unreachable", f"cannot reach {url}: {exc}", True) from exc
    if response.status_code != 200:
        raise _http_error(response)
    enrolled = EnrollResponse.model_validate(response.json())
    cert = x509.load_pem_x509_certificate(enrolled.certificate_pem.encode("ascii"))
    if cert.public_key() != key.public_key():
        raise NodeError("bad_certificate", "the coordinator returned a certificate for another key")
    where = files(settings)
    write_private(
        where.key,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        0o600,
    )
    write_private(where.cert, enrolled.certificate_pem.encode("ascii"), 0o600)
    write_private(where.ca, ca_pem, 0o600)
    write_private(
        where.config,
        json.dumps(
            {
                "url": url,
                "site": enrolled.site,
                "ca_sha256": expected,
                "certificate_sha256": cert.fingerprint(hashes.SHA256()).hex(),
                "superlink": enrolled.superlink,
                "enrolled_at": dt.datetime.now(dt.UTC).isoformat(),
            },
            indent=2,
        ).encode("utf-8"),
        0o600,
    )
    write_supernode_key(settings)
    log.info("enrolled in the federation at %s as site %s", url, enrolled.site)
    return enrolled


def write_supernode_key(settings: NodeSettings) -> Path:
    """The node key in the OpenSSH form Flower's SuperNode reads (0600), from ``node.key``."""
    where = files(settings)
    key = serialization.load_pem_private_key(where.key.read_bytes(), None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise NodeError("bad_key", f"{where.key} is not an EC key")
    write_private(
        where.supernode_key,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        ),
        0o600,
    )
    return where.supernode_key


def superlink_address(settings: NodeSettings) -> str | None:
    """Where this node's SuperNode connects: the setting, else what enrollment said."""
    if settings.superlink_address:
        return settings.superlink_address
    where = files(settings)
    if not where.config.exists():
        return None
    value = json.loads(where.config.read_text(encoding="utf-8")).get("superlink")
    return str(value) if value else None


class CoordinatorClient:
    """HTTPS to the coordinator: mutual TLS plus a signed token on every request."""

    def __init__(self, settings: NodeSettings) -> None:
        where = files(settings)
        if not enrolled(settings):
            raise NodeError("not_enrolled", "this node is not enrolled: run `radfed node enroll`")
        config = json.loads(where.config.read_text(encoding="utf-8"))
        self.url: str = config["url"]
        self.site: str = config["site"]
        key = serialization.load_pem_private_key(where.key.read_bytes(), None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise NodeError("bad_key", f"{where.key} is not an EC key")
        self._key = key
        cert = x509.load_pem_x509_certificate(where.cert.read_bytes())
        self.fingerprint = cert.fingerprint(hashes.SHA256()).hex()
        context = client_context(cafile=where.ca, certfile=where.cert, keyfile=where.key)
        # Outbound only; through the site's proxy when it has one (else HTTPS_PROXY applies).
        self._http = httpx.Client(
            base_url=self.url, verify=context, timeout=TIMEOUT, proxy=settings.proxy_url
        )

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        headers = dict(kwargs.pop("headers", {}) or {})
        headers["Authorization"] = make_token(self._key, self.site, self.fingerprint, method, path)
        try:
            return self._http.request(method, path, headers=headers, **kwargs)
        except httpx.HTTPError as exc:
            raise NodeError(
                "coordinator_unreachable", f"cannot reach {self.url}: {exc}", True
            ) from exc

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> CoordinatorClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def send_heartbeat(
    client: CoordinatorClient, counts: dict[str, int], last_error: str | None
) -> None:
    """Report version, counts by status and the last error; raises NodeError on refusal."""
    beat = Heartbeat(
        software_version=SOFTWARE_VERSION,
        protocol_version=PROTOCOL_VERSION,
        counts=counts,
        last_error=last_error,
        sent_at=dt.datetime.now(dt.UTC),
    )
    response = client.request("POST", "/api/v1/node/heartbeat", json=beat.model_dump(mode="json"))
    if response.status_code != 204:
        raise _http_error(response)


class HeartbeatSender:
    """Sends a heartbeat every ``interval`` seconds while ``radfed node serve`` runs."""

    def __init__(
        self,
        settings: NodeSettings,
        counts: Callable[[], dict[str, int]],
        last_error: Callable[[], str | None],
        interval: float,
    ) -> None:
        self.settings = settings
        self.counts = counts
        self.last_error = last_error
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="heartbeat", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)

    def _loop(self) -> None:
        client: CoordinatorClient | None = None
        while not self._stop.is_set():
            try:
                client = client or CoordinatorClient(self.settings)
                send_heartbeat(client, self.counts(), self.last_error())
            except NodeError as exc:
                log.warning("heartbeat not delivered: %s", exc.message)
            except Exception:
                log.exception("heartbeat failed")
            self._stop.wait(self.interval)
        if client is not None:
            client.close()
