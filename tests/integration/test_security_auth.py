"""Brute force and TLS against the running services (issue 9's security pass).

A coordinator (``radfed coordinator serve``, TLS, with its Flower SuperLink) and a
node (``radfed node serve``) run as processes on 127.0.0.1 with small limits:
three failed authentications lock a client out for two minutes. Both trust one
proxy, 127.0.0.2: the tests connect from that address with ``X-Forwarded-For``
naming a different client each (so one test's lockout never shuts out the next),
and a test from 127.0.0.1 — a peer that is not a trusted proxy — shows that the
header is then ignored.

For every secret either service checks (coordinator: API tokens, the web UI's
sign-in, enrollment tokens, node-signed request tokens; node: API tokens, the
web UI's password) the client's third failure locks it out: the right secret is
then refused too (429, ``Retry-After``, an ``ErrorBody`` with code
``too_many_attempts``), other clients carry on, the lockout is in the audit log
once and in ``/metrics``.

TLS: real handshakes with the coordinator API and the SuperLink, each weak offer
first shown to succeed against a permissive server (``tests.tls_probe``), and
cross-checked with ``openssl s_client``.
"""

from __future__ import annotations

import json
import re
import socket
import sqlite3
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from protocols.api.errors import ErrorBody
from protocols.nodeauth import make_token
from tests.helpers import CoordinatorProcess, NodeProcess, run_cli
from tests.tls_probe import STRONG, WEAK, offer, permissive_context, refused, self_signed, serving

pytestmark = pytest.mark.integration

#: The trusted proxy's address (the whole of 127/8 is loopback on Linux).
PROXY = "127.0.0.2"
MAX_FAILURES = 3
LOCKOUT_S = 120
LIMITS = {
    "TRUSTED_PROXIES": json.dumps([PROXY]),
    "AUTH_MAX_FAILURES": str(MAX_FAILURES),
    "AUTH_WINDOW_S": "300",
    "AUTH_LOCKOUT_S": str(LOCKOUT_S),
    "AUTH_MAX_LOCKOUT_S": str(LOCKOUT_S),
}
PASSWORD = "a long enough passphrase"
WRONG_TOKEN = "rfc_" + "B" * 43


@dataclass
class Services:
    base: Path
    coordinator: CoordinatorProcess
    node: NodeProcess
    operator: str
    node_operator: str
    enrollment: list[str]


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    from coordinator import sites, tokens
    from coordinator.registry.db import Database
    from coordinator.settings import load_settings as coordinator_settings
    from node.index.users import create_user
    from node.settings import load_settings as node_settings
    from node.site import open_index

    base = tmp_path_factory.mktemp("security-auth")
    chome, nhome = base / "coordinator", base / "node"
    run_cli("coordinator", "init", "--home", str(chome), check=True)
    db = Database.open(coordinator_settings(chome).db_url)
    try:
        operator = tokens.create(db, "olga", "operator", actor="test")
        enrollment = [
            sites.add(db, coordinator_settings(chome), name, actor="test")
            for name in ("st-marys", "st-johns")
        ]
    finally:
        db.close()
    index = open_index(node_settings(nhome))
    try:
        node_operator = index.create_token("ops", "operator", actor="test")
        create_user(index, "ann", "reviewer", PASSWORD, actor="test")
    finally:
        index.db.close()
    coordinator_env = {f"RADFED_COORDINATOR_{k}": v for k, v in LIMITS.items()}
    node_env = {f"RADFED_NODE_{k}": v for k, v in LIMITS.items()}
    with (
        CoordinatorProcess(chome, env=coordinator_env, flower=True) as coordinator,
        NodeProcess(nhome, env=node_env) as node,
    ):
        yield Services(base, coordinator, node, operator, node_operator, enrollment)


_clients = iter(range(1, 250))


def client_ip() -> str:
    """An address no other test uses (TEST-NET-2)."""
    return f"198.51.100.{next(_clients)}"


def via_proxy(
    base_url: str, client: str, verify: ssl.SSLContext | bool = False, **headers: str
) -> httpx.Client:
    """Requests as the trusted proxy forwards them for ``client``."""
    transport = httpx.HTTPTransport(local_address=PROXY, verify=verify)
    return httpx.Client(
        base_url=base_url,
        transport=transport,
        headers={"X-Forwarded-For": client, **headers},
        timeout=30,
    )


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def assert_locked_out(answer: httpx.Response) -> None:
    assert answer.status_code == 429, answer.text
    assert 0 < int(answer.headers["retry-after"]) <= LOCKOUT_S
    body = ErrorBody.model_validate_json(answer.content)
    assert body.code == "too_many_attempts" and body.retryable


def lockouts(database: Path) -> list[tuple[str, str, dict[str, Any]]]:
    """The ``auth.lockout`` entries of a service's audit log: (actor, subject, details)."""
    with sqlite3.connect(database) as db:
        rows = db.execute(
            "SELECT actor, subject, details FROM audit_log WHERE action = 'auth.lockout'"
        ).fetchall()
    return [(actor, subject, json.loads(details)) for actor, subject, details in rows]


def metric(text: str, name: str, scope: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels.get("scope") == scope:
                return float(sample.value)
    raise AssertionError(f"{name}{{scope={scope!r}}} is not exposed")


# -- the coordinator ---------------------------------------------------------------------


def test_wrong_api_tokens_lock_a_client_out_even_for_the_right_token(
    services: Services,
) -> None:
    # Prepare
    coordinator = services.coordinator
    guesser, bystander = client_ip(), client_ip()
    tls = coordinator.tls()

    # Execute: the guesser fails three times, then tries the right token and goes on
    with via_proxy(coordinator.url, guesser, tls) as client:
        wrong = [client.get("/api/v1/sites", headers=bearer(WRONG_TOKEN)) for _ in range(3)]
        right = client.get("/api/v1/sites", headers=bearer(services.operator))
        more = [client.get("/api/v1/sites", headers=bearer(WRONG_TOKEN)) for _ in range(3)]
        anonymous = client.get("/api/v1/sites")
    with via_proxy(coordinator.url, bystander, tls) as client:
        other = client.get("/api/v1/sites", headers=bearer(services.operator))
        scraped = client.get("/metrics", headers=bearer(services.operator))

    # Assert: locked out; another client is not; audited once; counted
    assert [a.status_code for a in wrong] == [401, 401, 401]
    assert_locked_out(right)
    for answer in more:
        assert_locked_out(answer)
    assert anonymous.status_code == 401  # no credentials: nothing was guessed
    assert other.status_code == 200, other.text
    entries = [e for e in lockouts(coordinator.home / "registry.sqlite") if e[1] == guesser]
    assert len(entries) == 1
    actor, _, details = entries[0]
    assert actor == "auth"
    assert details["scope"] == "token" and details["failures"] == MAX_FAILURES
    assert details["seconds"] == LOCKOUT_S
    assert scraped.status_code == 200
    assert metric(scraped.text, "radfed_coordinator_auth_lockouts_total", "token") >= 1
    assert metric(scraped.text, "radfed_coordinator_auth_failures_total", "token") >= 3


def test_web_ui_sign_in_counts_against_the_same_limit_as_the_api(services: Services) -> None:
    # Prepare: the login form and its CSRF token
    coordinator = services.coordinator
    with via_proxy(coordinator.url, client_ip(), coordinator.tls()) as client:
        form = client.get("/ui/login")
        found = re.search(r'name="csrf" value="([^"]+)"', form.text)
        assert found is not None, form.text
        csrf = found.group(1)

        # Execute
        wrong = [
            client.post("/ui/login", data={"token": WRONG_TOKEN, "csrf": csrf}) for _ in range(3)
        ]
        right = client.post("/ui/login", data={"token": services.operator, "csrf": csrf})
        api = client.get("/api/v1/sites", headers=bearer(services.operator))

    # Assert
    assert [a.status_code for a in wrong] == [401, 401, 401]
    assert right.status_code == 429 and 0 < int(right.headers["retry-after"]) <= LOCKOUT_S
    assert "Locked out" in right.text and "radfed_coordinator_session" not in client.cookies
    assert_locked_out(api)


def _csr() -> tuple[ec.EllipticCurvePrivateKey, str]:
    key = ec.generate_private_key(ec.SECP384R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "radfed-node")]))
        .sign(key, hashes.SHA384())
    )
    return key, csr.public_bytes(serialization.Encoding.PEM).decode("ascii")


def test_wrong_enrollment_tokens_lock_a_client_out_without_spending_a_good_one(
    services: Services,
) -> None:
    # Prepare: well-formed tokens for the right federation that were never issued
    coordinator = services.coordinator
    good = services.enrollment[0]
    fingerprint = good.rsplit(".", 1)[1]
    _, csr = _csr()

    # Execute
    with via_proxy(coordinator.url, client_ip(), coordinator.tls()) as client:
        wrong = [
            client.post(
                "/api/v1/enroll",
                json={"token": f"rfe1.{'x' * 42}{i}.{fingerprint}", "csr_pem": csr},
            )
            for i in range(3)
        ]
        right = client.post("/api/v1/enroll", json={"token": good, "csr_pem": csr})
    with via_proxy(coordinator.url, client_ip(), coordinator.tls()) as client:
        elsewhere = client.post("/api/v1/enroll", json={"token": good, "csr_pem": csr})

    # Assert: the refused attempt did not spend the token; another client enrolls with it
    assert [a.json()["code"] for a in wrong] == ["enrollment_token_invalid"] * 3
    assert_locked_out(right)
    assert elsewhere.status_code == 200, elsewhere.text
    scopes = [d["scope"] for _, _, d in lockouts(coordinator.home / "registry.sqlite")]
    assert "enroll" in scopes


@dataclass
class EnrolledNode:
    site: str
    fingerprint: str
    key: ec.EllipticCurvePrivateKey
    tls: ssl.SSLContext

    def signed(
        self, path: str, by: ec.EllipticCurvePrivateKey | None = None, at: float | None = None
    ) -> dict[str, str]:
        token = make_token(by or self.key, self.site, self.fingerprint, "GET", path, now=at)
        return {"Authorization": token}


@pytest.fixture(scope="module")
def enrolled(services: Services) -> EnrolledNode:
    """A node enrolled with the coordinator: its key, certificate and client TLS."""
    coordinator = services.coordinator
    key, csr = _csr()
    with via_proxy(coordinator.url, client_ip(), coordinator.tls()) as client:
        answer = client.post(
            "/api/v1/enroll", json={"token": services.enrollment[1], "csr_pem": csr}
        )
    assert answer.status_code == 200, answer.text
    cert_pem = answer.json()["certificate_pem"].encode("ascii")
    (services.base / "node.crt").write_bytes(cert_pem)
    (services.base / "node.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return EnrolledNode(
        answer.json()["site"],
        x509.load_pem_x509_certificate(cert_pem).fingerprint(hashes.SHA256()).hex(),
        key,
        coordinator.tls(services.base / "node.crt", services.base / "node.key"),
    )


def test_forged_node_signatures_lock_a_client_out_even_for_a_good_one(
    services: Services, enrolled: EnrolledNode
) -> None:
    # Prepare: a key that is not the node's
    coordinator = services.coordinator
    forger = ec.generate_private_key(ec.SECP384R1())
    path = "/api/v1/node/whoami"

    # Execute
    with via_proxy(coordinator.url, client_ip(), enrolled.tls) as client:
        forged = [client.get(path, headers=enrolled.signed(path, by=forger)) for _ in range(3)]
        genuine = client.get(path, headers=enrolled.signed(path))
    with via_proxy(coordinator.url, client_ip(), enrolled.tls) as client:
        elsewhere = client.get(path, headers=enrolled.signed(path))

    # Assert
    assert [a.status_code for a in forged] == [401, 401, 401]
    assert_locked_out(genuine)
    assert elsewhere.status_code == 200 and elsewhere.json()["site"] == enrolled.site
    scopes = [d["scope"] for _, _, d in lockouts(coordinator.home / "registry.sqlite")]
    assert "node" in scopes


def test_a_node_whose_clock_is_off_is_refused_but_not_locked_out(
    services: Services, enrolled: EnrolledNode
) -> None:
    # Prepare: tokens the node signed an hour ago (its clock is behind)
    coordinator = services.coordinator
    path = "/api/v1/node/whoami"
    behind = time.time() - 3600

    # Execute
    with via_proxy(coordinator.url, client_ip(), enrolled.tls) as client:
        skewed = [client.get(path, headers=enrolled.signed(path, at=behind)) for _ in range(5)]
        fixed = client.get(path, headers=enrolled.signed(path))

    # Assert: well-signed tokens out of their time window are no guesses
    assert [a.status_code for a in skewed] == [401] * 5
    assert "clock" in skewed[0].json()["message"]
    assert fixed.status_code == 200, fixed.text


def test_forwarded_for_from_a_peer_that_is_no_trusted_proxy_is_ignored(
    services: Services,
) -> None:
    # Prepare: a client on 127.0.0.1 (not a trusted proxy) naming a new address each time
    coordinator = services.coordinator
    with httpx.Client(base_url=coordinator.url, verify=coordinator.tls(), timeout=30) as client:

        def get(token: str) -> httpx.Response:
            spoofed = {"X-Forwarded-For": client_ip(), **bearer(token)}
            return client.get("/api/v1/sites", headers=spoofed)

        # Execute
        wrong = [get(WRONG_TOKEN) for _ in range(3)]
        right = get(services.operator)

    # Assert: counted against 127.0.0.1 whatever the header said
    assert [a.status_code for a in wrong] == [401, 401, 401]
    assert_locked_out(right)
    assert "127.0.0.1" in right.json()["message"]


def test_every_error_status_list_of_the_coordinator_api_declares_429(
    services: Services,
) -> None:
    spec = httpx.get(
        f"{services.coordinator.url}/api/v1/openapi.json", verify=services.coordinator.tls()
    ).json()
    guarded = {
        (method, path): operation["responses"]
        for path, item in spec["paths"].items()
        for method, operation in item.items()
        if "401" in operation["responses"]
    }

    assert guarded and all("429" in responses for responses in guarded.values())
    assert all("Retry-After" in r["429"]["headers"] for r in guarded.values())


# -- the node ----------------------------------------------------------------------------


def test_wrong_node_api_tokens_lock_a_client_out_even_for_the_right_token(
    services: Services,
) -> None:
    # Prepare
    node = services.node
    guesser = client_ip()

    # Execute
    with via_proxy(node.url, guesser) as client:
        wrong = [client.get("/api/v1/counts", headers=bearer("rfn_" + "C" * 43)) for _ in range(3)]
        right = client.get("/api/v1/counts", headers=bearer(services.node_operator))
    with via_proxy(node.url, client_ip()) as client:
        other = client.get("/api/v1/counts", headers=bearer(services.node_operator))
        scraped = client.get("/metrics")

    # Assert
    assert [a.status_code for a in wrong] == [401, 401, 401]
    assert_locked_out(right)
    assert other.status_code == 200, other.text
    entries = [e for e in lockouts(node.home / "index.sqlite") if e[1] == guesser]
    assert len(entries) == 1 and entries[0][2]["scope"] == "token"
    assert metric(scraped.text, "radfed_node_auth_lockouts_total", "token") >= 1


def test_wrong_web_ui_passwords_lock_a_client_out_even_for_the_right_one(
    services: Services,
) -> None:
    # Prepare
    node = services.node
    guesser = client_ip()

    def login(client: httpx.Client, password: str) -> httpx.Response:
        return client.post("/login", data={"name": "ann", "password": password, "next": "/"})

    # Execute
    with via_proxy(node.url, guesser) as client:
        wrong = [login(client, "not the passphrase") for _ in range(3)]
        right = login(client, PASSWORD)
    with via_proxy(node.url, client_ip()) as client:
        other = login(client, PASSWORD)

    # Assert
    assert all("Unknown user or wrong password" in a.text for a in wrong)
    assert right.status_code == 429 and 0 < int(right.headers["retry-after"]) <= LOCKOUT_S
    assert "Locked out" in right.text and "radfed_session" not in right.cookies
    assert other.status_code == 303 and "radfed_session" in other.cookies
    entries = [e for e in lockouts(node.home / "index.sqlite") if e[1] == guesser]
    assert len(entries) == 1 and entries[0][2]["scope"] == "password"


# -- TLS ---------------------------------------------------------------------------------


def _wait_for_port(port: int, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.3)
    raise AssertionError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


@pytest.fixture(scope="module")
def control(services: Services) -> Iterator[int]:
    """A permissive TLS server with the coordinator's certificate (and an RSA one)."""
    pki = services.coordinator.home / "pki"
    rsa_chain = self_signed(
        services.base, "rsa", rsa.generate_private_key(public_exponent=65537, key_size=2048)
    )
    with serving(permissive_context((pki / "server.crt", pki / "server.key"), rsa_chain)) as port:
        yield port


def _ports(services: Services) -> dict[str, int]:
    _wait_for_port(services.coordinator.superlink_port)
    return {"api": services.coordinator.port, "superlink": services.coordinator.superlink_port}


def _name(case: tuple[ssl.TLSVersion, str]) -> str:
    return f"{case[0].name}-{case[1]}"


@pytest.mark.parametrize("server", ["api", "superlink"])
@pytest.mark.parametrize("case", WEAK, ids=_name)
def test_weak_tls_is_refused(
    services: Services, control: int, server: str, case: tuple[ssl.TLSVersion, str]
) -> None:
    # Prepare
    version, ciphers = case
    port = _ports(services)[server]

    # Execute
    offered = offer("127.0.0.1", control, version, ciphers)
    answer = offer("127.0.0.1", port, version, ciphers)

    # Assert: the offer was made (the permissive server took it) and ours refused it
    assert offered.accepted, offered
    assert refused(answer), answer


@pytest.mark.parametrize("server", ["api", "superlink"])
@pytest.mark.parametrize("case", STRONG, ids=_name)
def test_tls12_ecdhe_aead_and_tls13_are_accepted(
    services: Services, server: str, case: tuple[ssl.TLSVersion, str]
) -> None:
    # Prepare
    version, ciphers = case
    port = _ports(services)[server]

    # Execute
    answer = offer("127.0.0.1", port, version, ciphers)

    # Assert
    assert answer.accepted, answer
    if version is ssl.TLSVersion.TLSv1_2:
        assert answer.cipher == ciphers


@pytest.mark.parametrize("server", ["api", "superlink"])
@pytest.mark.parametrize(
    ("flags", "accepted"),
    [
        (["-tls1", "-cipher", "ALL:@SECLEVEL=0"], False),
        (["-tls1_1", "-cipher", "ALL:@SECLEVEL=0"], False),
        (["-tls1_2", "-cipher", "ECDHE-ECDSA-AES256-SHA384:@SECLEVEL=0"], False),
        (["-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-GCM-SHA256"], True),
        (["-tls1_3"], True),
    ],
    ids=["tls1", "tls1_1", "tls1_2-cbc", "tls1_2-gcm", "tls1_3"],
)
def test_openssl_s_client_agrees(
    services: Services, control: int, server: str, flags: list[str], accepted: bool
) -> None:
    # Prepare
    port = _ports(services)[server]

    def s_client(to: int) -> bool:
        done = subprocess.run(
            ["openssl", "s_client", "-connect", f"127.0.0.1:{to}", *flags],
            input="",
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        # The exit status is no guide (a server that hangs up without close_notify
        # fails it); the session line is: "Cipher is (NONE)" when no handshake was made.
        return re.search(r"Cipher is (?!\(NONE\))\S+", done.stdout) is not None

    # Execute / Assert: the permissive server takes every offer; ours only the strong ones
    assert s_client(control)
    assert s_client(port) is accepted
