"""The node API: study search and detail, counts, quarantine, health and metrics.

Errors: service code raises ``NodeError``; ``ERROR_STATUS`` maps its code to the
HTTP status in one place and every error body is a ``protocols`` ``ErrorBody``.
Every route but ``/healthz`` and ``/metrics`` needs an operator's API token,
checked before anything else about the request (``_authenticate_first``), and
declares in the OpenAPI document every error status it may answer with. Wrong
tokens count against the client's address (``node.lockout``): too many and it
is locked out (429) for a while, right token or not.
No documentation UI is served (it would load assets from a CDN); the OpenAPI
document is at ``/api/v1/openapi.json``.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from node.errors import NodeError
from node.index.store import NodeIndex, StudyQuery
from node.lockout import auth_guard
from node.metrics import NodeMetrics
from node.vetting import review
from node.vetting.policy import VettingPolicy
from protocols.api.authguard import AuthGuard
from protocols.api.callers import pending_caller_checks
from protocols.api.errors import (
    ErrorBody,
    error_responses,
    http_error_code,
    validation_message,
)
from protocols.api.node import (
    Counts,
    FindingPublic,
    Health,
    OutboxEntryPublic,
    QuarantinePage,
    ReviewRequest,
    ReviewResult,
    StudyDetail,
    StudyPage,
    StudyStatus,
)
from protocols.bruteforce import LockoutPolicy
from protocols.phi.findings import Severity
from protocols.version import PROTOCOL_VERSION, SOFTWARE_VERSION

log = logging.getLogger("radfed.node.api")

#: Error code -> HTTP status; anything else is a 400.
ERROR_STATUS = {
    "unauthorized": 401,
    "forbidden": 403,
    "too_many_attempts": 429,
    "policy_not_saved": 503,
    "study_not_found": 404,
    "not_found": 404,
    "invalid_transition": 409,
    "already_reviewed": 409,
    "reason_required": 422,
    "invalid_request": 422,
    "bad_sort": 422,
    "bad_page": 422,
    "bad_filter": 422,
    "bad_run": 422,
    "internal": 500,
}
bearer = HTTPBearer(auto_error=False)


#: The validation error of a request body that could not be read at all.
_unreadable_body = {"loc": ("body",), "msg": "not JSON (or not UTF-8)", "type": "json_invalid"}


def _error(
    code: str, message: str, retryable: bool = False, retry_after: int | None = None
) -> JSONResponse:
    body = ErrorBody(code=code, message=message, retryable=retryable)
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return JSONResponse(
        status_code=ERROR_STATUS.get(code, 400), content=body.model_dump(), headers=headers
    )


def _token(request: Request, credentials: HTTPAuthorizationCredentials | None) -> tuple[str, str]:
    if credentials is None:
        raise NodeError("unauthorized", "an API token is required (Authorization: Bearer)")
    index: NodeIndex = request.app.state.index
    guard: AuthGuard = request.app.state.auth_guard
    with guard.attempt(request, "token") as attempt:
        found = index.check_token(credentials.credentials)
        if found is None:
            attempt.failed()
            raise NodeError("unauthorized", "unknown or revoked API token")
        attempt.succeeded()
    return found


def require_operator(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> str:
    """The name of the operator whose API token came with the request."""
    name, role = _token(request, credentials)
    if role != "operator":
        raise NodeError("forbidden", f"role {role} may not do this")
    request.state.caller_checked = True
    return name


def require_reviewer(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> str:
    """The name of a reviewer or operator whose API token came with the request."""
    name, role = _token(request, credentials)
    if role not in ("operator", "reviewer"):
        raise NodeError("forbidden", f"role {role} may not do this")
    request.state.caller_checked = True
    return name


Operator = Annotated[str, Depends(require_operator)]
ReviewerToken = Annotated[str, Depends(require_reviewer)]


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI error responses of a route behind an API token (401, 403, 429: locked
    out after failed authentications), and ``statuses``."""
    return error_responses(401, 403, 429, *statuses)


async def _authenticate_first(request: Request) -> None:
    """Check the caller of a request that failed before its route's dependencies ran."""
    for check in pending_caller_checks(request, (require_operator, require_reviewer)):
        await run_in_threadpool(check, request, await bearer(request))


def create_app(
    index: NodeIndex,
    metrics: NodeMetrics,
    listener_up: Callable[[], bool],
    pending: Callable[[], int],
    policy: Callable[[], VettingPolicy] = VettingPolicy,
    guard: AuthGuard | None = None,
) -> FastAPI:
    """The node's API (``guard``: its failed-authentication limits; defaults if not given)."""
    app = FastAPI(
        title="RadFed node",
        version=SOFTWARE_VERSION,
        openapi_url="/api/v1/openapi.json",
        docs_url=None,
        redoc_url=None,
    )
    app.state.index = index
    app.state.auth_guard = guard or auth_guard(index, LockoutPolicy())

    @app.exception_handler(NodeError)
    async def _node_error(_: Request, exc: NodeError) -> JSONResponse:
        return _error(exc.code, exc.message, exc.retryable, exc.retry_after)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        try:
            await _authenticate_first(request)
        except NodeError as refused:
            return _error(refused.code, refused.message, refused.retryable, refused.retry_after)
        return _error("invalid_request", validation_message(list(exc.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400:  # a body FastAPI could not read (not UTF-8, say)
            return await _invalid(request, RequestValidationError([_unreadable_body]))
        response = _error(http_error_code(exc.status_code), str(exc.detail))
        response.status_code = exc.status_code
        return response

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        metrics.errors.labels(kind="api").inc()
        return _error("internal", "internal error; see the node log", retryable=True)

    @app.get("/healthz", response_model=Health)
    def healthz() -> Health:
        return Health(
            status="ok",
            version=SOFTWARE_VERSION,
            protocol_version=PROTOCOL_VERSION,
            dicom_listener=listener_up(),
            pending_instances=pending(),
        )

    @app.get("/metrics", response_class=PlainTextResponse)
    def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/api/v1/studies", response_model=StudyPage, responses=errors(422))
    def search_studies(
        _: Operator,
        status: Annotated[list[StudyStatus] | None, Query()] = None,
        pseudonym: str | None = None,
        modality: str | None = None,
        body_part: str | None = None,
        manufacturer: str | None = None,
        model: str | None = None,
        study_date_from: dt.date | None = None,
        study_date_to: dt.date | None = None,
        rows: int | None = None,
        columns: int | None = None,
        pixel_spacing_min: float | None = None,
        pixel_spacing_max: float | None = None,
        slice_thickness_min: float | None = None,
        slice_thickness_max: float | None = None,
        number_of_frames_min: int | None = None,
        transfer_syntax: str | None = None,
        photometric: str | None = None,
        burned_in_risk: bool | None = None,
        sort: Literal["study_date", "received_at", "status_at"] = "study_date",
        order: Literal["asc", "desc"] = "desc",
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
        offset: Annotated[int, Query(ge=0)] = 0,
    ) -> StudyPage:
        return index.search(
            StudyQuery(
                status=tuple(status or ()),
                pseudonym=pseudonym,
                modality=modality,
                body_part=body_part,
                manufacturer=manufacturer,
                model=model,
                study_date_from=study_date_from,
                study_date_to=study_date_to,
                rows=rows,
                columns=columns,
                pixel_spacing_min=pixel_spacing_min,
                pixel_spacing_max=pixel_spacing_max,
                slice_thickness_min=slice_thickness_min,
                slice_thickness_max=slice_thickness_max,
                number_of_frames_min=number_of_frames_min,
                transfer_syntax=transfer_syntax,
                photometric=photometric,
                burned_in_risk=burned_in_risk,
                sort=sort,
                order=order,
                limit=limit,
                offset=offset,
            )
        )

    @app.get("/api/v1/studies/{study_uid}", response_model=StudyDetail, responses=errors(404, 422))
    def study_detail(study_uid: str, _: Operator) -> StudyDetail:
        return index.study(study_uid)

    @app.get(
        "/api/v1/studies/{study_uid}/findings",
        response_model=list[FindingPublic],
        responses=errors(404, 422),
    )
    def study_findings(study_uid: str, _: ReviewerToken) -> list[FindingPublic]:
        return [
            FindingPublic(
                source=str(f["source"]),
                severity=Severity(int(str(f["severity"]))).name.lower(),
                kind=str(f["kind"]),
                location=str(f["location"]),
                message=str(f["message"]),
                excerpt=str(f["excerpt"]),
            )
            for f in review.open_findings(index, study_uid)
        ]

    @app.post(
        "/api/v1/studies/{study_uid}/approve",
        response_model=ReviewResult,
        responses=errors(404, 409, 422),
    )
    def approve(study_uid: str, body: ReviewRequest, who: ReviewerToken) -> ReviewResult:
        outcome = review.approve(index, policy(), study_uid, who, body.reason)
        return ReviewResult(status=outcome.status, message=outcome.message)

    @app.post(
        "/api/v1/studies/{study_uid}/reject",
        response_model=ReviewResult,
        responses=errors(404, 409, 422),
    )
    def reject(study_uid: str, body: ReviewRequest, who: ReviewerToken) -> ReviewResult:
        outcome = review.reject(index, study_uid, who, body.reason)
        return ReviewResult(status=outcome.status, message=outcome.message)

    @app.get("/api/v1/outbox", response_model=list[OutboxEntryPublic], responses=errors(422))
    def outbox(
        _: Operator,
        state: str | None = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 100,
    ) -> list[OutboxEntryPublic]:
        return index.outbox(state, limit)

    @app.get("/api/v1/counts", response_model=Counts, responses=errors())
    def counts(_: Operator) -> Counts:
        return index.counts()

    @app.get("/api/v1/quarantine", response_model=QuarantinePage, responses=errors(422))
    def quarantine(
        _: Operator,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
        offset: Annotated[int, Query(ge=0)] = 0,
    ) -> QuarantinePage:
        return index.quarantine(limit, offset)

    return app
