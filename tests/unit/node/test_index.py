"""The node index: recording, idempotency, lifecycle, search, audit chain, tokens, originals."""

from __future__ import annotations

import datetime as dt
import sqlite3
from pathlib import Path

import pytest
from sqlalchemy import select, text
from sqlalchemy.exc import DBAPIError

from node.deid import keys
from node.deid.vault import Vault
from node.errors import NodeError
from node.index import audit
from node.index.lifecycle import TRANSITIONS, LifecycleError
from node.index.models import AuditEntry, Instance, Study
from node.index.originals import original_identifiers
from node.index.store import NodeIndex, StudyQuery
from node.intake.ingest import ingest
from node.settings import NodeSettings, load_settings
from node.site import engine_config, open_index
from protocols.api.node import StudyStatus
from radfed.synth.site import write_site_corpus
from tests.helpers import CountingAESGCM, indexed_vault_records, newest_vault_records


@pytest.fixture
def settings(tmp_path: Path) -> NodeSettings:
    return load_settings(tmp_path / "home")


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    root = tmp_path / "export"
    write_site_corpus(root, patients=2, ct_slices=3, ct_size=32, cr_size=32)
    (root / "notes.txt").write_text("not DICOM")
    return root


def take_in(settings: NodeSettings, index: NodeIndex, *paths: Path) -> None:
    ingest(
        list(paths), settings, index, engine_config(settings), 1, settings.runs_dir / "test.jsonl"
    )


@pytest.fixture
def index(settings: NodeSettings, corpus: Path) -> NodeIndex:
    idx = open_index(settings)
    take_in(settings, idx, corpus)
    return idx


def test_everything_is_recorded_once(
    index: NodeIndex, settings: NodeSettings, corpus: Path
) -> None:
    counts = index.counts()

    # 2 patients x (CT study with 3 slices + SR, and a radiograph study (+ US for patient 0))
    assert counts.instances == 2 * (3 + 1 + 1) + 1
    assert counts.studies == 4
    assert counts.by_status == {"deidentified": 4}
    assert counts.by_modality == {"CT": 6, "SR": 2, "CR": 1, "DX": 1, "US": 1}
    assert counts.quarantined == 1

    take_in(settings, index, corpus)  # the same folder again: nothing changes

    assert index.counts() == counts


def test_index_refers_only_to_files_in_the_store(index: NodeIndex, settings: NodeSettings) -> None:
    paths = index.instance_paths()
    assert paths
    assert all((settings.store_dir / p).is_file() for p in paths)


def test_a_study_records_its_history(index: NodeIndex) -> None:
    page = index.search(StudyQuery(modality="CT"))
    detail = index.study(page.items[0].study_instance_uid)

    assert [(c.from_status, c.to_status) for c in detail.history] == [
        (None, StudyStatus.RECEIVED),
        (StudyStatus.RECEIVED, StudyStatus.DEIDENTIFIED),
    ]
    assert detail.history[0].actor == "intake:folder"
    assert {s.modality for s in detail.series} == {"CT", "SR"}
    ct = next(s for s in detail.series if s.modality == "CT")
    assert [i.instance_number for i in ct.instances] == [1, 2, 3]
    assert all(len(i.sha256) == 64 and i.rows == 32 for i in ct.instances)


def test_search_filters_sorts_and_pages(index: NodeIndex) -> None:
    everything = index.search(StudyQuery(limit=500))
    first = index.search(StudyQuery(limit=1, offset=0, sort="study_date", order="asc"))
    second = index.search(StudyQuery(limit=1, offset=1, sort="study_date", order="asc"))

    assert everything.total == 4
    assert first.total == 4 and len(first.items) == 1
    dates = sorted(s.study_date for s in everything.items if s.study_date)
    assert first.items[0].study_date == dates[0] and second.items[0].study_date == dates[1]
    assert index.search(StudyQuery(modality="US")).total == 1
    assert index.search(StudyQuery(burned_in_risk=True)).total == 1
    assert index.search(StudyQuery(rows=32, modality="CT")).total == 2
    assert index.search(StudyQuery(rows=512)).total == 0
    assert index.search(StudyQuery(body_part="CHEST", manufacturer="AGFA")).total == 2
    assert index.search(StudyQuery(status=(StudyStatus.APPROVED,))).total == 0
    assert index.search(StudyQuery(study_date_from=dt.date(2100, 1, 1))).total == 0
    assert index.search(StudyQuery(slice_thickness_min=2.0, slice_thickness_max=3.0)).total == 2
    assert index.search(StudyQuery(photometric="MONOCHROME1")).total == 2


def test_bad_search_arguments_are_named(index: NodeIndex) -> None:
    with pytest.raises(NodeError, match='"sort"'):
        index.search(StudyQuery(sort="name"))
    with pytest.raises(NodeError, match='"limit"'):
        index.search(StudyQuery(limit=0))


@pytest.mark.parametrize(
    ("query", "argument"),
    [
        (StudyQuery(rows=2**108), '"rows"'),
        (StudyQuery(columns=-(2**64)), '"columns"'),
        (StudyQuery(number_of_frames_min=2**63), '"number_of_frames_min"'),
        (StudyQuery(offset=2**76), '"offset"'),
    ],
)
def test_integers_sqlite_cannot_bind_are_named_not_crashed_on(
    index: NodeIndex, query: StudyQuery, argument: str
) -> None:
    # Found by the API fuzz tests: these were an OverflowError (a 500) in the node API.
    with pytest.raises(NodeError, match=argument) as caught:
        index.search(query)
    with pytest.raises(NodeError, match='"offset"'):
        index.quarantine(offset=2**80)

    assert caught.value.code in ("bad_filter", "bad_page")


def test_transitions_follow_the_lifecycle(index: NodeIndex) -> None:
    uid = index.search(StudyQuery(limit=1)).items[0].study_instance_uid

    index.move(uid, StudyStatus.HELD, "policy", "burned-in risk")
    index.move(uid, StudyStatus.APPROVED, "reviewer:ann", "checked")
    with pytest.raises(LifecycleError, match="approved -> shared is not an allowed"):
        index.move(uid, StudyStatus.SHARED, "someone", "")
    index.move(uid, StudyStatus.WITHDRAWN, "site", "patient asked")
    with pytest.raises(LifecycleError):
        index.move(uid, StudyStatus.APPROVED, "reviewer:ann", "")

    history = index.study(uid).history
    assert [c.to_status for c in history][-3:] == ["held", "approved", "withdrawn"]
    assert history[-2].actor == "reviewer:ann" and history[-2].reason == "checked"


def test_the_lifecycle_table_is_closed() -> None:
    statuses = set(StudyStatus)
    assert set(TRANSITIONS) == statuses | {None}
    assert all(targets <= statuses for targets in TRANSITIONS.values())
    assert TRANSITIONS[StudyStatus.WITHDRAWN] == frozenset()
    for status in statuses - {StudyStatus.WITHDRAWN}:
        assert StudyStatus.WITHDRAWN in TRANSITIONS[status]  # a site can always withdraw


def test_new_instances_after_approval_reopen_the_study(
    index: NodeIndex, settings: NodeSettings, tmp_path: Path
) -> None:
    more = tmp_path / "more"
    write_site_corpus(
        more, patients=1, ct_slices=4, ct_size=32, cr_size=32, seed=5, with_us=False, with_sr=False
    )
    take_in(settings, index, more)
    uid = next(
        s.study_instance_uid
        for s in index.search(StudyQuery(limit=500)).items
        if s.instance_count == 4 and s.modalities == ["CT"]
    )
    index.move(uid, StudyStatus.APPROVED, "policy", "clean CT")
    extra = tmp_path / "extra"
    write_site_corpus(
        extra, patients=1, ct_slices=5, ct_size=32, cr_size=32, seed=5, with_us=False, with_sr=False
    )  # same seed: the same study, one more slice

    take_in(settings, index, extra)

    study = index.study(uid)
    assert study.instance_count == 5
    assert study.status == StudyStatus.DEIDENTIFIED
    assert "to be vetted again" in study.history[-1].reason


def test_audit_chain_holds_and_names_a_tampered_entry(index: NodeIndex) -> None:
    with index.db.read() as session:
        assert audit.verify(session).ok
        actions = session.scalars(select(AuditEntry.action).order_by(AuditEntry.seq)).all()
    assert len(actions) >= 9  # 4 studies x 2 transitions + 1 quarantine
    assert set(actions) == {"study.status", "quarantine"}

    # The database itself refuses edits...
    with pytest.raises(DBAPIError, match="append-only"), index.db.write() as session:
        session.execute(text("UPDATE audit_log SET actor = 'mallory' WHERE seq = 3"))
    # ...so a tamperer goes around it, straight at the file.
    raw = sqlite3.connect(index.db.path)
    raw.execute("DROP TRIGGER audit_log_no_update")
    raw.execute("UPDATE audit_log SET actor = 'mallory' WHERE seq = 3")
    raw.commit()
    raw.close()

    with index.db.read() as session:
        result = audit.verify(session)
    assert result.broken_at == 3 and "does not match" in result.reason


def test_a_deleted_entry_is_named(index: NodeIndex) -> None:
    raw = sqlite3.connect(index.db.path)
    raw.execute("DROP TRIGGER audit_log_no_delete")
    raw.execute("DELETE FROM audit_log WHERE seq = 2")
    raw.commit()
    raw.close()

    with index.db.read() as session:
        result = audit.verify(session)
    assert result.broken_at == 2 and "missing" in result.reason


def test_status_changes_and_their_audit_entries_commit_together(index: NodeIndex) -> None:
    uid = index.search(StudyQuery(limit=1)).items[0].study_instance_uid
    with index.db.read() as session:
        before = session.scalar(select(AuditEntry.seq).order_by(AuditEntry.seq.desc()).limit(1))

    with pytest.raises(LifecycleError):
        index.move(uid, StudyStatus.SHARED, "someone", "not allowed")

    with index.db.read() as session:
        after = session.scalar(select(AuditEntry.seq).order_by(AuditEntry.seq.desc()).limit(1))
        status = session.scalar(select(Study.status).where(Study.study_uid == uid))
    assert after == before and status == "deidentified"


def test_quarantine_is_listed_with_its_reason_and_the_source_sealed(index: NodeIndex) -> None:
    page = index.quarantine()

    assert page.total == 1
    entry = page.items[0]
    assert entry.code == "not_dicom" and "no DICM prefix" in entry.message
    with index.db.read() as session:
        sealed = session.execute(text("SELECT source_sealed FROM quarantine")).scalar_one()
    assert "notes.txt" not in sealed and index.vault.unseal(sealed).endswith("notes.txt")


def test_tokens_are_stored_hashed_and_can_be_revoked(index: NodeIndex) -> None:
    token = index.create_token("alice", "operator", actor="test")

    assert index.check_token(token) == ("alice", "operator")
    assert index.check_token(token + "x") is None
    with index.db.read() as session:
        stored = session.execute(text("SELECT token_hash FROM api_tokens")).scalar_one()
    assert token not in stored
    with pytest.raises(NodeError, match="exists"):
        index.create_token("alice", "operator", actor="test")
    index.revoke_token("alice", actor="test")
    assert index.check_token(token) is None
    with pytest.raises(NodeError, match='"role"'):
        index.create_token("bob", "superuser", actor="test")


def test_migrations_match_the_models(index: NodeIndex) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from node.index.models import Base

    with index.db.writer.connect() as connection:
        assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []


def test_a_mixed_series_is_searched_instance_by_instance(
    settings: NodeSettings, tmp_path: Path
) -> None:
    import pydicom

    corpus = tmp_path / "mixed"
    write_site_corpus(
        corpus,
        patients=1,
        ct_slices=3,
        ct_size=32,
        cr_size=32,
        seed=9,
        with_us=False,
        with_sr=False,
    )
    odd = sorted(corpus.rglob("CT/*.dcm"))[-1]
    ds = pydicom.dcmread(odd)
    ds.Rows, ds.Columns = 16, 64  # same pixel count, different shape
    ds.save_as(odd)
    index = open_index(settings)

    take_in(settings, index, corpus)

    with index.db.read() as session:
        uniform = session.execute(text("SELECT uniform FROM series WHERE modality = 'CT'"))
        assert uniform.scalar_one() == 0
    assert index.search(StudyQuery(rows=16)).total == 1
    assert index.search(StudyQuery(rows=32, modality="CT")).total == 1
    assert index.search(StudyQuery(rows=16, columns=32)).total == 0  # no instance has both
    assert index.search(StudyQuery(rows=16, columns=64)).total == 1


def test_reading_sealed_originals_is_audited(index: NodeIndex) -> None:
    from node.index.originals import original_identifiers, quarantine_source

    entry = index.quarantine().items[0]
    some_uid = index.study(index.search(StudyQuery(limit=1)).items[0].study_instance_uid)
    sop = some_uid.series[0].instances[0].sop_instance_uid

    source = quarantine_source(index, entry.id, actor="ops:ann", purpose="find the file")
    records = original_identifiers(index, [sop], actor="scanner", purpose="PHI scan")

    assert source.endswith("notes.txt")
    assert records[sop]["patient_id"].startswith("MRN")
    with index.db.read() as session:
        reads = session.execute(
            select(AuditEntry.actor, AuditEntry.subject, AuditEntry.details)
            .where(AuditEntry.action == "originals.read")
            .order_by(AuditEntry.seq)
        ).all()
        assert audit.verify(session).ok
    assert [(r.actor, r.subject) for r in reads] == [
        ("ops:ann", f"quarantine:{entry.id}"),
        ("scanner", "vault"),
    ]
    assert "find the file" in reads[0].details


def test_attach_uses_an_index_open_migrated_and_refuses_a_missing_one(tmp_path: Path) -> None:
    # Prepare: a node home whose index `open` created (and migrated).
    from node.index.db import Database

    path = tmp_path / "index.sqlite"
    Database.open(path).close()

    # Execute
    attached = Database.attach(path)
    with attached.read() as session:
        version = session.execute(text("SELECT version_num FROM alembic_version")).scalar()
    attached.close()
    with pytest.raises(NodeError) as missing:
        Database.attach(tmp_path / "elsewhere.sqlite")

    # Assert
    assert version
    assert missing.value.code == "index_missing"
    assert not (tmp_path / "elsewhere.sqlite").exists()  # nothing created on the way


# -- reading originals decrypts only the vault records that hold them -----------------------


def filler(vault: Vault, until: int) -> None:
    """Append records of other instances' entries until record ``until`` is written."""
    number = -1
    while number < until:
        number = vault.append(
            [{"sop_instance_uid": [f"1.2.3.{until}.{i}", f"2.25.9{until}{i}"]} for i in range(3)]
        )
        assert number is not None


def full_read(vault: Vault, wanted: set[str]) -> dict[str, dict[str, object]]:
    """What reading the whole vault finds: each wanted instance's newest entry."""
    found = {}
    for entry in vault.entries():
        if entry["sop_instance_uid"][1] in wanted:
            found[entry["sop_instance_uid"][1]] = entry
    return found


def sop_uids(index: NodeIndex) -> list[str]:
    with index.db.read() as session:
        return list(session.scalars(select(Instance.sop_uid).order_by(Instance.id)))


def counting(index: NodeIndex, settings: NodeSettings) -> CountingAESGCM:
    """Count the index's vault decryptions from now on."""
    counter = CountingAESGCM(keys.vault_key(settings.keys_dir))
    index.vault._aead = counter
    return counter


def test_each_instance_names_the_newest_vault_record_holding_its_entry(
    index: NodeIndex, settings: NodeSettings, corpus: Path
) -> None:
    # Prepare: what the first ingest recorded
    first = indexed_vault_records(settings.index_path)
    assert first == newest_vault_records(index.vault)

    # Execute: the same folder again appends the same entries to newer records
    take_in(settings, index, corpus)

    # Assert: the unchanged rows follow their entries to the newer records
    again = indexed_vault_records(settings.index_path)
    assert again == newest_vault_records(index.vault)
    assert again.keys() == first.keys()
    assert min(n for n in again.values() if n is not None) > max(
        n for n in first.values() if n is not None
    )


def test_reading_originals_decrypts_only_the_records_holding_them(
    settings: NodeSettings, tmp_path: Path
) -> None:
    # Prepare: 50 records; one study's entries early, another's late, others between
    index = open_index(settings)
    write_site_corpus(tmp_path / "early", patients=1, ct_slices=2, ct_size=32, cr_size=32, seed=1)
    write_site_corpus(tmp_path / "late", patients=1, ct_slices=2, ct_size=32, cr_size=32, seed=2)
    take_in(settings, index, tmp_path / "early")
    early = sop_uids(index)
    filler(index.vault, 24)
    take_in(settings, index, tmp_path / "late")
    late = [uid for uid in sop_uids(index) if uid not in early]
    filler(index.vault, 49)
    wanted = {early[0], late[-1]}
    rows = indexed_vault_records(settings.index_path)
    assert len({rows[uid] for uid in wanted}) == 2
    counter = counting(index, settings)

    # Execute
    found = original_identifiers(index, wanted, actor="vetting", purpose="PHI scan")
    decrypted = counter.decrypted

    # Assert: two records decrypted of fifty, and what a full read finds
    assert decrypted == 2
    counter.decrypted = 0
    assert found == full_read(index.vault, wanted)
    assert counter.decrypted == 50
    assert set(found) == wanted


def test_rows_indexed_before_the_vault_record_was_kept_are_found_by_a_full_read(
    index: NodeIndex, settings: NodeSettings
) -> None:
    # Prepare: a row as migration 0005 leaves the rows indexed before it, and a UID the
    # index does not hold (a file of `radfed node deid`, whose entry is in the vault)
    filler(index.vault, 9)
    wanted = set(sop_uids(index))
    fast = original_identifiers(index, wanted, actor="vetting", purpose="PHI scan")
    with index.db.write() as session:
        session.execute(
            text("UPDATE instances SET vault_record = NULL WHERE sop_uid = :uid"),
            {"uid": min(wanted)},
        )
    outside = "2.25.990"  # a filler entry's new UID: in the vault, not in the index
    counter = counting(index, settings)

    # Execute
    legacy = original_identifiers(index, wanted, actor="vetting", purpose="PHI scan")
    legacy_reads = counter.decrypted
    counter.decrypted = 0
    unknown = original_identifiers(index, {outside}, actor="cli", purpose="radfed node scan")
    unknown_reads = counter.decrypted

    # Assert: the same answers as before, from the whole vault
    assert legacy == fast == full_read(index.vault, wanted)
    assert set(legacy) == wanted
    assert legacy_reads == unknown_reads == 10
    assert list(unknown) == [outside]
    with index.db.read() as session:
        reads = session.scalars(
            select(AuditEntry.actor).where(AuditEntry.action == "originals.read")
        ).all()
    assert reads == ["vetting", "vetting", "cli"]
