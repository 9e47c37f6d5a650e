"""Signing in to the UI with an API token, and signing out.

The login form carries its own CSRF token, bound to a short-lived signed
cookie, so that no other site can sign a browser in under someone else's token.
A wrong token gets the same answer whatever was wrong with it, and counts as a
failed authentication of the client's address, as a wrong token on the API does
(``coordinator.lockout``): a client locked out gets the form back with 429.
"""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from coordinator.errors import CoordinatorError
from coordinator.web.session import COOKIE, COOKIE_PATH
from coordinator.web.ui import PREFIX, Reader, UiContext
from protocols.api.authguard import TOO_MANY_ATTEMPTS, AuthGuard

router = APIRouter()
#: The login form's cookie (its CSRF token is derived from it).
LOGIN_COOKIE = "radfed_coordinator_login"
LOGIN_ROLE = "login-form"


def _target(next_page: str) -> str:
    """Where to go after signing in: a page of the UI, never another site."""
    if next_page.startswith(f"{PREFIX}/") and not next_page.startswith("//"):
        return next_page
    return f"{PREFIX}/"


@router.get("/login")
def login_form(request: Request, ui: UiContext, next: str = "") -> HTMLResponse:
    form = ui.sessions.issue("", LOGIN_ROLE, bound=secrets.token_urlsafe(16))
    checked = ui.sessions.check(form)
    response = ui.page(
        "login.html",
        request,
        None,
        error="",
        next=_target(next),
        login_csrf=ui.sessions.csrf(checked) if checked else "",
    )
    response.set_cookie(
        LOGIN_COOKIE,
        form,
        max_age=3600,
        httponly=True,
        samesite="strict",
        secure=True,
        path=COOKIE_PATH,
    )
    return response


@router.post("/login")
def login(
    request: Request,
    ui: UiContext,
    token: Annotated[str, Form()] = "",
    csrf: Annotated[str, Form()] = "",
    next: Annotated[str, Form()] = "",
) -> Response:
    form = ui.sessions.check(request.cookies.get(LOGIN_COOKIE))
    if form is None or form.role != LOGIN_ROLE or not ui.sessions.check_csrf(form, csrf):
        return ui.page(
            "login.html",
            request,
            None,
            status_code=403,
            error="The login form expired or did not come from this page; reload and retry.",
            next=_target(next),
            login_csrf="",
        )
    guard: AuthGuard = request.app.state.auth_guard
    try:
        with guard.attempt(request, "token") as attempt:
            signed = ui.sessions.sign_in(token)
            if signed is None:
                attempt.failed()
                return ui.page(
                    "login.html",
                    request,
                    None,
                    status_code=401,
                    error="Unknown or revoked API token.",
                    next=_target(next),
                    login_csrf=csrf,
                )
            attempt.succeeded()
    except CoordinatorError as refused:
        if refused.code != TOO_MANY_ATTEMPTS:
            raise
        page = ui.page(
            "login.html",
            request,
            None,
            status_code=429,
            error=f"Locked out: {refused.message}.",
            next=_target(next),
            login_csrf=csrf,
        )
        page.headers["Retry-After"] = str(refused.retry_after)
        return page
    cookie, _user = signed
    response = RedirectResponse(_target(next), status_code=303)
    response.set_cookie(
        COOKIE,
        cookie,
        max_age=ui.sessions.lifetime,
        httponly=True,
        samesite="strict",
        secure=True,
        path=COOKIE_PATH,
    )
    response.delete_cookie(LOGIN_COOKIE, path=COOKIE_PATH)
    return response


@router.post("/logout")
def logout(user: Reader, ui: UiContext, csrf: Annotated[str, Form()] = "") -> Response:
    ui.check_csrf(user, csrf)
    response = RedirectResponse(f"{PREFIX}/login", status_code=303)
    response.delete_cookie(COOKIE, path=COOKIE_PATH, secure=True, httponly=True)
    return response
