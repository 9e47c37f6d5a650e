"""The error body every RadFed endpoint returns, and whether retrying can help."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


class ErrorBody(BaseModel):
    """``{"code": "study_not_found", "message": "...", "retryable": false}``."""

    model_config = ConfigDict(frozen=True)

    code: str
    message: str
    retryable: bool = False


def validation_message(errors: list[dict[str, Any]]) -> str:
    """A request-validation failure as one message naming each argument."""
    problems = "; ".join(
        f'Argument "{".".join(str(p) for p in e["loc"][1:])}": {e["msg"]}' for e in errors
    )
    return problems or "invalid request"


def http_error_code(status: int) -> str:
    """The error code of a framework HTTP error (an unknown route or method)."""
    return {404: "not_found", 405: "method_not_allowed"}.get(status, "http_error")
