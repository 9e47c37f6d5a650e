"""The coordinator API: enrollment, node heartbeats, sites (and, as they land, intake,
registry and releases); the web UI (``coordinator.web``) is mounted at ``/ui``.

Who may call what is decided by one dependency per kind of caller:
``Node`` (an enrolled, unrevoked site: client certificate + signed request
token), ``OperatorToken`` and ``ResearcherToken`` (API tokens with a role).
Service code raises ``CoordinatorError``; ``ERROR_STATUS`` maps its code to the
HTTP status in one place and every error body is a ``protocols`` ``ErrorBody``.
The caller is checked before anything else about a request
(``_authenticate_first``), and every route declares in the OpenAPI document
the error statuses it may answer with.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import Connection
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Mount

from coordinator import audit, pki, sites, tokens
from coordinator.errors import CoordinatorError
from coordinator.identity import NodeIdentity, NonceCache, authenticate_node
from coordinator.lockout import auth_guard
from coordinator.metrics import CoordinatorMetrics, RequestMetrics
from coordinator.registry.db import Database
from coordinator.settings import CoordinatorSettings
from coordinator.tls import peer_certificate
from protocols.api.authguard import AuthGuard
from protocols.api.bodylimit import BodyLimit, Scope
from protocols.api.callers import pending_caller_checks
from protocols.api.coordinator import (
    EnrollRequest,
    EnrollResponse,
    Heartbeat,
    SiteHealth,
    SitePublic,
    SiteStatus,
)
from protocols.api.errors import (
    ErrorBody,
    error_responses,
    http_error_code,
    validation_message,
)
from protocols.nodeauth import NodeAuthError
from protocols.version import PROTOCOL_VERSION, SOFTWARE_VERSION

log = logging.getLogger("radfed.coordinator.api")

#: Error code -> HTTP status; anything else is a 400.
ERROR_STATUS = {
    "unauthorized": 401,
    "client_certificate_required": 401,
    "certificate_expired": 401,
    "enrollment_token_invalid": 401,
    "enrollment_token_used": 401,
    "enrollment_token_expired": 401,
    "forbidden": 403,
    "too_many_attempts": 429,
    "site_revoked": 403,
    "not_found": 404,
    "site_not_found": 404,
    "method_not_allowed": 405,
    "site_exists": 409,
    "upload_not_found": 404,
    "file_not_in_manifest": 404,
    "signer_mismatch": 403,
    "site_mismatch": 403,
    "bad_signature": 422,
    "exam_conflict": 409,
    "upload_closed": 409,
    "offset_mismatch": 409,
    "upload_incomplete": 409,
    "too_many_bytes": 422,
    "sha256_mismatch": 422,
    "chunk_too_large": 413,
    "request_too_large": 413,
    "upload_too_large": 413,
    "too_many_open_uploads": 409,
    "exam_withdrawn": 409,
    "invalid_manifest": 422,
    "node_token_stale": 401,
    "exam_not_found": 404,
    "release_not_found": 404,
    "unknown_dimension": 404,
    "exam_not_owned": 403,
    "release_exists": 409,
    "export_exists": 409,
    "release_empty": 422,
    "invalid_filter": 422,
    "unsafe_release_path": 409,
    "release_object_missing": 500,
    "release_object_corrupt": 500,
    "release_manifest_corrupt": 500,
    "export_failed": 500,
    "invalid_request": 422,
    "invalid_argument": 422,
    "invalid_sha256": 422,
    "bad_csr": 422,
    "bad_site_name": 422,
    "app_not_found": 404,
    "run_not_found": 404,
    "model_not_found": 404,
    "not_enough_sites": 409,
    "run_not_running": 409,
    "run_not_resumable": 409,
    "bad_run_config": 422,
    "superlink_unavailable": 503,
    "superlink_error": 502,
    "instance_not_found": 404,
    "not_an_image": 404,
    "internal": 500,
}


def _error(
    code: str, message: str, retryable: bool = False, retry_after: int | None = None
) -> JSONResponse:
    body = ErrorBody(code=code, message=message, retryable=retryable)
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return JSONResponse(
        status_code=ERROR_STATUS.get(code, 400), content=body.model_dump(), headers=headers
    )


def _guard(request: Request) -> AuthGuard:
    guard: AuthGuard = request.app.state.auth_guard
    return guard


def caller(request: Request, *roles: str, connection: Connection | None = None) -> tuple[str, str]:
    """(name, role) of the person whose API token came with the request, in one of ``roles``.

    ``connection``: look the token up on it (``tokens.check``).
    """
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise CoordinatorError("unauthorized", "an API token is required (Authorization: Bearer)")
    db: Database = request.app.state.db
    with _guard(request).attempt(request, "token") as attempt:
        found = tokens.check(db, token.strip(), connection)
        if found is None:
            attempt.failed()
            raise CoordinatorError("unauthorized", "unknown or revoked API token")
        attempt.succeeded()
    name, role = found
    if role not in roles:
        raise CoordinatorError("forbidden", f"role {role} may not do this")
    request.state.caller_checked = True
    return name, role


def _person(request: Request, *roles: str) -> str:
    return caller(request, *roles)[0]


def require_operator(request: Request) -> str:
    """The operator whose API token came with the request."""
    return _person(request, "operator")


def require_reader(request: Request) -> str:
    """An operator or a researcher (registry reads)."""
    return _person(request, "operator", "researcher")


def require_node(request: Request) -> NodeIdentity:
    """The enrolled site whose node made this request."""
    settings: CoordinatorSettings = request.app.state.settings
    header = request.headers.get("authorization")
    with _guard(request).attempt(request, "node") as attempt:
        try:
            node = authenticate_node(
                request.app.state.db,
                header,
                request.method,
                # the path as routed (``request.url.path`` re-parses it and drops tabs, say)
                request.scope["path"],
                peer_certificate(request.scope),  # type: ignore[arg-type]
                require_tls_cert=not settings.behind_proxy,
                max_age_s=settings.node_token_max_age_s,
                nonces=request.app.state.nonces,
            )
        except CoordinatorError as exc:
            # A token that does not check out (signature, certificate, replay) counts. No
            # token, no client certificate, a revoked site, or a well-signed token out of
            # its time window (a node's clock is off: ``authenticate_node`` chains the
            # ``NodeAuthError``) is no guess.
            cause = exc.__cause__
            skewed = isinstance(cause, NodeAuthError) and cause.code == "expired_node_token"
            if header and exc.code == "unauthorized" and not skewed:
                attempt.failed()
            raise
        attempt.succeeded()
    request.state.caller_checked = True
    return node


Operator = Annotated[str, Depends(require_operator)]
Reader = Annotated[str, Depends(require_reader)]
Node = Annotated[NodeIdentity, Depends(require_node)]


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI error responses of a route with a caller check (401, 403, 429: locked
    out after failed authentications) and ``statuses``."""
    return error_responses(401, 403, 429, *statuses)


async def _authenticate_first(request: Request, checks: tuple[Callable[..., Any], ...]) -> None:
    """Check the caller of a request that failed before its route's dependencies ran."""
    for check in pending_caller_checks(request, checks):
        await run_in_threadpool(check, request)


#: The validation error of a request body that could not be read at all.
_unreadable_body = {"loc": ("body",), "msg": "not JSON (or not UTF-8)", "type": "json_invalid"}


#: The one route whose body is not JSON: an upload's file chunk (``intake.MAX_CHUNK``).
_CHUNK_ROUTE = re.compile(r"/api/v1/uploads/[^/]+/files/[^/]+")


def body_limit(settings: CoordinatorSettings) -> Callable[[Scope], int]:
    """The most bytes a request's body may carry: a file chunk, or ``max_request_body_mib``."""
    from coordinator.intake import MAX_CHUNK

    documents = int(settings.max_request_body_mib * 2**20)

    def limit(scope: Scope) -> int:
        if scope.get("method") == "PUT" and _CHUNK_ROUTE.fullmatch(scope.get("path", "")):
            return MAX_CHUNK
        return documents

    return limit


def create_app(settings: CoordinatorSettings, db: Database) -> FastAPI:
    app = FastAPI(
        title="RadFed coordinator",
        version=SOFTWARE_VERSION,
        openapi_url="/api/v1/openapi.json",
        docs_url=None,
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.db = db
    app.state.nonces = NonceCache()
    metrics = CoordinatorMetrics(
        db, settings, lambda: int(getattr(app.state, "superlink_restarts", lambda: 0)())
    )
    app.state.metrics = metrics
    guard = auth_guard(settings, db, metrics.registry)
    app.state.auth_guard = guard
    store = settings.store(durable_puts=False)
    app.state.store = store
    from coordinator.api.intake_routes import mount_intake
    from coordinator.api.registry_routes import mount_registry, require_viewer
    from coordinator.intake import Intake

    intake = Intake(db, settings, store)
    app.state.intake = intake
    mount_intake(app, intake)
    mount_registry(app, settings, db, store)
    from coordinator.api.training_routes import mount_training

    mount_training(app, settings, db, store)
    from coordinator.web.ui import PREFIX as WEB_PREFIX
    from coordinator.web.ui import mount_web

    mount_web(app, settings, db, store)
    for route in app.routes:  # the UI's sign-in counts against the same limits
        if isinstance(route, Mount) and route.path == WEB_PREFIX:
            route.app.state.auth_guard = guard  # type: ignore[attr-defined]
    app.add_middleware(RequestMetrics, metrics=metrics)
    # Outermost: a body too large or too slow is refused before anything reads it.
    app.add_middleware(
        BodyLimit,
        limit=body_limit(settings),
        idle_timeout_s=settings.request_body_timeout_s,
    )

    paths = pki.Paths(settings.pki_dir)
    caller_checks = (require_operator, require_reader, require_node, require_viewer)

    @app.exception_handler(CoordinatorError)
    async def _coordinator_error(_: Request, exc: CoordinatorError) -> JSONResponse:
        return _error(exc.code, exc.message, exc.retryable, exc.retry_after)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        try:
            await _authenticate_first(request, caller_checks)
        except CoordinatorError as refused:
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
        return _error("internal", "internal error; see the coordinator log", retryable=True)

    # -- open ------------------------------------------------------------------------

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok", "version": SOFTWARE_VERSION, "protocol_version": PROTOCOL_VERSION}

    @app.get(
        "/metrics",
        # errors are JSON: the text/plain media type is declared for the metrics alone
        response_class=Response,
        responses={
            200: {
                "content": {"text/plain": {"schema": {"type": "string"}}},
                "description": "Prometheus text exposition format",
            },
            **errors(),
        },
        summary="Prometheus metrics (an operator token: the coordinator faces the internet)",
    )
    def prometheus(_: Operator) -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get(
        "/api/v1/enroll/ca",
        response_class=Response,
        responses={200: {"content": {"application/x-pem-file": {"schema": {"type": "string"}}}}},
    )
    def ca_certificate() -> Response:
        """The federation CA (public); a node checks it against its token's fingerprint."""
        _, cert = pki.load_ca(paths)
        return Response(pki.pem(cert), media_type="application/x-pem-file")

    @app.post("/api/v1/enroll", response_model=EnrollResponse, responses=errors(422))
    def enroll(body: EnrollRequest, request: Request) -> EnrollResponse:
        with guard.attempt(request, "enroll") as attempt:
            try:
                done = sites.enroll(db, settings, body.token, body.csr_pem)
            except CoordinatorError as exc:
                if exc.code in sites.TOKEN_REFUSALS:
                    attempt.failed()
                raise
            attempt.succeeded()
        wake = getattr(app.state, "flower_sync", None)
        if callable(wake):
            wake()  # register the new key with the SuperLink now, not at the next poll
        return EnrollResponse(
            site=done.site,
            certificate_pem=done.certificate_pem,
            ca_certificate_pem=done.ca_certificate_pem,
            superlink=settings.superlink_address if settings.flower_enabled else None,
        )

    # -- nodes -----------------------------------------------------------------------

    @app.get("/api/v1/node/whoami", responses=errors())
    def whoami(node: Node) -> dict[str, str]:
        return {"site": node.site, "certificate": node.fingerprint}

    @app.post("/api/v1/node/heartbeat", status_code=204, responses=errors(422))
    def heartbeat(body: Heartbeat, node: Node) -> Response:
        sites.heartbeat(db, node.site_id, body.software_version, body.counts, body.last_error)
        return Response(status_code=204)

    # -- operators -------------------------------------------------------------------

    @app.get("/api/v1/sites", response_model=list[SitePublic], responses=errors())
    def list_sites(_: Operator) -> list[SitePublic]:
        return [
            SitePublic(
                name=s.name,
                status=SiteStatus(s.status),
                enrolled_at=s.enrolled_at,
                last_seen=s.last_seen,
                health=SiteHealth(s.health),
                version=s.version,
                counts=s.counts,
                last_error=s.last_error,
            )
            for s in sites.states(db, settings)
        ]

    @app.post("/api/v1/sites/{name}/revoke", status_code=204, responses=errors(404, 422))
    def revoke_site(name: str, who: Operator) -> Response:
        sites.revoke(db, name, who)
        return Response(status_code=204)

    @app.get("/api/v1/audit/verify", responses=errors())
    def audit_verify(_: Operator) -> dict[str, object]:
        with db.read() as session:
            result = audit.verify(session)
        return {"entries": result.entries, "ok": result.ok, "broken_at": result.broken_at}

    return app
