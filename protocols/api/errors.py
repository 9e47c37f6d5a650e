"""The error body every RadFed endpoint returns, and whether retrying can help."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class ErrorBody(BaseModel):
    """``{"code": "study_not_found", "message": "...", "retryable": false}``."""

    model_config = ConfigDict(frozen=True)

    code: str
    message: str
    retryable: bool = False
