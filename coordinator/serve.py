"""``radfed coordinator serve``: the API over TLS and the Flower SuperLink, until SIGINT/SIGTERM.

TLS is terminated here with the federation's server certificate, TLS 1.2 or
newer with forward-secret AEAD suites only (``protocols.tlsconfig``); a client
certificate is verified against the federation CA when one is presented
(nodes present theirs; operators and researchers use API tokens). Behind a
TLS-terminating proxy (``behind_proxy``) nodes are identified by their signed
request tokens alone.

With ``flower_enabled`` it also supervises the federation's Flower SuperLink
(``coordinator.flower``) and runs one background loop that keeps the SuperLink's
SuperNode registrations in step with the sites and the registry's view of the
training runs in step with their run directories (``coordinator.training``). On
stop the SuperLink and everything it started are stopped before the process exits.
"""

from __future__ import annotations

import json
import logging
import signal
import ssl
import threading
import time

import uvicorn

from coordinator import pki
from coordinator.api.app import create_app
from coordinator.errors import CoordinatorError
from coordinator.flower import FlowerCli, registrations_key, superlink, sync_supernodes
from coordinator.intake import Intake
from coordinator.registry.db import Database
from coordinator.settings import CoordinatorSettings
from coordinator.tls import PeerCertProtocol
from coordinator.training import RunWatcher
from protocols import heap
from protocols.api.slowheaders import with_header_deadline
from protocols.logs import configure_logging
from protocols.process import Supervised
from protocols.tlsconfig import server_context


def _sweep(intake: Intake, stop: threading.Event) -> None:
    """Expire abandoned uploads now and every hour."""
    log = logging.getLogger("radfed.coordinator.intake")
    while not stop.is_set():
        try:
            expired = intake.sweep()
            if expired:
                log.info("expired %d abandoned upload(s)", expired)
        except Exception:
            log.exception("upload sweep failed")
        stop.wait(3600)


def _training_loop(
    settings: CoordinatorSettings,
    db: Database,
    link: Supervised,
    watcher: RunWatcher,
    wake: threading.Event,
    stop: threading.Event,
) -> None:
    """Keep SuperNode registrations and run records current until ``stop``."""
    log = logging.getLogger("radfed.coordinator.flower")
    cli = FlowerCli(settings)
    synced_at, synced_key = 0.0, ""
    while not stop.is_set():
        # ``flwr`` costs seconds of CPU: call it when a site changed, after a SuperLink
        # restart (wake), and every few minutes in case the SuperLink lost its state.
        key = registrations_key(db)
        due = wake.is_set() or key != synced_key or time.monotonic() - synced_at > 300
        if link.running and due:
            wake.clear()
            try:
                sync_supernodes(db, cli)
                synced_at, synced_key = time.monotonic(), registrations_key(db)
            except CoordinatorError as exc:
                log.warning("SuperNode registrations not synced yet: %s", exc.message)
            except Exception:
                log.exception("SuperNode sync failed")
        try:
            watcher.poll()
        except Exception:
            log.exception("run watcher failed")
        if wake.wait(settings.training_poll_s):
            continue


def serve(settings: CoordinatorSettings) -> None:
    """Run until interrupted."""
    stop = threading.Event()
    configure_logging("alembic", "boto3", "botocore")
    log = logging.getLogger("radfed.coordinator")
    # Before any thread is started: the request threads then share these arenas.
    heap.limit_arenas(settings.malloc_arena_max)
    paths = pki.Paths(settings.pki_dir)
    pki.load_ca(paths)  # not initialised: stop here with the reason
    db = Database.open(settings.db_url)
    app = create_app(settings, db)
    app.state.intake.warm()
    sweeper = threading.Thread(
        target=_sweep, args=(app.state.intake, stop), name="upload-sweeper", daemon=True
    )
    sweeper.start()
    trimmer = heap.Trimmer(settings.malloc_trim_s).start() if settings.malloc_trim_s else None
    app.state.metrics.heap.trimmer = trimmer
    link: Supervised | None = None
    trainer: threading.Thread | None = None
    if settings.flower_enabled:
        link = superlink(settings)
        wake = threading.Event()

        def restarted(_count: int) -> None:
            wake.set()  # a fresh SuperLink may have lost registrations: sync now

        link.on_restart = restarted
        link.start()
        watcher = RunWatcher(
            db, settings, app.state.store, FlowerCli(settings), lambda: link.restarts if link else 0
        )
        app.state.superlink_restarts = lambda: link.restarts if link else 0
        app.state.flower_sync = wake.set
        app.state.superlink = link
        wake.set()
        trainer = threading.Thread(
            target=_training_loop,
            args=(settings, db, link, watcher, wake, stop),
            name="training",
            daemon=True,
        )
        trainer.start()
        log.info(
            json.dumps(
                {
                    "event": "superlink",
                    "address": f"{settings.superlink_host}:{settings.superlink_port}",
                    "log": str(link.log_path),
                }
            )
        )
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=settings.api_host,
            port=settings.api_port,
            # TLS 1.2+ with ECDHE + AEAD suites only (uvicorn's defaults allow CBC suites).
            ssl_context_factory=lambda _config, _default: server_context(
                paths.server_cert, paths.server_key, paths.ca_cert, ssl.CERT_OPTIONAL
            ),
            http=with_header_deadline(PeerCertProtocol, settings.request_header_timeout_s),
            limit_concurrency=settings.max_connections,
            # The client address is the socket peer; X-Forwarded-For counts only from the
            # ``trusted_proxies`` (uvicorn would otherwise believe any loopback peer's).
            proxy_headers=False,
            log_config=None,
            access_log=False,
            lifespan="on",
            # Long-lived connections (a node's keep-alive, a browser) must not hold a
            # stop past what service managers wait (Docker: 10 s by default).
            timeout_graceful_shutdown=5,
        )
    )
    stopped_by: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda number, _frame: stopped_by.append(number))
    log.info(
        json.dumps({"event": "serving", "api": f"https://{settings.api_host}:{settings.api_port}"})
    )
    try:
        server.run()
    finally:
        stop.set()
        if link is not None:
            link.stop()
        if trainer is not None:
            trainer.join(30)
        sweeper.join(10)
        if trimmer is not None:
            trimmer.stop()
        app.state.intake.close()
        db.close()
        log.info("coordinator stopped%s", f" by signal {stopped_by[0]}" if stopped_by else "")
