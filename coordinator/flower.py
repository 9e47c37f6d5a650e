"""The coordinator's Flower SuperLink and the ``flwr`` CLI that talks to it.

``serve`` supervises ``flower-superlink``: TLS with the federation's server
certificate (TLS 1.2+, ECDHE + AEAD only: it is started through
``coordinator.tlsrun``), SuperNode authentication on, state in
``<home>/flower/state.db``, runtime dependency installation, the update check and
telemetry off. The SuperLink
serves its Fleet, Control and Runtime APIs on one port (loopback by default; only
``/v1/fleet/`` is meant for nodes). ``FlowerCli`` runs ``flwr`` commands against it
with ``FLWR_HOME`` set to ``<home>/flower``, whose ``config.toml`` names the
connection ``radfed``.

``sync_supernodes`` keeps the SuperLink's SuperNode list in step with the sites:
each enrolled, unrevoked site's certificate key is registered (the node key also
authenticates the node's SuperNode, in OpenSSH form), a re-enrolled site's old key
and a revoked site's key are unregistered, and a registration the SuperLink lost
is made again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from sqlalchemy import select

from coordinator import audit, pki
from coordinator.errors import CoordinatorError
from coordinator.registry.db import Database
from coordinator.registry.models import NodeCertificate, Site
from coordinator.settings import CoordinatorSettings
from protocols.process import Supervised, tool, tool_path
from protocols.storage import private_dir, write_private

log = logging.getLogger("radfed.coordinator.flower")
CONNECTION = "radfed"


def flower_env(home: Path) -> dict[str, str]:
    """The environment of Flower's processes: its own home, no network side effects."""
    env = dict(os.environ)
    env.update(
        FLWR_HOME=str(home),
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        PATH=tool_path(),
        PYTHONUNBUFFERED="1",
    )
    return env


def write_connection(settings: CoordinatorSettings) -> None:
    """``<home>/flower/config.toml``: the ``radfed`` connection to our SuperLink."""
    home = settings.flower_dir.resolve()
    private_dir(home)
    ca = pki.Paths(settings.pki_dir).ca_cert.resolve()
    host = "127.0.0.1" if settings.superlink_host in ("0.0.0.0", "::") else settings.superlink_host  # noqa: S104
    text = (
        "# Written by radfed coordinator serve: the flwr CLI's connection to its SuperLink.\n"
        "[superlink]\n"
        f'default = "{CONNECTION}"\n\n'
        f"[superlink.{CONNECTION}]\n"
        f'address = "{host}:{settings.superlink_port}"\n'
        f"root-certificates = {json.dumps(str(ca))}\n"
    )
    write_private(home / "config.toml", text.encode("utf-8"), 0o600)


def superlink(settings: CoordinatorSettings) -> Supervised:
    """The supervised SuperLink process of this coordinator (not started)."""
    paths = pki.Paths(settings.pki_dir.resolve())
    home = settings.flower_dir.resolve()
    write_connection(settings)
    # The SuperLink's state (runs, messages, node keys) is created by SQLite with the
    # umask's mode: made 0600 first, its -wal and -shm files follow it.
    (home / "state.db").touch(mode=0o600, exist_ok=True)
    (home / "state.db").chmod(0o600)
    argv = [
        # Through coordinator.tlsrun: the SuperLink's uvicorn gets protocols.tlsconfig's TLS.
        sys.executable,
        "-m",
        "coordinator.tlsrun",
        tool("flower-superlink"),
        "--host",
        settings.superlink_host,
        "--port",
        str(settings.superlink_port),
        "--database",
        str(home / "state.db"),
        "--ssl-ca-certfile",
        str(paths.ca_cert),
        "--ssl-certfile",
        str(paths.server_cert),
        "--ssl-keyfile",
        str(paths.server_key),
        "--enable-supernode-auth",
        "--disable-runtime-dependency-installation",
    ]
    return Supervised(
        "superlink",
        argv,
        flower_env(home),
        home / "superlink.log",
        cwd=home,
    )


class FlowerCli:
    """``flwr`` commands against this coordinator's SuperLink."""

    def __init__(self, settings: CoordinatorSettings) -> None:
        self.settings = settings
        self.home = settings.flower_dir.resolve()
        self.env = flower_env(self.home)

    def call(self, *args: str, timeout: float = 60.0) -> dict[str, Any]:
        """Run ``flwr ARGS --format json``; its JSON answer, or a clear error."""
        argv = [tool("flwr"), *args, "--format", "json"]
        try:
            done = subprocess.run(  # noqa: S603 - fixed program, our arguments
                argv,
                env=self.env,
                cwd=self.home,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise CoordinatorError(
                "superlink_unavailable", f"`flwr {args[0]}` did not answer in {timeout:g} s", True
            ) from exc
        answer = _last_json(done.stdout)
        if done.returncode != 0 or answer is None or not answer.get("success", False):
            detail = (answer or {}).get("error-message") or done.stderr.strip()[-500:]
            raise CoordinatorError(
                "superlink_error",
                f"`flwr {' '.join(args[:2])}` failed: {detail or done.stdout.strip()[-500:]}",
                True,
            )
        return answer

    def register(self, public_key_pem: bytes, name: str) -> str:
        """Register a SuperNode public key; its Flower node id."""
        key = serialization.load_pem_public_key(public_key_pem)
        openssh = key.public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        with tempfile.NamedTemporaryFile(suffix=".pub", dir=self.home) as handle:
            handle.write(openssh + b"\n")
            handle.flush()
            answer = self.call("supernode", "register", handle.name, CONNECTION, "--name", name)
        return str(answer["node-id"])

    def unregister(self, node_id: str) -> None:
        self.call("supernode", "unregister", node_id, CONNECTION)

    def supernodes(self) -> dict[str, str]:
        """Flower node id -> status (registered, online, offline, unregistered)."""
        answer = self.call("supernode", "list", CONNECTION)
        return {str(n["node-id"]): str(n.get("status", "")) for n in answer.get("nodes", [])}

    def start_run(self, app_dir: Path, run_config: dict[str, Any]) -> str:
        """``flwr run`` the app with a run config; the Flower run id."""
        overrides = " ".join(f"{key}={_toml_value(value)}" for key, value in run_config.items())
        answer = self.call("run", str(app_dir), CONNECTION, "--run-config", overrides)
        return str(answer["run-id"])

    def stop_run(self, run_id: str) -> None:
        self.call("stop", run_id, CONNECTION)

    def run_status(self, run_id: str) -> str | None:
        """Flower's status of a run (e.g. ``running``, ``finished:completed``), if known."""
        answer = self.call("ls", CONNECTION, "--run-id", run_id)
        for run in answer.get("runs", []):
            if str(run.get("run-id")) == run_id:
                return str(run.get("status", ""))
        return None

    def logs(self, run_id: str) -> str:
        """What the run's ServerApp has logged so far."""
        done = subprocess.run(  # noqa: S603 - fixed program, our arguments
            [tool("flwr"), "log", run_id, CONNECTION, "--show"],
            env=self.env,
            cwd=self.home,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        return done.stdout


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    text = str(value)
    if '"' in text or "\\" in text or "\n" in text:
        raise CoordinatorError(
            "bad_run_config", f"run-config value {text!r} has a quote or newline"
        )
    return f'"{text}"'


def _last_json(stdout: str) -> dict[str, Any] | None:
    """The JSON object ``flwr --format json`` printed (after any other output)."""
    start = stdout.find("{")
    while start != -1:
        try:
            value = json.loads(stdout[start:])
            return value if isinstance(value, dict) else None
        except json.JSONDecodeError:
            start = stdout.find("{", start + 1)
    return None


def key_sha256(public_key_pem: bytes) -> str:
    return hashlib.sha256(public_key_pem).hexdigest()


@dataclass(frozen=True)
class SyncResult:
    registered: list[str]
    unregistered: list[str]


def registrations_key(db: Database) -> str:
    """A digest of what the SuperNode registrations depend on (cheap; no ``flwr`` call)."""
    with db.read() as session:
        rows = session.execute(
            select(
                Site.id,
                Site.revoked_at,
                Site.flower_node_id,
                NodeCertificate.fingerprint,
                NodeCertificate.revoked_at,
            )
            .outerjoin(NodeCertificate, NodeCertificate.site_id == Site.id)
            .order_by(Site.id, NodeCertificate.id)
        ).all()
    return hashlib.sha256(repr(rows).encode("utf-8")).hexdigest()


def sync_supernodes(db: Database, cli: FlowerCli) -> SyncResult:
    """Make the SuperLink's SuperNode list match the enrolled, unrevoked sites."""
    known = cli.supernodes()
    registered: list[str] = []
    unregistered: list[str] = []
    with db.read() as session:
        rows = session.scalars(select(Site)).all()
        wanted: dict[int, bytes | None] = {}
        for site in rows:
            cert = session.scalar(
                select(NodeCertificate)
                .where(NodeCertificate.site_id == site.id, NodeCertificate.revoked_at.is_(None))
                .order_by(NodeCertificate.issued_at.desc())
            )
            key = None
            if site.revoked_at is None and cert is not None:
                key = (
                    x509.load_pem_x509_certificate(cert.pem.encode("ascii"))
                    .public_key()
                    .public_bytes(
                        serialization.Encoding.PEM,
                        serialization.PublicFormat.SubjectPublicKeyInfo,
                    )
                )
            wanted[site.id] = key
        state = {s.id: (s.name, s.flower_node_id, s.flower_key_sha256) for s in rows}
    for site_id, key in wanted.items():
        name, node_id, key_sha = state[site_id]
        live = node_id is not None and known.get(node_id, "unregistered") != "unregistered"
        if key is None:
            if node_id is not None and live:
                cli.unregister(node_id)
            if node_id is not None:
                _record(db, site_id, None, None, "flower.supernode.unregister", name, node_id)
                unregistered.append(name)
            continue
        if live and key_sha == key_sha256(key):
            continue
        if live and node_id is not None:  # re-enrolled with a new key
            cli.unregister(node_id)
        new_id = cli.register(key, name)
        _record(db, site_id, new_id, key_sha256(key), "flower.supernode.register", name, new_id)
        registered.append(name)
    return SyncResult(registered, unregistered)


def _record(
    db: Database,
    site_id: int,
    node_id: str | None,
    key_sha: str | None,
    action: str,
    name: str,
    flower_id: str,
) -> None:
    with db.write() as session:
        site = session.get(Site, site_id)
        if site is None:  # pragma: no cover - sites are never deleted
            return
        site.flower_node_id = node_id
        site.flower_key_sha256 = key_sha
        audit.append(session, "coordinator", action, name, node_id=flower_id)
    log.info("%s %s (SuperNode %s)", action, name, flower_id)
