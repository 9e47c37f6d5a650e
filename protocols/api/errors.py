"""The error body every RadFed endpoint returns, and whether retrying can help.

``error_responses`` declares an operation's error statuses in its OpenAPI
document, each with this body, so clients (and the API fuzz tests) know every
status an operation may answer with.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


class ErrorBody(BaseModel):
    """``{"code": "study_not_found", "message": "...", "retryable": false}``."""

    model_config = ConfigDict(frozen=True)

    code: str
    message: str
    retryable: bool = False


#: What each error status means, for the OpenAPI document.
_MEANING = {
    400: "Bad request",
    401: "No credentials, or unknown, expired or revoked ones",
    403: "The caller may not do this",
    404: "Not found",
    409: "Conflicts with the current state",
    413: "Too large",
    422: "Invalid request: the message names each argument",
    429: "Too many failed authentications from this client: locked out for now, "
    "even with the right credentials; retry after Retry-After seconds",
    500: "Internal error",
    502: "An upstream service failed",
    503: "Unavailable for now; retry",
}


#: Extra fields of an error status's OpenAPI response (the headers it always carries).
_EXTRA: dict[int, dict[str, Any]] = {
    429: {
        "headers": {
            "Retry-After": {
                "description": "Seconds until the client may try again",
                "schema": {"type": "integer", "minimum": 1},
            }
        }
    },
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for the error statuses an operation may answer with."""
    return {
        status: {
            "model": ErrorBody,
            "description": _MEANING.get(status, "Error"),
            **_EXTRA.get(status, {}),
        }
        for status in statuses
    }


def validation_message(errors: list[dict[str, Any]]) -> str:
    """A request-validation failure as one message naming each argument."""
    problems = "; ".join(f'Argument "{_argument(e)}": {e["msg"]}' for e in errors)
    return problems or "invalid request"


def _argument(error: dict[str, Any]) -> str:
    """The argument a validation error is about (``body`` for a body that is not JSON)."""
    if error.get("type") == "json_invalid":
        return "body"
    return ".".join(str(p) for p in error["loc"][1:]) or str(error["loc"][0])


def http_error_code(status: int) -> str:
    """The error code of a framework HTTP error (an unknown route or method)."""
    return {404: "not_found", 405: "method_not_allowed"}.get(status, "http_error")
