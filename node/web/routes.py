"""The node's web UI: dashboard, review queue, study page with viewer, header diff and masking.

Server-rendered (Jinja2) with every asset served from the node itself — no CDN,
hospitals are often air-gapped — and a Content-Security-Policy that allows only
the node's own scripts and styles. Original values appear in one place only, the
reviewer's header diff on the study page, and every such read is audited. A wrong
password counts against the client's address (``node.lockout``): too many and the
sign-in is refused (429) for a while, right password or not.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import pydicom
from fastapi import APIRouter, Depends, FastAPI, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from jinja2 import Environment, FileSystemLoader, select_autoescape
from pydantic import ValidationError

from node.errors import NodeError
from node.index import audit
from node.index.store import NodeIndex, StudyQuery
from node.index.users import authenticate
from node.settings import NodeSettings
from node.vetting import review
from node.vetting.policy import VettingPolicy
from node.web.session import COOKIE, LIFETIME, Sessions, WebUser
from protocols.api.authguard import TOO_MANY_ATTEMPTS, AuthGuard
from protocols.api.node import StudyStatus
from protocols.deid.dictionary import keyword_for_tag
from protocols.phi.findings import Severity

log = logging.getLogger("radfed.node.web")
HERE = Path(__file__).parent
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
        "frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


class LoginRequiredError(Exception):
    """Raised by a page that needs a signed-in reviewer; answered with a redirect."""


def current_user(request: Request) -> WebUser:
    """The signed-in reviewer or operator of a page request."""
    sessions: Sessions = request.app.state.sessions
    user = sessions.check(request.cookies.get(COOKIE))
    if user is None:
        raise LoginRequiredError()
    return user


Reviewer = Annotated[WebUser, Depends(current_user)]


def mount_web(
    app: FastAPI,
    index: NodeIndex,
    settings: NodeSettings,
    policy: Callable[[], VettingPolicy],
    masker: Callable[[str, str, list[tuple[int, int, int, int]], str], str],
    renderer: Callable[[Path, int, int], bytes],
) -> None:
    """Add the UI's routes to the node's FastAPI app."""
    sessions = Sessions(settings.keys_dir)
    app.state.sessions = sessions
    templates = Environment(
        loader=FileSystemLoader(HERE / "templates"),
        autoescape=select_autoescape(["html"]),
    )
    templates.filters["severity"] = lambda value: Severity(int(value)).name.lower()
    router = APIRouter(include_in_schema=False)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")

    def page(name: str, request: Request, user: WebUser | None, **context: Any) -> HTMLResponse:
        body = templates.get_template(name).render(
            user=user,
            csrf=sessions.csrf(user) if user else "",
            flash=request.query_params.get("flash", ""),
            request=request,
            **context,
        )
        return HTMLResponse(body, headers=SECURITY_HEADERS)

    def checked(user: WebUser, token: str) -> None:
        if not sessions.check_csrf(user, token):
            raise NodeError("forbidden", "the form expired or did not come from this node")

    @app.exception_handler(LoginRequiredError)
    async def _login(request: Request, _: LoginRequiredError) -> Response:
        return RedirectResponse(f"/login?next={request.url.path}", status_code=303)

    @router.get("/login")
    def login_form(request: Request) -> HTMLResponse:
        return page("login.html", request, None, error="", next=request.query_params.get("next"))

    @router.post("/login")
    def login(
        request: Request,
        name: Annotated[str, Form()],
        password: Annotated[str, Form()],
        next: Annotated[str, Form()] = "/",
    ) -> Response:
        guard: AuthGuard = request.app.state.auth_guard
        try:
            with guard.attempt(request, "password") as attempt:
                role = authenticate(index, name, password)
                if role is None:
                    attempt.failed()
                else:
                    attempt.succeeded()
        except NodeError as refused:
            if refused.code != TOO_MANY_ATTEMPTS:
                raise
            locked = page(
                "login.html", request, None, error=f"Locked out: {refused.message}.", next=next
            )
            locked.status_code = 429
            locked.headers["Retry-After"] = str(refused.retry_after)
            return locked
        if role is None:
            return page(
                "login.html", request, None, error="Unknown user or wrong password.", next=next
            )
        target = next if next.startswith("/") and not next.startswith("//") else "/"
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(
            COOKIE,
            sessions.issue(name, role),
            max_age=LIFETIME,
            httponly=True,
            samesite="strict",
            secure=False,
        )
        return response

    @router.post("/logout")
    def logout(user: Reviewer, csrf: Annotated[str, Form()]) -> Response:
        checked(user, csrf)
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(COOKIE)
        return response

    @router.get("/")
    def dashboard(request: Request, user: Reviewer) -> HTMLResponse:
        counts = index.counts()
        return page(
            "dashboard.html", request, user, counts=counts, activity=index.recent_activity(25)
        )

    @router.get("/queue")
    def queue(request: Request, user: Reviewer, status: str = "held") -> HTMLResponse:
        try:
            wanted = StudyStatus(status)
        except ValueError:
            wanted = StudyStatus.HELD
        studies = index.search(
            StudyQuery(status=(wanted,), sort="received_at", order="asc", limit=200)
        ).items
        worst = {
            s.study_instance_uid: _worst(review.open_findings(index, s.study_instance_uid))
            for s in studies
        }
        return page(
            "queue.html",
            request,
            user,
            studies=studies,
            status=wanted.value,
            worst=worst,
            statuses=[s.value for s in StudyStatus],
        )

    @router.get("/outbox")
    def outbox_page(request: Request, user: Reviewer, state: str = "") -> HTMLResponse:
        wanted = state if state in ("queued", "sending", "done", "held", "failed") else ""
        return page(
            "outbox.html", request, user, entries=index.outbox(wanted or None, 200), state=wanted
        )

    @router.get("/policy")
    def policy_page(request: Request, user: Reviewer) -> HTMLResponse:
        return page(
            "policy.html",
            request,
            user,
            policy=policy(),
            path=settings.policy_path,
            error="",
            severities=[s.name.lower() for s in Severity],
        )

    @router.post("/policy")
    def policy_save(
        request: Request,
        user: Reviewer,
        csrf: Annotated[str, Form()],
        auto_approve_modalities: Annotated[str, Form()] = "",
        hold_modalities: Annotated[str, Form()] = "",
        findings_at_or_above: Annotated[str, Form()] = "low",
        auto_approve_enabled: Annotated[str, Form()] = "",
        two_person: Annotated[str, Form()] = "",
    ) -> Response:
        checked(user, csrf)
        if user.role != "operator":
            raise NodeError("forbidden", "only an operator may change the vetting policy")

        def codes(text: str) -> list[str]:
            return [c for c in text.replace(",", " ").split() if c]

        try:
            new = VettingPolicy.model_validate(
                {
                    "auto_approve": {
                        "enabled": bool(auto_approve_enabled),
                        "modalities": codes(auto_approve_modalities),
                    },
                    "hold": {
                        "modalities": codes(hold_modalities),
                        "findings_at_or_above": findings_at_or_above,
                    },
                    "review": {"two_person": bool(two_person)},
                }
            )
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
            )
            response = page(
                "policy.html",
                request,
                user,
                policy=policy(),
                path=settings.policy_path,
                error=f"Nothing was changed: {problems}",
                severities=[s.name.lower() for s in Severity],
            )
            response.status_code = 400
            return response
        old = policy()
        new.save(settings.policy_path)
        with index.db.write() as session:
            audit.append(
                session,
                user.name,
                "policy.change",
                settings.policy_path.name,
                path=str(settings.policy_path),
                before=old.model_dump(),
                after=new.model_dump(),
            )
        log.info("vetting policy changed by %s", user.name)
        return RedirectResponse("/policy?flash=Policy saved.", status_code=303)

    @router.get("/studies/{study_uid}")
    def study_page(request: Request, study_uid: str, user: Reviewer) -> HTMLResponse:
        detail = index.study(study_uid)
        instances = [(s, i) for s in detail.series for i in s.instances]
        current = request.query_params.get("instance") or (
            instances[0][1].sop_instance_uid if instances else ""
        )
        diff = _header_diff(index, settings, study_uid, current, user.name) if current else []
        queue_next = _next_in_queue(index, study_uid)
        return page(
            "study.html",
            request,
            user,
            study=detail,
            instances=instances,
            current=current,
            findings=review.open_findings(index, study_uid),
            diff=diff,
            queue_next=queue_next,
            two_person=policy().review.two_person,
        )

    @router.get("/studies/{study_uid}/instances/{sop_uid}.png")
    def image(
        study_uid: str, sop_uid: str, user: Reviewer, frame: int = 0, size: int = 0
    ) -> Response:
        path = settings.store_dir / index.instance_path(study_uid, sop_uid)
        return Response(
            renderer(path, frame, size),
            media_type="image/png",
            headers={"Cache-Control": "no-store"},
        )

    @router.post("/studies/{study_uid}/approve")
    def approve(
        study_uid: str,
        user: Reviewer,
        csrf: Annotated[str, Form()],
        reason: Annotated[str, Form()] = "",
    ) -> Response:
        checked(user, csrf)
        outcome = review.approve(index, policy(), study_uid, user.name, reason)
        return _back(study_uid, outcome.message, index, outcome.status)

    @router.post("/studies/{study_uid}/reject")
    def reject(
        study_uid: str,
        user: Reviewer,
        csrf: Annotated[str, Form()],
        reason: Annotated[str, Form()] = "",
    ) -> Response:
        checked(user, csrf)
        outcome = review.reject(index, study_uid, user.name, reason)
        return _back(study_uid, outcome.message, index, outcome.status)

    @router.post("/studies/{study_uid}/instances/{sop_uid}/mask")
    def mask(
        study_uid: str,
        sop_uid: str,
        user: Reviewer,
        csrf: Annotated[str, Form()],
        rectangles: Annotated[str, Form()],
    ) -> Response:
        checked(user, csrf)
        try:
            rects = [tuple(int(v) for v in r) for r in json.loads(rectangles)]
        except (ValueError, TypeError) as exc:
            raise NodeError(
                "bad_mask",
                'Argument "rectangles": a JSON list of [left, top, width, height] in image pixels.',
            ) from exc
        if not rects or any(len(r) != 4 or r[2] <= 0 or r[3] <= 0 for r in rects):
            raise NodeError("bad_mask", 'Argument "rectangles": draw at least one rectangle.')
        message = masker(study_uid, sop_uid, [(r[0], r[1], r[2], r[3]) for r in rects], user.name)
        return RedirectResponse(
            f"/studies/{study_uid}?instance={sop_uid}&flash={message}", status_code=303
        )

    app.include_router(router)


def _worst(findings: list[dict[str, Any]]) -> str:
    if not findings:
        return ""
    return Severity(int(max(f["severity"] for f in findings))).name.lower()


def _next_in_queue(index: NodeIndex, study_uid: str) -> str | None:
    held = index.search(
        StudyQuery(status=(StudyStatus.HELD,), sort="received_at", order="asc", limit=500)
    ).items
    uids = [s.study_instance_uid for s in held if s.study_instance_uid != study_uid]
    return uids[0] if uids else None


def _back(study_uid: str, message: str, index: NodeIndex, status: StudyStatus) -> Response:
    target = _next_in_queue(index, study_uid) if status is not StudyStatus.HELD else study_uid
    if target is None:
        return RedirectResponse(f"/queue?flash={message}", status_code=303)
    return RedirectResponse(f"/studies/{target}?flash={message}", status_code=303)


def _header_diff(
    index: NodeIndex, settings: NodeSettings, study_uid: str, sop_uid: str, reviewer: str
) -> list[dict[str, str]]:
    """Original vs de-identified top-level values of one instance (an audited vault read)."""
    from node.index.originals import original_identifiers

    try:
        path = settings.store_dir / index.instance_path(study_uid, sop_uid)
    except NodeError:
        return []
    record = original_identifiers(index, [sop_uid], actor=reviewer, purpose="header diff").get(
        sop_uid
    )
    if record is None:
        return []
    deidentified = pydicom.dcmread(path, stop_before_pixels=True)
    rows = []
    for tag_hex, original in sorted(record.get("header", {}).items()):
        tag = int(tag_hex, 16)
        element = deidentified.get(tag)
        now = "" if element is None else str(element.value)
        rows.append(
            {
                "tag": f"({tag_hex[:4]},{tag_hex[4:]})",
                "keyword": keyword_for_tag(tag) or "private",
                "original": original,
                "deidentified": now if element is not None else "(removed)",
            }
        )
    return rows
