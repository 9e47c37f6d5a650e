"""Send a signed exam to the coordinator: resumable, chunked, idempotent.

``send_exam`` opens (or re-opens: the same manifest gives the same session) an
upload, sends each file the coordinator does not hold yet from the offset it
holds, in chunks, and completes it. A transient failure — a dropped
connection, a 5xx, a coordinator restart — is retried with backoff from where
the coordinator says it is; a permanent refusal (a bad signature, a file that
does not match, PHI found) comes back as a ``Rejection`` and is not retried.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from node.errors import NodeError
from node.federation import CoordinatorClient
from node.share.manifest import ExamPackage
from protocols.api.coordinator import (
    Receipt,
    Rejection,
    UploadCreate,
    UploadFileState,
    UploadPublic,
    UploadStatus,
)
from protocols.signing import manifest_digest

log = logging.getLogger("radfed.node.share")
CHUNK = 8 * 1024 * 1024


class RateLimiter:
    """A token bucket shared by every upload of a node: at most ``bytes_per_s`` on average."""

    def __init__(self, bytes_per_s: float) -> None:
        self.rate = bytes_per_s
        self._allowance = bytes_per_s
        self._last = time.monotonic()
        self._lock = threading.Lock()

    def take(self, amount: int) -> None:
        """Wait until ``amount`` bytes may go."""
        with self._lock:
            now = time.monotonic()
            self._allowance = min(self.rate, self._allowance + (now - self._last) * self.rate)
            self._last = now
            self._allowance -= amount
            wait = -self._allowance / self.rate if self._allowance < 0 else 0.0
        if wait > 0:
            time.sleep(wait)


def _error(response: httpx.Response) -> NodeError:
    try:
        body = response.json()
        return NodeError(
            str(body.get("code", "coordinator_error")),
            str(body.get("message", "")),
            bool(body.get("retryable", False))
            or response.status_code >= 500
            or response.status_code == 429,
        )
    except ValueError:
        return NodeError(
            "coordinator_error",
            f"HTTP {response.status_code} from the coordinator",
            response.status_code >= 500 or response.status_code == 429,
        )


def _retrying(action: Callable[[], httpx.Response], attempts: int, pause: float) -> httpx.Response:
    """``action``'s response, retried on unreachable coordinators and 5xx answers."""
    for attempt in range(1, attempts + 1):
        try:
            response = action()
        except NodeError as exc:
            if not exc.retryable or attempt == attempts:
                raise
            log.warning("coordinator unreachable (%s); retrying", exc.message)
        else:
            if response.status_code < 500 or attempt == attempts:
                return response
            log.warning("coordinator answered %d; retrying", response.status_code)
        time.sleep(min(pause * 2 ** (attempt - 1), 30.0))
    raise AssertionError("unreachable")  # pragma: no cover


def send_exam(
    client: CoordinatorClient,
    exam: ExamPackage,
    chunk: int = CHUNK,
    attempts: int = 6,
    pause: float = 0.5,
    on_chunk: Callable[[str, int], None] | None = None,
    limiter: RateLimiter | None = None,
) -> Receipt | Rejection:
    """Upload one exam; the coordinator's receipt, or its rejection with reasons."""
    body = UploadCreate(signed=exam.signed).model_dump(mode="json")
    response = _retrying(
        lambda: client.request("POST", "/api/v1/uploads", json=body), attempts, pause
    )
    if response.status_code != 200:
        raise _error(response)
    upload = UploadPublic.model_validate(response.json())
    if upload.status is UploadStatus.REGISTERED and upload.receipt is not None:
        return check_receipt(upload.receipt.model_copy(update={"duplicate": True}), exam)
    if upload.rejection is not None and upload.status is not UploadStatus.OPEN:
        return upload.rejection
    for state in upload.missing():
        _send_file(
            client,
            upload.upload_id,
            state,
            exam.files[state.sha256],
            chunk,
            attempts,
            pause,
            on_chunk,
            limiter,
        )
    path = f"/api/v1/uploads/{upload.upload_id}/complete"
    response = _retrying(lambda: client.request("POST", path), attempts, pause)
    if response.status_code == 200:
        return check_receipt(Receipt.model_validate(response.json()), exam)
    if response.status_code == 422 and "reasons" in response.text:
        return Rejection.model_validate(response.json())
    raise _error(response)


def check_receipt(receipt: Receipt, exam: ExamPackage) -> Receipt:
    """``receipt`` if it is for the exam sent: this study, this site, every instance.

    A receipt marks the study shared, so one for another exam (a coordinator's bug,
    a proxy's cache, anything between) must not. Its manifest digest is this
    manifest's, unless it says the exam was registered before (``duplicate``: from
    a manifest packaged earlier, with the same files).
    """
    manifest = exam.signed.manifest
    problems = [
        what
        for what, wrong in (
            ("study", receipt.study_instance_uid != manifest.study_instance_uid),
            ("site", receipt.site != manifest.site),
            ("instances", receipt.instances != manifest.instance_count),
            (
                "manifest",
                not receipt.duplicate and receipt.manifest_sha256 != manifest_digest(manifest),
            ),
        )
        if wrong
    ]
    if problems:
        raise NodeError(
            "receipt_mismatch",
            f"the coordinator's receipt is not for the exam sent ({', '.join(problems)} "
            f"differ: receipt for {receipt.study_instance_uid} of {receipt.site}); "
            "the study is not marked shared",
        )
    return receipt


def _send_file(
    client: CoordinatorClient,
    upload_id: str,
    state: UploadFileState,
    path: Path,
    chunk: int,
    attempts: int,
    pause: float,
    on_chunk: Callable[[str, int], None] | None,
    limiter: RateLimiter | None = None,
) -> None:
    url = f"/api/v1/uploads/{upload_id}/files/{state.sha256}"
    offset = state.received
    failures = 0
    with open(path, "rb") as handle:
        while offset < state.size:
            handle.seek(offset)
            data = handle.read(min(chunk, state.size - offset))
            if limiter is not None:
                limiter.take(len(data))
            try:
                response = client.request(
                    "PUT",
                    url,
                    params={"offset": offset},
                    content=data,
                    headers={"Content-Type": "application/octet-stream"},
                )
            except NodeError as exc:
                if not exc.retryable:
                    raise
                response = None
            if response is not None and response.status_code == 200:
                now = UploadFileState.model_validate(response.json())
                offset = now.size if now.complete else now.received
                failures = 0
                if on_chunk is not None:
                    on_chunk(state.sha256, offset)
                continue
            if response is not None and response.status_code < 500:
                problem = _error(response)
                if problem.code != "offset_mismatch":
                    raise problem
            failures += 1
            if failures >= attempts:
                raise NodeError(
                    "upload_interrupted",
                    f"gave up sending {state.sha256} after {failures} failures; it resumes later",
                    retryable=True,
                )
            time.sleep(min(pause * 2 ** (failures - 1), 30.0))
            offset = _held(client, upload_id, state.sha256, attempts, pause)


def _held(
    client: CoordinatorClient, upload_id: str, sha256: str, attempts: int, pause: float
) -> int:
    """How many bytes of a file the coordinator holds now."""
    path = f"/api/v1/uploads/{upload_id}"
    response = _retrying(lambda: client.request("GET", path), attempts, pause)
    if response.status_code != 200:
        raise _error(response)
    for state in UploadPublic.model_validate(response.json()).files:
        if state.sha256 == sha256:
            return state.size if state.complete else state.received
    raise NodeError("upload_lost", f"the coordinator no longer lists {sha256} in the upload")
