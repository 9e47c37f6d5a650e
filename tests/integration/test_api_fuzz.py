"""API fuzzing with schemathesis: both services' OpenAPI documents, every operation, every caller.

One coordinator (TLS, its own CA) and one node run as processes on 127.0.0.1
with data in them (a small synthetic corpus ingested, the approved exams shared,
release ``v1`` cut). Each operation of each live ``/api/v1/openapi.json`` is
fuzzed as each caller — node: operator, reviewer, anonymous, a wrong token;
coordinator: operator, researcher, anonymous, a wrong token and the enrolled
node (certificate + a token signed for each request) — with valid and invalid
requests schemathesis generates, derandomized so every run sends the same ones.
Each answer: no 5xx; status, content type, headers and body as the document
declares; every error body an ``ErrorBody``; a caller without the role gets
401/403 and one with it never does (node roles read from the routes'
dependencies, coordinator roles from the federation tests' authorization matrix).

Short on purpose (``make bench`` runs ``bench/api_fuzz.py`` with many more
examples): ``ALLOWED`` examples per operation for a caller that may use it,
``REFUSED`` for one that may not, and fewer for ``POST /api/v1/uploads``, whose
nested signed manifest takes schemathesis about a second per example to generate.

Side effects are kept from making the run meaningless: generated ids match
nothing (so approvals, withdrawals and run decisions mostly answer 404/409/422),
and revoking a site — which could hit the enrolled one and shut the node caller
out — runs last, after every node call.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests import api_fuzz
from tests.api_fuzz import Federation

pytestmark = pytest.mark.integration

ALLOWED = 12
REFUSED = 3
#: Operations whose examples are slow to generate -> examples for each caller.
SLOW = {("POST", "/api/v1/uploads"): 2}
#: Run after everything else (see the module docstring).
LAST = {("POST", "/api/v1/sites/{name}/revoke")}

NODE_ROLES = api_fuzz.node_roles()
COORDINATOR_ROLES = api_fuzz.coordinator_roles()
NODE_CALLERS = ("operator", "reviewer", "anonymous", "wrong token")
COORDINATOR_CALLERS = ("operator", "researcher", "anonymous", "wrong token", "node")


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    with api_fuzz.federation(tmp_path_factory.mktemp("api-fuzz")) as federation:
        yield federation


@pytest.fixture(scope="module")
def node_schema(running: Federation) -> Any:
    return api_fuzz.load_schema(f"{running.node.url}/api/v1/openapi.json")


@pytest.fixture(scope="module")
def coordinator_schema(running: Federation) -> Any:
    url = f"{running.coordinator.url}/api/v1/openapi.json"
    return api_fuzz.load_schema(url, verify=str(running.coordinator.ca))


def _cases(
    roles: dict[tuple[str, str], frozenset[str] | None], callers: tuple[str, ...]
) -> list[Any]:
    ordered = sorted(roles, key=lambda key: (key in LAST, key[1], key[0]))
    return [
        pytest.param(key, caller, id=f"{caller}-{key[0]} {key[1]}")
        for key in ordered
        for caller in callers
    ]


def _examples(key: tuple[str, str], allowed: bool) -> int:
    return SLOW.get(key, ALLOWED if allowed else REFUSED)


def _report(outcome: api_fuzz.Outcome) -> str:
    return "\n\n".join(f"{kind}:\n{example}" for kind, example in outcome.failures.items())


def test_the_documents_list_every_route_with_its_roles(
    node_schema: Any, coordinator_schema: Any
) -> None:
    node = {api_fuzz.label(op) for op in api_fuzz.operations(node_schema)}
    coordinator = {api_fuzz.label(op) for op in api_fuzz.operations(coordinator_schema)}

    assert node == set(NODE_ROLES)
    assert coordinator == set(COORDINATOR_ROLES)


@pytest.mark.parametrize(("key", "caller"), _cases(NODE_ROLES, NODE_CALLERS))
def test_node_api(running: Federation, node_schema: Any, key: tuple[str, str], caller: str) -> None:
    # Prepare
    operation = node_schema[key[1]][key[0]]
    who = {c.name: c for c in api_fuzz.node_callers(running)}[caller]
    roles = NODE_ROLES[key]
    allowed = roles is None or caller in roles

    # Execute
    outcome = api_fuzz.fuzz(operation, who, roles, running.node.url, _examples(key, allowed))

    # Assert
    assert outcome.examples > 0
    assert not outcome.failures, _report(outcome)


@pytest.mark.parametrize(("key", "caller"), _cases(COORDINATOR_ROLES, COORDINATOR_CALLERS))
def test_coordinator_api(
    running: Federation, coordinator_schema: Any, key: tuple[str, str], caller: str
) -> None:
    # Prepare
    operation = coordinator_schema[key[1]][key[0]]
    who = {c.name: c for c in api_fuzz.coordinator_callers(running)}[caller]
    roles = COORDINATOR_ROLES[key]
    allowed = roles is None or caller in roles

    # Execute
    outcome = api_fuzz.fuzz(operation, who, roles, running.coordinator.url, _examples(key, allowed))

    # Assert
    assert outcome.examples > 0
    assert not outcome.failures, _report(outcome)


def test_the_services_logged_no_unhandled_error(running: Federation) -> None:
    logs = {
        "node": running.node.log.read_text(),
        "coordinator": running.coordinator.log.read_text(),
    }

    assert not [name for name, text in logs.items() if "unhandled error" in text]
