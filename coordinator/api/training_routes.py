"""Training runs over HTTP (``/api/v1/runs``), the apps on offer, and a node's cohort.

Researchers and operators (``Reader``) submit, watch, stop and resume runs and
download models with their provenance. A node asks which of its exams are in a
release (``Node``), since it trains only on what a run's cohort names.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import FastAPI, Query
from fastapi.responses import PlainTextResponse, Response, StreamingResponse

from coordinator import training
from coordinator.api.app import Node, Reader, errors
from coordinator.flower import FlowerCli
from coordinator.objects import ObjectStore
from coordinator.registry.db import Database
from coordinator.settings import CoordinatorSettings
from protocols.api.training import AppPublic, Provenance, RunCreate, RunPublic


def mount_training(
    app: FastAPI, settings: CoordinatorSettings, db: Database, store: ObjectStore
) -> None:
    """Add the training routes to the coordinator's app."""
    cli = FlowerCli(settings)

    def restarts() -> int:
        counter = getattr(app.state, "superlink_restarts", None)
        return int(counter()) if callable(counter) else 0

    @app.get("/api/v1/apps", response_model=list[AppPublic], responses=errors())
    def list_apps(_: Reader) -> list[AppPublic]:
        """The Flower apps researchers may run, with the hash node policies allow."""
        return training.list_apps(settings)

    @app.post(
        "/api/v1/runs",
        response_model=RunPublic,
        status_code=201,
        responses=errors(404, 409, 422, 502, 503),
    )
    def submit_run(body: RunCreate, who: Reader) -> RunPublic:
        """Start a federated training run on the enrolled sites."""
        return training.submit(db, settings, cli, body, who, restarts())

    @app.get("/api/v1/runs", response_model=list[RunPublic], responses=errors(422))
    def list_runs(_: Reader, limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> list[RunPublic]:
        return training.list_runs(db, limit)

    @app.get("/api/v1/runs/{run_id}", response_model=RunPublic, responses=errors(404, 422))
    def show_run(run_id: str, _: Reader) -> RunPublic:
        """Status, rounds with each site's part in them, metrics, the model once there."""
        return training.get(db, run_id)

    @app.post(
        "/api/v1/runs/{run_id}/stop",
        response_model=RunPublic,
        responses=errors(404, 409, 422, 502, 503),
    )
    def stop_run(run_id: str, who: Reader) -> RunPublic:
        return training.stop(db, cli, run_id, who)

    @app.post(
        "/api/v1/runs/{run_id}/resume",
        response_model=RunPublic,
        responses=errors(404, 409, 422, 502, 503),
    )
    def resume_run(run_id: str, who: Reader) -> RunPublic:
        """Continue a failed or stopped run from its last checkpointed round."""
        return training.resume(db, settings, cli, run_id, who, restarts())

    @app.get(
        "/api/v1/runs/{run_id}/logs",
        # errors are JSON: the text/plain media type is declared for the log alone
        response_class=Response,
        responses={
            200: {
                "content": {"text/plain": {"schema": {"type": "string"}}},
                "description": "The log, every attempt",
            },
            **errors(404, 422, 502, 503),
        },
    )
    def run_logs(run_id: str, _: Reader) -> PlainTextResponse:
        """What the run's ServerApp logged (every attempt), as text."""
        view = training.get(db, run_id)
        parts = [
            f"# {view.id}: Flower run {flower_id}\n{cli.logs(flower_id)}"
            for flower_id in view.attempts
        ]
        return PlainTextResponse("\n".join(parts) or f"# {view.id}: not started\n")

    @app.get(
        "/api/v1/runs/{run_id}/model",
        response_class=StreamingResponse,
        responses={
            200: {
                "content": {"application/octet-stream": {"schema": {"type": "string"}}},
                "description": "The model (safetensors)",
            },
            **errors(404, 422),
        },
    )
    def run_model(run_id: str, _: Reader) -> StreamingResponse:
        """The final model (safetensors); its SHA-256 in ``X-Model-Sha256``."""
        return model_download(db, store, run_id)

    @app.get(
        "/api/v1/runs/{run_id}/provenance", response_model=Provenance, responses=errors(404, 422)
    )
    def run_provenance(run_id: str, _: Reader) -> Provenance:
        return training.model(db, run_id)[2]

    @app.get(
        "/api/v1/node/releases/{name}/studies",
        response_model=list[str],
        responses=errors(404, 422),
    )
    def release_studies(name: str, node: Node) -> list[str]:
        """The study UIDs of this node's site in a release."""
        return training.release_studies(db, name, node.site_id)


def model_download(db: Database, store: ObjectStore, run_id: str) -> StreamingResponse:
    """A run's final model streamed from the object store, its SHA-256 in ``X-Model-Sha256``
    (the API and the web UI serve it the same way)."""
    sha, size, _provenance = training.model(db, run_id)

    def chunks() -> Iterator[bytes]:
        with store.open(sha) as handle:
            while chunk := handle.read(1 << 20):
                yield chunk

    return StreamingResponse(
        chunks(),
        media_type="application/octet-stream",
        headers={
            "X-Model-Sha256": sha,
            "Content-Length": str(size),
            "Content-Disposition": f'attachment; filename="{run_id}.safetensors"',
        },
    )
