"""The coordinator's web UI as an application mounted at ``/ui`` on the coordinator's app.

Its own small FastAPI application, so that it answers in HTML (errors too) while
the API under ``/api/v1`` answers in JSON, and stays out of the API's OpenAPI
document. Pages are rendered on the server (Jinja2); every asset is served from
``/ui/static`` — hospitals and coordinators are often air-gapped, so nothing
comes from a CDN — under a Content-Security-Policy that allows the UI's own
scripts, styles and images only.

Who may see what follows the API: operators everything; researchers the
registry, releases and training runs, but not the sites or the audit log, and
they do not cut or export releases. Every POST carries a CSRF token.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from coordinator.errors import CoordinatorError
from coordinator.objects import ObjectStore
from coordinator.registry.db import Database
from coordinator.settings import CoordinatorSettings
from coordinator.web.session import COOKIE, Sessions
from protocols.api.errors import validation_message
from protocols.websession import WebUser

log = logging.getLogger("radfed.coordinator.web")
HERE = Path(__file__).parent
#: Where the UI is mounted on the coordinator's app.
PREFIX = "/ui"
SECURITY_HEADERS = {
    "content-security-policy": (
        "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
        "object-src 'none'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
    ),
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "strict-transport-security": "max-age=31536000",
    "cache-control": "no-store",
}


class LoginRequiredError(Exception):
    """A page needs a signed-in operator or researcher; answered with the login page."""


class SecurityHeaders:
    """Adds ``SECURITY_HEADERS`` to every response of the UI that does not set its own."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                for name, value in SECURITY_HEADERS.items():
                    if name.encode() not in present:
                        headers.append((name.encode(), value.encode()))
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, with_headers)


def _when(value: dt.datetime | dt.date | None) -> str:
    if value is None:
        return ""
    if isinstance(value, dt.datetime):
        return value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M")
    return value.isoformat()


def _size(value: int | None) -> str:
    if value is None:
        return ""
    if value < 1024:
        return f"{value} B"
    amount, unit = float(value) / 1024, "KiB"
    for bigger in ("MiB", "GiB", "TiB"):
        if amount < 1024:
            break
        amount, unit = amount / 1024, bigger
    return f"{amount:.1f} {unit}"


@dataclass
class Ui:
    """What every page of the UI works with."""

    settings: CoordinatorSettings
    db: Database
    store: ObjectStore
    sessions: Sessions
    templates: Environment

    def page(
        self,
        template: str,
        request: Request,
        user: WebUser | None,
        status_code: int = 200,
        **context: Any,
    ) -> HTMLResponse:
        body = self.templates.get_template(template).render(
            user=user,
            operator=user is not None and user.role == "operator",
            csrf=self.sessions.csrf(user) if user else "",
            flash=request.query_params.get("flash", ""),
            **context,
        )
        # Set here too: an error page of the last resort bypasses the middleware.
        return HTMLResponse(body, status_code=status_code, headers=SECURITY_HEADERS)

    def check_csrf(self, user: WebUser, token: str) -> None:
        """Refuse a form that did not come from this user's session."""
        if not token or not self.sessions.check_csrf(user, token):
            raise CoordinatorError(
                "forbidden", "the form expired or did not come from this page; reload and retry"
            )


def _ui(request: Request) -> Ui:
    ui: Ui = request.app.state.ui
    return ui


def current_user(request: Request) -> WebUser:
    """The signed-in operator or researcher (their API token still active)."""
    user = _ui(request).sessions.user(request.cookies.get(COOKIE))
    if user is None:
        raise LoginRequiredError()
    return user


Reader = Annotated[WebUser, Depends(current_user)]


def current_operator(user: Reader) -> WebUser:
    """The signed-in operator; a researcher is refused as the API refuses them."""
    if user.role != "operator":
        raise CoordinatorError("forbidden", f"role {user.role} may not do this")
    return user


Operator = Annotated[WebUser, Depends(current_operator)]
UiContext = Annotated[Ui, Depends(_ui)]


def create_web_app(settings: CoordinatorSettings, db: Database, store: ObjectStore) -> FastAPI:
    """The UI's application (mount it at ``PREFIX``)."""
    from coordinator.api.app import ERROR_STATUS
    from coordinator.web import audit_pages, registry_pages, run_pages, session_pages, site_pages

    web = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    templates = Environment(
        loader=FileSystemLoader(HERE / "templates"),
        autoescape=select_autoescape(["html"]),
    )
    templates.filters["when"] = _when
    templates.filters["size"] = _size
    ui = Ui(settings, db, store, Sessions(db, settings.home / "web.secret"), templates)
    web.state.ui = ui
    web.add_middleware(SecurityHeaders)
    web.mount("/static", StaticFiles(directory=HERE / "static"), name="static")

    def error_page(request: Request, status_code: int, message: str) -> HTMLResponse:
        try:
            user = ui.sessions.user(request.cookies.get(COOKIE))
        except Exception:  # the error page must render even with the registry away
            user = None
        return ui.page("error.html", request, user, status_code, message=message)

    @web.exception_handler(LoginRequiredError)
    async def _login(request: Request, _: LoginRequiredError) -> Response:
        target = request.url.path if request.method == "GET" else PREFIX + "/"
        return RedirectResponse(f"{PREFIX}/login?next={target}", status_code=303)

    @web.exception_handler(CoordinatorError)
    async def _coordinator_error(request: Request, exc: CoordinatorError) -> Response:
        return error_page(request, ERROR_STATUS.get(exc.code, 400), exc.message)

    @web.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        return error_page(request, 422, validation_message(list(exc.errors())))

    @web.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        return error_page(request, exc.status_code, str(exc.detail))

    @web.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error in the web UI")
        return error_page(request, 500, "internal error; see the coordinator log")

    for module in (session_pages, site_pages, registry_pages, run_pages, audit_pages):
        web.include_router(module.router)
    return web


def mount_web(
    app: FastAPI, settings: CoordinatorSettings, db: Database, store: ObjectStore
) -> None:
    """Serve the UI at ``/ui`` on the coordinator's app; ``/`` leads there."""
    app.mount(PREFIX, create_web_app(settings, db, store))

    @app.get("/", include_in_schema=False)
    def _root() -> RedirectResponse:
        return RedirectResponse(f"{PREFIX}/", status_code=307)

    @app.get(PREFIX, include_in_schema=False)
    def _ui_root() -> RedirectResponse:
        return RedirectResponse(f"{PREFIX}/", status_code=307)
