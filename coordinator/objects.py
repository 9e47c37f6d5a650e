"""Content-addressed storage for exam files: one interface, a filesystem and an S3 store.

An object is named by the sha256 of its bytes. Every put hashes the bytes as they
stream in and stores nothing when they differ from the claimed hash, so a tampered
or torn upload never reaches the store, and putting an object the store already
holds changes nothing. ``open_store`` builds the store the settings name: the
filesystem by default, an S3-compatible bucket as an option (DESIGN: Storage).
"""

from __future__ import annotations

import base64
import contextlib
import errno
import functools
import hashlib
import io
import logging
import os
import re
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, BinaryIO

import boto3  # type: ignore[import-untyped]
from botocore.config import Config  # type: ignore[import-untyped]
from botocore.exceptions import (  # type: ignore[import-untyped]
    BotoCoreError,
    ClientError,
    NoCredentialsError,
    ParamValidationError,
    PartialCredentialsError,
)

from coordinator.errors import CoordinatorError

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

log = logging.getLogger(__name__)

#: How much is read or written at a time.
CHUNK_SIZE = 1024 * 1024
#: Objects are owner-readable only: they are de-identified but not yet released.
FILE_MODE = 0o600
DIR_MODE = 0o750
MIB = 1024 * 1024
#: S3 refuses multipart parts under 5 MiB (except the last).
S3_MIN_PART_SIZE = 5 * MIB

_SHA256 = re.compile(r"[0-9a-fA-F]{64}")
_HEX2 = re.compile(r"[0-9a-f]{2}")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_S3_KEY = re.compile(r"objects/([0-9a-f]{2})/([0-9a-f]{2})/([0-9a-f]{64})")
# S3 error codes worth another try although their HTTP status is 4xx.
_RETRYABLE_S3_CODES = frozenset(
    {
        "BadDigest",  # the bytes were damaged on the way
        "IncompleteBody",
        "RequestTimeout",
        "RequestTimeTooSkewed",
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "XAmzContentSHA256Mismatch",
    }
)


def check_sha256(sha256: str) -> str:
    """Return the hash as 64 lowercase hex digits, or raise ``invalid_sha256``."""
    if not isinstance(sha256, str) or _SHA256.fullmatch(sha256) is None:
        raise CoordinatorError(
            "invalid_sha256", 'Argument "sha256" must be a sha256 digest: 64 hex digits.'
        )
    return sha256.lower()


def _mismatch(claimed: str, actual: str) -> CoordinatorError:
    return CoordinatorError(
        "sha256_mismatch",
        f"The content's sha256 is {actual}, not the claimed {claimed}; nothing was stored.",
    )


def _b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode("ascii")


class ObjectStore(ABC):
    """Objects named by the sha256 of their bytes.

    Puts verify the bytes against the claimed hash and return whether the object
    is new; a mismatch raises ``sha256_mismatch`` and stores nothing. Missing
    objects raise ``object_not_found``. Failures of the backend raise a
    ``CoordinatorError`` whose ``retryable`` says whether to try again.
    """

    def put_file(self, path: str | os.PathLike[str], sha256: str) -> bool:
        """Store the file at ``path`` as the object ``sha256``.

        Returns
        -------
        bool
            True if stored now, False if the store already held the object.
        """
        digest = check_sha256(sha256)
        try:
            with open(path, "rb") as source:
                return self.put_stream(
                    iter(functools.partial(source.read, CHUNK_SIZE), b""), digest
                )
        except OSError as exc:
            # The store's own disk errors arrive as CoordinatorError: this is the source.
            raise CoordinatorError(
                "source_unreadable", f'Argument "path": cannot read {os.fspath(path)!r}: {exc}.'
            ) from exc

    @abstractmethod
    def put_stream(self, chunks: Iterable[bytes], sha256: str) -> bool:
        """Store the concatenated ``chunks`` as the object ``sha256``; see ``put_file``.

        An exception raised by ``chunks`` propagates unchanged, with nothing stored.
        """

    @abstractmethod
    def exists(self, sha256: str) -> bool:
        """Whether the store holds the object."""

    @abstractmethod
    def open(self, sha256: str) -> BinaryIO:
        """The object's bytes as a binary file to read (and close)."""

    @abstractmethod
    def size(self, sha256: str) -> int:
        """The object's length in bytes."""

    @abstractmethod
    def delete(self, sha256: str) -> None:
        """Remove the object; removing one that is not there is no error."""

    @abstractmethod
    def iter_hashes(self) -> Iterator[str]:
        """Every object's sha256, in ascending order."""

    def sync(self, hashes: Iterable[str]) -> None:  # noqa: B027 - most stores need nothing
        """Make the objects durable (a store that defers flushing its puts flushes here)."""


@contextlib.contextmanager
def _disk(action: str) -> Iterator[None]:
    """Turn an ``OSError`` of the store's own disk into a ``CoordinatorError``."""
    try:
        yield
    except OSError as exc:
        # A full or failing disk can recover; a permission problem needs an operator.
        raise CoordinatorError(
            "object_store_io",
            f"The object store could not {action}: {exc}.",
            retryable=not isinstance(exc, PermissionError),
        ) from exc


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _verify_only(chunks: Iterable[bytes], digest: str) -> None:
    sha = hashlib.sha256()
    for chunk in chunks:
        sha.update(chunk)
    if sha.hexdigest() != digest:
        raise _mismatch(digest, sha.hexdigest())


class FilesystemStore(ObjectStore):
    """Objects as files ``<root>/ab/cd/<sha256>``.

    A put writes a temporary file under ``<root>/tmp`` (the same filesystem),
    fsyncs and verifies it, then hard-links it to its final name and fsyncs the
    directory: a crash leaves at most a temporary file, never a partial object,
    and of two concurrent puts of one object the first wins and the second
    returns False.
    """

    def __init__(self, root: str | os.PathLike[str], durable_puts: bool = True) -> None:
        self.root = Path(root)
        self.tmp_dir = self.root / "tmp"
        #: False: a put does not wait for the disk; ``sync`` makes objects durable later
        #: (the coordinator syncs an exam's objects once, before it registers the exam).
        self.durable_puts = durable_puts

    def sync(self, hashes: Iterable[str]) -> None:
        """fsync the objects and their directories (each directory once)."""
        directories: set[Path] = set()
        with _disk("flush objects to disk"):
            for sha256 in hashes:
                path = self.path(sha256)
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
                directories.update((path.parent, path.parent.parent, path.parent.parent.parent))
            for directory in sorted(directories, key=lambda d: len(d.parts), reverse=True):
                _fsync_dir(directory)

    def path(self, sha256: str) -> Path:
        """Where the object ``sha256`` lives (whether or not it exists)."""
        digest = check_sha256(sha256)
        return self.root / digest[:2] / digest[2:4] / digest

    def put_stream(self, chunks: Iterable[bytes], sha256: str) -> bool:
        """Store the concatenated ``chunks`` as the object ``sha256``; see ``put_file``."""
        digest = check_sha256(sha256)
        final = self.path(digest)
        if final.is_file():
            _verify_only(chunks, digest)
            return False
        with _disk("create its temporary directory"):
            self._make_dirs(self.tmp_dir)
            fd, name = tempfile.mkstemp(dir=self.tmp_dir, prefix=f"{digest[:16]}.", suffix=".part")
        tmp = Path(name)
        try:
            sha = hashlib.sha256()
            with os.fdopen(fd, "wb") as out:
                for chunk in chunks:
                    sha.update(chunk)
                    with _disk("write an object"):
                        out.write(chunk)
                with _disk("write an object"):
                    out.flush()
                    os.fchmod(out.fileno(), FILE_MODE)
                    if self.durable_puts:
                        os.fsync(out.fileno())
            if sha.hexdigest() != digest:
                raise _mismatch(digest, sha.hexdigest())
            with _disk("store an object"):
                self._make_dirs(final.parent)
                if not self._link(tmp, final):
                    return False
                if self.durable_puts:
                    _fsync_dir(final.parent)
            return True
        finally:
            tmp.unlink(missing_ok=True)

    @staticmethod
    def _link(tmp: Path, final: Path) -> bool:
        """Give ``tmp`` its final name unless it exists; True if this call did."""
        try:
            os.link(tmp, final)
        except FileExistsError:
            return False
        except OSError as exc:
            # Some filesystems have no hard links: a rename is atomic too, and a
            # concurrent put of the same object writes the same bytes.
            if exc.errno not in {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS}:
                raise
            if final.exists():
                return False
            os.replace(tmp, final)
        return True

    @staticmethod
    def _make_dirs(path: Path) -> None:
        """Create ``path`` and its missing parents, fsyncing each new entry's directory."""
        missing = []
        while not path.is_dir():
            missing.append(path)
            path = path.parent
        for directory in reversed(missing):
            try:
                directory.mkdir(mode=DIR_MODE)
            except FileExistsError:
                continue
            _fsync_dir(directory.parent)

    def exists(self, sha256: str) -> bool:
        """Whether the store holds the object."""
        return self.path(sha256).is_file()

    def open(self, sha256: str) -> BinaryIO:
        """The object's bytes as a binary file to read (and close)."""
        path = self.path(sha256)
        try:
            return path.open("rb")
        except FileNotFoundError:
            raise _not_found(path.name) from None
        except OSError as exc:
            raise CoordinatorError(
                "object_store_io", f"The object store could not read {path.name}: {exc}."
            ) from exc

    def size(self, sha256: str) -> int:
        """The object's length in bytes."""
        path = self.path(sha256)
        try:
            return path.stat().st_size
        except FileNotFoundError:
            raise _not_found(path.name) from None

    def delete(self, sha256: str) -> None:
        """Remove the object; removing one that is not there is no error."""
        path = self.path(sha256)
        with _disk("delete an object"):
            try:
                path.unlink()
            except FileNotFoundError:
                return
            _fsync_dir(path.parent)

    def iter_hashes(self) -> Iterator[str]:
        """Every object's sha256, in ascending order."""
        for top in _sorted_dirs(self.root):
            for mid in _sorted_dirs(top):
                prefix = top.name + mid.name
                for entry in sorted(mid.iterdir()):
                    name = entry.name
                    if _HEX64.fullmatch(name) and name.startswith(prefix) and entry.is_file():
                        yield name

    def sweep_temp(self, older_than_s: float = 24 * 3600) -> int:
        """Remove temporary files a crashed put left behind; returns how many."""
        if not self.tmp_dir.is_dir():
            return 0
        cutoff = time.time() - older_than_s
        removed = 0
        for entry in self.tmp_dir.iterdir():
            with contextlib.suppress(FileNotFoundError):
                if entry.is_file() and entry.stat().st_mtime <= cutoff:
                    entry.unlink()
                    removed += 1
        return removed


def _sorted_dirs(path: Path) -> list[Path]:
    if not path.is_dir():
        return []
    return sorted(p for p in path.iterdir() if _HEX2.fullmatch(p.name) and p.is_dir())


def _not_found(sha256: str) -> CoordinatorError:
    return CoordinatorError("object_not_found", f"The object store holds no object {sha256}.")


class _S3Body(io.RawIOBase):
    """An S3 response body that reports stream failures as retryable ``CoordinatorError``."""

    def __init__(self, body: Any, sha256: str) -> None:
        self._body = body
        self._sha256 = sha256

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        view = memoryview(buffer).cast("B")
        try:
            data: bytes = self._body.read(len(view))
        except BotoCoreError as exc:
            raise _s3_error(exc, f"read object {self._sha256}") from exc
        view[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._body.close()
        super().close()


def _s3_error(exc: Exception, action: str) -> CoordinatorError:
    """One ``CoordinatorError`` for a failed S3 call, retryable where a retry may help."""
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
        retryable = status >= 500 or status == 429 or code in _RETRYABLE_S3_CODES
        return CoordinatorError(
            "object_store_unavailable" if retryable else "object_store_error",
            f"S3 could not {action}: {code or status} {error.get('Message', '')}".rstrip() + ".",
            retryable=retryable,
        )
    if isinstance(exc, NoCredentialsError | PartialCredentialsError | ParamValidationError):
        return CoordinatorError("object_store_config", f"S3 could not {action}: {exc}.")
    # Connection refused or reset, timeouts, a damaged response stream.
    return CoordinatorError(
        "object_store_unavailable", f"S3 could not {action}: {exc}.", retryable=True
    )


def _status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


class S3Store(ObjectStore):
    """Objects in an S3-compatible bucket, keyed ``<prefix>objects/ab/cd/<sha256>``.

    A put spools the bytes to a temporary file while hashing them, and uploads
    only verified bytes, with their SHA-256 and MD5 so the server checks what it
    received; objects over ``multipart_threshold`` go up in parts of
    ``part_size``, each checked the same way. Credentials come from the
    arguments or, when both are None, boto3's usual chain (``AWS_ACCESS_KEY_ID``
    and ``AWS_SECRET_ACCESS_KEY``, config files, instance roles). ``max_attempts``
    counts every try of one request, the first included (botocore's standard
    retry mode, with backoff, retries throttling, 5xx and connection errors).
    """

    def __init__(
        self,
        bucket: str,
        *,
        endpoint_url: str | None = None,
        region: str = "us-east-1",
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        prefix: str = "",
        spool_dir: str | os.PathLike[str] | None = None,
        multipart_threshold: int = 64 * MIB,
        part_size: int = 16 * MIB,
        connect_timeout_s: float = 10.0,
        read_timeout_s: float = 60.0,
        max_attempts: int = 5,
    ) -> None:
        if not bucket:
            raise CoordinatorError("invalid_argument", 'Argument "bucket" is required.')
        if (access_key_id is None) != (secret_access_key is None):
            raise CoordinatorError(
                "invalid_argument",
                'Arguments "access_key_id" and "secret_access_key" go together.',
            )
        if part_size < S3_MIN_PART_SIZE:
            raise CoordinatorError(
                "invalid_argument", 'Argument "part_size" must be at least 5 MiB.'
            )
        if max_attempts < 1:
            raise CoordinatorError(
                "invalid_argument", 'Argument "max_attempts" must be at least 1.'
            )
        self.bucket = bucket
        self.prefix = prefix if not prefix or prefix.endswith("/") else prefix + "/"
        self._spool_dir = os.fspath(spool_dir) if spool_dir is not None else None
        self._threshold = max(multipart_threshold, 0)
        self._part_size = part_size
        config = Config(
            region_name=region,
            signature_version="s3v4",
            connect_timeout=connect_timeout_s,
            read_timeout=read_timeout_s,
            retries={"total_max_attempts": max_attempts, "mode": "standard"},
            # S3-compatible servers rarely have per-bucket DNS names.
            s3={"addressing_style": "path" if endpoint_url else "auto"},
        )
        try:
            self._client = boto3.session.Session().client(
                "s3",
                endpoint_url=endpoint_url,
                aws_access_key_id=access_key_id,
                aws_secret_access_key=secret_access_key,
                config=config,
            )
        except (BotoCoreError, ValueError) as exc:
            raise CoordinatorError(
                "object_store_config", f"Cannot set up the S3 client: {exc}."
            ) from exc

    def key(self, sha256: str) -> str:
        """The object's key in the bucket."""
        digest = check_sha256(sha256)
        return f"{self.prefix}objects/{digest[:2]}/{digest[2:4]}/{digest}"

    def put_stream(self, chunks: Iterable[bytes], sha256: str) -> bool:
        """Store the concatenated ``chunks`` as the object ``sha256``; see ``put_file``."""
        digest = check_sha256(sha256)
        with tempfile.SpooledTemporaryFile(max_size=CHUNK_SIZE, dir=self._spool_dir) as spool:
            sha = hashlib.sha256()
            md5 = hashlib.md5(usedforsecurity=False)
            for chunk in chunks:
                sha.update(chunk)
                md5.update(chunk)
                with _disk("spool an upload"):
                    spool.write(chunk)
            if sha.hexdigest() != digest:
                raise _mismatch(digest, sha.hexdigest())
            if self.exists(digest):
                return False
            size = spool.tell()
            spool.seek(0)
            if size <= self._threshold:
                self._put_single(spool, size, digest, sha.digest(), md5.digest())
            else:
                self._put_multipart(spool, digest)
        return True

    def _put_single(self, body: IO[bytes], size: int, digest: str, sha: bytes, md5: bytes) -> None:
        try:
            self._client.put_object(
                Bucket=self.bucket,
                Key=self.key(digest),
                Body=body,
                ContentLength=size,
                ContentType="application/octet-stream",
                ChecksumSHA256=_b64(sha),
                ContentMD5=_b64(md5),
            )
        except (BotoCoreError, ClientError) as exc:
            raise _s3_error(exc, f"store object {digest}") from exc

    def _put_multipart(self, spool: IO[bytes], digest: str) -> None:
        key = self.key(digest)
        try:
            upload = self._client.create_multipart_upload(
                Bucket=self.bucket,
                Key=key,
                ContentType="application/octet-stream",
                ChecksumAlgorithm="SHA256",
            )
        except (BotoCoreError, ClientError) as exc:
            raise _s3_error(exc, f"start storing object {digest}") from exc
        upload_id = upload["UploadId"]
        try:
            parts: list[dict[str, Any]] = []
            # One part in memory at a time: part_size bounds what a put holds.
            while block := spool.read(self._part_size):
                number = len(parts) + 1
                sha = _b64(hashlib.sha256(block).digest())
                md5 = _b64(hashlib.md5(block, usedforsecurity=False).digest())
                answer = self._client.upload_part(
                    Bucket=self.bucket,
                    Key=key,
                    UploadId=upload_id,
                    PartNumber=number,
                    Body=block,
                    ChecksumSHA256=sha,
                    ContentMD5=md5,
                )
                parts.append({"PartNumber": number, "ETag": answer["ETag"], "ChecksumSHA256": sha})
            self._client.complete_multipart_upload(
                Bucket=self.bucket,
                Key=key,
                UploadId=upload_id,
                MultipartUpload={"Parts": parts},
            )
        except BaseException as exc:
            self._abort(key, upload_id)
            if isinstance(exc, BotoCoreError | ClientError):
                raise _s3_error(exc, f"store object {digest}") from exc
            raise

    def _abort(self, key: str, upload_id: str) -> None:
        try:
            self._client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
        except (BotoCoreError, ClientError):
            # The bucket's lifecycle rule for incomplete uploads cleans up after us.
            log.warning("could not abort multipart upload %s of %s", upload_id, key)

    def _head(self, digest: str) -> dict[str, Any] | None:
        try:
            head: dict[str, Any] = self._client.head_object(
                Bucket=self.bucket, Key=self.key(digest)
            )
        except ClientError as exc:
            if _status(exc) == 404:
                return None
            raise _s3_error(exc, f"look up object {digest}") from exc
        except BotoCoreError as exc:
            raise _s3_error(exc, f"look up object {digest}") from exc
        return head

    def exists(self, sha256: str) -> bool:
        """Whether the store holds the object."""
        return self._head(check_sha256(sha256)) is not None

    def open(self, sha256: str) -> BinaryIO:
        """The object's bytes as a binary file to read (and close), streamed from S3."""
        digest = check_sha256(sha256)
        try:
            answer = self._client.get_object(
                Bucket=self.bucket, Key=self.key(digest), ChecksumMode="ENABLED"
            )
        except ClientError as exc:
            if _status(exc) == 404:
                raise _not_found(digest) from None
            raise _s3_error(exc, f"read object {digest}") from exc
        except BotoCoreError as exc:
            raise _s3_error(exc, f"read object {digest}") from exc
        return io.BufferedReader(_S3Body(answer["Body"], digest), buffer_size=CHUNK_SIZE)

    def size(self, sha256: str) -> int:
        """The object's length in bytes."""
        digest = check_sha256(sha256)
        head = self._head(digest)
        if head is None:
            raise _not_found(digest)
        return int(head["ContentLength"])

    def delete(self, sha256: str) -> None:
        """Remove the object; removing one that is not there is no error."""
        digest = check_sha256(sha256)
        try:
            self._client.delete_object(Bucket=self.bucket, Key=self.key(digest))
        except (BotoCoreError, ClientError) as exc:
            raise _s3_error(exc, f"delete object {digest}") from exc

    def iter_hashes(self) -> Iterator[str]:
        """Every object's sha256, in ascending order (S3 lists keys in order)."""
        pages = self._client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=f"{self.prefix}objects/"
        )
        try:
            for page in pages:
                for item in page.get("Contents", []):
                    match = _S3_KEY.fullmatch(item["Key"][len(self.prefix) :])
                    if match and match[3].startswith(match[1] + match[2]):
                        yield match[3]
        except (BotoCoreError, ClientError) as exc:
            raise _s3_error(exc, "list objects") from exc


def open_store(
    *,
    object_store: str = "fs",
    root: str | os.PathLike[str] | None = None,
    s3_bucket: str = "radfed",
    s3_endpoint_url: str | None = None,
    s3_region: str = "us-east-1",
    s3_prefix: str = "",
    s3_access_key_id: str | None = None,
    s3_secret_access_key: str | None = None,
    **s3_options: Any,
) -> ObjectStore:
    """The store the settings name: ``"fs"`` (under ``root``) or ``"s3"``.

    The keyword names follow ``CoordinatorSettings``; ``s3_options`` go to
    ``S3Store`` as they are (timeouts, part size, spool directory).
    """
    if object_store == "fs":
        if root is None:
            raise CoordinatorError(
                "invalid_argument", 'Argument "root" is required for the filesystem store.'
            )
        return FilesystemStore(root)
    if object_store == "s3":
        return S3Store(
            s3_bucket,
            endpoint_url=s3_endpoint_url,
            region=s3_region,
            access_key_id=s3_access_key_id,
            secret_access_key=s3_secret_access_key,
            prefix=s3_prefix,
            **s3_options,
        )
    raise CoordinatorError(
        "invalid_argument", f'Argument "object_store" must be "fs" or "s3", not {object_store!r}.'
    )
