"""The operators' sites page: status, health, counts; adding a site, new tokens, revoking.

The actions call ``coordinator.sites`` as the CLI and the API do, with the
signed-in operator as the actor in the audit log. An enrollment token is shown
once, in the answer to the form that made it, and is never put in a URL.
"""

from __future__ import annotations

from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from coordinator import sites
from coordinator.api.app import ERROR_STATUS
from coordinator.errors import CoordinatorError
from coordinator.registry import search
from coordinator.web.ui import PREFIX, Operator, UiContext

router = APIRouter()
#: The study states a node reports in its heartbeat, in lifecycle order.
STATES = (
    "received",
    "deidentified",
    "held",
    "approved",
    "rejected",
    "queued",
    "shared",
    "failed",
    "withdrawn",
)


def _sites_page(
    request: Request, ui: UiContext, user: Operator, status_code: int = 200, **context: object
) -> HTMLResponse:
    states = sites.states(ui.db, ui.settings)
    registered = {
        row.key: row.count or 0
        for row in search.stats(ui.db, "site", k=ui.settings.small_count_k, exact=True).rows
    }
    reported = sorted({s for site in states for s in site.counts} - set(STATES))
    context.setdefault("token", None)
    context.setdefault("error", "")
    context.setdefault("name", "")
    return ui.page(
        "sites.html",
        request,
        user,
        status_code,
        sites=states,
        registered=registered,
        columns=[*STATES, *reported],
        ttl=ui.settings.enrollment_ttl_hours,
        **context,
    )


@router.get("/sites")
def sites_page(request: Request, ui: UiContext, user: Operator) -> HTMLResponse:
    return _sites_page(request, ui, user)


@router.post("/sites")
def add_site(
    request: Request,
    ui: UiContext,
    user: Operator,
    name: Annotated[str, Form()] = "",
    csrf: Annotated[str, Form()] = "",
) -> HTMLResponse:
    ui.check_csrf(user, csrf)
    try:
        token = sites.add(ui.db, ui.settings, name.strip(), actor=user.name)
    except CoordinatorError as exc:
        status = ERROR_STATUS.get(exc.code, 400)
        return _sites_page(request, ui, user, status, error=exc.message, name=name)
    return _sites_page(request, ui, user, token=token, token_site=name.strip())


@router.post("/sites/{name}/token")
def site_token(
    request: Request,
    name: str,
    ui: UiContext,
    user: Operator,
    csrf: Annotated[str, Form()] = "",
) -> HTMLResponse:
    ui.check_csrf(user, csrf)
    token = sites.new_token(ui.db, ui.settings, name, actor=user.name)
    return _sites_page(request, ui, user, token=token, token_site=name)


@router.get("/sites/{name}/revoke")
def revoke_form(request: Request, name: str, ui: UiContext, user: Operator) -> HTMLResponse:
    site = next((s for s in sites.states(ui.db, ui.settings) if s.name == name), None)
    if site is None:
        raise CoordinatorError("site_not_found", f"no site named {name}")
    return ui.page("revoke.html", request, user, site=site)


@router.post("/sites/{name}/revoke")
def revoke(
    name: str,
    ui: UiContext,
    user: Operator,
    csrf: Annotated[str, Form()] = "",
    reason: Annotated[str, Form()] = "",
    confirm: Annotated[str, Form()] = "",
) -> Response:
    ui.check_csrf(user, csrf)
    if confirm != name:
        return RedirectResponse(
            f"{PREFIX}/sites/{quote(name)}/revoke?flash="
            + quote("Type the site's name to confirm; nothing was revoked."),
            status_code=303,
        )
    sites.revoke(ui.db, name, actor=user.name, reason=reason.strip())
    return RedirectResponse(
        f"{PREFIX}/sites?flash=" + quote(f"Site {name} revoked: its node is refused from now on."),
        status_code=303,
    )
