"""Federated training end to end: coordinator + Flower SuperLink + three nodes with SuperNodes.

Real processes on 127.0.0.1 with TLS and SuperNode authentication on. Each node
enrolls (which registers its key with the SuperLink), takes in a generated
labelled chest-radiograph cohort with a learnable signal (an opacity in the
positives), approves by policy and shares; the coordinator cuts release ``v1``.
Two sites allow the reference app by its bundle hash; the third does not.

In order: a run on the release trains on the two that allow it, the third is
reported as declined and never loads the app; the final model beats chance
clearly on held-out generated data; metrics, model and provenance are registered
and fetched. The third site is revoked: its SuperNode is cut off. In one run: a
node killed mid-round (the round goes on with the other, the run is marked
degraded with who dropped), then the SuperLink killed (the run fails with a
resume hint; resuming continues from the last checkpoint, with the node back).
An unregistered SuperNode is refused. Stopping everything leaves no Flower
process behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from coordinator.training import fab_hash
from radfed.synth.cohort import cohort_manifest, write_cohort
from tests.helpers import ROOT, CoordinatorProcess, NodeProcess, run_cli

pytestmark = pytest.mark.integration

ALLOWING = ("north", "south")
DECLINING = "west"
SITES = (*ALLOWING, DECLINING)
#: Small and quick on two cores; the signal is still learnable at this size.
TRAIN = ("--image-size", "32", "--local-epochs", "8", "--batch-size", "8", "--lr", "0.002")


@dataclass
class Training:
    coordinator: CoordinatorProcess
    nodes: dict[str, NodeProcess]
    base: Path
    env: dict[str, str]
    app_hash: str

    def cli(self, *args: str, check: bool = True, timeout: float = 600) -> str:
        result = run_cli(*args, env=self.env, check=check, timeout=timeout)
        return result.stdout + result.stderr

    def run(self, run_id: str) -> dict[str, object]:
        out = run_cli("train", "status", run_id, "--json", env=self.env, check=True).stdout
        return json.loads(out)

    def wait(self, run_id: str, until: str, timeout: float = 300) -> dict[str, object]:
        """Poll the run until ``until`` holds ("round>=N" or a status)."""
        deadline = time.monotonic() + timeout
        run: dict[str, object] = {}
        while time.monotonic() < deadline:
            run = self.run(run_id)
            if until.startswith("round>="):
                if int(run["current_round"]) >= int(until.split(">=")[1]):  # type: ignore[arg-type]
                    return run
            elif run["status"] == until:
                return run
            time.sleep(1)
        pytest.fail(f"{run_id} never reached {until}: {run}")

    def node_sql(self, site: str, sql: str) -> list[tuple[object, ...]]:
        with sqlite3.connect(self.nodes[site].home / "index.sqlite") as db:
            return db.execute(sql).fetchall()

    def flower(self, *args: str) -> dict[str, object]:
        env = {
            **os.environ,
            "FLWR_HOME": str(self.coordinator.home / "flower"),
            "FLWR_DISABLE_UPDATE_CHECK": "1",
        }
        done = subprocess.run(
            [str(ROOT / ".venv" / "bin" / "flwr"), *args, "radfed", "--format", "json"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        return json.loads(done.stdout[done.stdout.find("{") :]) if "{" in done.stdout else {}

    def supernodes(self) -> dict[str, str]:
        nodes = self.flower("supernode", "list").get("nodes", [])
        return {str(n["node-id"]): str(n["status"]) for n in nodes}  # type: ignore[union-attr]

    def node_id(self, site: str) -> str:
        with sqlite3.connect(self.coordinator.home / "registry.sqlite") as db:
            row = db.execute("SELECT flower_node_id FROM sites WHERE name = ?", (site,)).fetchone()
        return str(row[0])


def _wait_gone(pattern: str, timeout: float = 20) -> list[str]:
    """Processes matching ``pattern`` still alive after ``timeout`` seconds (none, we hope)."""
    deadline = time.monotonic() + timeout
    while True:
        found = subprocess.run(
            ["pgrep", "-f", pattern], capture_output=True, text=True, check=False
        ).stdout.split()
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


def _shared(training: Training, site: str) -> tuple[int, int]:
    rows = training.node_sql(site, "SELECT status, count(*) FROM studies GROUP BY status")
    counts = {str(status): int(n) for status, n in rows}  # type: ignore[call-overload]
    return counts.get("shared", 0), sum(counts.values())


@pytest.fixture(scope="module")
def training(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Training]:
    base = tmp_path_factory.mktemp("training")
    home = base / "coordinator"
    run_cli("coordinator", "init", "--home", str(home), check=True)
    heldout = write_cohort(base / "heldout", n=40, seed=999, size=64, site="held-out")
    central = base / "heldout.json"
    central.write_text(cohort_manifest(heldout, run="held-out", site="held-out").model_dump_json())
    coordinator = CoordinatorProcess(
        home, env={"RADFED_COORDINATOR_CENTRAL_EVAL_MANIFEST": str(central)}, flower=True
    ).start()
    nodes: dict[str, NodeProcess] = {}
    try:
        researcher = (
            run_cli(
                "coordinator",
                "token",
                "create",
                "ada",
                "--role",
                "researcher",
                "--home",
                str(home),
                check=True,
            )
            .stdout.strip()
            .split()[-1]
        )
        app_hash = fab_hash(ROOT / "apps" / "cxr")
        for number, site in enumerate(SITES):
            token = run_cli("coordinator", "site", "add", site, "--home", str(home), check=True)
            node_home = base / site
            run_cli(
                "node",
                "enroll",
                coordinator.url,
                token.stdout.strip(),
                "--home",
                str(node_home),
                check=True,
            )
            cohort = write_cohort(
                base / f"{site}-cohort",
                n=6 if site == DECLINING else 28,
                seed=number,
                size=64,
                site=site,
            )
            run_cli("node", "ingest", str(cohort.root), "--home", str(node_home), "-q", check=True)
            run_cli(
                "node",
                "labels",
                "import",
                str(cohort.labels_csv),
                "--home",
                str(node_home),
                check=True,
            )
            if site in ALLOWING:
                run_cli(
                    "node",
                    "training",
                    "policy",
                    "--allow",
                    app_hash,
                    "--home",
                    str(node_home),
                    check=True,
                )
            nodes[site] = NodeProcess(node_home, env={"RADFED_NODE_OUTBOX_SECONDS": "1"}).start()
        env = {
            "RADFED_URL": coordinator.url,
            "RADFED_TOKEN": researcher,
            "RADFED_CA": str(home / "pki" / "ca.crt"),
        }
        training = Training(coordinator, nodes, base, env, app_hash)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            shared = [_shared(training, s) for s in SITES]
            online = [s for s in training.supernodes().values() if s == "online"]
            if all(done == total > 0 for done, total in shared) and len(online) == len(SITES):
                break
            time.sleep(1)
        else:
            pytest.fail(f"sites did not share and connect: {shared}, {training.supernodes()}")
        run_cli("coordinator", "release", "create", "v1", "--home", str(home), check=True)
        yield training
    finally:
        for node in nodes.values():
            if node.proc is not None and node.proc.poll() is None:
                node.stop()
        coordinator.stop()


def test_1_a_run_on_the_release_trains_where_allowed_and_registers_the_model(
    training: Training, tmp_path: Path
) -> None:
    # Execute
    run_id = training.cli(
        "train",
        "submit",
        "--release",
        "v1",
        "--rounds",
        "3",
        "--min-nodes",
        "2",
        *TRAIN,
        "--wait",
    ).split()[0]
    run = training.run(run_id)
    fetched = training.cli("train", "fetch", run_id, "--out", str(tmp_path))
    logs = training.cli("train", "logs", run_id)
    table = training.cli("train", "status", run_id)

    # Assert: three rounds, north and south trained in each, west declined every time.
    assert run["status"] == "finished" and not run["degraded"], run
    history = run["history"]
    assert [r["round"] for r in history] == [1, 2, 3]
    for record in history:
        assert sorted(record["trained"]) == list(ALLOWING) and min(record["trained"].values()) > 0
        assert record["declined"] == [DECLINING] and record["dropped"] == []
    assert run["participation"] == {"north": "trained", "south": "trained", "west": "declined"}
    assert "north (" in table and "west" in table  # the status table names sites and samples
    assert f"{run_id}: Flower run {run['attempts'][0]}" in logs
    # The model beats chance clearly on held-out generated data (balanced binary task).
    final = history[-1]["central_metrics"]
    assert final["eval-accuracy"] >= 0.75, history
    # Model and provenance, fetched and checked.
    model = tmp_path / f"{run_id}.safetensors"
    provenance = json.loads((tmp_path / f"{run_id}.provenance.json").read_text())
    assert model.is_file() and "sha256" in fetched
    assert provenance["sites"] == list(ALLOWING)
    assert provenance["app_hash"] == training.app_hash
    assert provenance["cohort"]["release"] == "v1"
    assert provenance["strategy"] == "fedavg"
    assert [r["trained"] for r in provenance["rounds"]] == [r["trained"] for r in history]
    assert len(provenance["metrics_history"]["central-accuracy"]) == 3
    # Each node's audit log has the run: accepted and three rounds trained here, with
    # samples; declined at west, where the app bundle was never even installed.
    north = training.node_sql("north", "SELECT action, details FROM audit_log")
    trained = [json.loads(d) for a, d in north if a == "training.train"]
    assert len(trained) == 3 and all(t["samples"] > 0 for t in trained)
    assert all(t["app_hash"] == training.app_hash for t in trained)
    assert any(a == "training.accept" for a, _ in north)
    west = [a for a, _ in training.node_sql("west", "SELECT action, details FROM audit_log")]
    assert "training.decline" in west and "training.train" not in west
    assert not list((training.nodes["west"].home / "training" / "flower").rglob("client_app.py"))
    for site in SITES:
        verified = run_cli("node", "audit", "verify", "--home", str(training.nodes[site].home))
        assert verified.returncode == 0, verified.stdout + verified.stderr


def test_2_a_revoked_site_is_cut_off_from_the_superlink(training: Training) -> None:
    node_id = training.node_id(DECLINING)
    assert training.supernodes()[node_id] == "online"

    run_cli(
        "coordinator",
        "site",
        "revoke",
        DECLINING,
        "--home",
        str(training.coordinator.home),
        check=True,
    )
    deadline = time.monotonic() + 60
    while training.supernodes().get(node_id) != "unregistered":
        assert time.monotonic() < deadline, training.supernodes()
        time.sleep(1)

    with sqlite3.connect(training.coordinator.home / "registry.sqlite") as db:
        actions = [
            a for (a,) in db.execute("SELECT action FROM audit_log WHERE subject = ?", (DECLINING,))
        ]
    assert "flower.supernode.unregister" in actions


def test_3_a_node_lost_mid_round_then_a_superlink_restart_then_resume(
    training: Training,
) -> None:
    # Prepare: two rounds that need one site.
    south = training.nodes["south"]
    log = south.home / "training" / "supernode.log"
    seen = log.read_text(errors="replace").count("Receiving: train message")
    run_id = training.cli(
        "train",
        "submit",
        "--release",
        "v1",
        "--rounds",
        "2",
        "--min-nodes",
        "1",
        "--round-timeout",
        "90",  # room for SuperNodes reconnecting to a restarted SuperLink on busy cores
        *TRAIN,
    ).split()[0]
    deadline = time.monotonic() + 240
    while log.read_text(errors="replace").count("Receiving: train message") < seen + 1:
        assert time.monotonic() < deadline, "round 1 never reached south"
        time.sleep(0.2)

    # Execute 1: south disappears while round 1 is in flight (SIGKILL: no clean-up).
    south.kill()
    port = south.env["RADFED_NODE_SUPERNODE_PORT"]
    orphans = _wait_gone(f"flower-supernode.*--port {port}")
    degraded = training.wait(run_id, "round>=1", timeout=300)
    # Execute 2: the SuperLink dies in round 2 (the coordinator restarts it).
    link = training.coordinator.superlink_port
    pids = subprocess.run(
        ["pgrep", "-f", f"flower-superlink.*--port {link}"], capture_output=True, text=True
    ).stdout.split()
    os.killpg(int(pids[0]), signal.SIGKILL)
    failed = training.wait(run_id, "failed", timeout=120)
    # Execute 3: south comes back; the run resumes from its checkpoint.
    south.start()
    training.cli("train", "resume", run_id, "--wait")
    run = training.run(run_id)

    # Assert: round 1 went on without south, and the run says who dropped.
    assert orphans == [], "the killed node's SuperNode outlived it"
    assert degraded["degraded"] is True and degraded["status"] == "running"
    first = degraded["history"][0]
    assert first["dropped"] == ["south"] and list(first["trained"]) == ["north"]
    # The restart failed the run cleanly, with the way back.
    assert "SuperLink restarted" in failed["error"] and f"train resume {run_id}" in failed["error"]
    assert [r["round"] for r in failed["history"]] == [1]
    # Resumed from round 1's checkpoint: round 2 only, both sites again.
    assert run["status"] == "finished" and run["degraded"] is True
    assert [r["round"] for r in run["history"]] == [1, 2]
    assert sorted(run["history"][1]["trained"]) == ["north", "south"]
    assert len(run["attempts"]) == 2 and run["model"] is not None
    assert run["participation"]["south"] == "trained"


def test_4_an_unregistered_supernode_is_refused(training: Training, tmp_path: Path) -> None:
    # Prepare: a key the SuperLink has never seen.
    key = ec.generate_private_key(ec.SECP384R1())
    path = tmp_path / "stranger.key"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
    )
    from tests.helpers import free_port

    before = training.supernodes()

    # Execute: its own session, so Flower's executor it starts goes with it afterwards.
    log = tmp_path / "stranger.log"
    with open(log, "w") as out:
        stranger = subprocess.Popen(
            [
                str(ROOT / ".venv" / "bin" / "flower-supernode"),
                "--superlink",
                f"127.0.0.1:{training.coordinator.superlink_port}",
                "--port",
                str(free_port()),
                "--root-certificates",
                str(training.coordinator.home / "pki" / "ca.crt"),
                "--auth-supernode-private-key",
                str(path),
                "--max-retries",
                "1",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={
                **os.environ,
                # Flower starts its executor by name: the venv's scripts come first.
                "PATH": f"{ROOT / '.venv' / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
                "FLWR_HOME": str(tmp_path),
                "FLWR_DISABLE_UPDATE_CHECK": "1",
            },
        )
        try:
            deadline = time.monotonic() + 90
            while "Failed to activate SuperNode" not in log.read_text(errors="replace"):
                if stranger.poll() is not None or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(stranger.pid, signal.SIGKILL)
            stranger.wait(10)
    known = training.supernodes()

    # Assert: refused at activation, and the SuperLink knows no node more than before.
    assert "Failed to activate SuperNode" in log.read_text(errors="replace"), log.read_text()
    assert set(known) == set(before)


def test_5_stopping_the_services_leaves_no_flower_process_behind(training: Training) -> None:
    ports = [n.env["RADFED_NODE_SUPERNODE_PORT"] for n in training.nodes.values()]
    link = training.coordinator.superlink_port

    for node in training.nodes.values():
        if node.proc is not None and node.proc.poll() is None:
            assert node.stop() == 0
    assert training.coordinator.stop() == 0

    assert _wait_gone(f"flower-superlink.*--port {link}") == []
    for port in ports:
        assert _wait_gone(f"flower-supernode.*--port {port}") == []
    # Flower's executors of the SuperLink (its ServerApps) went with it.
    assert _wait_gone(f"flower-superexec.*127.0.0.1:{link}") == []
