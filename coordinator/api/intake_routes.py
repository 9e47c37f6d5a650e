"""Contribution intake over HTTP: open an upload, send files in chunks, complete it.

Every route is a node's (certificate + signed request token). A chunk is the
raw request body, sent with ``?offset=`` the coordinator holds; the response
says how many bytes it now has, so a node that lost a connection asks
``GET /uploads/{id}`` and goes on from there.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from coordinator.api.app import Node, errors
from coordinator.errors import CoordinatorError
from coordinator.intake import MAX_CHUNK, Intake
from protocols.api.coordinator import (
    Receipt,
    Rejection,
    UploadCreate,
    UploadFileState,
    UploadPublic,
)


def mount_intake(app: FastAPI, intake: Intake) -> None:
    """Add the intake routes to the coordinator's app."""

    @app.post("/api/v1/uploads", response_model=UploadPublic, responses=errors(409, 413, 422))
    def open_upload(body: UploadCreate, node: Node) -> UploadPublic:
        return intake.open(node, body)

    @app.get("/api/v1/uploads/{upload_id}", response_model=UploadPublic, responses=errors(404, 422))
    def upload_status(upload_id: str, node: Node) -> UploadPublic:
        return intake.status(node, upload_id)

    @app.put(
        "/api/v1/uploads/{upload_id}/files/{sha256}",
        response_model=UploadFileState,
        responses=errors(404, 409, 413, 422),
    )
    async def put_file(
        upload_id: str,
        sha256: str,
        request: Request,
        node: Node,
        offset: Annotated[int, Query(ge=0)] = 0,
    ) -> UploadFileState:
        declared = request.headers.get("content-length")
        if declared is not None and int(declared) > MAX_CHUNK:
            raise CoordinatorError(
                "chunk_too_large", f"a chunk may carry {MAX_CHUNK} bytes at most"
            )
        data = bytearray()
        async for piece in request.stream():
            data.extend(piece)
            if len(data) > MAX_CHUNK:
                raise CoordinatorError(
                    "chunk_too_large", f"a chunk may carry {MAX_CHUNK} bytes at most"
                )
        return await run_in_threadpool(
            intake.put_chunk, node, upload_id, sha256, offset, bytes(data)
        )

    @app.post(
        "/api/v1/uploads/{upload_id}/complete",
        response_model=Receipt,
        responses={
            **errors(404, 409),
            422: {"model": Rejection, "description": "Refused: the reasons and PHI findings"},
        },
    )
    def complete(upload_id: str, node: Node) -> Receipt | JSONResponse:
        outcome = intake.complete(node, upload_id)
        if isinstance(outcome, Rejection):
            return JSONResponse(status_code=422, content=outcome.model_dump(mode="json"))
        return outcome
