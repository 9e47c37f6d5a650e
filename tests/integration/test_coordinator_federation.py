"""The federation end to end over real TLS on 127.0.0.1, on SQLite and on PostgreSQL.

``radfed coordinator init`` creates the CA; ``serve`` runs the API as a process;
``site add`` prints a token; ``radfed node enroll`` (another process) makes the
node key and gets its certificate; heartbeats arrive; ``site revoke`` shuts the
site out from its next request on. Every endpoint is called by every kind of
caller (the authorization matrix).
"""

from __future__ import annotations

import datetime as dt
import json
import ssl
import stat
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from protocols.nodeauth import make_token
from protocols.version import PROTOCOL_VERSION, SOFTWARE_VERSION
from radfed.synth.site import write_site_corpus
from tests.helpers import CoordinatorProcess, NodeProcess, PgSchema, run_cli

pytestmark = pytest.mark.integration


@dataclass
class Node:
    home: Path
    site: str

    @property
    def federation(self) -> Path:
        return self.home / "keys" / "federation"

    def key(self) -> ec.EllipticCurvePrivateKey:
        key = serialization.load_pem_private_key((self.federation / "node.key").read_bytes(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return key

    def fingerprint(self) -> str:
        cert = x509.load_pem_x509_certificate((self.federation / "node.crt").read_bytes())
        return cert.fingerprint(hashes.SHA256()).hex()


@dataclass
class Federation:
    coordinator: CoordinatorProcess
    env: dict[str, str]
    operator: str
    researcher: str
    active: Node
    revoked: Node
    base: Path

    def cli(self, *args: str, check: bool = False) -> Any:
        return run_cli(
            "coordinator", *args, "--home", str(self.coordinator.home), env=self.env, check=check
        )

    def node_tls(self, node: Node | None) -> ssl.SSLContext:
        if node is None:
            return self.coordinator.tls()
        return self.coordinator.tls(node.federation / "node.crt", node.federation / "node.key")


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def federation(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Federation]:
    base = tmp_path_factory.mktemp(f"federation-{request.param}")
    home = base / "coordinator"
    with PgSchema() as schema:
        env = (
            {"RADFED_COORDINATOR_DATABASE_URL": schema.url} if request.param == "postgresql" else {}
        )
        # The authorization matrix presents a wrong token on purpose, once per endpoint,
        # from 127.0.0.1 like every other caller here: more than the default 10 failures
        # that lock a client out (tests/integration/test_security_auth.py tests that).
        env["RADFED_COORDINATOR_AUTH_MAX_FAILURES"] = "1000"
        # The heap trimmer every 0.2 s, not every minute: its test sees it work.
        env["RADFED_COORDINATOR_MALLOC_TRIM_S"] = "0.2"
        init = run_cli("coordinator", "init", "--home", str(home), env=env)
        assert init.returncode == 0, init.stderr
        operator = run_cli(
            "coordinator",
            "token",
            "create",
            "olga",
            "--role",
            "operator",
            "--home",
            str(home),
            env=env,
            check=True,
        ).stdout.strip()
        researcher = run_cli(
            "coordinator",
            "token",
            "create",
            "rita",
            "--role",
            "researcher",
            "--home",
            str(home),
            env=env,
            check=True,
        ).stdout.strip()
        with CoordinatorProcess(home, env=env) as coordinator:
            nodes = {}
            for name in ("st-marys", "lost-site"):
                token = run_cli(
                    "coordinator", "site", "add", name, "--home", str(home), env=env, check=True
                ).stdout.strip()
                node_home = base / name
                run_cli(
                    "node", "enroll", coordinator.url, token, "--home", str(node_home), check=True
                )
                nodes[name] = Node(node_home, name)
            run_cli(
                "coordinator",
                "site",
                "revoke",
                "lost-site",
                "--reason",
                "stolen",
                "--home",
                str(home),
                env=env,
                check=True,
            )
            yield Federation(
                coordinator, env, operator, researcher, nodes["st-marys"], nodes["lost-site"], base
            )


def test_enrollment_stores_a_private_key_and_a_certificate_for_the_site(
    federation: Federation,
) -> None:
    node = federation.active

    config = json.loads((node.federation / "coordinator.json").read_text())
    cert = x509.load_pem_x509_certificate((node.federation / "node.crt").read_bytes())
    ca = x509.load_pem_x509_certificate((node.federation / "ca.crt").read_bytes())

    # The home (the first thing enrolling made in it) and the keys folder: owner only.
    for folder in (node.federation, node.federation.parent, node.federation.parent.parent):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder
    for name in ("node.key", "node.crt", "ca.crt", "coordinator.json"):
        assert stat.S_IMODE((node.federation / name).stat().st_mode) == 0o600
    assert config["site"] == "st-marys" and config["url"] == federation.coordinator.url
    assert ca.public_bytes(serialization.Encoding.PEM) == federation.coordinator.ca.read_bytes()
    cert.verify_directly_issued_by(ca)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "st-marys"
    assert cert.public_key() == node.key().public_key()


def test_a_used_token_and_a_token_for_another_federation_are_refused(
    federation: Federation, tmp_path: Path
) -> None:
    # Prepare
    token = federation.cli("site", "add", "twice", check=True).stdout.strip()
    run_cli(
        "node",
        "enroll",
        federation.coordinator.url,
        token,
        "--home",
        str(tmp_path / "a"),
        check=True,
    )
    other_ca = "rfe1." + token.split(".")[1] + "." + "0" * 64

    # Execute
    reused = run_cli(
        "node", "enroll", federation.coordinator.url, token, "--home", str(tmp_path / "b")
    )
    foreign = run_cli(
        "node", "enroll", federation.coordinator.url, other_ca, "--home", str(tmp_path / "c")
    )

    # Assert
    assert reused.returncode == 2 and "was used already" in reused.stderr
    assert foreign.returncode == 2 and "does not match the enrollment token" in foreign.stderr
    assert not (tmp_path / "b" / "keys" / "federation" / "node.key").exists()
    assert not (tmp_path / "c" / "keys" / "federation").exists()


def test_heartbeats_show_on_the_site_list(federation: Federation) -> None:
    # Execute
    sent = run_cli("node", "heartbeat", "--home", str(federation.active.home))
    sites = httpx.get(
        f"{federation.coordinator.url}/api/v1/sites",
        headers={"Authorization": f"Bearer {federation.operator}"},
        verify=federation.coordinator.tls(),
    ).json()
    listed = federation.cli("site", "list", check=True).stdout

    # Assert
    assert sent.returncode == 0, sent.stderr
    by_name = {s["name"]: s for s in sites}
    assert by_name["st-marys"]["status"] == "active"
    assert by_name["st-marys"]["health"] == "ok"
    assert by_name["st-marys"]["version"] == SOFTWARE_VERSION
    seen = dt.datetime.fromisoformat(by_name["st-marys"]["last_seen"])
    assert dt.datetime.now(dt.UTC) - seen < dt.timedelta(minutes=5)
    assert by_name["lost-site"]["status"] == "revoked"
    assert "st-marys" in listed and "revoked" in listed


def test_a_revoked_site_is_refused(federation: Federation) -> None:
    refused = run_cli("node", "heartbeat", "--home", str(federation.revoked.home))

    assert refused.returncode == 2
    assert "revoked" in refused.stderr


def test_tls_needs_a_certificate_of_this_federation(federation: Federation, tmp_path: Path) -> None:
    # Prepare: a key and certificate from some other CA, and a valid token for st-marys.
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "st-marys")])
    now = dt.datetime.now(dt.UTC)
    rogue = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA384())
    )
    (tmp_path / "rogue.crt").write_bytes(rogue.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "rogue.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    node = federation.active
    path = "/api/v1/node/whoami"

    def token() -> str:
        return make_token(node.key(), node.site, node.fingerprint(), "GET", path)

    # Execute
    with pytest.raises(httpx.HTTPError):
        httpx.get(
            f"{federation.coordinator.url}{path}",
            headers={"Authorization": token()},
            verify=federation.coordinator.tls(tmp_path / "rogue.crt", tmp_path / "rogue.key"),
        ).raise_for_status()
    without = httpx.get(
        f"{federation.coordinator.url}{path}",
        headers={"Authorization": token()},
        verify=federation.coordinator.tls(),
    )
    with_cert = httpx.get(
        f"{federation.coordinator.url}{path}",
        headers={"Authorization": token()},
        verify=federation.node_tls(node),
    )

    # Assert
    assert without.status_code == 401 and without.json()["code"] == "client_certificate_required"
    assert with_cert.status_code == 200 and with_cert.json()["site"] == "st-marys"


def test_a_node_token_is_checked_against_the_path_as_routed(federation: Federation) -> None:
    # Prepare: found by the API fuzz tests. The path was read back from a re-parsed URL,
    # which drops a tab (and splits at a "?"), so a token signed for the path sent was refused.
    node = federation.active
    token = make_token(
        node.key(), node.site, node.fingerprint(), "GET", "/api/v1/node/releases/v\t1?/studies"
    )

    # Execute
    answer = httpx.get(
        f"{federation.coordinator.url}/api/v1/node/releases/v%091%3F/studies",
        headers={"Authorization": token},
        verify=federation.node_tls(node),
    )

    # Assert
    assert answer.status_code == 404, answer.text
    assert answer.json()["code"] == "release_not_found"


# -- the authorization matrix -----------------------------------------------------------

OPEN = {("GET", "/healthz"), ("GET", "/api/v1/enroll/ca"), ("POST", "/api/v1/enroll")}
#: Every endpoint but the open ones -> the callers allowed.
MATRIX: dict[tuple[str, str], set[str]] = {
    ("GET", "/api/v1/node/whoami"): {"node"},
    ("POST", "/api/v1/node/heartbeat"): {"node"},
    ("GET", "/api/v1/sites"): {"operator"},
    ("POST", "/api/v1/sites/{name}/revoke"): {"operator"},
    ("GET", "/api/v1/audit/verify"): {"operator"},
    ("GET", "/metrics"): {"operator"},
    ("POST", "/api/v1/uploads"): {"node"},
    ("GET", "/api/v1/uploads/{upload_id}"): {"node"},
    ("PUT", "/api/v1/uploads/{upload_id}/files/{sha256}"): {"node"},
    ("POST", "/api/v1/uploads/{upload_id}/complete"): {"node"},
    ("GET", "/api/v1/exams"): {"operator", "researcher"},
    ("GET", "/api/v1/exams/{study_uid}"): {"operator", "researcher"},
    ("GET", "/api/v1/stats/{dimension}"): {"operator", "researcher"},
    ("POST", "/api/v1/releases"): {"operator"},
    ("GET", "/api/v1/releases"): {"operator", "researcher"},
    ("GET", "/api/v1/releases/{name}"): {"operator", "researcher"},
    ("GET", "/api/v1/releases/{a}/diff/{b}"): {"operator", "researcher"},
    ("POST", "/api/v1/node/exams/{study_uid}/withdraw"): {"node"},
    ("GET", "/api/v1/apps"): {"operator", "researcher"},
    ("POST", "/api/v1/runs"): {"operator", "researcher"},
    ("GET", "/api/v1/runs"): {"operator", "researcher"},
    ("GET", "/api/v1/runs/{run_id}"): {"operator", "researcher"},
    ("POST", "/api/v1/runs/{run_id}/stop"): {"operator", "researcher"},
    ("POST", "/api/v1/runs/{run_id}/resume"): {"operator", "researcher"},
    ("GET", "/api/v1/runs/{run_id}/logs"): {"operator", "researcher"},
    ("GET", "/api/v1/runs/{run_id}/model"): {"operator", "researcher"},
    ("GET", "/api/v1/runs/{run_id}/provenance"): {"operator", "researcher"},
    ("GET", "/api/v1/node/releases/{name}/studies"): {"node"},
}
#: What path parameters are called with (nothing by these names exists).
PLACEHOLDERS = {
    "{name}": "no-such-site",
    "{upload_id}": "0" * 32,
    "{sha256}": "ab" * 32,
    "{study_uid}": "1.2.3.4",
    "{dimension}": "site",
    "{a}": "no-such-release",
    "{b}": "no-such-release",
    "{run_id}": "run-9999",
}
CALLERS = ("nobody", "operator", "researcher", "node", "revoked node", "wrong token")


def _call(federation: Federation, caller: str, method: str, template: str) -> httpx.Response:
    path = template
    for parameter, value in PLACEHOLDERS.items():
        path = path.replace(parameter, value)
    headers: dict[str, str] = {}
    node: Node | None = None
    if caller in ("operator", "researcher", "wrong token"):
        token = {
            "operator": federation.operator,
            "researcher": federation.researcher,
            "wrong token": "rfc_" + "A" * 43,
        }[caller]
        headers["Authorization"] = f"Bearer {token}"
    elif caller in ("node", "revoked node"):
        node = federation.active if caller == "node" else federation.revoked
        headers["Authorization"] = make_token(
            node.key(), node.site, node.fingerprint(), method, path
        )
    body = None
    if path.endswith("/heartbeat"):
        body = {
            "software_version": SOFTWARE_VERSION,
            "protocol_version": PROTOCOL_VERSION,
            "counts": {},
            "sent_at": dt.datetime.now(dt.UTC).isoformat(),
        }
    elif path == "/api/v1/releases" and method == "POST":
        body = {"name": "no-such-release", "filters": {"site": "no-such-site"}, "export": False}
    elif path.endswith("/withdraw"):
        body = {"reason": "authorization matrix"}
    return httpx.request(
        method,
        f"{federation.coordinator.url}{path}",
        headers=headers,
        json=body,
        verify=federation.node_tls(node),
        timeout=30,
    )


def test_metrics_report_the_federation_and_the_requests_answered(federation: Federation) -> None:
    # Prepare: what the API says, and a request the counter must have seen.
    from prometheus_client.parser import text_string_to_metric_families

    tls = federation.coordinator.tls()
    operator = {"Authorization": f"Bearer {federation.operator}"}
    listed = httpx.get(
        f"{federation.coordinator.url}/api/v1/sites", headers=operator, verify=tls
    ).json()
    exams = httpx.get(
        f"{federation.coordinator.url}/api/v1/exams", headers=operator, verify=tls
    ).json()["total"]

    # Execute
    answer = httpx.get(f"{federation.coordinator.url}/metrics", headers=operator, verify=tls)
    anonymous = httpx.get(f"{federation.coordinator.url}/metrics", verify=tls)

    # Assert
    assert answer.status_code == 200 and anonymous.status_code == 401
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(answer.text)
        for s in family.samples
    }
    by_status: dict[str, float] = {}
    for (name, labels), value in samples.items():
        if name == "radfed_coordinator_sites":
            status = dict(labels)["status"]
            by_status[status] = by_status.get(status, 0) + value
    expected: dict[str, int] = {}
    for site in listed:
        expected[site["status"]] = expected.get(site["status"], 0) + 1
    assert by_status == expected
    assert samples[("radfed_coordinator_exams", ())] == exams
    requests = {
        dict(labels)["route"]: value
        for (name, labels), value in samples.items()
        if name == "radfed_coordinator_requests_total"
        and dict(labels)["method"] == "GET"
        and dict(labels)["status"] == "200"
    }
    assert requests.get("/api/v1/sites", 0) >= 1 and requests.get("/api/v1/exams", 0) >= 1
    assert not any("1.2.3" in str(labels) for _, labels in samples)  # templates, not paths


def test_the_c_heap_keeps_to_its_arena_limit_under_parallel_requests(
    federation: Federation,
) -> None:
    # Prepare: 40 requests at a time — glibc would give each new request thread an
    # arena of its own (up to eight per core) without the limit (malloc_arena_max, 2).
    from prometheus_client.parser import text_string_to_metric_families

    tls = federation.coordinator.tls()
    researcher = {"Authorization": f"Bearer {federation.researcher}"}
    operator = {"Authorization": f"Bearer {federation.operator}"}
    url = federation.coordinator.url

    def search(n: int) -> int:
        with httpx.Client(verify=tls, timeout=60) as client:
            return client.get(
                f"{url}/api/v1/exams", params={"limit": 1 + n % 7}, headers=researcher
            ).status_code

    with ThreadPoolExecutor(40) as pool:
        statuses = list(pool.map(search, range(200)))
    time.sleep(0.5)  # the trimmer's interval here is 0.2 s

    # Execute
    answer = httpx.get(f"{url}/metrics", headers=operator, verify=tls)

    # Assert
    assert statuses == [200] * 200 and answer.status_code == 200
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(answer.text)
        for s in family.samples
    }
    assert 1 <= samples[("radfed_coordinator_heap_arenas", ())] <= 2
    assert samples[("radfed_coordinator_heap_bytes", (("state", "in_use"),))] > 1 << 20
    assert ("radfed_coordinator_heap_bytes", (("state", "free"),)) in samples
    assert samples[("radfed_coordinator_heap_trims_total", ())] >= 1


def test_the_matrix_covers_every_endpoint(federation: Federation) -> None:
    spec = httpx.get(
        f"{federation.coordinator.url}/api/v1/openapi.json", verify=federation.coordinator.tls()
    ).json()
    served = {(method.upper(), path) for path, item in spec["paths"].items() for method in item}

    assert served - OPEN == set(MATRIX)


@pytest.mark.parametrize("caller", CALLERS)
@pytest.mark.parametrize(("method", "path"), sorted(MATRIX))
def test_authorization_matrix(federation: Federation, caller: str, method: str, path: str) -> None:
    answer = _call(federation, caller, method, path)

    if caller in MATRIX[(method, path)]:
        assert answer.status_code not in (401, 403), answer.text
        assert answer.status_code < 500
    elif caller == "revoked node" and "node" in MATRIX[(method, path)]:
        assert answer.status_code == 403 and answer.json()["code"] == "site_revoked"
    elif caller == "researcher" and "operator" in MATRIX[(method, path)]:
        assert answer.status_code == 403 and answer.json()["code"] == "forbidden"
    else:
        assert answer.status_code == 401, answer.text
        assert answer.json()["code"] in ("unauthorized", "client_certificate_required")


def test_node_serve_shares_in_the_background_and_reports_its_counts(
    federation: Federation,
) -> None:
    # Prepare: a node with studies taken in (one approved by policy, one held), sending a
    # heartbeat every second and looking at its outbox every second.
    import sqlite3
    import time

    node = federation.active
    corpus = federation.base / "corpus"
    write_site_corpus(corpus, patients=1, ct_slices=2, ct_size=64, cr_size=64, with_sr=False)
    run_cli("node", "ingest", str(corpus), "--home", str(node.home), "-q", check=True)

    def counts() -> dict[str, int]:
        with sqlite3.connect(node.home / "index.sqlite") as db:
            return dict(
                db.execute("SELECT status, count(*) FROM studies GROUP BY status").fetchall()
            )

    before = counts()
    env = {"RADFED_NODE_HEARTBEAT_SECONDS": "1", "RADFED_NODE_OUTBOX_SECONDS": "1"}

    # Execute
    with NodeProcess(node.home, env=env):
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            sites = httpx.get(
                f"{federation.coordinator.url}/api/v1/sites",
                headers={"Authorization": f"Bearer {federation.operator}"},
                verify=federation.coordinator.tls(),
            ).json()
            mine = next(s for s in sites if s["name"] == "st-marys")
            now = counts()
            if not {"approved", "queued"} & set(now) and mine["counts"] == now:
                break
            time.sleep(0.5)
        registered = httpx.get(
            f"{federation.coordinator.url}/api/v1/exams",
            headers={"Authorization": f"Bearer {federation.operator}"},
            verify=federation.coordinator.tls(),
        ).json()

    # Assert: what was approved was shared by serve's sender, and the heartbeat says so.
    assert before.get("approved") and before.get("held")
    assert now == {"shared": before["approved"], "held": before["held"]}
    assert mine["counts"] == now and mine["health"] == "ok"
    assert registered["total"] == before["approved"]
