"""The ingest load benchmark's own functions at small scale, so its accounting is tested.

``bench/load_node_ingest.py`` ingests 100,000 instances and checks from the node's
vault, index and store that nothing was lost. Here the same functions run on 300
instances through the real ``radfed node ingest`` process: the accounting holds after a
clean ingest, and it names the loss when a stored file or an index row goes missing.
No timing is asserted.
"""

from __future__ import annotations

import importlib
import json
import math
import sqlite3
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from tests.helpers import ROOT

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def load() -> Iterator[ModuleType]:
    # bench/ stays on the path while the tests run: the C-STORE senders are spawned
    # processes that import the bench module again.
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        yield importlib.import_module("load_node_ingest")
    finally:
        sys.path.remove(str(ROOT / "bench"))


def test_every_instance_is_accounted_for_and_a_loss_is_named(
    load: ModuleType, tmp_path: Path
) -> None:
    # Prepare: 300 instances, CT series, CR, DX, US and SR across 40 studies.
    made = load.corpus(tmp_path / "work", 300, seed=1, ct_slices=(5, 30))
    assert set(Counter(m.modality for m in made.made)) == {"CT", "CR", "DX", "US", "SR"}
    home = tmp_path / "home"

    # Execute
    run = load.run_ingest(made.export, home, jobs=2, interval=0.2)
    acct = load.account(home, made.made)

    # Assert: all there, once, with their files; the probes saw the run.
    assert run.rc == 0, run.output
    assert acct.ok, dict(acct.problems)
    assert (acct.generated, acct.vault_records, acct.indexed, acct.stored) == (300,) * 4
    assert (acct.quarantined, acct.duplicates, acct.strays) == (0, 0, 0)
    assert acct.studies == (40, 40)
    assert acct.series[0] == acct.series[1]
    assert sum(b.items for b in run.batches if b.kind == "index") == 300
    assert sum(b.items for b in run.batches if b.kind == "vault") == 300
    assert 0 < run.peak_largest < 1024  # MiB: sampled, not asserted flat at this size
    assert len(acct.received) == len(acct.lags) == 300

    # Execute: lose one instance's file, and another instance's index row.
    with sqlite3.connect(home / "index.sqlite") as db:
        (kept_path,) = db.execute("SELECT path FROM instances ORDER BY id LIMIT 1").fetchone()
        db.execute("DELETE FROM instances WHERE id = (SELECT max(id) FROM instances)")
    db.close()
    (home / "store" / kept_path).unlink()
    lost = load.account(home, made.made)

    # Assert: both losses named, and the orphaned file seen as a stray.
    assert not lost.ok
    assert lost.problems["LOST: indexed, file missing from the store"] == 1
    assert lost.problems["LOST: not indexed"] == 1
    assert lost.problems["file in the store the index does not know"] == 1
    assert (lost.indexed, lost.stored) == (299, 298)


def test_instances_sent_over_c_store_are_all_accounted_for(
    load: ModuleType, tmp_path: Path
) -> None:
    # Prepare: 60 instances, sent by two pynetdicom senders keeping their debug records.
    made = load.corpus(tmp_path / "work", 60, seed=2, ct_slices=(5, 12))
    home, dicom_log = tmp_path / "serve-home", tmp_path / "dicom-log"
    dicom_log.mkdir()

    # Execute
    run = load.run_cstore(made.export, made.made, home, associations=2, dicom_log=dicom_log)
    acct = load.account(home, made.made)

    # Assert: every C-STORE answered with success in the end, every instance indexed
    # once with its file; a debug dump for each C-STORE left unanswered (rare) and
    # none otherwise.
    assert run.statuses == Counter({0: 60}), run.events
    assert not math.isnan(run.drained)  # the spool emptied
    assert acct.ok, dict(acct.problems)
    assert (acct.generated, acct.indexed, acct.stored) == (60, 60, 60)
    assert acct.quarantined == 0
    unanswered = [e for e in run.events if "no response" in e]
    assert len(list(dicom_log.glob("sender-*.log"))) == len(unanswered)
    assert sum(run.handled.values()) >= 60


#: pynetdicom's send_c_store race, forced: the sender's association thread leaves its
#: pause 20 ms late (still reading as paused), and the thread waiting for the response
#: wakes 100 ms late, as under load. The response arrives in between; the association
#: thread takes it and the request waits out its (3 s) DIMSE timeout.
_RACE = """
import json, sys, threading, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import pynetdicom, pynetdicom.association as association, pynetdicom.dimse as dimse
from pynetdicom import AE, AllStoragePresentationContexts, evt
import load_node_ingest as load

class LateResume(threading.Event):
    def wait(self, timeout=None):
        got = super().wait(timeout)
        if threading.current_thread().name.startswith("RequestorThread"):
            time.sleep(0.02)
        return got

made_association = association.Association.__init__
def with_late_resume(self, *args, **kwargs):
    made_association(self, *args, **kwargs)
    self._reactor_checkpoint = LateResume()
    self._reactor_checkpoint.set()
association.Association.__init__ = with_late_resume

get_msg = dimse.DIMSEServiceProvider.get_msg
def late_wake(self, block=False):
    if block:
        time.sleep(0.1)
    return get_msg(self, block)
dimse.DIMSEServiceProvider.get_msg = late_wake

class QuickAE(AE):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.dimse_timeout = 3
pynetdicom.AE = QuickAE

scp = AE(ae_title="RADFED")
scp.supported_contexts = AllStoragePresentationContexts
server = scp.start_server(("127.0.0.1", 0), block=False,
                          evt_handlers=[(evt.EVT_C_STORE, lambda event: 0x0000)])
made = load.corpus(Path(sys.argv[2]), 3, seed=3, ct_slices=(5, 6))
paths = [str(made.export / m.relpath) for m in made.made[:3]]
try:
    *_, statuses, events = load._send_part((server.server_address[1], paths, time.time(), ""))
finally:
    server.shutdown()
print(json.dumps({"statuses": statuses, "events": events}))
"""


def test_a_response_taken_by_the_senders_own_pynetdicom_thread_is_told_apart(
    tmp_path: Path,
) -> None:
    # Execute: the bench's sender against a pynetdicom SCP that answers every C-STORE,
    # with the race forced (above).
    done = subprocess.run(
        [sys.executable, "-c", _RACE, str(ROOT / "bench"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )

    # Assert: requests after the first on an association go unanswered although the SCP
    # answered; each is named as taken by the sender's thread, and its resend on a new
    # association succeeds.
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["statuses"] == [0, 0, 0]
    unanswered = [e for e in result["events"] if "no response" in e]
    assert unanswered
    assert all("sender's own pynetdicom thread took it" in e for e in unanswered)
