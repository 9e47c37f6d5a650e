"""``radfed coordinator serve``: the API over TLS, until SIGINT/SIGTERM.

TLS is terminated here with the federation's server certificate; a client
certificate is verified against the federation CA when one is presented
(nodes present theirs; operators and researchers use API tokens). Behind a
TLS-terminating proxy (``behind_proxy``) nodes are identified by their signed
request tokens alone.
"""

from __future__ import annotations

import json
import logging
import signal
import ssl
import threading

import uvicorn

from coordinator import pki
from coordinator.api.app import create_app
from coordinator.intake import Intake
from coordinator.registry.db import Database
from coordinator.settings import CoordinatorSettings
from coordinator.tls import PeerCertProtocol
from protocols.logs import configure_logging


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


def serve(settings: CoordinatorSettings) -> None:
    """Run until interrupted."""
    stop = threading.Event()
    configure_logging("alembic", "boto3", "botocore")
    log = logging.getLogger("radfed.coordinator")
    paths = pki.Paths(settings.pki_dir)
    pki.load_ca(paths)  # not initialised: stop here with the reason
    db = Database.open(settings.db_url)
    app = create_app(settings, db)
    app.state.intake.warm()
    sweeper = threading.Thread(
        target=_sweep, args=(app.state.intake, stop), name="upload-sweeper", daemon=True
    )
    sweeper.start()
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=settings.api_host,
            port=settings.api_port,
            ssl_keyfile=str(paths.server_key),
            ssl_certfile=str(paths.server_cert),
            ssl_ca_certs=str(paths.ca_cert),
            ssl_cert_reqs=ssl.CERT_OPTIONAL,
            http=PeerCertProtocol,
            log_config=None,
            access_log=False,
            lifespan="on",
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
        sweeper.join(10)
        app.state.intake.close()
        db.close()
        log.info("coordinator stopped%s", f" by signal {stopped_by[0]}" if stopped_by else "")
