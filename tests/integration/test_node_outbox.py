"""The node's outbox against a real coordinator process: send, gate, retry, refuse, withdraw.

``radfed node share`` and ``radfed node withdraw`` run as an operator runs them;
the coordinator is ``radfed coordinator serve`` on 127.0.0.1 over mutual TLS.
"""

from __future__ import annotations

import datetime as dt
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, text

from radfed.synth.site import write_site_corpus
from tests.helpers import (
    ConnectProxy,
    CoordinatorProcess,
    NodeProcess,
    plant_after_review,
    run_cli,
)

pytestmark = pytest.mark.integration


@dataclass
class Site:
    coordinator: CoordinatorProcess
    node: Path

    def studies(self) -> dict[str, tuple[str, str]]:
        """Study UID -> (modalities, status)."""
        with sqlite3.connect(self.node / "index.sqlite") as db:
            return {
                uid: (mods, status)
                for uid, mods, status in db.execute(
                    "SELECT study_uid, modalities, status FROM studies"
                )
            }

    def outbox(self) -> list[tuple[str, str, str, int, str]]:
        """(study uid, kind, state, attempts, last code), oldest first."""
        with sqlite3.connect(self.node / "index.sqlite") as db:
            return [
                tuple(row)
                for row in db.execute(
                    "SELECT s.study_uid, o.kind, o.state, o.attempts, o.last_code FROM outbox o "
                    "JOIN studies s ON s.id = o.study_id ORDER BY o.id"
                )
            ]

    def registry(self, sql: str) -> list[tuple[object, ...]]:
        engine = create_engine(f"sqlite:///{self.coordinator.home / 'registry.sqlite'}")
        try:
            with engine.connect() as connection:
                return [tuple(row) for row in connection.execute(text(sql))]
        finally:
            engine.dispose()

    def share(self) -> object:
        return run_cli("node", "share", "--home", str(self.node))


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    home = tmp_path / "coordinator"
    run_cli("coordinator", "init", "--home", str(home), check=True)
    token = run_cli("coordinator", "site", "add", "st-marys", "--home", str(home), check=True)
    write_site_corpus(tmp_path / "export", patients=2, ct_slices=2, ct_size=32, cr_size=32)
    node = tmp_path / "node"
    run_cli("node", "ingest", str(tmp_path / "export"), "--home", str(node), "-q", check=True)
    with CoordinatorProcess(home) as coordinator:
        run_cli(
            "node", "enroll", coordinator.url, token.stdout.strip(), "--home", str(node), check=True
        )
        yield Site(coordinator, node)


def test_approved_exams_arrive_once_and_byte_identical_and_nothing_else_leaves(site: Site) -> None:
    # Prepare
    before = site.studies()
    approved = {uid for uid, (_, status) in before.items() if status == "approved"}
    assert approved and len(approved) < len(before)  # some are held for review

    # Execute
    first = site.share()
    second = site.share()

    # Assert
    assert first.returncode == 0, first.stdout + first.stderr
    assert second.returncode == 0 and "nothing to send" in second.stdout
    after = site.studies()
    assert {uid for uid, (_, status) in after.items() if status == "shared"} == approved
    registered = {row[0] for row in site.registry("SELECT study_uid FROM exams")}
    assert registered == approved
    with sqlite3.connect(site.node / "index.sqlite") as db:
        stored = dict(
            db.execute(
                "SELECT i.sha256, i.path FROM instances i JOIN studies s ON s.id = i.study_id "
                "WHERE s.status = 'shared'"
            ).fetchall()
        )
    for sha256, path in stored.items():
        held = site.coordinator.home / "objects" / sha256[:2] / sha256[2:4] / sha256
        assert held.read_bytes() == (site.node / "store" / path).read_bytes()
    assert [(kind, state) for _, kind, state, _, _ in site.outbox()] == [("exam", "done")] * len(
        approved
    )
    token = run_cli("node", "token", "create", "ops", "--home", str(site.node), check=True)
    with NodeProcess(site.node) as node:
        listed = httpx.get(
            f"{node.url}/api/v1/outbox",
            headers={"Authorization": f"Bearer {token.stdout.strip()}"},
            timeout=30,
        ).json()
        page = _signed_in(node).get("/outbox").text
    assert {e["study_instance_uid"] for e in listed} == approved
    assert all(e["state"] == "done" and e["bytes_sent"] == e["bytes_total"] > 0 for e in listed)
    assert all(f'data-uid="{uid}"' in page for uid in approved)
    assert page.count('class="entry state-done"') == len(approved) and "100%" in page


def _signed_in(node: NodeProcess) -> httpx.Client:
    secret = node.home / "ops.password"
    secret.write_text("a long enough passphrase")
    run_cli(
        "node",
        "user",
        "create",
        "ops",
        "--role",
        "operator",
        "--password-file",
        str(secret),
        "--home",
        str(node.home),
        check=True,
    )
    client = httpx.Client(base_url=node.url, timeout=30)
    answer = client.post("/login", data={"name": "ops", "password": "a long enough passphrase"})
    assert answer.status_code == 303
    return client


def test_a_planted_name_is_stopped_by_the_send_time_gate(site: Site) -> None:
    # Prepare: a name gets into an approved instance after review (index updated to match).
    uid = next(u for u, (_, status) in site.studies().items() if status == "approved")
    plant_after_review(site.node, uid, "for Harriet Smithfield, call 555-0142")

    # Execute
    result = site.share()

    # Assert
    assert result.returncode == 1 and "held" in result.stdout
    assert site.studies()[uid][1] == "held"
    assert site.registry(f"SELECT count(*) FROM exams WHERE study_uid = '{uid}'") == [(0,)]
    assert site.registry(f"SELECT count(*) FROM uploads WHERE study_uid = '{uid}'") == [(0,)]
    with sqlite3.connect(site.node / "index.sqlite") as db:
        sources = {
            r[0]
            for r in db.execute(
                "SELECT f.source FROM findings f JOIN studies s ON s.id = f.study_id "
                "WHERE s.study_uid = ? AND f.resolved_at IS NULL",
                (uid,),
            )
        }
    assert "send-gate" in sources


def test_an_unreachable_coordinator_is_retried_later_and_then_reached(site: Site) -> None:
    # Prepare
    site.coordinator.stop()

    # Execute
    away = site.share()
    queued = site.outbox()
    with sqlite3.connect(site.node / "index.sqlite") as db:
        schedule = [
            (dt.datetime.fromisoformat(due), dt.datetime.fromisoformat(decided))
            for due, decided in db.execute("SELECT next_attempt_at, updated_at FROM outbox")
        ]
    site.coordinator.start()
    back = site.share()

    # Assert
    assert away.returncode == 1 and "retrying" in away.stdout
    assert {(state, attempts, code) for _, _, state, attempts, code in queued} == {
        ("queued", 1, "coordinator_unreachable")
    }
    assert all(due - decided >= dt.timedelta(seconds=2) for due, decided in schedule)  # backoff
    assert back.returncode == 0, back.stdout
    assert {state for _, _, state, _, _ in site.outbox()} == {"done"}


def test_a_revoked_site_stops_for_good_with_the_reason(site: Site) -> None:
    # Prepare
    run_cli(
        "coordinator",
        "site",
        "revoke",
        "st-marys",
        "--home",
        str(site.coordinator.home),
        check=True,
    )

    # Execute
    result = site.share()

    # Assert
    assert result.returncode == 1 and "revoked" in result.stdout
    entries = site.outbox()
    assert entries and {(state, code) for _, _, state, _, code in entries} == {
        ("failed", "site_revoked")
    }
    assert {status for _, status in site.studies().values()} >= {"failed"}
    assert site.registry("SELECT count(*) FROM exams") == [(0,)]


def test_a_withdrawal_reaches_the_coordinator_even_if_it_was_away(site: Site) -> None:
    # Prepare
    site.share()
    shared = [uid for uid, (_, status) in site.studies().items() if status == "shared"]
    site.coordinator.stop()

    # Execute
    offline = run_cli(
        "node", "withdraw", shared[0], "--reason", "consent withdrawn", "--home", str(site.node)
    )
    site.coordinator.start()
    later = site.share()

    # Assert
    assert offline.returncode == 0 and "will be told" in offline.stdout
    assert later.returncode == 0, later.stdout
    assert site.studies()[shared[0]][1] == "withdrawn"
    assert ("withdrawal", "done") in {(kind, state) for _, kind, state, _, _ in site.outbox()}
    rows = site.registry(
        "SELECT withdrawn_at IS NOT NULL, withdrawn_reason FROM exams "
        f"WHERE study_uid = '{shared[0]}'"
    )
    assert rows == [(1, "consent withdrawn")]


def test_uploads_go_through_the_hospital_proxy(site: Site) -> None:
    # Prepare
    with ConnectProxy() as proxy:
        env = {"RADFED_NODE_PROXY_URL": proxy.url, "NO_PROXY": "", "no_proxy": ""}

        # Execute
        result = run_cli("node", "share", "--home", str(site.node), env=env)
        checked = run_cli("node", "doctor", "--home", str(site.node), env=env)

    # Assert
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"127.0.0.1:{site.coordinator.port}" in proxy.targets
    assert checked.returncode == 0, checked.stdout
    assert f"goes through {proxy.url}" in checked.stdout


def test_a_connection_cut_mid_upload_is_resumed(site: Site) -> None:
    # Prepare: the proxy cuts every tunnel once the node has sent 2.5 kB through it.
    with ConnectProxy(drop_after=2_500) as flaky:
        env = {"RADFED_NODE_PROXY_URL": flaky.url}

        # Execute
        cut = run_cli("node", "share", "--home", str(site.node), env=env)
    done = site.share()

    # Assert
    assert flaky.dropped > 0
    assert cut.returncode == 1 and "retrying" in cut.stdout
    assert done.returncode == 0, done.stdout
    approved = {u for u, (_, status) in site.studies().items() if status == "shared"}
    assert {row[0] for row in site.registry("SELECT study_uid FROM exams")} == approved


def test_doctor_names_what_is_wrong_and_how_to_fix_it(site: Site, tmp_path: Path) -> None:
    # Execute
    healthy = run_cli("node", "doctor", "--home", str(site.node))
    lonely = run_cli("node", "doctor", "--home", str(tmp_path / "never-enrolled"))
    site.coordinator.stop()
    down = run_cli("node", "doctor", "--home", str(site.node))
    site.coordinator.start()
    run_cli(
        "coordinator",
        "site",
        "revoke",
        "st-marys",
        "--home",
        str(site.coordinator.home),
        check=True,
    )
    revoked = run_cli("node", "doctor", "--home", str(site.node))

    # Assert
    assert healthy.returncode == 0, healthy.stdout
    for name in (
        "free disk",
        "enrollment",
        "node certificate",
        "proxy",
        "name resolution",
        "TCP connection",
        "TLS handshake",
        "coordinator",
    ):
        assert f" ok  {name}:" in healthy.stdout
    assert lonely.returncode == 1 and "radfed node enroll URL TOKEN" in lonely.stdout
    assert down.returncode == 1 and "FAIL  TCP connection" in down.stdout
    assert "fix: is the coordinator running?" in down.stdout
    assert "-  TLS handshake: skipped" in down.stdout
    assert revoked.returncode == 1 and "site_revoked" in revoked.stdout


def test_a_sender_that_died_mid_send_is_resumed(site: Site) -> None:
    # Prepare: a first pass is killed while sending (its entry stays "sending").
    from node.settings import load_settings
    from node.share.outbox import enqueue
    from node.site import open_index

    index = open_index(load_settings(site.node))
    queued = enqueue(index)
    with sqlite3.connect(site.node / "index.sqlite") as db:
        db.execute(
            "UPDATE outbox SET state = 'sending', attempts = 1, "
            "updated_at = datetime('now', '-1 hour')"
        )

    # Execute
    result = site.share()

    # Assert
    assert queued > 0
    assert result.returncode == 0, result.stdout
    assert {(state, attempts) for _, _, state, attempts, _ in site.outbox()} == {("done", 2)}


def test_what_the_coordinator_finds_sends_the_study_back_to_review(site: Site) -> None:
    # Prepare: this site's policy holds only critical findings (a lax setting), so an
    # attribute the profile removes, left in after review, passes the node's gate.
    (site.node / "policy.toml").write_text('[hold]\nfindings_at_or_above = "critical"\n')
    uid = next(u for u, (_, status) in site.studies().items() if status == "approved")
    plant_after_review(site.node, uid, "follow-up in clinic B")

    # Execute
    result = site.share()

    # Assert
    assert result.returncode == 1 and "held" in result.stdout
    assert site.studies()[uid][1] == "held"
    assert site.registry(f"SELECT status FROM uploads WHERE study_uid = '{uid}'") == [
        ("quarantined",)
    ]
    assert site.registry(f"SELECT count(*) FROM exams WHERE study_uid = '{uid}'") == [(0,)]
    with sqlite3.connect(site.node / "index.sqlite") as db:
        found = db.execute(
            "SELECT f.source, f.kind FROM findings f JOIN studies s ON s.id = f.study_id "
            "WHERE s.study_uid = ? AND f.resolved_at IS NULL",
            (uid,),
        ).fetchall()
        history = db.execute(
            "SELECT c.actor, c.reason FROM status_changes c JOIN studies s ON s.id = c.study_id "
            "WHERE s.study_uid = ? ORDER BY c.id DESC LIMIT 1",
            (uid,),
        ).fetchone()
    assert ("coordinator", "not_removed") in found
    assert history[0] == "coordinator" and "coordinator's PHI scan" in history[1]


def test_no_more_uploads_at_once_than_the_cap(site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: five messages due; the sender's work is replaced by a probe that counts.
    import threading
    import time as clock

    from node.settings import load_settings
    from node.share import outbox
    from node.site import open_index

    with sqlite3.connect(site.node / "index.sqlite") as db:
        study_id = db.execute("SELECT id FROM studies LIMIT 1").fetchone()[0]
        for _ in range(5):
            db.execute(
                "INSERT INTO outbox (study_id, kind, state, reason, attempts, next_attempt_at, "
                "last_code, last_error, owner, bytes_total, bytes_sent, created_at, updated_at) "
                "VALUES (?, 'withdrawal', 'queued', '', 0, datetime('now', '-1 minute'), '', '', "
                "'', 0, 0, datetime('now'), datetime('now'))",
                (study_id,),
            )
    running, peak, lock = [0], [0], threading.Lock()

    def probe(self: outbox.Sender, entry_id: int) -> outbox.Outcome:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        clock.sleep(0.3)
        with lock:
            running[0] -= 1
        return outbox.Outcome("x", "withdrawal", "done", "")

    monkeypatch.setattr(outbox.Sender, "_process", probe)
    settings = load_settings(site.node, upload_concurrency=2)
    sender = outbox.Sender(open_index(settings), settings, lambda: None, lambda: None)  # type: ignore[arg-type,return-value]

    # Execute
    outcomes = sender.run_once()

    # Assert
    assert len(outcomes) >= 5  # and the approved studies enqueue() added
    assert peak[0] == 2


def test_the_bandwidth_limit_meters_every_byte_sent(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: a sender with a limit; the limiter records what it is asked to let through.
    from node import federation
    from node.settings import load_settings
    from node.share import upload
    from node.share.outbox import Sender
    from node.site import open_index
    from node.vetting.policy import VettingPolicy

    metered: list[int] = []
    monkeypatch.setattr(upload.RateLimiter, "take", lambda self, n: metered.append(n))
    settings = load_settings(site.node, upload_limit_mbps=8.0)
    sender = Sender(
        open_index(settings),
        settings,
        lambda: federation.CoordinatorClient(settings),
        VettingPolicy,
    )

    # Execute
    try:
        outcomes = sender.run_once(everything=True)
    finally:
        sender.stop()

    # Assert
    assert sender.limiter is not None and sender.limiter.rate == 1_000_000  # 8 Mbit/s
    assert outcomes and all(o.state == "shared" for o in outcomes)
    with sqlite3.connect(site.node / "index.sqlite") as db:
        sent = db.execute(
            "SELECT sum(i.size) FROM instances i JOIN studies s ON s.id = i.study_id "
            "WHERE s.status = 'shared'"
        ).fetchone()[0]
    assert sum(metered) == sent
