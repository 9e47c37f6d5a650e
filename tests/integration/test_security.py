"""Issue 9's security pass, end to end: hostile names, floods, replays, files at rest, the vault.

One federation for the module, started under a permissive umask (000: whatever
a process creates without saying otherwise is world-readable and writable): a
coordinator (``radfed coordinator serve`` over TLS, small body and upload limits
so a flood is quick to make), two enrolled sites — ``st-a`` with a de-identified
PHI-laden corpus, ``st-b`` with nothing — and a served node (``radfed node
serve``: its HTTP API and DICOM listener). Everything arrives the way an
attacker would send it: raw bytes over TLS for request lines and bodies no
client library would produce, a real DICOM association, captured manifests and
request tokens sent again. After each attack the filesystem is searched for
what must not have been written, and the services must still answer.

Rerun: ``.venv/bin/pytest tests/integration/test_security.py`` (about two minutes).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import http.client
import json
import os
import secrets
import socket
import ssl
import stat
import threading
import time
import urllib.parse
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from coordinator import sites, tokens
from coordinator.registry.db import Database
from coordinator.settings import load_settings as load_coordinator_settings
from node import federation
from node.deid.vault import Vault, VaultError
from node.errors import NodeError
from node.settings import NodeSettings, load_settings
from node.share.manifest import ExamPackage, package
from node.share.upload import check_receipt, send_exam
from node.site import open_index
from protocols.api.coordinator import (
    DeidRecord,
    ExamEntry,
    ExamManifest,
    InstanceEntry,
    Receipt,
    SeriesEntry,
    SignedManifest,
    UploadCreate,
)
from protocols.deid.options import DeidOptions
from protocols.nodeauth import make_token
from protocols.signing import sign_manifest
from protocols.version import DEID_PROFILE_VERSION, PROTOCOL_VERSION
from radfed.synth.site import SiteCorpus, write_site_corpus
from tests.helpers import CoordinatorProcess, NodeProcess, run_cli

pytestmark = pytest.mark.integration

#: The coordinator's limits in this module (small, so floods are quick to make).
BODY_MIB = 1
BODY_TIMEOUT_S = 2
HEADER_TIMEOUT_S = 3
OPEN_UPLOADS = 3
MAX_CHUNK = 64 * 2**20


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


@dataclass
class Fed:
    base: Path
    marker: str
    coordinator: CoordinatorProcess
    operator: str
    a: NodeSettings
    b: NodeSettings
    corpus: SiteCorpus
    served: NodeProcess
    node_token: str
    receipts: dict[str, Receipt] = field(default_factory=dict)
    packages: dict[str, ExamPackage] = field(default_factory=dict)

    def studies(self) -> list[str]:
        import sqlite3

        with sqlite3.connect(self.a.home / "index.sqlite") as db:
            return [row[0] for row in db.execute("SELECT study_uid FROM studies ORDER BY id")]

    def package(self, study_uid: str) -> ExamPackage:
        files = federation.files(self.a)
        return package(open_index(self.a), self.a, study_uid, "st-a", files.key, files.cert)

    def api(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return httpx.request(
            method,
            f"{self.coordinator.url}{path}",
            headers={"Authorization": f"Bearer {self.operator}"},
            verify=self.coordinator.tls(),
            timeout=60,
            **kwargs,
        )

    def escaped(self) -> list[Path]:
        """Anything named after this module's marker, anywhere it could have been written."""
        found = [p for p in self.base.rglob(f"*{self.marker}*")]
        for folder in (Path("/"), Path("/tmp"), *self.base.parents):
            with contextlib.suppress(OSError):
                found += [p for p in folder.iterdir() if self.marker in p.name]
        return found


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fed]:
    base = tmp_path_factory.mktemp("security")
    home = base / "coordinator"
    env = {
        "RADFED_COORDINATOR_MAX_REQUEST_BODY_MIB": str(BODY_MIB),
        "RADFED_COORDINATOR_REQUEST_BODY_TIMEOUT_S": str(BODY_TIMEOUT_S),
        "RADFED_COORDINATOR_REQUEST_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S),
        "RADFED_COORDINATOR_MAX_OPEN_UPLOADS_PER_SITE": str(OPEN_UPLOADS),
        "RADFED_COORDINATOR_SCAN_WORKERS": "1",
        # replays and stray credentials are made on purpose here: no lockout of 127.0.0.1
        "RADFED_COORDINATOR_AUTH_MAX_FAILURES": "1000",
    }
    coordinator = CoordinatorProcess(home, env=env)
    served = NodeProcess(base / "served", env={"RADFED_NODE_AUTH_MAX_FAILURES": "1000"})

    def site_a() -> SiteCorpus:
        corpus = write_site_corpus(
            base / "export", patients=2, ct_slices=2, ct_size=32, cr_size=32, with_us=False
        )
        run_cli("node", "ingest", str(corpus.root), "--home", str(base / "a"), "-q", check=True)
        return corpus

    # Everything below under umask 000: what RadFed does not make private itself is open.
    # (Commands run as users run them where they make files; the rest in-process, and
    # in parallel where they can, to keep the module short on two loaded cores.)
    with umask(0o000), ThreadPoolExecutor(3) as pool:
        corpus_made = pool.submit(site_a)
        run_cli("coordinator", "init", "--home", str(home), check=True)
        settings = load_coordinator_settings(home)
        db = Database.open(settings.db_url)
        try:
            operator = tokens.create(db, "ops", "operator", actor="test")
            enroll = {name: sites.add(db, settings, name, "test") for name in ("st-a", "st-b")}
        finally:
            db.close()
        index = open_index(load_settings(base / "served"))
        node_token = index.create_token("ops", "operator", actor="test")
        index.db.close()
        started = [pool.submit(coordinator.start), pool.submit(served.start)]
        try:
            for future in started:
                future.result()
            corpus = corpus_made.result()
            for name in ("a", "b"):
                federation.enroll(load_settings(base / name), coordinator.url, enroll[f"st-{name}"])
        except BaseException:
            coordinator.kill()
            served.kill()
            raise
    try:
        yield Fed(
            base=base,
            marker=f"radfed-escape-{secrets.token_hex(4)}",
            coordinator=coordinator,
            operator=operator,
            a=load_settings(base / "a"),
            b=load_settings(base / "b"),
            corpus=corpus,
            served=served,
            node_token=node_token,
        )
    finally:
        served.stop()
        coordinator.stop()


# -- raw HTTP ----------------------------------------------------------------------------------


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def code(self) -> str:
        try:
            return str(json.loads(self.body).get("code"))
        except ValueError:
            return f"<not JSON: {self.body[:80]!r}>"


def connect(fed: Fed, node: NodeSettings | None = None, timeout: float = 30) -> ssl.SSLSocket:
    """A TLS connection to the coordinator (with ``node``'s client certificate)."""
    files = federation.files(node) if node is not None else None
    context = fed.coordinator.tls(files.cert, files.key) if files else fed.coordinator.tls()
    sock = socket.create_connection(("127.0.0.1", fed.coordinator.port), timeout=timeout)
    return context.wrap_socket(sock, server_hostname="127.0.0.1")


def node_token(node: NodeSettings, method: str, target: str, now: float | None = None) -> str:
    """A ``RadFed-Node`` token for ``target`` as the server routes it (percent-decoded)."""
    files = federation.files(node)
    key = serialization.load_pem_private_key(files.key.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    config = json.loads(files.config.read_text())
    path = urllib.parse.unquote(target.partition("?")[0])
    return make_token(key, config["site"], config["certificate_sha256"], method, path, now=now)


def request(
    fed: Fed,
    method: str,
    target: str,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
    node: NodeSettings | None = None,
    token: str | None = None,
    sock: ssl.SSLSocket | socket.socket | None = None,
) -> Answer:
    """One request written byte for byte (the target is not normalised or re-encoded)."""
    sock = sock or connect(fed, node)
    head = {
        "Host": "127.0.0.1",
        "Content-Length": str(len(body)),
        **({"Content-Type": "application/json"} if body.startswith(b"{") else {}),
        **(headers or {}),
    }
    if node is not None:
        head["Authorization"] = node_token(node, method, target)
    elif token is not None:
        head["Authorization"] = f"Bearer {token}"
    lines = [f"{method} {target} HTTP/1.1", *(f"{k}: {v}" for k, v in head.items()), "", ""]
    with sock:
        sock.sendall("\r\n".join(lines).encode("latin-1") + body)
        return read_answer(sock)


def read_answer(sock: socket.socket) -> Answer:
    response = http.client.HTTPResponse(sock)  # type: ignore[arg-type]
    response.begin()
    return Answer(
        response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    )


def fake_signed(node: NodeSettings, sizes: list[int]) -> SignedManifest:
    """A manifest ``node`` signs for a new study whose files (random digests) were never made."""
    files = federation.files(node)
    key = serialization.load_pem_private_key(files.key.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    site = json.loads(files.config.read_text())["site"]
    manifest = ExamManifest(
        protocol_version=PROTOCOL_VERSION,
        site=site,
        exam=ExamEntry(
            pseudonym="SITE-FLOOD",
            study_instance_uid=f"2.25.{secrets.randbits(100)}",
            modalities=["CT"],
            series=[
                SeriesEntry(
                    series_instance_uid=f"2.25.{secrets.randbits(100)}",
                    modality="CT",
                    instances=[
                        InstanceEntry(
                            sop_instance_uid=f"2.25.{secrets.randbits(100)}",
                            sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                            size=size,
                            sha256=secrets.token_hex(32),
                        )
                        for size in sizes
                    ],
                )
            ],
        ),
        deid=DeidRecord.of(DeidOptions(), DEID_PROFILE_VERSION),
        created_at=dt.datetime.now(dt.UTC),
    )
    return sign_manifest(manifest, key, x509.load_pem_x509_certificate(files.cert.read_bytes()))


def opening(signed: SignedManifest) -> bytes:
    return json.dumps(UploadCreate(signed=signed).model_dump(mode="json")).encode()


def healthy(fed: Fed) -> bool:
    return fed.coordinator.ready() and fed.served.ready()


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


# -- 1. names that could reach the filesystem --------------------------------------------------


def hostile_names(marker: str) -> dict[str, str]:
    """Path segments, percent-encoded as they go on the wire, by what they try."""
    return {
        "parent": f"..%2F..%2F..%2F..%2F..%2F{marker}",
        "dot-dot": "%2e%2e",
        "dot": ".",
        "absolute": f"%2Ftmp%2F{marker}",
        "nul": f"{marker}%00.dcm",
        "backslash": f"..%5C..%5C..%5C{marker}",
        "overlong": "x" * 5000,
        "fullwidth": f"%EF%BC%8E%EF%BC%8E%EF%BC%8F{marker}",
        "overlong-utf8": f"%C0%AE%C0%AE%2F{marker}",
        "double-encoded": f"..%252F..%252F{marker}",
        "newline": f"{marker}%0A..",
    }


def openapi_routes(fed: Fed) -> list[tuple[str, str]]:
    document = fed.api("GET", "/api/v1/openapi.json").json()
    return [
        (method.upper(), path)
        for path, operations in document["paths"].items()
        for method in operations
        if "{" in path
    ]


def test_api_path_parameters_never_reach_the_filesystem(fed: Fed) -> None:
    # Prepare: every route with a path parameter, as the right caller (a node or an operator).
    routes = openapi_routes(fed)
    names = hostile_names(fed.marker)
    sha = "0" * 64
    answers: dict[str, Answer] = {}

    # Execute
    for method, template in routes:
        by_node = template.startswith(("/api/v1/uploads", "/api/v1/node/"))
        for what, name in names.items():
            target = template
            for param in ("upload_id", "study_uid", "name", "a", "b", "run_id", "dimension"):
                target = target.replace(f"{{{param}}}", name)
            target = target.replace("{sha256}", sha)
            body = b'{"reason": "x"}' if method in ("POST", "PUT") else b""
            answers[f"{method} {template} [{what}]"] = request(
                fed,
                method,
                target,
                body,
                {"Content-Type": "application/json"},
                node=fed.a if by_node else None,
                token=None if by_node else fed.operator,
            )
        # the sha256 of a chunk is a path parameter too
        if "{sha256}" in template:
            for what, name in names.items():
                target = template.replace("{upload_id}", "0" * 32).replace("{sha256}", name)
                answers[f"{method} {template} [sha256 {what}]"] = request(
                    fed, method, target, b"x", node=fed.a
                )

    # Assert: a clear refusal (the shared error body), never a success or a crash
    assert len(routes) >= 15, routes
    wrong = {
        where: (a.status, a.code)
        for where, a in answers.items()
        if not 400 <= a.status < 500 or a.code.startswith("<")
    }
    assert wrong == {}
    assert fed.escaped() == []
    assert healthy(fed)


def test_release_and_site_names_that_are_paths_are_refused(fed: Fed) -> None:
    # Prepare
    names = [
        f"../{fed.marker}",
        f"/tmp/{fed.marker}",
        "..",
        ".",
        f"{fed.marker}\x00",
        f"..\\{fed.marker}",
        f"a/{fed.marker}",
        "x" * 65,
        f"\uff0e\uff0e\uff0f{fed.marker}",
        f" {fed.marker}",
        f"{fed.marker}\n",
    ]
    releases = fed.coordinator.home / "releases"
    home = ["--home", str(fed.coordinator.home)]

    # Execute
    by_api = {
        name: fed.api("POST", "/api/v1/releases", json={"name": name, "export": True})
        for name in names
    }
    # (a command line cannot carry a NUL byte; these few stand for the rest)
    by_cli = {
        n: run_cli("coordinator", "release", "create", n, *home)
        for n in (f"../{fed.marker}", f"/tmp/{fed.marker}")
    }
    sites = {n: run_cli("coordinator", "site", "add", n, *home) for n in (f"..\\{fed.marker}",)}

    # Assert
    assert {n: (r.status_code, r.json()["code"]) for n, r in by_api.items()} == {
        n: (422, "invalid_request") for n in names
    }
    for done in (*by_cli.values(), *sites.values()):
        assert done.returncode != 0 and "error" in done.stderr.lower(), done
        assert '"name"' in done.stderr or "name" in done.stderr.lower()
    assert fed.api("GET", "/api/v1/releases").json() == []
    assert not releases.exists() or list(releases.iterdir()) == []
    assert fed.escaped() == []


def test_node_api_path_parameters_are_refused(fed: Fed) -> None:
    # Prepare
    names = hostile_names(fed.marker)
    routes = [
        ("GET", "/api/v1/studies/{}"),
        ("POST", "/api/v1/studies/{}/approve"),
        ("POST", "/api/v1/studies/{}/reject"),
        ("GET", "/studies/{}"),
    ]
    sock_to = ("127.0.0.1", fed.served.api_port)

    # Execute
    answers = {
        f"{method} {route} [{what}]": request(
            fed,
            method,
            route.format(name),
            b'{"reason": "x"}' if method == "POST" else b"",
            {"Content-Type": "application/json", "Authorization": f"Bearer {fed.node_token}"},
            sock=socket.create_connection(sock_to, timeout=30),
        )
        for method, route in routes
        for what, name in names.items()
    }

    # Assert: API routes answer the error body; the UI sends a stranger to sign in
    wrong = {
        where: (a.status, a.code)
        for where, a in answers.items()
        if not (400 <= a.status < 500 or (where.startswith("GET /studies") and a.status == 303))
    }
    assert wrong == {}
    assert fed.escaped() == []
    assert healthy(fed)


@pytest.mark.filterwarnings("ignore:The value length")  # an accession too long, on purpose
def test_hostile_names_over_dicom_stay_inside_the_node(fed: Fed) -> None:
    # Prepare: an instance whose every name is a path, from a caller whose AE title is one.
    source = pydicom.dcmread(next(p for p in fed.corpus.files if "CT" in p.parts))
    source.PatientID = f"../../../../{fed.marker}"
    source.PatientName = f"..\\..\\{fed.marker}"
    source.AccessionNumber = f"/tmp/{fed.marker}"
    source.SOPInstanceUID = "1.2.826.0.1.3680043.10.1043.99.1"
    ae = AE(ae_title="../../..")
    ae.add_requested_context(CTImageStorage, ["1.2.840.10008.1.2.1"])
    home = fed.served.home

    # Execute
    assoc = ae.associate("127.0.0.1", fed.served.dicom_port, ae_title="RADFED")
    assert assoc.is_established
    try:
        status = int(assoc.send_c_store(source).Status)
    finally:
        assoc.release()
    deadline = time.monotonic() + 60
    while list((home / "spool").glob("*.dcm")) and time.monotonic() < deadline:
        time.sleep(0.2)
    stored = [p for p in (home / "store").rglob("*.dcm")]

    # Assert: taken in, under the store, named by the pseudonym and mapped UIDs only
    assert status == 0
    assert stored, "the instance was not stored"
    for path in stored:
        relative = path.relative_to(home / "store")
        assert ".." not in relative.parts and fed.marker not in str(relative)
        assert path.resolve().is_relative_to((home / "store").resolve())
    assert fed.escaped() == []


# -- 2. bodies too large, too slow, too many ---------------------------------------------------


def body_routes(fed: Fed) -> list[tuple[str, str]]:
    """Every route that takes a body: the API's (from its document) and the web UI's forms."""
    document = fed.api("GET", "/api/v1/openapi.json").json()
    api = [
        (method.upper(), path.replace("{sha256}", "0" * 64).replace("{", "").replace("}", ""))
        for path, operations in document["paths"].items()
        for method in operations
        if method in ("post", "put", "patch")
    ]
    web = [
        ("POST", f"/ui{path}")
        for path in (
            "/login",
            "/logout",
            "/sites",
            "/sites/x/token",
            "/sites/x/revoke",
            "/releases",
            "/releases/x/export",
        )
    ]
    return api + web


def test_a_huge_declared_body_is_refused_on_every_route_before_it_is_read(fed: Fed) -> None:
    # Prepare
    routes = body_routes(fed)
    pid = fed.coordinator.proc.pid  # type: ignore[union-attr]
    before = rss_mib(pid)

    # Execute: a terabyte promised, not a byte of it sent (nor any credential)
    answers = {
        f"{method} {path}": request(fed, method, path, headers={"Content-Length": str(10**12)})
        for method, path in routes
    }
    chunk = request(
        fed,
        "PUT",
        f"/api/v1/uploads/{'0' * 32}/files/{'0' * 64}?offset=0",
        headers={"Content-Length": str(MAX_CHUNK + 1)},
    )

    # Assert
    assert len(routes) >= 15
    assert {k: (a.status, a.code) for k, a in answers.items()} == {
        k: (413, "request_too_large") for k in answers
    }
    assert (chunk.status, chunk.code) == (413, "request_too_large")
    assert answers["POST /api/v1/enroll"].headers["connection"] == "close"
    assert rss_mib(pid) - before < 50
    assert healthy(fed)


def _flood(fed: Fed, path: str, total: int, results: list[Any]) -> None:
    """``total`` bytes of a chunked body that never ends, then the server's answer.

    (The server answers at its limit and stops parsing; until TLS has shut down it
    reads on and discards what still comes, so the whole ``total`` goes out.)
    """
    try:
        sock = connect(fed)
        head = (
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            "Transfer-Encoding: chunked\r\n\r\n"
        )
        sock.sendall(head.encode())
        piece = b"[" + b"1," * (2**15)
        frame = f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
        sent = 0
        with contextlib.suppress(OSError):
            while sent < total:
                sock.sendall(frame)
                sent += len(piece)
        answer = read_answer(sock)
        sock.settimeout(10)
        try:
            closed = sock.recv(1) == b""
        except (OSError, ssl.SSLError):
            closed = True
        results.append((answer.status, answer.code, sent, closed))
    except Exception as exc:
        results.append(("error", repr(exc), 0, False))


def test_chunked_floods_without_end_are_refused_and_memory_stays_bounded(fed: Fed) -> None:
    # Prepare: eight senders at once, each with 8 MiB of chunked JSON that never ends.
    pid = fed.coordinator.proc.pid  # type: ignore[union-attr]
    before = rss_mib(pid)
    results: list[Any] = []
    senders = [
        threading.Thread(target=_flood, args=(fed, path, 8 * 2**20, results))
        for path in ("/api/v1/enroll", "/api/v1/uploads", "/api/v1/releases", "/api/v1/runs") * 2
    ]
    peak = before

    # Execute
    for sender in senders:
        sender.start()
    while any(s.is_alive() for s in senders):
        peak = max(peak, rss_mib(pid))
        time.sleep(0.05)

    # Assert: each refused after about the limit, none read to its end
    assert [(status, code, closed) for status, code, _, closed in results] == [
        (413, "request_too_large", True)
    ] * 8
    assert peak - before < 8 * BODY_MIB * 4 + 64, (before, peak)
    assert healthy(fed)


def test_slow_and_lying_bodies_are_cut_off_and_others_are_still_served(fed: Fed) -> None:
    # Prepare: twenty connections that promise a body and send a piece of it, slowly.
    slow = []
    for n in range(20):
        sock = connect(fed)
        sock.sendall(
            b"POST /api/v1/enroll HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nContent-Length: 500\r\n\r\n"
            + b'{"token": "'[: n % 10 + 1]
        )
        slow.append(sock)
    started = time.monotonic()

    # Execute
    meanwhile = httpx.get(
        f"{fed.coordinator.url}/healthz", verify=fed.coordinator.tls(), timeout=10
    )
    answers = [read_answer(sock) for sock in slow]
    waited = time.monotonic() - started
    for sock in slow:
        sock.close()

    # Assert
    assert meanwhile.status_code == 200
    assert {(a.status, a.code, a.headers.get("connection")) for a in answers} == {
        (408, "request_timeout", "close")
    }
    assert json.loads(answers[0].body)["retryable"] is True
    assert waited < BODY_TIMEOUT_S + 10
    assert healthy(fed)


def closed_after(sock: ssl.SSLSocket, limit: float) -> float | None:
    """Seconds until the server closed ``sock`` without answering; None if it answered."""
    started = time.monotonic()
    sock.settimeout(limit)
    try:
        data = sock.recv(1)
    except (ConnectionError, ssl.SSLError):
        data = b""
    except TimeoutError:
        return float("inf")
    return time.monotonic() - started if data == b"" else None


def test_slow_or_missing_headers_are_cut_off_and_others_are_still_served(fed: Fed) -> None:
    # Prepare: connections that say nothing, or send their headers a byte at a time.
    silent = [connect(fed) for _ in range(5)]
    dribbling = [connect(fed) for _ in range(5)]
    head = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Padding: " + b"a" * 200
    stop = threading.Event()

    def dribble() -> None:
        for byte in range(len(head)):
            if stop.wait(0.25):
                return
            for sock in dribbling:
                with contextlib.suppress(OSError):
                    sock.sendall(head[byte : byte + 1])

    sender = threading.Thread(target=dribble, daemon=True)
    sender.start()

    # Execute
    meanwhile = httpx.get(
        f"{fed.coordinator.url}/healthz", verify=fed.coordinator.tls(), timeout=10
    )
    closed = [closed_after(sock, HEADER_TIMEOUT_S + 20) for sock in silent + dribbling]
    stop.set()
    sender.join(5)
    for sock in silent + dribbling:
        sock.close()

    # Assert: every one closed unanswered around the deadline (the dribble would take
    # ~50 s to finish its headers); the others were served meanwhile and after.
    assert meanwhile.status_code == 200
    assert all(c is not None and c < HEADER_TIMEOUT_S + 10 for c in closed), closed
    assert healthy(fed)


def test_a_client_that_keeps_its_connection_gets_the_deadline_again_per_request(
    fed: Fed,
) -> None:
    # Prepare: one kept-alive connection, answered once.
    sock = connect(fed)
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    first = read_answer(sock)

    # Execute: the next request's headers start but never end.
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    closed = closed_after(sock, HEADER_TIMEOUT_S + 20)
    sock.close()

    # Assert
    assert first.status == 200
    assert closed is not None and closed < HEADER_TIMEOUT_S + 10, closed


def test_an_upload_takes_no_more_than_its_manifest_declares(fed: Fed) -> None:
    # Prepare: site b opens an upload for a manifest it signed: one file of 100 bytes.
    signed = fake_signed(fed.b, [100])
    opened = request(fed, "POST", "/api/v1/uploads", opening(signed), node=fed.b)
    assert opened.status == 200, opened.body
    upload = json.loads(opened.body)["upload_id"]
    sha = next(iter(signed.manifest.files()))
    objects_before = sorted((fed.coordinator.home / "objects").rglob("*"))

    # Execute
    past_end = request(fed, "PUT", f"/api/v1/uploads/{upload}/files/{sha}?offset=0", b"x" * 200,
                       node=fed.b)  # fmt: skip
    beyond = request(fed, "PUT", f"/api/v1/uploads/{upload}/files/{sha}?offset=150", b"x" * 10,
                     node=fed.b)  # fmt: skip
    unlisted = request(
        fed, "PUT", f"/api/v1/uploads/{upload}/files/{'ab' * 32}?offset=0", b"x", node=fed.b
    )
    foreign = request(fed, "GET", f"/api/v1/uploads/{upload}", node=fed.a)
    status = request(fed, "GET", f"/api/v1/uploads/{upload}", node=fed.b)

    # Assert
    assert opened.status == 200
    assert (past_end.status, past_end.code) == (422, "too_many_bytes")
    assert (beyond.status, beyond.code) == (409, "offset_mismatch")
    assert (unlisted.status, unlisted.code) == (404, "file_not_in_manifest")
    assert (foreign.status, foreign.code) == (404, "upload_not_found")
    assert json.loads(status.body)["files"][0]["received"] == 0
    assert sorted((fed.coordinator.home / "objects").rglob("*")) == objects_before


def test_a_site_cannot_keep_more_uploads_open_than_allowed(fed: Fed) -> None:
    # Prepare: site b opens uploads it never completes (it has one from the test above).
    def open_one() -> Answer:
        return request(fed, "POST", "/api/v1/uploads", opening(fake_signed(fed.b, [100])),
                       node=fed.b)  # fmt: skip

    # Execute
    answers = [open_one() for _ in range(OPEN_UPLOADS + 2)]

    # Assert: up to the cap, then a retryable refusal; the other site is not held up
    statuses = [(a.status, a.code if a.status != 200 else "open") for a in answers]
    assert statuses.count((200, "open")) == OPEN_UPLOADS - 1
    assert statuses[-1] == (409, "too_many_open_uploads")
    assert json.loads(answers[-1].body)["retryable"] is True
    study = fed.studies()[0]
    exam = fed.package(study)
    with federation.CoordinatorClient(fed.a) as client:
        receipt = send_exam(client, exam)
    assert isinstance(receipt, Receipt)
    fed.receipts[study], fed.packages[study] = receipt, exam


def test_the_node_api_refuses_huge_bodies(fed: Fed) -> None:
    # Prepare
    routes = [
        ("PUT", "/api/v1/training/policy"),
        ("POST", "/api/v1/studies/1.2.3/approve"),
        ("POST", "/login"),
    ]

    # Execute
    declared = {
        path: request(
            fed,
            method,
            path,
            headers={"Content-Length": str(10**12), "Authorization": f"Bearer {fed.node_token}"},
            sock=socket.create_connection(("127.0.0.1", fed.served.api_port), timeout=30),
        )
        for method, path in routes
    }

    # Assert
    assert {p: (a.status, a.code) for p, a in declared.items()} == {
        p: (413, "request_too_large") for p in declared
    }
    assert healthy(fed)


# -- 3. replays --------------------------------------------------------------------------------


def test_a_manifest_sent_again_or_by_another_site_registers_nothing_new(fed: Fed) -> None:
    # Prepare: st-a's exam is registered (above); its signed manifest was captured.
    study, exam = next(iter(fed.packages.items()))
    body = opening(exam.signed)
    before = fed.api("GET", f"/api/v1/exams/{study}").json()

    # Execute
    with federation.CoordinatorClient(fed.a) as client:
        again = send_exam(client, exam)
    by_b = request(fed, "POST", "/api/v1/uploads", body, node=fed.b)
    anonymous = request(fed, "POST", "/api/v1/uploads", body)
    as_operator = request(fed, "POST", "/api/v1/uploads", body, token=fed.operator)

    # Assert
    assert isinstance(again, Receipt) and again.duplicate
    assert again.manifest_sha256 == fed.receipts[study].manifest_sha256
    assert (by_b.status, by_b.code) == (403, "signer_mismatch")
    assert (anonymous.status, as_operator.status) == (401, 401)
    assert fed.api("GET", f"/api/v1/exams/{study}").json() == before
    assert fed.api("GET", "/api/v1/audit/verify").json()["ok"] is True


def test_the_node_takes_no_receipt_of_another_exam(fed: Fed) -> None:
    # Prepare: a second exam of st-a, registered; the coordinator's two receipts.
    first = next(iter(fed.packages))
    second = next(s for s in fed.studies() if s != first)
    exam = fed.package(second)
    with federation.CoordinatorClient(fed.a) as client:
        receipt = send_exam(client, exam)
    assert isinstance(receipt, Receipt)
    fed.receipts[second], fed.packages[second] = receipt, exam

    # Execute / Assert: each receipt is its own exam's, and no other's
    assert check_receipt(fed.receipts[first], fed.packages[first])
    with pytest.raises(NodeError) as swapped:
        check_receipt(fed.receipts[second], fed.packages[first])
    assert swapped.value.code == "receipt_mismatch" and not swapped.value.retryable


def test_a_withdrawn_exam_cannot_be_brought_back_by_its_old_manifest(fed: Fed) -> None:
    # Prepare: st-a withdraws its first exam.
    study, exam = next(iter(fed.packages.items()))
    body = opening(exam.signed)
    # the registered upload, as the node would find it again
    upload = json.loads(request(fed, "POST", "/api/v1/uploads", body, node=fed.a).body)
    assert upload["status"] == "registered" and upload["receipt"] is not None
    withdrawn = request(
        fed, "POST", f"/api/v1/node/exams/{study}/withdraw", b'{"reason": "consent"}',
        {"Content-Type": "application/json"}, node=fed.a,
    )  # fmt: skip

    # Execute
    replayed = request(fed, "POST", "/api/v1/uploads", body, node=fed.a)
    completed = request(fed, "POST", f"/api/v1/uploads/{upload['upload_id']}/complete",
                        node=fed.a)  # fmt: skip
    with federation.CoordinatorClient(fed.a) as client, pytest.raises(NodeError) as resent:
        send_exam(client, exam)

    # Assert
    assert withdrawn.status == 200
    assert (replayed.status, replayed.code) == (409, "exam_withdrawn")
    assert (completed.status, completed.code) == (409, "exam_withdrawn")
    assert (resent.value.code, resent.value.retryable) == ("exam_withdrawn", False)
    assert fed.api("GET", f"/api/v1/exams/{study}").json()["withdrawn_at"] is not None


def test_a_node_token_is_spent_once_even_across_a_coordinator_restart(fed: Fed) -> None:
    # Prepare: a heartbeat token, captured.
    path = "/api/v1/node/heartbeat"
    beat = json.dumps(
        {
            "software_version": "9.9.9",
            "protocol_version": "1.0",
            "counts": {},
            "sent_at": "2030-01-01T00:00:00Z",
        }
    ).encode()
    captured = node_token(fed.a, "POST", path)
    headers = {"Content-Type": "application/json", "Authorization": captured}

    def send(token_headers: dict[str, str]) -> Answer:
        files = federation.files(fed.a)
        sock = socket.create_connection(("127.0.0.1", fed.coordinator.port), timeout=30)
        tls = fed.coordinator.tls(files.cert, files.key).wrap_socket(
            sock, server_hostname="127.0.0.1"
        )
        return request(fed, "POST", path, beat, token_headers, sock=tls)

    # Execute
    first = send(headers)
    replayed = send(headers)
    fed.coordinator.stop()
    with umask(0o000):  # as the module started it
        fed.coordinator.start()
    after_restart = send(headers)
    fresh = send({**headers, "Authorization": node_token(fed.a, "POST", path)})

    # Assert
    assert first.status == 204, first.body
    assert (replayed.status, replayed.code) == (401, "unauthorized")
    assert (after_restart.status, after_restart.code) == (401, "node_token_stale")
    assert json.loads(after_restart.body)["retryable"] is True
    assert fresh.status == 204, fresh.body


# -- 5. the originals vault --------------------------------------------------------------------


def planted(corpus: SiteCorpus) -> set[str]:
    """Every original identifier the corpus carries, as the vault would hold it."""
    values: set[str] = set()
    for path in corpus.files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        for keyword in (
            "PatientID",
            "OtherPatientIDs",
            "AccessionNumber",
            "PatientAddress",
            "PatientTelephoneNumbers",
            "PatientBirthDate",
            "StudyInstanceUID",
            "SeriesInstanceUID",
            "SOPInstanceUID",
        ):
            value = ds.get(keyword)
            if value:
                values.add(str(value))
        values.update(part for part in str(ds.PatientName).split("^") if len(part) > 3)
    return values


def test_the_vault_holds_no_original_identifier_and_is_nothing_without_its_key(
    fed: Fed, tmp_path: Path
) -> None:
    # Prepare
    needles = planted(fed.corpus)
    vault_file = fed.a.vault_path
    raw = vault_file.read_bytes()
    key = bytes.fromhex((fed.a.keys_dir / "vault.key").read_text().strip())
    copy = tmp_path / "copy.vault"

    # Execute
    in_clear = sorted(n for n in needles if n.encode() in raw)
    entries = list(Vault(vault_file, key).entries())
    with pytest.raises(VaultError, match="wrong key or tampered"):
        list(Vault(vault_file, os.urandom(32)).entries())
    damaged = []
    for at in (8, 9, 12, 20, 40, len(raw) // 2, len(raw) - 1):
        flipped = bytearray(raw)
        flipped[at] ^= 0x04
        copy.write_bytes(bytes(flipped))
        try:
            damaged.append((at, len(list(Vault(copy, key).entries()))))
        except VaultError:
            continue

    # Assert: nothing in clear; it is the real map (the key opens it); every change is an error
    assert len(needles) > 20 and in_clear == []
    held = json.dumps(entries)
    assert {p.patient_id for p in fed.corpus.patients} <= {e["patient_id"] for e in entries}
    assert all(p.name in held for p in fed.corpus.patients)
    assert damaged == []
    index = (fed.a.home / "index.sqlite").read_bytes()
    assert sorted(n for n in needles if n.encode() in index) == []


def test_the_vault_key_lives_apart_from_the_vault_and_only_its_owner_reads_them(fed: Fed) -> None:
    key = fed.a.keys_dir / "vault.key"

    assert key.parent != fed.a.vault_path.parent
    assert not key.resolve().is_relative_to(fed.a.vault_path.parent.resolve())
    for path, mode in (
        (fed.a.home, 0o700),
        (fed.a.keys_dir, 0o700),
        (key, 0o600),
        (fed.a.keys_dir / "site.secret", 0o600),
        (fed.a.vault_path.parent, 0o700),
        (fed.a.vault_path, 0o600),
    ):
        assert stat.S_IMODE(path.stat().st_mode) == mode, path


# -- 4. secrets and state at rest --------------------------------------------------------------

#: What may be readable by others, and why (everything else: 0600 files, 0700 folders).
READABLE = {
    "pki/ca.crt": "the federation CA certificate is public (nodes fetch it to enroll)",
    "pki/server.crt": "the TLS server certificate is public (every client sees it)",
    "objects/": "de-identified objects' folders: 0750 for the operator's group (files 0600)",
    "store/": "de-identified outputs: 0755/0644, inside a home only its owner enters",
    "releases/": "release exports are for publishing: 0750/0640 for the operator's group",
}
#: Written by this test's harness, not by RadFed.
HARNESS = {"serve.log"}


def violations(home: Path) -> list[str]:
    found = []
    for path in [home, *home.rglob("*")]:
        relative = path.relative_to(home).as_posix() + ("/" if path.is_dir() else "")
        if path.is_symlink() or relative in HARNESS:
            continue
        mode = stat.S_IMODE(path.lstat().st_mode)
        if mode & 0o022:
            found.append(f"{relative} {mode:o}: writable by others")
            continue
        readable = any(
            relative == rule or (rule.endswith("/") and relative.startswith(rule))
            for rule in READABLE
        )
        private = 0o700 if path.is_dir() else 0o600
        if not readable and mode & 0o077:
            found.append(f"{relative} {mode:o}: not {private:o}")
    return found


def test_secrets_and_state_stay_private_under_a_permissive_umask(fed: Fed) -> None:
    # Prepare: the homes after init, tokens, enrollment, ingest, serve, uploads, a
    # withdrawal and a release export, all under umask 000 (the coordinator restarted
    # under it too, above).
    made = fed.api("POST", "/api/v1/releases", json={"name": "v1", "export": True})
    assert made.status_code == 201, made.text
    homes = {
        "coordinator": fed.coordinator.home,
        "node a": fed.a.home,
        "node b": fed.b.home,
        "served node": fed.served.home,
    }

    # Execute
    found = {name: violations(home) for name, home in homes.items()}

    # Assert
    assert found == {name: [] for name in homes}
    for name in ("registry.sqlite", "web.secret", "pki/ca.key", "pki/server.key"):
        assert stat.S_IMODE((fed.coordinator.home / name).stat().st_mode) == 0o600, name
    for name in ("node.key", "supernode.key", "coordinator.json"):
        assert stat.S_IMODE((federation.files(fed.a).key.parent / name).stat().st_mode) == 0o600


@pytest.mark.parametrize("mask", [0o022, 0o000], ids=["umask-022", "umask-000"])
def test_a_home_any_first_command_makes_is_private(fed: Fed, tmp_path: Path, mask: int) -> None:
    # Prepare
    one = next(p for p in fed.corpus.files if "XR" in p.parts)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "one.dcm").write_bytes(one.read_bytes())

    # Execute: a node home made by `ingest`, a coordinator home by `init`
    with umask(mask), ThreadPoolExecutor(2) as pool:
        made = [
            pool.submit(run_cli, "node", "ingest", str(tmp_path / "in"), "--home",
                        str(tmp_path / "node"), "-q", check=True),
            pool.submit(run_cli, "coordinator", "init", "--home", str(tmp_path / "coordinator"),
                        check=True),
        ]  # fmt: skip
        for done in made:
            done.result()

    # Assert
    assert violations(tmp_path / "node") == []
    assert violations(tmp_path / "coordinator") == []
