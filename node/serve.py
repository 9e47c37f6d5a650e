"""``radfed node serve``: the HTTP API and the DICOM listener in one process.

Once enrolled it also sends (the outbox), reports (heartbeats) and supervises the
node's Flower SuperNode (``node.training.supernode``), stopped with the node.

The listener runs on background threads; uvicorn serves the API in the
foreground and stops on SIGINT/SIGTERM, after which the listener is shut down
and the index closed. Both bound addresses are logged (port 0 picks a free one).
"""

from __future__ import annotations

import json
import logging
import signal
from functools import partial

import uvicorn

from node import federation
from node.api.app import create_app
from node.intake.listener import DicomListener
from node.lockout import auth_guard
from node.metrics import NodeMetrics
from node.settings import NodeSettings
from node.site import engine_config, open_index
from node.vetting.policy import VettingPolicy
from node.vetting.service import Vetter, render_png, reviewer_mask
from node.web.routes import mount_web
from protocols.api.bodylimit import BodyLimit
from protocols.api.slowheaders import HeaderDeadlineProtocol
from protocols.logs import configure_logging as configure_logging_as


def configure_logging() -> None:
    configure_logging_as("pynetdicom", "alembic")


#: The most a request body to the node's API or web UI may carry (its largest are a
#: study's mask boxes and the policy form: a few KiB) ...
MAX_BODY = 4 * 2**20
#: ... and how long it may stop arriving before the request is cut off.
BODY_TIMEOUT_S = 60.0
#: Connections and requests the node API serves at once (503 beyond): it is a
#: loopback or LAN service for a handful of people and the outbox.
MAX_CONNECTIONS = 256


def serve(settings: NodeSettings) -> None:
    """Run until interrupted."""
    configure_logging()
    log = logging.getLogger("radfed.node")
    index = open_index(settings)
    metrics = NodeMetrics(index, settings.spool_dir)
    policy = partial(VettingPolicy.load, settings.policy_path)
    policy()  # a broken policy file stops the node here, with its reason
    vetter = Vetter(index, settings, policy)
    listener = DicomListener(settings, index, engine_config(settings), metrics, vetter.wake)
    host, port = listener.start()
    vetter.start()
    beats = sender = flower = None
    if federation.enrolled(settings):
        from node.share.outbox import Sender

        sender = Sender(index, settings, lambda: federation.CoordinatorClient(settings), policy)
        sender.start()
        beats = federation.HeartbeatSender(
            settings,
            lambda: index.counts().by_status,
            lambda: vetter.last_error or sender.last_error if sender else vetter.last_error,
            settings.heartbeat_seconds,
        )
        beats.start()
        from node.training.supernode import supernode

        flower = supernode(settings)
        if flower is not None:
            flower.start()
            log.info(json.dumps({"event": "supernode", "log": str(flower.log_path)}))
    log.info(json.dumps({"event": "listening", "dicom": f"{host}:{port}"}))
    guard = auth_guard(index, settings.lockout_policy, settings.trusted_proxies, metrics.registry)
    app = create_app(index, metrics, lambda: listener.running, listener.pending, policy, guard)
    mount_web(app, index, settings, policy, reviewer_mask(index, settings), render_png)
    from node.api.training_routes import mount_training

    mount_training(app, index, settings)
    # Outermost: a body too large or too slow is refused before anything reads it.
    app.add_middleware(BodyLimit, limit=lambda _: MAX_BODY, idle_timeout_s=BODY_TIMEOUT_S)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=settings.api_host,
            port=settings.api_port,
            log_config=None,
            access_log=False,
            # The client address is the socket peer; X-Forwarded-For counts only from the
            # ``trusted_proxies`` (uvicorn would otherwise believe any loopback peer's).
            proxy_headers=False,
            # A client gets HEADER_TIMEOUT_S for a request's headers (no slow-loris), and
            # no more than MAX_CONNECTIONS are served at once (503 beyond).
            http=HeaderDeadlineProtocol,
            limit_concurrency=MAX_CONNECTIONS,
            lifespan="on",
            # Long-lived connections (a node's keep-alive, a browser) must not hold a
            # stop past what service managers wait (Docker: 10 s by default).
            timeout_graceful_shutdown=5,
        )
    )
    # uvicorn re-raises the signal that stopped it once it has shut down; these
    # handlers receive it, so the listener and the index are closed before exiting 0.
    stopped_by: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda number, _frame: stopped_by.append(number))
    try:
        server.run()
    finally:
        listener.stop()
        vetter.stop()
        if flower is not None:
            flower.stop()
        if beats is not None:
            beats.stop()
        if sender is not None:
            sender.stop()
        index.db.close()
        log.info("node stopped%s", f" by signal {stopped_by[0]}" if stopped_by else "")
