"""The audit log in the UI (operators): the chain verified on every view, then a page of entries.

The verification is ``coordinator.audit.verify``, the same as ``radfed
coordinator audit verify`` and ``/api/v1/audit/verify``; a broken chain names
the first entry that does not hold.
"""

from __future__ import annotations

from typing import Annotated
from urllib.parse import urlencode

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse

from coordinator import audit
from coordinator.web import views
from coordinator.web.ui import Operator, UiContext

router = APIRouter()
#: Entries per page.
PAGE = 100


@router.get("/audit")
def audit_page(
    request: Request,
    ui: UiContext,
    user: Operator,
    action: str = "",
    offset: Annotated[int, Query(ge=0)] = 0,
) -> HTMLResponse:
    with ui.db.read() as session:
        verification = audit.verify(session)
        total, entries = audit.entries(session, limit=PAGE, offset=offset, action=action.strip())
    return ui.page(
        "audit.html",
        request,
        user,
        verification=verification,
        entries=entries,
        pager=views.Pager(total, PAGE, offset),
        action=action.strip(),
        query=urlencode([("action", action.strip())] if action.strip() else []),
    )
