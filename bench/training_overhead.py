#!/usr/bin/env python3
"""What does RadFed add to a federated training run, against bare Flower on the same nodes?

One coordinator (with its SuperLink) and two enrolled nodes on 127.0.0.1, each
with a generated labelled chest-radiograph cohort, ingested and approved. For
the same app (`apps/cxr`), data, rounds and settings, measured in one run:

* **RadFed**: `radfed train submit --wait`, from submit until the run is
  finished and its model registered — through the coordinator API, the node
  gates (policy, cohort manifest, audit) and the run watcher.
* **RadFed, SuperNodes only**: the same submit, with each node's SuperNode started
  exactly as `radfed node serve` starts it (its gate on `PATH`) but without the rest
  of the node appliance (API, DICOM listener, vetter, outbox, heartbeats): the
  difference to the first is what the appliance running beside training costs.
* **bare Flower**: `flwr run apps/cxr` against the same SuperLink, with the same
  node keys in plain `flower-supernode`s (Flower's own `flwr-clientapp`, the
  manifest handed over in `--node-config`), until the run ends.

The three alternate (`--repeat` rounds of all three); the table shows each wall
time, the median and the ratio. A benchmark: it prints a table, it does not pass
or fail.

    .venv/bin/python bench/training_overhead.py [--rounds 3] [--samples 48] [--repeat 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
BIN = Path(sys.executable).parent
RADFED = [str(BIN / "radfed")]
SITES = ("north", "south")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cli(*args: str, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        [*RADFED, *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"radfed {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
    return done.stdout.strip()


def flower_env(home: Path) -> dict[str, str]:
    return {
        **os.environ,
        "FLWR_HOME": str(home),
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }


def online(coordinator: Path) -> int:
    done = subprocess.run(
        [str(BIN / "flwr"), "supernode", "list", "radfed", "--format", "json"],
        capture_output=True,
        text=True,
        env=flower_env(coordinator / "flower"),
        check=False,
    )
    try:
        nodes = json.loads(done.stdout[done.stdout.find("{") :])["nodes"]
    except (ValueError, KeyError):
        return 0
    return sum(1 for n in nodes if n["status"] == "online")


def wait_online(coordinator: Path, count: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while online(coordinator) < count:
        if time.monotonic() > deadline:
            raise SystemExit("SuperNodes did not come online")
        time.sleep(1)


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--samples", type=int, default=48, help="radiographs per site")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=BENCH / "work" / "training")
    args = parser.parse_args()

    from coordinator.training import fab_hash
    from node.index.db import Database
    from node.settings import load_settings
    from node.training.cohort import Cohort, samples
    from node.training.supernode import supernode
    from protocols.training import TrainingManifest
    from radfed.synth.cohort import write_cohort

    work = args.workdir.resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    home = work / "coordinator"
    cli("coordinator", "init", "--home", str(home))
    api, link = free_port(), free_port()
    coord_env = {
        "RADFED_COORDINATOR_SUPERLINK_PORT": str(link),
        "RADFED_COORDINATOR_TRAINING_POLL_S": "0.5",
    }
    logs = open(work / "coordinator.log", "ab")  # noqa: SIM115 - lives as long as the run
    coordinator = subprocess.Popen(
        [*RADFED, "coordinator", "serve", "--home", str(home), "--port", str(api)],
        env={**os.environ, **coord_env},
        stdout=logs,
        stderr=logs,
    )
    nodes: dict[str, subprocess.Popen[bytes]] = {}
    bare: list[subprocess.Popen[bytes]] = []
    gated: list[Any] = []
    try:
        time.sleep(3)
        url = f"https://127.0.0.1:{api}"
        token = cli(
            "coordinator", "token", "create", "bench", "--role", "researcher", "--home", str(home)
        )
        app_hash = fab_hash(ROOT / "apps" / "cxr")
        homes = {site: work / site for site in SITES}
        for n, site in enumerate(SITES):
            enroll = cli("coordinator", "site", "add", site, "--home", str(home))
            cli("node", "enroll", url, enroll, "--home", str(homes[site]))
            cohort = write_cohort(
                work / f"{site}-cohort", n=args.samples, seed=n, size=64, site=site
            )
            cli("node", "ingest", str(cohort.root), "--home", str(homes[site]), "-q")
            cli("node", "labels", "import", str(cohort.labels_csv), "--home", str(homes[site]))
            cli("node", "training", "policy", "--allow", app_hash, "--home", str(homes[site]))
        settings = ("--image-size", "32", "--local-epochs", "4", "--batch-size", "8")
        run_config = (
            f"num-rounds={args.rounds} min-nodes=2 image-size=32 local-epochs=4 batch-size=8"
        )
        env = {"RADFED_URL": url, "RADFED_TOKEN": token, "RADFED_CA": str(home / "pki" / "ca.crt")}

        def start_nodes() -> None:
            for site in SITES:
                log = open(homes[site] / "serve.log", "ab")  # noqa: SIM115
                nodes[site] = subprocess.Popen(
                    [
                        *RADFED,
                        "node",
                        "serve",
                        "--home",
                        str(homes[site]),
                        "--api-port",
                        str(free_port()),
                        "--dicom-port",
                        str(free_port()),
                    ],
                    env={**os.environ, "RADFED_NODE_SUPERNODE_PORT": str(free_port())},
                    stdout=log,
                    stderr=log,
                )
            wait_online(home, len(SITES))

        def start_gated() -> None:
            for site in SITES:
                proc = supernode(load_settings(homes[site], supernode_port=free_port()))
                if proc is None:
                    raise SystemExit(f"{site}: no SuperNode to start (not enrolled?)")
                proc.start()
                gated.append(proc)
            wait_online(home, len(SITES))

        def start_bare() -> None:
            for site in SITES:
                db = Database.open(homes[site] / "index.sqlite")
                found = samples(
                    db, homes[site] / "store", ("approved", "queued", "shared"), Cohort()
                )
                db.close()
                manifest = work / f"{site}-bare.json"
                manifest.write_text(
                    TrainingManifest(
                        run="bare", site=site, app_hash=app_hash, samples=found
                    ).model_dump_json()
                )
                fl_home = work / f"{site}-bare-flower"
                fl_home.mkdir(exist_ok=True)
                keys = homes[site] / "keys" / "federation"
                log = open(work / f"{site}-bare.log", "ab")  # noqa: SIM115
                bare.append(
                    subprocess.Popen(
                        [
                            str(BIN / "flower-supernode"),
                            "--superlink",
                            f"127.0.0.1:{link}",
                            "--port",
                            str(free_port()),
                            "--root-certificates",
                            str(keys / "ca.crt"),
                            "--auth-supernode-private-key",
                            str(keys / "supernode.key"),
                            "--node-config",
                            f'radfed-manifest="{manifest}"',
                        ],
                        env=flower_env(fl_home),
                        stdout=log,
                        stderr=log,
                        start_new_session=True,
                    )
                )
            wait_online(home, len(SITES))

        def radfed_run() -> float:
            started = time.perf_counter()
            run_id = cli(
                "train",
                "submit",
                "--rounds",
                str(args.rounds),
                "--min-nodes",
                "2",
                *settings,
                "--wait",
                env=env,
            ).split()[0]
            seconds = time.perf_counter() - started
            run = json.loads(cli("train", "status", run_id, "--json", env=env))
            if run["status"] != "finished" or run["model"] is None:
                raise SystemExit(f"{run_id} did not finish: {run}")
            return seconds

        def bare_run(n: int) -> float:
            out = work / f"bare-{n}"
            started = time.perf_counter()
            done = subprocess.run(
                [
                    str(BIN / "flwr"),
                    "run",
                    str(ROOT / "apps" / "cxr"),
                    "radfed",
                    "--stream",
                    "--run-config",
                    f'{run_config} run-dir="{out}"',
                ],
                capture_output=True,
                text=True,
                env=flower_env(home / "flower"),
                check=False,
            )
            seconds = time.perf_counter() - started
            if not (out / "model.safetensors").exists():
                raise SystemExit(f"bare Flower run wrote no model:\n{done.stdout[-3000:]}")
            return seconds

        times: dict[str, list[float]] = {"radfed": [], "gated": [], "bare": []}
        for n in range(args.repeat):
            start_nodes()
            times["radfed"].append(radfed_run())
            for proc in nodes.values():
                stop(proc)
            time.sleep(5)  # the SuperLink notices the SuperNodes are gone
            start_gated()
            times["gated"].append(radfed_run())
            for supervised in gated:
                supervised.stop()
            gated.clear()
            time.sleep(5)
            start_bare()
            times["bare"].append(bare_run(n))
            for proc in bare:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(30)
            bare.clear()
            time.sleep(5)  # the SuperLink notices the bare SuperNodes are gone
    finally:
        for proc in [*nodes.values(), *bare]:
            if proc.poll() is None:
                proc.terminate()
        for supervised in gated:
            supervised.stop()
        stop(coordinator)

    def median(values: list[float]) -> float:
        ordered = sorted(values)
        middle = len(ordered) // 2
        if len(ordered) % 2:
            return ordered[middle]
        return (ordered[middle - 1] + ordered[middle]) / 2

    print(
        f"Training run wall time: 2 sites x {args.samples} radiographs, {args.rounds} rounds, "
        f"apps/cxr (32x32, 4 local epochs), {args.repeat} alternating rounds of the three\n"
    )
    print(f"{'':<44} {'runs (s)':<24} {'median s':>9} {'x bare':>7} {'best s':>7} {'x bare':>7}")
    base = median(times["bare"])
    best = min(times["bare"])
    for key, label in (
        ("radfed", "RadFed: submit -> model registered"),
        ("gated", "RadFed, SuperNodes without the appliance"),
        ("bare", "bare Flower: flwr run --stream"),
    ):
        runs = ", ".join(f"{t:.1f}" for t in times[key])
        fastest = min(times[key])
        print(
            f"{label:<44} {runs:<24} {median(times[key]):>9.1f} {median(times[key]) / base:>7.2f}"
            f" {fastest:>7.1f} {fastest / best:>7.2f}"
        )


if __name__ == "__main__":
    main()
