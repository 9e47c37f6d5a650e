"""The vetting policy edited in the node's web UI: who may, what is refused, what the vetter does.

An operator changes the policy through the form; the file is rewritten, the change is
audited, and the running node's vetter applies it to the next study a PACS pushes
(pynetdicom, a real DICOM peer). A reviewer may read the policy but not change it, and
a policy that does not validate changes nothing.
"""

from __future__ import annotations

import json
import re
import sqlite3
import time
import tomllib
from collections.abc import Iterator

import httpx
import pytest

from tests.helpers import NodeProcess, run_cli
from tests.integration.test_node_serve import push, study

pytestmark = pytest.mark.integration

PASSWORD = "a long enough passphrase"


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    base = tmp_path_factory.mktemp("policy")
    home = base / "home"
    secret = base / "password"
    secret.write_text(PASSWORD)
    for name, role in (("olga", "operator"), ("ann", "reviewer")):
        run_cli(
            "node",
            "user",
            "create",
            name,
            "--role",
            role,
            "--password-file",
            str(secret),
            "--home",
            str(home),
            check=True,
        )
    with NodeProcess(home) as running:
        yield running


def login(node: NodeProcess, name: str) -> tuple[httpx.Client, str]:
    """A signed-in browser-like client and the CSRF token of its policy form."""
    client = httpx.Client(base_url=node.url, timeout=30)
    answer = client.post("/login", data={"name": name, "password": PASSWORD, "next": "/policy"})
    assert answer.status_code == 303
    page = client.get("/policy")
    assert page.status_code == 200
    found = re.search(r'name="csrf" value="([0-9a-f]+)"', page.text)
    assert found is not None
    return client, found.group(1)


def form(csrf: str, **fields: str) -> dict[str, str]:
    return {
        "csrf": csrf,
        "auto_approve_enabled": "on",
        "auto_approve_modalities": "CT, CR, DX, MR",
        "hold_modalities": "US SC OT XC ES SM",
        "findings_at_or_above": "low",
        **fields,
    }


def vetted_status(node: NodeProcess, study_uid_hint: str, timeout: float = 60) -> tuple[str, str]:
    """(status, last reason) of the one study whose original accession ends the hint."""
    deadline = time.monotonic() + timeout
    while True:
        with sqlite3.connect(node.home / "index.sqlite") as db:
            rows = db.execute(
                "SELECT s.status, c.reason FROM studies s JOIN status_changes c"
                " ON c.study_id = s.id WHERE s.id = ? ORDER BY c.id DESC LIMIT 1",
                (study_uid_hint,),
            ).fetchall()
        if rows and rows[0][0] not in ("received", "deidentified"):
            return str(rows[0][0]), str(rows[0][1])
        if time.monotonic() > deadline:
            pytest.fail(f"study {study_uid_hint} was not vetted within {timeout} s")
        time.sleep(0.2)


def newest_study(node: NodeProcess, known: set[int], timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while True:
        with sqlite3.connect(node.home / "index.sqlite") as db:
            ids = {row[0] for row in db.execute("SELECT id FROM studies")}
        fresh = ids - known
        if fresh:
            return fresh.pop()
        if time.monotonic() > deadline:
            pytest.fail("the pushed study never reached the index")
        time.sleep(0.2)


def audit_entries(node: NodeProcess, action: str) -> list[tuple[str, dict]]:
    with sqlite3.connect(node.home / "index.sqlite") as db:
        rows = db.execute(
            "SELECT actor, details FROM audit_log WHERE action = ? ORDER BY seq", (action,)
        ).fetchall()
    return [(actor, json.loads(details)) for actor, details in rows]


def test_a_reviewer_reads_the_policy_but_may_not_change_it(node: NodeProcess) -> None:
    client, csrf = login(node, "ann")

    page = client.get("/policy").text
    answer = client.post("/policy", data=form(csrf, two_person="on"))

    assert "Only an operator may change the policy." in page
    assert 'id="policy-save"' not in page
    assert answer.status_code == 403 and answer.json()["code"] == "forbidden"
    assert not (node.home / "policy.toml").exists()
    assert audit_entries(node, "policy.change") == []


def test_an_invalid_policy_changes_nothing(node: NodeProcess) -> None:
    client, csrf = login(node, "olga")

    bad_code = client.post("/policy", data=form(csrf, hold_modalities="US, <script>"))
    bad_level = client.post("/policy", data=form(csrf, findings_at_or_above="whatever"))
    no_csrf = client.post("/policy", data=form("0" * 32))

    assert bad_code.status_code == 400 and "Nothing was changed" in bad_code.text
    assert "&lt;script&gt;" in bad_code.text and "<script>'" not in bad_code.text
    assert bad_level.status_code == 400 and "findings_at_or_above" in bad_level.text
    assert no_csrf.status_code == 403
    assert not (node.home / "policy.toml").exists()
    assert audit_entries(node, "policy.change") == []


def test_an_operator_changes_the_policy_and_the_vetter_applies_it(node: NodeProcess) -> None:
    # Prepare: under the defaults a CT-only study is approved by machine.
    push(node, study(seed=3)[:7])
    first = newest_study(node, set())
    assert vetted_status(node, first) == (
        "approved",
        "scan clean, low-risk modalities, nothing flagged",
    )
    client, csrf = login(node, "olga")

    # Execute: take CT off the auto-approve list and turn the two-person rule on.
    answer = client.post(
        "/policy",
        data=form(csrf, auto_approve_modalities="cr dx", two_person="on"),
        follow_redirects=False,
    )
    push(node, study(seed=5)[:7])
    second = newest_study(node, {first})

    # Assert
    assert answer.status_code == 303 and answer.headers["location"].startswith("/policy")
    saved = tomllib.loads((node.home / "policy.toml").read_text())
    assert saved == {
        "auto_approve": {"enabled": True, "modalities": ["CR", "DX"]},
        "hold": {"modalities": ["US", "SC", "OT", "XC", "ES", "SM"], "findings_at_or_above": "low"},
        "review": {"two_person": True},
    }
    page = client.get("/policy").text
    assert 'value="CR, DX"' in page and 'name="two_person" value="on" checked' in page
    [(actor, details)] = audit_entries(node, "policy.change")
    assert actor == "olga"
    assert details["before"]["auto_approve"]["modalities"] == ["CT", "CR", "DX", "MR"]
    assert details["after"]["auto_approve"]["modalities"] == ["CR", "DX"]
    assert details["after"]["review"]["two_person"] is True
    status, reason = vetted_status(node, second)
    assert status == "held"
    assert reason == "modality CT is not on the auto-approve list"
    assert run_cli("node", "audit", "verify", "--home", str(node.home)).returncode == 0
