"""API fuzzing with schemathesis: both services' OpenAPI documents, every operation, every caller.

Shared by ``tests/integration/test_api_fuzz.py`` (a short, seeded run in ``make
test``) and ``bench/api_fuzz.py`` (a long one in ``make bench``).

``federation()`` starts a real coordinator (TLS, its own CA) and a real node as
processes on 127.0.0.1, with data in them: the node ingests a small synthetic
site corpus, enrolls with the coordinator and shares what its policy approved
(so the registry holds exams), and the operator cuts a release.

``fuzz()`` loads an OpenAPI document from the live service and, for one
operation and one caller, sends ``max_examples`` requests that schemathesis
generates from the schema (valid and invalid ones, derandomized: the same
requests on every run), checking each answer:

* no 5xx;
* the status code, content type, headers and body conform to what the document
  declares for that operation;
* every 4xx/5xx body is a ``protocols.api.errors.ErrorBody``;
* a caller that may not use the operation gets 401/403 with an authentication
  code, and one that may never does.

Failures are collected (one example each, as a curl command), not raised, so a
run reports every kind of failure it found.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import sqlite3
import subprocess
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pydantic
import requests
import schemathesis
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import Case, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from protocols.api.errors import ErrorBody
from protocols.nodeauth import make_token
from radfed.synth.site import write_site_corpus
from tests.helpers import RADFED, ROOT, CoordinatorProcess, NodeProcess

#: Error codes that mean "who are you / you may not": what a refused caller gets.
AUTH_CODES = {
    "unauthorized",
    "forbidden",
    "client_certificate_required",
    "certificate_expired",
    "site_revoked",
}
#: The schemathesis checks run on every answer. Not ``negative_data_rejection``: both APIs
#: ignore query parameters they do not know (as FastAPI does, by design), and the callers'
#: credentials are added when a request is sent, so schemathesis would count every request
#: as "missing the required Authorization header" and every 200 as accepting invalid data.
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
SITE = "st-marys"


# -- the services ------------------------------------------------------------------------


@dataclass
class Federation:
    """A running coordinator and node, the callers' credentials, and where their homes are."""

    base: Path
    coordinator: CoordinatorProcess
    node: NodeProcess
    coordinator_tokens: dict[str, str]
    node_tokens: dict[str, str]

    @property
    def node_keys(self) -> Path:
        return self.node.home / "keys" / "federation"

    def node_key(self) -> ec.EllipticCurvePrivateKey:
        key = serialization.load_pem_private_key((self.node_keys / "node.key").read_bytes(), None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise TypeError("the node key is not an EC key")
        return key

    def node_fingerprint(self) -> str:
        cert = x509.load_pem_x509_certificate((self.node_keys / "node.crt").read_bytes())
        return cert.fingerprint(hashes.SHA256()).hex()


def _wait(what: str, done: Callable[[], bool], timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen in {timeout} s")
        time.sleep(0.3)


def _finish(proc: subprocess.Popen[str], what: str) -> None:
    out, err = proc.communicate(timeout=300)
    if proc.returncode != 0:
        raise AssertionError(f"{what} exited {proc.returncode}\n{out}\n{err}")


@contextlib.contextmanager
def federation(base: Path, patients: int = 2) -> Iterator[Federation]:
    """A coordinator and an enrolled node with data, as processes on 127.0.0.1.

    ``radfed coordinator init`` and ``radfed node ingest`` run as the CLI does
    (at the same time); tokens, the site and the enrollment are made through the
    same library calls the CLI makes, in this process, to keep the start short.
    """
    from coordinator import sites, tokens
    from coordinator.registry.db import Database
    from coordinator.settings import load_settings as coordinator_settings
    from node.federation import enroll
    from node.settings import load_settings as node_settings
    from node.site import open_index

    chome, nhome, corpus = base / "coordinator", base / "node", base / "export"
    cli = {"cwd": ROOT, "text": True, "stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
    init = subprocess.Popen([*RADFED, "coordinator", "init", "--home", str(chome)], **cli)
    write_site_corpus(corpus, patients=patients, ct_slices=2, ct_size=64, cr_size=64)
    ingest = subprocess.Popen(
        [*RADFED, "node", "ingest", str(corpus), "--home", str(nhome), "-q"], **cli
    )
    _finish(init, "radfed coordinator init")
    csettings = coordinator_settings(chome)
    db = Database.open(csettings.db_url)
    try:
        ctokens = {
            role: tokens.create(db, name, role, actor="test")
            for name, role in (("olga", "operator"), ("rita", "researcher"))
        }
        enrollment = sites.add(db, csettings, SITE, actor="test")
    finally:
        db.close()
    _finish(ingest, "radfed node ingest")
    nsettings = node_settings(nhome)
    index = open_index(nsettings)
    ntokens = {
        role: index.create_token(name, role, actor="test")
        for name, role in (("ops", "operator"), ("rev", "reviewer"))
    }
    index.db.close()
    # Every caller sends from 127.0.0.1, "wrong token" and mangled credentials on purpose,
    # far more than the failed authentications that lock a client out by default (10 in
    # 5 minutes): the limits are raised so that the fuzzing reaches the operations.
    limits = {"AUTH_MAX_FAILURES": "1000000", "AUTH_WINDOW_S": "1"}
    with CoordinatorProcess(
        chome, env={f"RADFED_COORDINATOR_{k}": v for k, v in limits.items()}
    ) as coordinator:
        enroll(nsettings, coordinator.url, enrollment)
        env = {
            "RADFED_NODE_OUTBOX_SECONDS": "1",
            "RADFED_NODE_HEARTBEAT_SECONDS": "1",
            **{f"RADFED_NODE_{k}": v for k, v in limits.items()},
        }
        with NodeProcess(nhome, env=env) as node:
            running = Federation(base, coordinator, node, ctokens, ntokens)
            _share_and_release(running)
            yield running


def _share_and_release(running: Federation) -> None:
    """Wait until the node shared what was approved, then cut release ``v1`` of it."""

    def statuses() -> set[str]:
        with sqlite3.connect(running.node.home / "index.sqlite") as db:
            return {row[0] for row in db.execute("SELECT status FROM studies")}

    _wait("sharing", lambda: "shared" in statuses() and not {"approved", "queued"} & statuses())
    operator = {"Authorization": f"Bearer {running.coordinator_tokens['operator']}"}
    answer = httpx.post(
        f"{running.coordinator.url}/api/v1/releases",
        json={"name": "v1", "filters": {}, "export": False},
        headers=operator,
        verify=running.coordinator.tls(),
        timeout=60,
    )
    if answer.status_code != 201:
        raise AssertionError(f"release v1: {answer.status_code} {answer.text}")


# -- callers -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Caller:
    """Who sends a request: the headers it adds and the TLS it speaks."""

    name: str
    headers: Callable[[Case, str], dict[str, str]]
    transport: dict[str, Any] = field(default_factory=dict)


def bearer(name: str, token: str | None, **transport: Any) -> Caller:
    """A caller with an API token (``None``: no ``Authorization`` header at all)."""
    header = {} if token is None else {"Authorization": f"Bearer {token}"}
    return Caller(name, lambda _case, _url: dict(header), transport)


def node_caller(running: Federation) -> Caller:
    """The enrolled node: its client certificate and a token signed for each request."""
    key, fingerprint = running.node_key(), running.node_fingerprint()

    def headers(case: Case, base_url: str) -> dict[str, str]:
        url = case.as_transport_kwargs(base_url=base_url)["url"]
        path = urllib.parse.unquote(urllib.parse.urlsplit(url).path)
        return {"Authorization": make_token(key, SITE, fingerprint, case.method, path)}

    keys = running.node_keys
    return Caller(
        "node",
        headers,
        {
            "verify": str(running.coordinator.ca),
            "cert": (str(keys / "node.crt"), str(keys / "node.key")),
        },
    )


def node_callers(running: Federation) -> list[Caller]:
    tokens = running.node_tokens
    return [
        bearer("operator", tokens["operator"]),
        bearer("reviewer", tokens["reviewer"]),
        bearer("anonymous", None),
        bearer("wrong token", "rfn_" + "A" * 43),
    ]


def coordinator_callers(running: Federation) -> list[Caller]:
    tokens, ca = running.coordinator_tokens, str(running.coordinator.ca)
    return [
        bearer("operator", tokens["operator"], verify=ca),
        bearer("researcher", tokens["researcher"], verify=ca),
        bearer("anonymous", None, verify=ca),
        bearer("wrong token", "rfc_" + "A" * 43, verify=ca),
        node_caller(running),
    ]


# -- fuzzing -----------------------------------------------------------------------------


@dataclass
class Outcome:
    """What fuzzing one operation as one caller found."""

    operation: str
    caller: str
    allowed: bool
    examples: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    #: A short description of each distinct failure -> one example of it.
    failures: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    def fail(self, kind: str, example: str) -> None:
        self.failures.setdefault(kind, example)


def load_schema(url: str, verify: str | bool = True) -> Any:
    """The live service's OpenAPI document, as schemathesis sees it."""
    return schemathesis.openapi.from_url(url, verify=verify, timeout=30)


def operations(schema: Any) -> list[Any]:
    """Every operation of a loaded document, in a stable order."""
    found = [result.ok() for result in schema.get_all_operations()]
    return sorted(found, key=lambda op: (op.path, op.method))


def label(operation: Any) -> tuple[str, str]:
    return operation.method.upper(), operation.path


def _error_code(response: Any) -> tuple[str | None, str | None]:
    """An error response's ``ErrorBody`` code, or why the body is not an ``ErrorBody``."""
    try:
        return ErrorBody.model_validate_json(response.content).code, None
    except pydantic.ValidationError as exc:
        return None, f"not an ErrorBody: {exc.errors()[0]['msg']}"


def fuzz(
    operation: Any,
    caller: Caller,
    roles: frozenset[str] | None,
    base_url: str,
    max_examples: int,
) -> Outcome:
    """Send ``max_examples`` generated requests to one operation as one caller.

    ``roles`` are the callers that may use the operation (``None``: anyone may).
    """
    allowed = roles is None or caller.name in roles
    outcome = Outcome(" ".join(label(operation)), caller.name, allowed)
    strategy = st.one_of(
        operation.as_strategy(GenerationMode.POSITIVE),
        operation.as_strategy(GenerationMode.NEGATIVE),
    )

    @settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=strategy)
    def one(case: Case) -> None:
        outcome.examples += 1
        headers = caller.headers(case, base_url)
        response = case.call(
            base_url=base_url, session=session, headers=headers, timeout=60, **caller.transport
        )
        status = response.status_code
        outcome.statuses[status] += 1
        curl = case.as_curl_command(headers=dict(response.request.headers), verify=False)
        try:
            case.validate_response(
                response,
                checks=CHECKS,
                headers=headers,
                transport_kwargs={"base_url": base_url, **caller.transport},
            )
        except FailureGroup as group:
            for failure in group.exceptions:
                outcome.fail(f"{failure.title} ({status})", f"{curl}\n{failure.message}")
        code = None
        if status >= 400:
            code, problem = _error_code(response)
            if problem:
                outcome.fail(f"{problem} ({status})", f"{curl}\n{response.text[:500]}")
        if roles is None:
            return
        # A negative case may drop or mangle the credentials: then the caller is nobody.
        intended = headers.get("Authorization")
        presented = intended is None or response.request.headers.get("Authorization") == intended
        if not (allowed and presented) and not (status in (401, 403) and code in AUTH_CODES):
            outcome.fail(f"reachable without the right role ({status})", curl)
        if allowed and presented and code in AUTH_CODES:
            outcome.fail(f"refused its own role ({status} {code})", f"{curl}\n{response.text}")

    started = time.monotonic()
    with requests.Session() as session:  # one connection (and TLS handshake) for them all
        one()
    outcome.seconds = time.monotonic() - started
    return outcome


def when() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


# -- who may call what -------------------------------------------------------------------


def node_roles() -> dict[tuple[str, str], frozenset[str] | None]:
    """Who may call each node API route, read from the routes' dependencies (``None``: anyone).

    The app is built as ``radfed node serve`` builds it, without an index (no
    route is called): only its routes are read.
    """
    from fastapi.routing import APIRoute

    from node.api.app import create_app, require_operator, require_reviewer
    from node.api.training_routes import mount_training

    nothing: Any = None
    app = create_app(nothing, nothing, lambda: True, lambda: 0)
    mount_training(app, nothing, nothing)

    def calls(dependant: Any) -> Iterator[Any]:
        for dependency in dependant.dependencies:
            yield dependency.call
            yield from calls(dependency)

    roles: dict[tuple[str, str], frozenset[str] | None] = {}
    for route in app.routes:
        if not isinstance(route, APIRoute) or not route.include_in_schema:
            continue
        needs = set(calls(route.dependant))
        allowed: frozenset[str] | None = None
        if require_operator in needs:
            allowed = frozenset({"operator"})
        elif require_reviewer in needs:
            allowed = frozenset({"operator", "reviewer"})
        for method in route.methods:
            roles[(method, route.path)] = allowed
    return roles


def coordinator_roles() -> dict[tuple[str, str], frozenset[str] | None]:
    """Who may call each coordinator API route: the federation tests' authorization matrix."""
    from tests.integration.test_coordinator_federation import MATRIX, OPEN

    roles: dict[tuple[str, str], frozenset[str] | None] = {key: None for key in OPEN}
    roles.update({key: frozenset(callers) for key, callers in MATRIX.items()})
    return roles
