"""The coordinator's one error type: a stable machine code, a human message, retryable or not.

Service code raises these, never HTTP exceptions; the API maps codes to HTTP
statuses and to the sanitized public message in one place.
"""

from __future__ import annotations


class CoordinatorError(Exception):
    """A failure the coordinator reports: ``code`` is stable, ``message`` says what to do."""

    def __init__(
        self, code: str, message: str, retryable: bool = False, retry_after: int | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retryable = retryable
        #: Seconds before a retry can succeed (an HTTP ``Retry-After``), where that is known.
        self.retry_after = retry_after
