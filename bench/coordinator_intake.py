#!/usr/bin/env python3
"""Coordinator intake throughput: 8 nodes uploading at once over mutual TLS. A table, not pass/fail.

Eight enrolled sites (each its own node home, key and certificate) send their
de-identified CT exams at the same time — eight client processes — to one
``radfed coordinator serve`` process on loopback, through the node's own
uploader (signed manifest, chunked PUTs, complete: signature, digests, the
PHI scan of every instance, atomic registration).

The floor is a bare HTTPS server (uvicorn, the same TLS certificates, client
certificates required) that reads each PUT body and throws it away: the same
bytes, in the same chunks, from the same eight processes. Target: intake MB/s
≥ 60% of the floor's.

    .venv/bin/python bench/coordinator_intake.py [--nodes 8] [--exams 3] [--slices 40]
                                                 [--size 512] [--workdir bench/work]
"""

from __future__ import annotations

import argparse
import datetime as dt
import multiprocessing
import os
import random
import shutil
import signal
import ssl
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import httpx
import numpy as np

from radfed.synth.site import Uids, ct_series, make_patient, write

BENCH = Path(__file__).resolve().parent
RADFED = str(Path(sysconfig.get_path("scripts")) / "radfed")
CHUNK = 8 * 1024 * 1024


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run(*args: str, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        [RADFED, *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        check=False,
    )
    if done.returncode != 0:
        sys.exit(f"radfed {' '.join(args[:3])} failed:\n{done.stderr}")
    return done.stdout.strip()


def wait_https(url: str, ca: Path, timeout: float = 60) -> None:
    context = ssl.create_default_context(cafile=str(ca))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            httpx.get(url, verify=context, timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.2)
    sys.exit(f"{url} did not come up")


# -- the sites ---------------------------------------------------------------------------


def make_site(root: Path, index: int, exams: int, slices: int, size: int) -> Path:
    """A node home with ``exams`` CT studies taken in (de-identified, vetted, approved)."""
    home = root / f"node{index}"
    if (home / ".complete").exists():
        return home
    shutil.rmtree(home, ignore_errors=True)
    export = root / f"export{index}"
    shutil.rmtree(export, ignore_errors=True)
    rng, nprng, uids = random.Random(index), np.random.default_rng(index), Uids(1000 + index)
    for exam in range(exams):
        patient = make_patient(rng, index * 100 + exam)
        series = ct_series(
            patient,
            uids,
            uids.new(),
            dt.datetime(2020, 5, 1) + dt.timedelta(days=exam),
            f"ACC{index:02d}{exam:03d}",
            slices,
            size,
            nprng,
        )
        for i, ds in enumerate(series):
            write(ds, export / f"e{exam}" / f"{i:04d}.dcm")
    run("node", "ingest", str(export), "--home", str(home), "-q", "--no-vet")
    shutil.rmtree(export, ignore_errors=True)
    (home / ".complete").write_text("ok\n")
    return home


def study_uids(home: Path) -> list[str]:
    import sqlite3

    with sqlite3.connect(home / "index.sqlite") as db:
        return [row[0] for row in db.execute("SELECT study_uid FROM studies ORDER BY id")]


# -- clients (one process per site) --------------------------------------------------------


def tree_cpu(pid: int) -> float:
    """CPU seconds used so far by a process and all its descendants (from /proc)."""
    ticks = os.sysconf("SC_CLK_TCK")
    parents: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(entry.name)] = int(fields[1])
        cpu[int(entry.name)] = (int(fields[11]) + int(fields[12])) / ticks
    total, stack = 0.0, [pid]
    while stack:
        current = stack.pop()
        total += cpu.get(current, 0.0)
        stack.extend(child for child, parent in parents.items() if parent == current)
    return total


def own_cpu() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def intake_client(home: str, start: float) -> tuple[int, float, float]:
    """Send every study of one node; (bytes, seconds)."""
    from node import federation
    from node.settings import load_settings
    from node.share.manifest import package
    from node.share.upload import send_exam
    from node.site import open_index
    from protocols.api.coordinator import Receipt

    settings = load_settings(Path(home))
    index = open_index(settings)
    files = federation.files(settings)
    with federation.CoordinatorClient(settings) as client:
        exams = [
            package(index, settings, uid, client.site, files.key, files.cert)
            for uid in study_uids(Path(home))
        ]
        while time.time() < start:
            time.sleep(0.001)
        began, cpu = time.perf_counter(), own_cpu()
        sent = 0
        for exam in exams:
            outcome = send_exam(client, exam, chunk=CHUNK)
            if not isinstance(outcome, Receipt):
                raise RuntimeError(f"exam refused: {outcome}")
            sent += sum(p.stat().st_size for p in exam.files.values())
        return sent, time.perf_counter() - began, own_cpu() - cpu


def floor_client(home: str, url: str, ca: str, start: float) -> tuple[int, float, float]:
    """The same files, the same chunks, PUT to the bare server; (bytes, seconds)."""
    settings_files = Path(home) / "keys" / "federation"
    context = ssl.create_default_context(cafile=ca)
    context.load_cert_chain(str(settings_files / "node.crt"), str(settings_files / "node.key"))
    paths = sorted((Path(home) / "store").rglob("*.dcm"))
    with httpx.Client(base_url=url, verify=context, timeout=60) as client:
        while time.time() < start:
            time.sleep(0.001)
        began, cpu = time.perf_counter(), own_cpu()
        sent = 0
        for path in paths:
            with open(path, "rb") as handle:
                offset = 0
                while data := handle.read(CHUNK):
                    response = client.put(
                        f"/files/{path.name}", params={"offset": offset}, content=data
                    )
                    response.raise_for_status()
                    offset += len(data)
                    sent += len(data)
        return sent, time.perf_counter() - began, own_cpu() - cpu


BARE_SERVER = """
import sys, ssl, uvicorn

async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    more = True
    while more:
        message = await receive()
        more = message.get("more_body", False)
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": b"{}"})

port, key, cert, ca = sys.argv[1:5]
uvicorn.run(app, host="127.0.0.1", port=int(port), ssl_keyfile=key, ssl_certfile=cert,
            ssl_ca_certs=ca, ssl_cert_reqs=ssl.CERT_REQUIRED, log_level="warning",
            access_log=False)
"""


def measure(target, args_for, homes: list[Path], server: int):  # type: ignore[no-untyped-def]
    """(MB/s, seconds, bytes, server CPU s, clients CPU s) of one run."""
    start = time.time() + 2.0
    with multiprocessing.get_context("spawn").Pool(len(homes)) as pool:
        before = tree_cpu(server)
        results = pool.starmap(target, [(*args_for(h), start) for h in homes])
        server_cpu = tree_cpu(server) - before
    total = sum(r[0] for r in results)
    seconds = max(r[1] for r in results)
    return total / seconds / 1e6, seconds, total, server_cpu, sum(r[2] for r in results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=int, default=8)
    parser.add_argument("--exams", type=int, default=3)
    parser.add_argument("--slices", type=int, default=40)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--workdir", type=Path, default=BENCH / "work")
    args = parser.parse_args()
    root = args.workdir / f"intake-{args.nodes}x{args.exams}x{args.slices}x{args.size}"
    root.mkdir(parents=True, exist_ok=True)
    print(
        f"preparing {args.nodes} sites × {args.exams} CT exams × {args.slices} slices {args.size}²"
    )
    homes = [make_site(root, i, args.exams, args.slices, args.size) for i in range(args.nodes)]

    coordinator = root / "coordinator"
    shutil.rmtree(coordinator, ignore_errors=True)
    run("coordinator", "init", "--home", str(coordinator))
    port = free_port()
    url = f"https://127.0.0.1:{port}"
    log = open(root / "coordinator.log", "w")  # noqa: SIM115 - closed below
    server = subprocess.Popen(
        [RADFED, "coordinator", "serve", "--home", str(coordinator), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    ca = coordinator / "pki" / "ca.crt"
    try:
        wait_https(f"{url}/healthz", ca)
        for i, home in enumerate(homes):
            shutil.rmtree(home / "keys" / "federation", ignore_errors=True)
            token = run("coordinator", "site", "add", f"site{i}", "--home", str(coordinator))
            run("node", "enroll", url, token, "--home", str(home))
        intake_rate, intake_s, intake_bytes, intake_cpu, intake_clients = measure(
            intake_client, lambda h: (str(h),), homes, server.pid
        )
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(30)
        log.close()

    bare_port = free_port()
    pki = coordinator / "pki"
    bare = subprocess.Popen(
        [
            sys.executable,
            "-c",
            BARE_SERVER,
            str(bare_port),
            str(pki / "server.key"),
            str(pki / "server.crt"),
            str(ca),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        bare_url = f"https://127.0.0.1:{bare_port}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with socket_ready(bare_port):
                    break
            except OSError:
                time.sleep(0.2)
        floor_rate, floor_s, floor_bytes, floor_cpu, floor_clients = measure(
            floor_client, lambda h: (str(h), bare_url, str(ca)), homes, bare.pid
        )
    finally:
        bare.send_signal(signal.SIGTERM)
        bare.wait(30)

    ratio = intake_rate / floor_rate
    files = sum(len(list((h / "store").rglob("*.dcm"))) for h in homes)
    cores = os.cpu_count() or 1
    print()
    print(
        f"| {args.nodes} nodes, {files} files, {intake_bytes / 1e6:.0f} MB | seconds | MB/s "
        f"| vs floor | server CPU ms/file | clients CPU ms/file |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    print(
        f"| bare HTTPS PUT, body discarded (floor) | {floor_s:.1f} | {floor_rate:.1f} | 100% "
        f"| {floor_cpu / files * 1000:.1f} | {floor_clients / files * 1000:.1f} |"
    )
    print(
        f"| RadFed intake (verify, store, PHI scan, register) | {intake_s:.1f} | "
        f"{intake_rate:.1f} | {ratio:.0%} | {intake_cpu / files * 1000:.1f} "
        f"| {intake_clients / files * 1000:.1f} |"
    )
    bound = (floor_cpu + floor_clients) / (intake_cpu + intake_clients)
    print(
        f"\nCPU bound on these {cores} cores (clients and server share them): "
        f"intake can reach at most ~{bound:.0%} of the floor's rate"
    )
    print(f"\ntarget ≥ 60% of the floor: {'met' if ratio >= 0.6 else 'NOT met'}")
    assert floor_bytes == intake_bytes


class socket_ready:  # noqa: N801 - used as a tiny context manager
    def __init__(self, port: int) -> None:
        import socket

        self.sock = socket.create_connection(("127.0.0.1", port), timeout=1)

    def __enter__(self) -> socket_ready:
        return self

    def __exit__(self, *_: object) -> None:
        self.sock.close()


if __name__ == "__main__":
    main()
