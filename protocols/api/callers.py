"""Which caller checks a request still owes, when it failed before its route ran them.

FastAPI parses a JSON body before it resolves a route's dependencies: a body that
is not JSON would be answered (422) before the caller was checked, telling an
anonymous caller about the route. Both services' validation-error handlers ask
this which of their caller checks the routed endpoint depends on and run them
first. A check marks ``request.state.caller_checked`` when it has run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from fastapi import Request
from fastapi.routing import APIRoute


def pending_caller_checks(
    request: Request, checks: Iterable[Callable[..., Any]]
) -> list[Callable[..., Any]]:
    """The ``checks`` the request's route depends on, unless one has run already."""
    route = request.scope.get("route")
    if getattr(request.state, "caller_checked", False) or not isinstance(route, APIRoute):
        return []
    wanted = tuple(checks)
    return [d.call for d in route.dependant.dependencies if d.call in wanted]
