"""``radfed node serve``: the HTTP API and the DICOM listener in one process.

The listener runs on background threads; uvicorn serves the API in the
foreground and stops on SIGINT/SIGTERM, after which the listener is shut down
and the index closed. Both bound addresses are logged (port 0 picks a free one).
"""

from __future__ import annotations

import json
import logging
import signal
import sys
from functools import partial

import uvicorn

from node.api.app import create_app
from node.intake.listener import DicomListener
from node.metrics import NodeMetrics
from node.settings import NodeSettings
from node.site import engine_config, open_index
from node.vetting.policy import VettingPolicy
from node.vetting.service import Vetter, render_png, reviewer_mask
from node.web.routes import mount_web


class JsonFormatter(logging.Formatter):
    """One JSON object per log line: time, level, logger, message."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "at": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    for noisy in ("pynetdicom", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


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
    log.info(json.dumps({"event": "listening", "dicom": f"{host}:{port}"}))
    app = create_app(index, metrics, lambda: listener.running, listener.pending, policy)
    mount_web(app, index, settings, policy, reviewer_mask(index, settings), render_png)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=settings.api_host,
            port=settings.api_port,
            log_config=None,
            access_log=False,
            lifespan="on",
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
        index.db.close()
        log.info("node stopped%s", f" by signal {stopped_by[0]}" if stopped_by else "")
