"""One coordinator, three nodes, real processes on 127.0.0.1 — and things breaking in between.

Each node enrolls, ingests a generated site corpus, approves by policy and
shares. Then, one at a time: the coordinator killed mid-upload, the connection
cut mid-chunk, a node's sender killed mid-send, a receipt lost, a byte
corrupted in transit, a certificate revoked, a manifest altered after signing,
a planted name slipped past review. After each, the same invariants hold:
every study a node marked shared is registered exactly once, byte-identical;
nothing else arrived; each failure was reported to the node it concerns with
its reason; both audit logs account for every step and verify.

The tests run in order and share the federation (module scope).
"""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from node import federation as fed
from node.errors import NodeError
from node.settings import load_settings
from node.share.manifest import ExamPackage, package
from node.share.upload import send_exam
from node.site import open_index
from radfed.synth.site import write_site_corpus
from tests.helpers import (
    RADFED,
    ROOT,
    ConnectProxy,
    CoordinatorProcess,
    plant_after_review,
    run_cli,
)

pytestmark = pytest.mark.integration

SITES = ("st-marys", "mercy", "lakeside")


@dataclass
class Federation:
    coordinator: CoordinatorProcess
    nodes: dict[str, Path]
    base: Path
    corpora: dict[str, int] = field(default_factory=dict)

    # -- the node side ---------------------------------------------------------------

    def studies(self, site: str) -> dict[str, str]:
        if not (self.nodes[site] / "index.sqlite").exists():
            return {}  # nothing taken in yet
        with sqlite3.connect(self.nodes[site] / "index.sqlite") as db:
            return dict(db.execute("SELECT study_uid, status FROM studies").fetchall())

    def outbox(self, site: str) -> list[tuple[str, str, str, int]]:
        with sqlite3.connect(self.nodes[site] / "index.sqlite") as db:
            return db.execute(
                "SELECT s.study_uid, o.kind, o.state, o.attempts FROM outbox o "
                "JOIN studies s ON s.id = o.study_id ORDER BY o.id"
            ).fetchall()

    def more(
        self, site: str, ct_size: int = 32, slices: int = 2, held_too: bool = False
    ) -> set[str]:
        """A new batch of exams for a site (new patients); the studies it approved."""
        before = set(self.studies(site))
        n = self.corpora.get(site, 0) + 1
        self.corpora[site] = n
        corpus = self.base / f"{site}-corpus-{n}"
        seed = 100 * (SITES.index(site) + 1) + n
        write_site_corpus(
            corpus,
            patients=2 if held_too else 1,
            ct_slices=slices,
            ct_size=ct_size,
            cr_size=32,
            seed=seed,
            with_us=held_too,  # ultrasound and SR reports are held for review
            with_sr=held_too,
        )
        run_cli("node", "ingest", str(corpus), "--home", str(self.nodes[site]), "-q", check=True)
        approved = {u for u, s in self.studies(site).items() if u not in before and s == "approved"}
        assert approved, f"nothing new was approved at {site}"
        return approved

    def share(
        self, site: str, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        return run_cli("node", "share", "--home", str(self.nodes[site]), env=env)

    def share_until_settled(self, site: str, passes: int = 4) -> None:
        for _ in range(passes):
            self.share(site)
            if not any(state in ("queued", "sending") for _, _, state, _ in self.outbox(site)):
                return
        pytest.fail(f"{site}'s outbox did not settle: {self.outbox(site)}")

    # -- the coordinator side ----------------------------------------------------------

    def registry(self, sql: str, *args: object) -> list[tuple[object, ...]]:
        with sqlite3.connect(self.coordinator.home / "registry.sqlite") as db:
            return db.execute(sql, args).fetchall()

    def check(self) -> None:
        """The invariants: exactly once, byte-identical, nothing else, audits account."""
        exams = self.registry(
            "SELECT e.study_uid, s.name FROM exams e JOIN sites s ON s.id = e.site_id"
        )
        uids = [uid for uid, _ in exams]
        assert len(uids) == len(set(uids)), "an exam was registered twice"
        registered = dict(exams)
        shared_anywhere: set[str] = set()
        for site, home in self.nodes.items():
            statuses = self.studies(site)
            shared = {u for u, s in statuses.items() if s == "shared"}
            shared_anywhere |= shared
            for uid in shared:
                assert registered.get(uid) == site, f"{uid} shared by {site} is not registered"
            with sqlite3.connect(home / "index.sqlite") as db:
                for uid, sha, path in db.execute(
                    "SELECT s.study_uid, i.sha256, i.path FROM instances i "
                    "JOIN studies s ON s.id = i.study_id WHERE s.status = 'shared'"
                ):
                    held = self.coordinator.home / "objects" / sha[:2] / sha[2:4] / sha
                    assert held.read_bytes() == (home / "store" / path).read_bytes(), uid
            # Nothing that was not approved (and is not shared or withdrawn since) arrived.
            for uid, owner in registered.items():
                if owner == site:
                    assert statuses.get(uid) in ("shared", "withdrawn"), (uid, statuses.get(uid))
            node_audit = run_cli("node", "audit", "verify", "--home", str(home))
            assert node_audit.returncode == 0, node_audit.stdout + node_audit.stderr
            with sqlite3.connect(home / "index.sqlite") as db:
                to_shared = {
                    subject
                    for subject, details in db.execute(
                        "SELECT subject, details FROM audit_log WHERE action = 'study.status'"
                    )
                    if json.loads(details).get("to_status") == "shared"
                }
            assert shared <= to_shared
        registrations = [
            subject
            for (subject,) in self.registry(
                "SELECT subject FROM audit_log WHERE action = 'exam.register'"
            )
        ]
        assert sorted(registrations) == sorted(uids)
        verified = run_cli("coordinator", "audit", "verify", "--home", str(self.coordinator.home))
        assert verified.returncode == 0, verified.stdout + verified.stderr

    def sending(self, site: str, timeout: float = 60) -> None:
        """Wait until a node's upload is under way (bytes sent, not finished)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with sqlite3.connect(self.nodes[site] / "index.sqlite") as db:
                row = db.execute(
                    "SELECT count(*) FROM outbox WHERE state = 'sending' AND bytes_sent > 0"
                ).fetchone()
            if row and row[0]:
                return
            time.sleep(0.1)
        pytest.fail(f"{site} never started sending: {self.outbox(site)}")

    def background_share(self, site: str, mbps: float) -> subprocess.Popen[str]:
        import os

        return subprocess.Popen(
            [*RADFED, "node", "share", "--home", str(self.nodes[site])],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            text=True,
            cwd=ROOT,
            env={**os.environ, "RADFED_NODE_UPLOAD_LIMIT_MBPS": str(mbps)},
        )


@pytest.fixture(scope="module")
def fed_(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    base = tmp_path_factory.mktemp("federation")
    home = base / "coordinator"
    run_cli("coordinator", "init", "--home", str(home), check=True)
    with CoordinatorProcess(home) as coordinator:
        nodes = {}
        for site in SITES:
            token = run_cli("coordinator", "site", "add", site, "--home", str(home), check=True)
            nodes[site] = base / site
            run_cli(
                "node",
                "enroll",
                coordinator.url,
                token.stdout.strip(),
                "--home",
                str(nodes[site]),
                check=True,
            )
        federation = Federation(coordinator, nodes, base)
        for site in SITES:
            federation.more(site, held_too=True)
        yield federation


def test_0_every_site_shares_what_it_approved(fed_: Federation) -> None:
    for site in SITES:
        result = fed_.share(site)
        assert result.returncode == 0, result.stdout + result.stderr
    held = {site: {u for u, s in fed_.studies(site).items() if s == "held"} for site in SITES}

    fed_.check()
    assert all(held.values())  # every site held something for review: it did not arrive
    assert not set().union(*held.values()) & {
        u for (u,) in fed_.registry("SELECT study_uid FROM exams")
    }


def test_1_the_coordinator_killed_mid_upload(fed_: Federation) -> None:
    fresh = fed_.more("st-marys", ct_size=256, slices=6)
    sender = fed_.background_share("st-marys", mbps=1.0)
    fed_.sending("st-marys")

    fed_.coordinator.kill()
    fed_.coordinator.start()
    sender.wait(120)
    fed_.share_until_settled("st-marys")

    assert fresh and fresh <= {u for u, s in fed_.studies("st-marys").items() if s == "shared"}
    fed_.check()


def test_2_the_connection_cut_mid_chunk(fed_: Federation) -> None:
    fresh = fed_.more("mercy", ct_size=128, slices=4)
    with ConnectProxy(drop_after=40_000) as flaky:
        cut = fed_.share("mercy", env={"RADFED_NODE_PROXY_URL": flaky.url})
    fed_.share_until_settled("mercy")

    # Cut every 40 kB, the upload still got through (resumed per chunk) or is retried.
    assert flaky.dropped > 0 and cut.returncode in (0, 1)
    assert fresh <= {u for u, s in fed_.studies("mercy").items() if s == "shared"}
    fed_.check()


def test_3_a_node_killed_mid_send_and_restarted(fed_: Federation) -> None:
    fresh = fed_.more("lakeside", ct_size=256, slices=6)
    sender = fed_.background_share("lakeside", mbps=1.0)
    fed_.sending("lakeside")

    sender.send_signal(signal.SIGKILL)
    sender.wait(30)
    left = [state for _, _, state, _ in fed_.outbox("lakeside")]
    fed_.share_until_settled("lakeside")

    assert "sending" in left  # it really died mid-send
    assert fresh <= {u for u, s in fed_.studies("lakeside").items() if s == "shared"}
    assert max(attempts for *_, attempts in fed_.outbox("lakeside")) >= 2
    fed_.check()


def test_4_a_lost_receipt_and_the_exam_sent_again(fed_: Federation) -> None:
    uid = next(u for u, s in fed_.studies("st-marys").items() if s == "shared")
    with sqlite3.connect(fed_.nodes["st-marys"] / "index.sqlite") as db:
        # The coordinator registered it; the node never heard (crash before the receipt).
        study_id = db.execute("SELECT id FROM studies WHERE study_uid = ?", (uid,)).fetchone()[0]
        db.execute(
            "UPDATE outbox SET state = 'queued' WHERE study_id = ? AND kind = 'exam'", (study_id,)
        )
        db.execute("UPDATE studies SET status = 'queued' WHERE id = ?", (study_id,))

    again = fed_.share("st-marys")

    assert again.returncode == 0, again.stdout
    assert "already held" in "".join(
        r
        for (r,) in sqlite3.connect(fed_.nodes["st-marys"] / "index.sqlite").execute(
            "SELECT reason FROM status_changes WHERE study_id = ? ORDER BY id DESC LIMIT 1",
            (study_id,),
        )
    )
    assert fed_.registry("SELECT count(*) FROM exams WHERE study_uid = ?", uid) == [(1,)]
    fed_.check()


def test_5_a_byte_corrupted_in_transit(fed_: Federation) -> None:
    fresh = fed_.more("mercy", ct_size=128, slices=4)
    with ConnectProxy(corrupt_at=30_000) as noisy:
        first = fed_.share("mercy", env={"RADFED_NODE_PROXY_URL": noisy.url})
    fed_.share_until_settled("mercy")

    assert noisy.corrupted == 1
    assert first.returncode in (0, 1)  # TLS catches it: a failed request, retried
    assert fresh <= {u for u, s in fed_.studies("mercy").items() if s == "shared"}
    fed_.check()


def test_6_a_certificate_revoked_mid_run(fed_: Federation) -> None:
    run_cli(
        "coordinator",
        "site",
        "revoke",
        "lakeside",
        "--reason",
        "test",
        "--home",
        str(fed_.coordinator.home),
        check=True,
    )
    fresh = fed_.more("lakeside")
    other = fed_.more("st-marys")

    refused = fed_.share("lakeside")
    fine = fed_.share("st-marys")

    assert refused.returncode == 1 and "revoked" in refused.stdout
    statuses = fed_.studies("lakeside")
    assert all(statuses[u] == "failed" for u in fresh)
    assert fine.returncode == 0 and all(fed_.studies("st-marys")[u] == "shared" for u in other)
    assert not {u for (u,) in fed_.registry("SELECT study_uid FROM exams")} & fresh
    fed_.check()


def test_7_a_manifest_altered_after_signing(fed_: Federation) -> None:
    fresh = fed_.more("mercy")
    uid = next(iter(fresh))
    settings = load_settings(fed_.nodes["mercy"])
    files = fed.files(settings)
    exam = package(open_index(settings), settings, uid, "mercy", files.key, files.cert)
    changed = exam.signed.manifest.model_copy(update={"clinical": {"icu": "yes"}})
    tampered = ExamPackage(exam.signed.model_copy(update={"manifest": changed}), exam.files)

    with fed.CoordinatorClient(settings) as client, pytest.raises(NodeError) as refused:
        send_exam(client, tampered)

    assert refused.value.code == "bad_signature"
    assert fed_.registry(
        "SELECT count(*) FROM audit_log WHERE action = 'upload.refused' AND subject = ?", uid
    ) == [(1,)]
    assert fed_.registry("SELECT count(*) FROM exams WHERE study_uid = ?", uid) == [(0,)]
    fed_.share_until_settled("mercy")  # the untouched manifest goes through
    fed_.check()


def test_8_a_planted_name_past_review_is_caught_by_the_coordinator(fed_: Federation) -> None:
    home = fed_.nodes["st-marys"]
    (home / "policy.toml").write_text('[hold]\nfindings_at_or_above = "critical"\n')
    fresh = fed_.more("st-marys")
    uid = next(iter(fresh))
    plant_after_review(home, uid, "seen by dr. Harriet in ward 7")

    result = fed_.share("st-marys")

    assert result.returncode == 1 and "held" in result.stdout
    assert fed_.studies("st-marys")[uid] == "held"
    assert fed_.registry("SELECT status FROM uploads WHERE study_uid = ?", uid) == [
        ("quarantined",)
    ]
    with sqlite3.connect(home / "index.sqlite") as db:
        sources = {
            r[0]
            for r in db.execute(
                "SELECT f.source FROM findings f JOIN studies s ON s.id = f.study_id "
                "WHERE s.study_uid = ?",
                (uid,),
            )
        }
    assert "coordinator" in sources
    # The other sites heard nothing of it.
    for site in ("mercy", "lakeside"):
        assert uid not in fed_.studies(site)
    fed_.check()
