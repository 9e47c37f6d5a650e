"""The node's outbox: approved exams and withdrawals, sent until the coordinator confirms.

``enqueue`` puts every approved study in the outbox (the study moves to
``queued``). ``Sender.run_once`` takes what is due, at most ``upload_concurrency``
at a time, and for an exam:

1. builds and signs the manifest from the index (every file re-hashed);
2. the send-time gate: re-runs the PHI scanner, with this patient's originals,
   on exactly the bytes it will send (their digests are the manifest's, and the
   coordinator checks what it receives against them) — anything at or above the
   policy's threshold sends the study back to review, nothing leaves;
3. uploads it (resumable; ``node.share.upload``) and marks the study ``shared``
   only on the coordinator's receipt.

A retryable failure (unreachable, timeouts, 5xx, 429, an interrupted upload)
waits with exponential backoff and jitter and resumes where it stopped. A
permanent one stops: PHI found by the coordinator sends the study back to review
with its findings attached; any other refusal (revoked certificate, a manifest
refused) marks it ``failed`` with the reason, for an operator to retry.
Withdrawals are messages like exams: queued while the coordinator is away.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import os
import random
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select

from node.errors import NodeError
from node.index.lifecycle import transition
from node.index.models import Finding, OutboxEntry, Study, utcnow
from node.index.originals import original_identifiers
from node.index.store import NodeIndex
from node.settings import NodeSettings
from node.share.manifest import ExamPackage, package
from node.share.upload import RateLimiter, send_exam
from node.site import safe_private
from node.vetting.policy import VettingPolicy
from protocols.api.coordinator import Receipt, Rejection, WithdrawRequest
from protocols.api.node import StudyStatus as S
from protocols.phi.findings import PhiFinding, Severity
from protocols.phi.scanner import Originals, scan
from protocols.signing import manifest_digest

log = logging.getLogger("radfed.node.outbox")

EXAM = "exam"
WITHDRAWAL = "withdrawal"
#: Refusals after which sending again cannot help (anything else is retried).
PERMANENT = frozenset(
    {
        "site_revoked",
        "certificate_expired",
        "bad_signature",
        "signer_mismatch",
        "site_mismatch",
        "exam_conflict",
        "exam_withdrawn",
        "invalid_manifest",
        "upload_too_large",
        "receipt_mismatch",
        "store_changed",
        "store_unreadable",
        "empty_study",
        "not_enrolled",
        "bad_key",
        "invalid_request",
        "forbidden",
    }
)
MAX_BACKOFF_S = 900.0
#: A "sending" entry not touched for this long was left by a sender that died.
STALE_SENDING = dt.timedelta(minutes=10)
#: Who is sending: this host and process.
OWNER = f"{socket.gethostname()}:{os.getpid()}"


def _alive(owner: str) -> bool:
    """Whether the sender ``host:pid`` still runs (a sender on another host is presumed alive)."""
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def backoff(attempts: int, base: float = 5.0) -> float:
    """Seconds before attempt ``attempts + 1``: exponential with full jitter, capped."""
    ceiling = min(MAX_BACKOFF_S, base * 2 ** max(attempts - 1, 0))
    return random.uniform(ceiling / 2, ceiling)


def enqueue(index: NodeIndex) -> int:
    """Queue every approved study for sending; returns how many were queued."""
    queued = 0
    with index.db.write() as session:
        for study in session.scalars(select(Study).where(Study.status == S.APPROVED.value)):
            session.add(OutboxEntry(study_id=study.id, kind=EXAM, state="queued"))
            transition(session, study, S.QUEUED, "outbox", "approved: queued for the coordinator")
            queued += 1
    return queued


def withdraw(index: NodeIndex, study_uid: str, reason: str, actor: str) -> bool:
    """Withdraw a study here and, if the coordinator may have it, tell it (queued)."""
    with index.db.write() as session:
        study = session.scalar(select(Study).where(Study.study_uid == study_uid))
        if study is None:
            raise NodeError("study_not_found", f"no study {study_uid} in this node's index")
        was = S(study.status)
        sent = session.scalar(
            select(OutboxEntry.id).where(
                OutboxEntry.study_id == study.id,
                OutboxEntry.kind == EXAM,
                OutboxEntry.state.in_(("sending", "done")),
            )
        )
        for pending in session.scalars(
            select(OutboxEntry).where(
                OutboxEntry.study_id == study.id,
                OutboxEntry.kind == EXAM,
                OutboxEntry.state == "queued",
            )
        ):
            pending.state, pending.reason, pending.updated_at = "failed", "withdrawn", utcnow()
        transition(session, study, S.WITHDRAWN, actor, reason or "withdrawn by the site")
        tell = sent is not None or was is S.SHARED
        if tell:
            session.add(
                OutboxEntry(study_id=study.id, kind=WITHDRAWAL, state="queued", reason=reason)
            )
    return tell


def recover(index: NodeIndex, older_than: dt.timedelta = STALE_SENDING) -> int:
    """Put entries a dead sender left ``sending`` back in the queue (the upload resumes)."""
    cutoff = utcnow() - older_than
    with index.db.write() as session:
        stale = [
            entry
            for entry in session.scalars(select(OutboxEntry).where(OutboxEntry.state == "sending"))
            if entry.updated_at <= cutoff or not _alive(entry.owner)
        ]
        for entry in stale:
            entry.state, entry.next_attempt_at, entry.updated_at = "queued", utcnow(), utcnow()
            entry.last_code, entry.last_error = "interrupted", "the sender stopped mid-send"
    if stale:
        log.warning("resuming %d upload(s) a stopped sender left behind", len(stale))
    return len(stale)


@dataclass
class Outcome:
    study_uid: str
    kind: str
    state: str
    detail: str


class Sender:
    """Sends what the outbox holds: ``run_once`` is one pass; ``start`` keeps passing."""

    def __init__(
        self,
        index: NodeIndex,
        settings: NodeSettings,
        client: Callable[[], object],
        policy: Callable[[], VettingPolicy],
    ) -> None:
        self.index = index
        self.settings = settings
        self.client_factory = client
        self.policy = policy
        self._client: object | None = None
        self._client_lock = threading.Lock()
        limit = settings.upload_limit_mbps
        self.limiter = RateLimiter(limit * 1e6 / 8) if limit else None
        self.last_error: str | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="outbox", daemon=True)

    # -- background ------------------------------------------------------------------

    def start(self) -> None:
        # This process is the node's sender now: whatever a dead one left "sending" resumes.
        recover(self.index, older_than=dt.timedelta(0))
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(60)
        close = getattr(self._client, "close", None)
        if close is not None:
            close()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_once()
            except Exception as exc:
                log.exception("outbox pass failed")
                self.last_error = f"outbox: {type(exc).__name__}: {exc}"[:500]
            self._wake.wait(self.settings.outbox_seconds)
            self._wake.clear()

    # -- one pass --------------------------------------------------------------------

    def run_once(self, everything: bool = False) -> list[Outcome]:
        """Queue what was approved, then send what is due (``everything``: ignore backoff)."""
        recover(self.index)
        enqueue(self.index)
        now = utcnow()
        with self.index.db.read() as session:
            query = select(OutboxEntry.id).where(OutboxEntry.state == "queued")
            if not everything:
                query = query.where(OutboxEntry.next_attempt_at <= now)
            due = list(session.scalars(query.order_by(OutboxEntry.id)).all())
        if not due:
            return []
        with ThreadPoolExecutor(max_workers=self.settings.upload_concurrency) as pool:
            return list(pool.map(self._process, due))

    def client(self) -> object:
        """One HTTPS client for every upload of this sender (made when first needed)."""
        with self._client_lock:
            if self._client is None:
                self._client = self.client_factory()
            return self._client

    def _claim(self, entry_id: int) -> tuple[OutboxEntry, Study] | None:
        with self.index.db.write() as session:
            entry = session.get(OutboxEntry, entry_id)
            if entry is None or entry.state != "queued":
                return None
            study = session.get(Study, entry.study_id)
            if study is None:
                return None
            entry.state, entry.attempts, entry.updated_at = "sending", entry.attempts + 1, utcnow()
            entry.owner = OWNER
            session.flush()
            session.expunge(entry)
            session.expunge(study)
            return entry, study

    def _process(self, entry_id: int) -> Outcome:
        claimed = self._claim(entry_id)
        if claimed is None:
            return Outcome("?", "?", "skipped", "taken by another pass")
        entry, study = claimed
        try:
            if entry.kind == WITHDRAWAL:
                return self._send_withdrawal(entry, study)
            return self._send_exam(entry, study)
        except NodeError as exc:
            return self._failed_attempt(entry, study, exc)
        except Exception as exc:  # a bug must not wedge the entry in "sending"
            log.exception("sending %s failed", study.study_uid)
            return self._failed_attempt(
                entry, study, NodeError("internal", f"{type(exc).__name__}: {exc}", True)
            )

    def _send_exam(self, entry: OutboxEntry, study: Study) -> Outcome:
        if study.status != S.QUEUED.value:
            self._finish(entry.id, "failed", "", f"study is {study.status}, not queued")
            return Outcome(study.study_uid, EXAM, "skipped", f"study is {study.status}")
        client = self.client()
        files = self.settings.keys_dir / "federation"
        exam = package(
            self.index,
            self.settings,
            study.study_uid,
            client.site,  # type: ignore[attr-defined]
            files / "node.key",
            files / "node.crt",
        )
        found = gate(self.index, self.settings, exam, self.policy())
        if found:
            self._hold(entry.id, study.study_uid, "send-gate", found, "the send-time PHI scan")
            return Outcome(study.study_uid, EXAM, "held", f"{len(found)} finding(s) before sending")
        sizes = {i.sha256: i.size for i in exam.signed.manifest.instances()}
        self._progress(entry.id, 0, sum(sizes.values()), manifest_digest(exam.signed.manifest))
        offsets: dict[str, int] = {}
        last = [0.0]

        def progress(sha256: str, offset: int) -> None:
            offsets[sha256] = offset
            if time.monotonic() - last[0] >= 1.0:  # at most one registry write a second
                last[0] = time.monotonic()
                self._progress(entry.id, sum(offsets.values()), sum(sizes.values()), None)

        # A few quick retries ride out a blip mid-upload; longer outages are the outbox's.
        outcome = send_exam(
            client,  # type: ignore[arg-type]
            exam,
            attempts=3,
            on_chunk=progress,
            limiter=self.limiter,
        )
        if isinstance(outcome, Receipt):
            with self.index.db.write() as session:
                row = session.get(OutboxEntry, entry.id)
                target = session.get(Study, study.id)
                if row is not None:
                    row.state, row.updated_at = "done", utcnow()
                    row.bytes_sent = row.bytes_total
                    row.receipt = outcome.model_dump_json()
                if target is not None and target.status == S.QUEUED.value:
                    transition(
                        session,
                        target,
                        S.SHARED,
                        "coordinator",
                        f"registered ({outcome.instances} instances"
                        + (", already held" if outcome.duplicate else "")
                        + ")",
                    )
            return Outcome(study.study_uid, EXAM, "shared", f"{outcome.instances} instances")
        return self._rejected(entry, study, outcome)

    def _rejected(self, entry: OutboxEntry, study: Study, rejection: Rejection) -> Outcome:
        if rejection.code == "phi_found":
            found = [
                PhiFinding(
                    severity=Severity.parse(f.severity),
                    kind=f.kind,
                    location=f"{f.sop_instance_uid or ''} {f.location}".strip()[:200],
                    message=f.message,
                )
                for f in rejection.findings
            ]
            self._hold(
                entry.id, study.study_uid, "coordinator", found, "the coordinator's PHI scan"
            )
            return Outcome(study.study_uid, EXAM, "held", rejection.message)
        reasons = "; ".join(r.message for r in rejection.reasons[:5])
        self._fail(
            entry.id, study.study_uid, rejection.code, f"{rejection.message} {reasons}".strip()
        )
        return Outcome(study.study_uid, EXAM, "failed", rejection.message)

    def _send_withdrawal(self, entry: OutboxEntry, study: Study) -> Outcome:
        with self.index.db.read() as session:
            in_flight = session.scalar(
                select(OutboxEntry.id).where(
                    OutboxEntry.study_id == study.id,
                    OutboxEntry.kind == EXAM,
                    OutboxEntry.state == "sending",
                )
            )
        if in_flight is not None:
            # The exam may be registered a moment from now: withdraw it after that.
            raise NodeError("exam_in_flight", "the exam is still being sent", retryable=True)
        client = self.client()
        body = WithdrawRequest(reason=entry.reason or "withdrawn by the site")
        response = client.request(  # type: ignore[attr-defined]
            "POST",
            f"/api/v1/node/exams/{study.study_uid}/withdraw",
            json=body.model_dump(mode="json"),
        )
        if response.status_code == 200 or (
            response.status_code == 404 and response.json().get("code") == "exam_not_found"
        ):
            self._finish(entry.id, "done", "", "")
            return Outcome(study.study_uid, WITHDRAWAL, "done", "the coordinator knows")
        body_json = (
            response.json()
            if response.headers.get("content-type", "").startswith("application/json")
            else {}
        )
        raise NodeError(
            str(body_json.get("code", "coordinator_error")),
            str(body_json.get("message", f"HTTP {response.status_code}")),
            response.status_code >= 500 or response.status_code == 429,
        )

    # -- outcomes --------------------------------------------------------------------

    def _failed_attempt(self, entry: OutboxEntry, study: Study, exc: NodeError) -> Outcome:
        self.last_error = f"{study.study_uid}: {exc.code}: {exc.message}"[:500]
        if exc.retryable and exc.code not in PERMANENT:
            wait = backoff(entry.attempts)
            with self.index.db.write() as session:
                row = session.get(OutboxEntry, entry.id)
                if row is not None:
                    row.state = "queued"
                    row.next_attempt_at = utcnow() + dt.timedelta(seconds=wait)
                    row.last_code, row.last_error = exc.code, exc.message[:2000]
                    row.updated_at = utcnow()
            log.warning(
                "sending %s failed (%s), retrying in %.0f s", study.study_uid, exc.message, wait
            )
            return Outcome(study.study_uid, entry.kind, "retrying", exc.message)
        if entry.kind == WITHDRAWAL:
            self._finish(entry.id, "failed", exc.code, exc.message)
        else:
            self._fail(entry.id, study.study_uid, exc.code, exc.message)
        return Outcome(study.study_uid, entry.kind, "failed", exc.message)

    def _finish(self, entry_id: int, state: str, code: str, message: str) -> None:
        with self.index.db.write() as session:
            row = session.get(OutboxEntry, entry_id)
            if row is not None:
                row.state, row.last_code, row.last_error = state, code, message[:2000]
                row.updated_at = utcnow()

    def _fail(self, entry_id: int, study_uid: str, code: str, message: str) -> None:
        with self.index.db.write() as session:
            row = session.get(OutboxEntry, entry_id)
            if row is not None:
                row.state, row.last_code, row.last_error = "failed", code, message[:2000]
                row.updated_at = utcnow()
            study = session.scalar(select(Study).where(Study.study_uid == study_uid))
            if study is not None and study.status == S.QUEUED.value:
                transition(session, study, S.FAILED, "outbox", f"{code}: {message}"[:500])
        log.error("sending %s failed for good: %s: %s", study_uid, code, message)

    def _hold(
        self, entry_id: int, study_uid: str, source: str, found: list[PhiFinding], by: str
    ) -> None:
        with self.index.db.write() as session:
            row = session.get(OutboxEntry, entry_id)
            if row is not None:
                row.state, row.last_code = "held", "phi_found"
                row.last_error = f"{len(found)} finding(s) by {by}"
                row.updated_at = utcnow()
            study = session.scalar(select(Study).where(Study.study_uid == study_uid))
            if study is None:
                return
            for finding in found:
                session.add(
                    Finding(
                        study_id=study.id,
                        source=source,
                        severity=int(finding.severity),
                        kind=finding.kind,
                        location=finding.location[:200],
                        message=finding.message,
                        excerpt="",
                        at=utcnow(),
                    )
                )
            if study.status == S.QUEUED.value:
                transition(session, study, S.HELD, source, f"{len(found)} PHI finding(s) by {by}")
        log.warning("study %s held: PHI found by %s", study_uid, by)

    def _progress(self, entry_id: int, sent: int, total: int, digest: str | None) -> None:
        with self.index.db.write() as session:
            row = session.get(OutboxEntry, entry_id)
            if row is not None:
                row.bytes_sent, row.bytes_total = sent, total
                if digest is not None:
                    row.manifest_sha256 = digest
                row.updated_at = utcnow()


def gate(
    index: NodeIndex, settings: NodeSettings, exam: ExamPackage, policy: VettingPolicy
) -> list[PhiFinding]:
    """The send-time gate: findings at or above the policy's threshold in the bytes to send."""
    threshold = Severity.parse(policy.hold.findings_at_or_above)
    entries = {i.sha256: i for i in exam.signed.manifest.instances()}
    records = original_identifiers(
        index, [i.sop_instance_uid for i in entries.values()], actor="outbox", purpose="send gate"
    )
    allowed = safe_private(settings)
    found: list[PhiFinding] = []
    for sha256, path in exam.files.items():
        data = Path(path).read_bytes()
        if hashlib.sha256(data).hexdigest() != sha256:
            raise NodeError("store_changed", f"{path.name} changed since its manifest was made")
        entry = entries[sha256]
        record = records.get(entry.sop_instance_uid)
        for finding in scan(
            data,
            settings.deid,
            site_prefix=settings.site_id,
            originals=Originals.from_records([record]) if record else None,
            safe_private=allowed,
        ):
            if finding.severity >= threshold:
                found.append(
                    finding.model_copy(
                        update={"location": f"{entry.sop_instance_uid} {finding.location}"}
                    )
                )
    return found
