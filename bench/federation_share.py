#!/usr/bin/env python3
"""End-to-end sharing throughput: node outbox -> registered, against intake alone. A table.

Three sites, each with ≥ 500 approved CT instances in its node. Two runs in
the same process, each against a fresh ``radfed coordinator serve``:

* intake only: each site's exams are packaged up front and sent with the
  uploader straight to the coordinator (signature, upload, scan, register) —
  the coordinator-intake rate;
* end to end: each site runs ``radfed node share`` — the outbox queues the
  approved studies, builds and signs manifests, runs the send-time PHI gate on
  the bytes, uploads, records the receipt and marks the studies shared.

Target: end-to-end MB/s ≥ 80% of intake-only.

    .venv/bin/python bench/federation_share.py [--sites 3] [--exams 5] [--slices 100]
                                               [--size 256] [--workdir bench/work]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from coordinator_intake import (
    RADFED,
    free_port,
    intake_client,
    make_site,
    measure,
    run,
    wait_https,
)

BENCH = Path(__file__).resolve().parent


def share_client(home: str, start: float) -> tuple[int, float, float]:
    """``radfed node share`` for one site; (bytes, seconds, CPU seconds of the process)."""
    import resource

    while time.time() < start:
        time.sleep(0.001)
    began = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(
        [RADFED, "node", "share", "--home", home], capture_output=True, text=True, check=False
    )
    seconds = time.perf_counter() - began
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(f"share failed:\n{done.stdout}\n{done.stderr}")
    sent = sum(p.stat().st_size for p in (Path(home) / "store").rglob("*.dcm"))
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return sent, seconds, cpu


def coordinator(root: Path, homes: list[Path], name: str) -> tuple[subprocess.Popen[bytes], Path]:
    home = root / f"coordinator-{name}"
    shutil.rmtree(home, ignore_errors=True)
    run("coordinator", "init", "--home", str(home))
    port = free_port()
    url = f"https://127.0.0.1:{port}"
    server = subprocess.Popen(
        [RADFED, "coordinator", "serve", "--home", str(home), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=open(root / f"{name}.log", "w"),  # noqa: SIM115 - lives as long as the server
    )
    wait_https(f"{url}/healthz", home / "pki" / "ca.crt")
    for i, node in enumerate(homes):
        shutil.rmtree(node / "keys" / "federation", ignore_errors=True)
        token = run("coordinator", "site", "add", f"site{i}", "--home", str(home))
        run("node", "enroll", url, token, "--home", str(node))
    return server, home


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--exams", type=int, default=5)
    parser.add_argument("--slices", type=int, default=100)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--workdir", type=Path, default=BENCH / "work")
    args = parser.parse_args()
    root = args.workdir / f"share-{args.sites}x{args.exams}x{args.slices}x{args.size}"
    root.mkdir(parents=True, exist_ok=True)
    instances = args.exams * args.slices
    print(f"preparing {args.sites} sites × {instances} CT instances {args.size}²")
    prepared = []
    for i in range(args.sites):
        home = make_site(root, 50 + i, args.exams, args.slices, args.size)
        if not (home / ".vetted").exists():
            run("node", "vet", "--home", str(home))  # policy: CT-only exams are approved
            (home / ".vetted").write_text("ok\n")
        prepared.append(home)
    # Each run starts from a copy: the end-to-end run marks the studies shared.
    homes = []
    for home in prepared:
        scratch = root / "run" / home.name
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.copytree(home, scratch)
        homes.append(scratch)

    server, _ = coordinator(root, homes, "intake")
    try:
        intake = measure(intake_client, lambda h: (str(h),), homes, server.pid)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)
    server, _ = coordinator(root, homes, "e2e")
    try:
        e2e = measure(share_client, lambda h: (str(h),), homes, server.pid)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)

    files = args.sites * instances
    print()
    print(
        f"| {args.sites} sites, {files} instances, {intake[2] / 1e6:.0f} MB | seconds | MB/s "
        "| vs intake | coordinator CPU ms/file | nodes CPU ms/file |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for label, (rate, seconds, _, server_cpu, client_cpu) in (
        ("coordinator intake only (uploader straight in)", intake),
        ("end to end: outbox, gate, upload, receipt", e2e),
    ):
        print(
            f"| {label} | {seconds:.1f} | {rate:.1f} | {rate / intake[0]:.0%} "
            f"| {server_cpu / files * 1000:.1f} | {client_cpu / files * 1000:.1f} |"
        )
    ratio = e2e[0] / intake[0]
    print(
        f"\ntarget ≥ 80% of intake only ({os.cpu_count()} cores shared by all processes): "
        f"{'met' if ratio >= 0.8 else 'NOT met'} ({ratio:.0%})"
    )


if __name__ == "__main__":
    main()
