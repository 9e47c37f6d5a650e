"""Test helpers: run the CLI as users do, and scan outputs for anything identifying.

The scan is deliberately independent of the engine: it reads outputs with
pydicom (every element at every depth, private elements, file meta) and also
searches the raw bytes of each file.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sqlite3
import subprocess
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ahocorasick
import pydicom
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pydicom.dataset import Dataset

if TYPE_CHECKING:
    from node.deid.vault import Vault

ROOT = Path(__file__).resolve().parent.parent
#: Debian's Chromium, driven by Playwright in the browser tests (never a downloaded one).
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
RADFED = [sys.executable, "-m", "radfed.cli"]


def run_cli(
    *args: str, env: dict[str, str] | None = None, check: bool = False, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    """Run ``radfed ARGS`` in a subprocess, as an operator would."""
    full_env = {**os.environ, "COLUMNS": "200", **(env or {})}
    proc = subprocess.run(
        [*RADFED, *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        cwd=ROOT,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"radfed {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


def report_lines(home: Path) -> list[dict[str, Any]]:
    """The per-file report of the newest run in a node home."""
    reports = sorted((home / "runs").glob("deid-*.jsonl"), key=lambda p: p.stat().st_mtime)
    assert reports, f"no run report in {home / 'runs'}"
    return [json.loads(line) for line in reports[-1].read_text().splitlines()]


@dataclass
class Value:
    """One element value found in an output, with where it was."""

    path: str
    tag: int
    vr: str
    raw: bytes


def _as_bytes(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        return b"\\".join(_as_bytes(v) for v in value)
    return str(value).encode("utf-8", "replace")


def walk_values(ds: Dataset, prefix: str = "") -> Iterator[Value]:
    """Every element value at every depth (file meta included, sequences recursed)."""
    meta = getattr(ds, "file_meta", None)
    if meta is not None and not prefix:
        for elem in meta:
            yield Value(f"meta/{elem.tag}", int(elem.tag), elem.VR, _as_bytes(elem.value))
    for elem in ds:
        where = f"{prefix}/{elem.tag}"
        if elem.VR == "SQ":
            for i, item in enumerate(elem.value):
                yield from walk_values(item, f"{where}[{i}]")
        else:
            yield Value(where, int(elem.tag), elem.VR, _as_bytes(elem.value))


def find_needles(files: Iterable[Path], needles: dict[bytes, str]) -> list[str]:
    """Needles found in element values or raw bytes, as readable findings.

    One Aho-Corasick pass per file over its raw bytes and over its decoded
    values (which matter where raw bytes hide them: a deflated data set).
    """
    if not needles:
        return []
    automaton = ahocorasick.Automaton()
    for needle in needles:
        automaton.add_word(needle.decode("latin-1"), needle)
    automaton.make_automaton()

    def hits(data: bytes) -> set[bytes]:
        return {needle for _, needle in automaton.iter(data.decode("latin-1"))}

    findings = []
    for path in files:
        raw_hits = hits(path.read_bytes())
        values = b"\x00".join(v.raw for v in walk_values(pydicom.dcmread(path)))
        for needle in sorted(raw_hits):
            findings.append(
                f"{path.name}: raw bytes contain {needle!r} (planted {needles[needle]})"
            )
        for needle in sorted(hits(values) - raw_hits):
            findings.append(f"{path.name}: an element holds {needle!r} (planted {needles[needle]})")
    return findings


def iod_errors(path: Path) -> set[str]:
    """dciodvfy's errors for a file, with values normalised so shapes can be compared."""
    proc = subprocess.run(
        ["dciodvfy", str(path)], capture_output=True, text=True, errors="replace", check=False
    )
    errors = set()
    for line in (proc.stdout + proc.stderr).splitlines():
        if "Error" not in line:
            continue
        # Values differ by design (UIDs mapped, dates shifted, text removed): compare shapes.
        line = re.sub(r"(value|=) <[^>]*>", r"\1 <>", line)
        line = re.sub(r"0x[0-9a-fA-F]+", "0x", line)
        errors.add(re.sub(r"[0-9][0-9.]*", "N", line).strip())
    return errors


class CountingAESGCM:
    """The cryptography library's AES-GCM, counting decryptions.

    Put in place of a vault's cipher, it shows how many records a read decrypted
    (the library's class cannot be subclassed, so this wraps one).
    """

    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)
        self.decrypted = 0

    def encrypt(self, nonce: bytes, data: bytes, associated_data: bytes | None) -> bytes:
        return self._aead.encrypt(nonce, data, associated_data)

    def decrypt(self, nonce: bytes, data: bytes, associated_data: bytes | None) -> bytes:
        self.decrypted += 1
        return self._aead.decrypt(nonce, data, associated_data)


def newest_vault_records(vault: Vault) -> dict[str, int]:
    """New SOP Instance UID -> the newest vault record holding its entry, read one by one."""
    from node.deid.vault import VaultError  # here: the coordinator's tests use these helpers too

    newest: dict[str, int] = {}
    number = 0
    while True:
        try:
            entries = list(vault.records([number]))
        except VaultError as exc:
            if "does not exist" in str(exc):
                return newest
            raise
        for entry in entries:
            newest[entry["sop_instance_uid"][1]] = number
        number += 1


def indexed_vault_records(index_path: Path) -> dict[str, int | None]:
    """SOP Instance UID -> the vault record the node index names for it."""
    with contextlib.closing(sqlite3.connect(index_path)) as db:
        return dict(db.execute("SELECT sop_uid, vault_record FROM instances").fetchall())


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServiceProcess:
    """A RadFed service as a real process on 127.0.0.1, started and stopped by a test."""

    what = "service"

    def __init__(self, home: Path, env: dict[str, str] | None = None) -> None:
        self.home = home
        self.env = env or {}
        self.proc: subprocess.Popen[str] | None = None
        self.log = home / "serve.log"

    def argv(self) -> list[str]:
        raise NotImplementedError

    def ready(self) -> bool:
        raise NotImplementedError

    def start(self, timeout: float = 60) -> Any:
        import time

        self.home.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [*RADFED, *self.argv()],
            stdout=subprocess.DEVNULL,
            stderr=self.log.open("a"),
            text=True,
            cwd=ROOT,
            env={**os.environ, **self.env},
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"{self.what} exited {self.proc.returncode}:\n{self.log.read_text()}"
                )
            try:
                if self.ready():
                    return self
            except OSError:
                pass
            time.sleep(0.2)
        self.kill()
        raise AssertionError(f"{self.what} did not come up in {timeout} s:\n{self.log.read_text()}")

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM and wait: the service must stop cleanly."""
        assert self.proc is not None
        self.proc.terminate()
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"{self.what} did not stop on SIGTERM") from None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def __enter__(self) -> Any:
        return self.start()

    def __exit__(self, *_: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.stop()


class NodeProcess(ServiceProcess):
    """``radfed node serve``: the API, the web UI and the DICOM listener."""

    what = "node"

    def __init__(self, home: Path, env: dict[str, str] | None = None) -> None:
        # A study is vetted once no instance has come for this long (30 s in a real
        # node); the tests push whole studies at once, so two seconds is plenty.
        super().__init__(
            home,
            {
                "RADFED_NODE_STUDY_STABLE_SECONDS": "2",
                "RADFED_NODE_SUPERNODE_PORT": str(free_port()),
                **(env or {}),
            },
        )
        self.api_port = free_port()
        self.dicom_port = free_port()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def argv(self) -> list[str]:
        return [
            "node",
            "serve",
            "--home",
            str(self.home),
            "--api-port",
            str(self.api_port),
            "--dicom-port",
            str(self.dicom_port),
        ]

    def ready(self) -> bool:
        import httpx

        try:
            return httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False


PG_DSN = os.environ.get("RADFED_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")


class PgSchema:
    """A fresh PostgreSQL schema in the test database, dropped afterwards.

    The URL it gives sets the schema as the search path, so a registry opened
    on it sees only its own tables: tests never share state, and nothing is
    left in the database. ``make test`` starts PostgreSQL if it is down.
    """

    def __init__(self) -> None:
        import secrets

        self.name = f"rf_{secrets.token_hex(6)}"

    @property
    def url(self) -> str:
        return f"{PG_DSN}?options=-csearch_path%3D{self.name}"

    def _run(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(PG_DSN, autocommit=True) as conn:
            conn.execute(sql)

    def __enter__(self) -> PgSchema:
        try:
            self._run(f"CREATE SCHEMA {self.name}")
        except Exception as exc:
            raise AssertionError(
                f"PostgreSQL at {PG_DSN} is not reachable ({exc}); `make test` starts it"
            ) from exc
        return self

    def __exit__(self, *_: object) -> None:
        self._run(f"DROP SCHEMA IF EXISTS {self.name} CASCADE")


class CoordinatorProcess(ServiceProcess):
    """``radfed coordinator serve`` over TLS."""

    what = "coordinator"

    def __init__(self, home: Path, env: dict[str, str] | None = None, flower: bool = False) -> None:
        # The Flower SuperLink only where a test trains: it costs a few seconds to start.
        self.superlink_port = free_port()
        flower_env = {
            "RADFED_COORDINATOR_FLOWER_ENABLED": "1" if flower else "0",
            "RADFED_COORDINATOR_SUPERLINK_PORT": str(self.superlink_port),
            "RADFED_COORDINATOR_TRAINING_POLL_S": "0.5",
        }
        super().__init__(home, {**flower_env, **(env or {})})
        self.port = free_port()

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def ca(self) -> Path:
        return self.home / "pki" / "ca.crt"

    def tls(self, cert: Path | None = None, key: Path | None = None) -> Any:
        """An SSL context trusting the federation CA (with a client certificate if given)."""
        import ssl

        context = ssl.create_default_context(cafile=str(self.ca))
        if cert is not None:
            context.load_cert_chain(str(cert), str(key) if key else None)
        return context

    def argv(self) -> list[str]:
        return ["coordinator", "serve", "--home", str(self.home), "--port", str(self.port)]

    def ready(self) -> bool:
        import httpx

        try:
            answer = httpx.get(f"{self.url}/healthz", timeout=1, verify=self.tls())
        except httpx.HTTPError:
            return False
        return answer.status_code == 200


class ConnectProxy:
    """A small HTTP CONNECT proxy on 127.0.0.1 that records where it connected.

    Stands in for a hospital's outbound proxy. ``drop_after`` bytes (client to
    server, per tunnel) cuts the tunnel mid-stream, as a flaky network would; ``corrupt_at``
    flips the byte at that offset of the first tunnel that gets that far (once).
    """

    def __init__(self, drop_after: int | None = None, corrupt_at: int | None = None) -> None:
        import socket
        import threading

        self.drop_after = drop_after
        self.corrupt_at = corrupt_at
        self.corrupted = 0
        self.targets: list[str] = []
        self.dropped = 0
        self._server = socket.create_server(("127.0.0.1", 0))
        self._server.settimeout(0.5)
        self.port = self._server.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ConnectProxy:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self._server.close()

    def _accept(self) -> None:
        import threading

        while not self._stop.is_set():
            try:
                client, _ = self._server.accept()
            except OSError:
                continue
            threading.Thread(target=self._tunnel, args=(client,), daemon=True).start()

    def _tunnel(self, client: Any) -> None:
        import contextlib
        import socket
        import threading

        with client:
            client.settimeout(30)
            request = b""
            while b"\r\n\r\n" not in request and len(request) < 8192:
                data = client.recv(4096)
                if not data:
                    return
                request += data
            line = request.split(b"\r\n", 1)[0].decode("latin-1").split()
            if len(line) < 2 or line[0] != "CONNECT":
                client.sendall(b"HTTP/1.1 405 Method Not Allowed\r\n\r\n")
                return
            host, port = line[1].rsplit(":", 1)
            self.targets.append(line[1])
            try:
                upstream = socket.create_connection((host, int(port)), timeout=10)
            except OSError:
                client.sendall(b"HTTP/1.1 502 Bad Gateway\r\n\r\n")
                return
            client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            with upstream:
                sent = [0]

                def pump(source: Any, sink: Any, count: bool) -> None:
                    try:
                        while True:
                            data = source.recv(65536)
                            if not data:
                                break
                            if count:
                                before = sent[0]
                                sent[0] += len(data)
                                if self.drop_after is not None and sent[0] > self.drop_after:
                                    self.dropped += 1
                                    break
                                at = self.corrupt_at
                                if at is not None and before <= at < sent[0] and not self.corrupted:
                                    flipped = bytearray(data)
                                    flipped[at - before] ^= 0xFF  # one bit pattern, once
                                    data = bytes(flipped)
                                    self.corrupted += 1
                            sink.sendall(data)
                    except OSError:
                        pass
                    finally:
                        for end in (source, sink):
                            with contextlib.suppress(OSError):
                                end.shutdown(socket.SHUT_RDWR)

                back = threading.Thread(target=pump, args=(upstream, client, False), daemon=True)
                back.start()
                pump(client, upstream, True)
                back.join(30)


def plant_after_review(node_home: Path, study_uid: str, comment: str) -> None:
    """Put ``comment`` into a stored instance of a study after it was vetted, index updated.

    What a bug between review and sending would do: the index says the file is
    the one it holds, so only the PHI scans can notice.
    """
    import hashlib
    import io
    import sqlite3

    with sqlite3.connect(node_home / "index.sqlite") as db:
        row_id, path = db.execute(
            "SELECT i.id, i.path FROM instances i JOIN studies s ON s.id = i.study_id "
            "WHERE s.study_uid = ? LIMIT 1",
            (study_uid,),
        ).fetchone()
        ds = pydicom.dcmread(node_home / "store" / path)
        ds.ImageComments = comment
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        (node_home / "store" / path).write_bytes(buffer.getvalue())
        db.execute(
            "UPDATE instances SET sha256 = ?, size = ? WHERE id = ?",
            (hashlib.sha256(buffer.getvalue()).hexdigest(), len(buffer.getvalue()), row_id),
        )
