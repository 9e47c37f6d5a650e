"""The object stores: one suite for the filesystem and the S3 store, then each one's own checks.

The S3 store runs against a real S3 API server: moto in server mode, started
here as a separate process on 127.0.0.1 and stopped at the end of the module.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import os
import random
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest

from coordinator.errors import CoordinatorError
from coordinator.objects import (
    S3_MIN_PART_SIZE,
    FilesystemStore,
    ObjectStore,
    S3Store,
    open_store,
)

ROOT = Path(__file__).resolve().parents[3]
MIB = 1024 * 1024
KEYS = {"access_key_id": "testing", "secret_access_key": "testing"}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def random_chunks(seed: int, count: int, size: int = MIB) -> Iterator[bytes]:
    """``count`` reproducible chunks of random bytes, made one at a time."""
    rng = random.Random(seed)
    for _ in range(count):
        yield rng.randbytes(size)


def read_all(store: ObjectStore, digest: str) -> bytes:
    with store.open(digest) as f:
        return f.read()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def answers(port: int) -> bool:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        connection.request("GET", "/")
        connection.getresponse().read()
    except OSError:
        return False
    finally:
        connection.close()
    return True


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A moto S3 server process on a free port, stopped when the module is done."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("moto") / "moto.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while not answers(port):
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"moto server did not start:\n{log_path.read_text(errors='replace')}")
            time.sleep(0.2)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def s3_client(endpoint: str) -> Any:
    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


def new_bucket(endpoint: str) -> str:
    bucket = f"radfed-{uuid.uuid4().hex[:12]}"
    s3_client(endpoint).create_bucket(Bucket=bucket)
    return bucket


def make_s3_store(endpoint: str, tmp_path: Path, bucket: str | None = None) -> S3Store:
    # A low multipart threshold so that the large-object test goes up in parts.
    return S3Store(
        bucket or new_bucket(endpoint),
        endpoint_url=endpoint,
        prefix="site-x/",
        spool_dir=tmp_path,
        multipart_threshold=8 * MIB,
        part_size=S3_MIN_PART_SIZE,
        **KEYS,
    )


@pytest.fixture(params=["fs", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    if request.param == "fs":
        return FilesystemStore(tmp_path / "objects")
    return make_s3_store(request.getfixturevalue("s3_endpoint"), tmp_path)


class TestObjectStore:
    """What every object store does."""

    def test_a_stream_round_trips(self, store: ObjectStore) -> None:
        data = b"DICM" + bytes(range(256)) * 10

        created = store.put_stream([data[:100], data[100:]], sha(data))

        assert created is True
        assert store.exists(sha(data))
        assert store.size(sha(data)) == len(data)
        assert read_all(store, sha(data)) == data
        assert list(store.iter_hashes()) == [sha(data)]

    def test_a_file_round_trips(self, store: ObjectStore, tmp_path: Path) -> None:
        data = os.urandom(3 * MIB + 17)
        source = tmp_path / "exam.dcm"
        source.write_bytes(data)

        created = store.put_file(source, sha(data))

        assert created is True
        assert read_all(store, sha(data)) == data

    def test_an_empty_object_round_trips(self, store: ObjectStore) -> None:
        empty = sha(b"")

        created = store.put_stream([], empty)

        assert created is True
        assert store.size(empty) == 0
        assert read_all(store, empty) == b""

    def test_the_same_object_twice_is_a_no_op(self, store: ObjectStore, tmp_path: Path) -> None:
        data = b"the same exam file"
        store.put_stream([data], sha(data))
        source = tmp_path / "again.dcm"
        source.write_bytes(data)

        again_stream = store.put_stream([data], sha(data))
        again_file = store.put_file(source, sha(data))

        assert (again_stream, again_file) == (False, False)
        assert read_all(store, sha(data)) == data
        assert list(store.iter_hashes()) == [sha(data)]

    def test_a_wrong_sha256_stores_nothing(self, store: ObjectStore) -> None:
        claimed = sha(b"what the manifest says")

        with pytest.raises(CoordinatorError) as caught:
            store.put_stream([b"what ", b"arrived"], claimed)

        assert caught.value.code == "sha256_mismatch"
        assert caught.value.retryable is False
        assert not store.exists(claimed)
        assert not store.exists(sha(b"what arrived"))
        assert list(store.iter_hashes()) == []

    def test_other_content_under_a_stored_hash_is_refused(self, store: ObjectStore) -> None:
        data = b"the real exam"
        store.put_stream([data], sha(data))

        with pytest.raises(CoordinatorError) as caught:
            store.put_stream([b"a tampered exam"], sha(data))

        assert caught.value.code == "sha256_mismatch"
        assert read_all(store, sha(data)) == data

    def test_an_interrupted_put_leaves_nothing(self, store: ObjectStore) -> None:
        def dropped_upload() -> Iterator[bytes]:
            yield b"a" * MIB
            yield b"b" * MIB
            raise ConnectionResetError("the upload dropped")

        intended = sha(b"a" * MIB + b"b" * MIB + b"c" * MIB)

        with pytest.raises(ConnectionResetError, match="the upload dropped"):
            store.put_stream(dropped_upload(), intended)

        assert not store.exists(intended)
        assert list(store.iter_hashes()) == []

    def test_iteration_lists_every_object_once_in_order(self, store: ObjectStore) -> None:
        blobs = [f"exam {i}".encode() for i in range(7)]
        for blob in blobs:
            store.put_stream([blob], sha(blob))
        store.put_stream([blobs[0]], sha(blobs[0]))

        listed = list(store.iter_hashes())
        store.delete(sha(blobs[3]))
        after_delete = list(store.iter_hashes())

        assert listed == sorted(sha(b) for b in blobs)
        assert after_delete == sorted(sha(b) for b in blobs if b != blobs[3])
        assert not store.exists(sha(blobs[3]))

    def test_a_large_object_goes_in_and_out_in_chunks(self, store: ObjectStore) -> None:
        digest = hashlib.sha256()
        for chunk in random_chunks(seed=7, count=20):
            digest.update(chunk)
        expected = digest.hexdigest()

        created = store.put_stream(random_chunks(seed=7, count=20), expected)

        assert created is True
        assert store.size(expected) == 20 * MIB
        read_back = hashlib.sha256()
        with store.open(expected) as f:
            while chunk := f.read(MIB):
                assert len(chunk) <= MIB
                read_back.update(chunk)
        assert read_back.hexdigest() == expected

    def test_a_missing_object_is_reported(self, store: ObjectStore) -> None:
        missing = sha(b"never stored")

        with pytest.raises(CoordinatorError) as opening:
            store.open(missing)
        with pytest.raises(CoordinatorError) as sizing:
            store.size(missing)
        store.delete(missing)

        assert opening.value.code == sizing.value.code == "object_not_found"
        assert not store.exists(missing)

    @pytest.mark.parametrize("bad", ["", "abc", "g" * 64, "0" * 63, "../" + "0" * 61])
    def test_a_malformed_sha256_is_refused(self, store: ObjectStore, bad: str) -> None:
        with pytest.raises(CoordinatorError) as caught:
            store.put_stream([b"x"], bad)

        assert caught.value.code == "invalid_sha256"
        assert "sha256" in caught.value.message

    def test_an_uppercase_sha256_names_the_same_object(self, store: ObjectStore) -> None:
        data = b"case"

        store.put_stream([data], sha(data).upper())

        assert store.exists(sha(data))
        assert list(store.iter_hashes()) == [sha(data)]

    def test_an_unreadable_source_file_is_reported(
        self, store: ObjectStore, tmp_path: Path
    ) -> None:
        with pytest.raises(CoordinatorError) as caught:
            store.put_file(tmp_path / "absent.dcm", sha(b""))

        assert caught.value.code == "source_unreadable"
        assert '"path"' in caught.value.message


class TestFilesystemStore:
    """The filesystem store's layout, permissions, crash safety and concurrency."""

    def test_objects_are_laid_out_by_hash_and_private(self, tmp_path: Path) -> None:
        store = FilesystemStore(tmp_path)
        data = b"layout"

        store.put_stream([data], sha(data))

        path = tmp_path / sha(data)[:2] / sha(data)[2:4] / sha(data)
        assert path.read_bytes() == data
        assert path.stat().st_mode & 0o777 == 0o600
        assert list((tmp_path / "tmp").iterdir()) == []

    def test_a_crash_mid_put_leaves_no_object_under_its_name(self, tmp_path: Path) -> None:
        # Prepare: a process that dies (SIGKILL) while its put is half written.
        crashing = textwrap.dedent(
            """
            import os, signal, sys
            from coordinator.objects import FilesystemStore

            def chunks():
                yield b"x" * 1048576
                os.kill(os.getpid(), signal.SIGKILL)
                yield b"never"

            FilesystemStore(sys.argv[1]).put_stream(chunks(), sys.argv[2])
            """
        )
        intended = sha(b"x" * MIB + b"never")

        result = subprocess.run(
            [sys.executable, "-c", crashing, str(tmp_path), intended], cwd=ROOT, timeout=120
        )

        store = FilesystemStore(tmp_path)
        assert result.returncode == -signal.SIGKILL
        assert not store.exists(intended)
        assert list(store.iter_hashes()) == []
        assert len(list(store.tmp_dir.iterdir())) == 1
        assert store.sweep_temp(older_than_s=0) == 1
        assert list(store.tmp_dir.iterdir()) == []

    def test_the_sweep_keeps_recent_temporary_files(self, tmp_path: Path) -> None:
        store = FilesystemStore(tmp_path)
        store.tmp_dir.mkdir(parents=True)
        (store.tmp_dir / "in-flight.part").write_bytes(b"x")

        removed = store.sweep_temp(older_than_s=3600)

        assert removed == 0
        assert (store.tmp_dir / "in-flight.part").exists()

    def test_concurrent_puts_of_one_object_store_it_once(self, tmp_path: Path) -> None:
        store = FilesystemStore(tmp_path)
        data = os.urandom(2 * MIB)
        barrier = threading.Barrier(8)
        results: list[bool] = []

        def put() -> None:
            barrier.wait(timeout=30)
            results.append(store.put_stream([data[:MIB], data[MIB:]], sha(data)))

        threads = [threading.Thread(target=put) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)

        assert sorted(results) == [False] * 7 + [True]
        assert read_all(store, sha(data)) == data
        assert list(store.tmp_dir.iterdir()) == []

    def test_stray_files_are_not_listed(self, tmp_path: Path) -> None:
        store = FilesystemStore(tmp_path)
        data = b"real"
        store.put_stream([data], sha(data))
        (tmp_path / "README").write_text("not an object")
        (tmp_path / "ab" / "cd").mkdir(parents=True)
        (tmp_path / "ab" / "cd" / ("ef" * 32)).write_bytes(b"in the wrong place")

        listed = list(store.iter_hashes())

        assert listed == [sha(data)]


class TestS3Store:
    """The S3 store's keys, multipart clean-up and failures."""

    def test_objects_are_keyed_under_the_prefix(self, s3_endpoint: str, tmp_path: Path) -> None:
        store = make_s3_store(s3_endpoint, tmp_path)
        data = b"keyed"

        store.put_stream([data], sha(data))

        listing = s3_client(s3_endpoint).list_objects_v2(Bucket=store.bucket)
        digest = sha(data)
        assert [item["Key"] for item in listing["Contents"]] == [
            f"site-x/objects/{digest[:2]}/{digest[2:4]}/{digest}"
        ]

    @pytest.mark.parametrize(("size", "operation"), [(MIB, "PutObject"), (12 * MIB, "UploadPart")])
    def test_uploads_carry_checksums_for_the_server_to_verify(
        self, s3_endpoint: str, tmp_path: Path, size: int, operation: str
    ) -> None:
        # Prepare: record the headers of every upload request. moto does not verify
        # checksums (AWS and MinIO do), so the headers are what this test can check.
        store = make_s3_store(s3_endpoint, tmp_path)
        sent: list[dict[str, Any]] = []
        store._client.meta.events.register(
            f"before-send.s3.{operation}", lambda request, **_: sent.append(dict(request.headers))
        )
        data = os.urandom(size)

        store.put_stream([data], sha(data))

        blocks = [data[i : i + S3_MIN_PART_SIZE] for i in range(0, size, S3_MIN_PART_SIZE)]
        if operation == "PutObject":
            blocks = [data]
        assert [h["x-amz-checksum-sha256"] for h in sent] == [
            base64.b64encode(hashlib.sha256(b).digest()) for b in blocks
        ]
        assert [h["Content-MD5"] for h in sent] == [
            base64.b64encode(hashlib.md5(b).digest()) for b in blocks
        ]

    def test_a_multipart_put_leaves_no_open_upload(self, s3_endpoint: str, tmp_path: Path) -> None:
        store = make_s3_store(s3_endpoint, tmp_path)
        data = os.urandom(12 * MIB)

        created = store.put_stream([data], sha(data))

        uploads = s3_client(s3_endpoint).list_multipart_uploads(Bucket=store.bucket)
        assert created is True
        assert uploads.get("Uploads", []) == []
        assert read_all(store, sha(data)) == data

    def test_a_multipart_put_failing_midway_is_aborted(
        self, s3_endpoint: str, tmp_path: Path
    ) -> None:
        # Prepare: the connection "drops" as the second part goes out.
        store = make_s3_store(s3_endpoint, tmp_path)
        parts: list[int] = []

        def drop_second_part(**_: Any) -> None:
            parts.append(1)
            if len(parts) == 2:
                raise ConnectionAbortedError("dropped on part 2")

        store._client.meta.events.register("before-send.s3.UploadPart", drop_second_part)
        data = os.urandom(12 * MIB)

        with pytest.raises(ConnectionAbortedError):
            store.put_stream([data], sha(data))

        uploads = s3_client(s3_endpoint).list_multipart_uploads(Bucket=store.bucket)
        assert uploads.get("Uploads", []) == []
        assert not store.exists(sha(data))
        assert list(store.iter_hashes()) == []

    def test_an_unreachable_server_is_a_retryable_error(self, tmp_path: Path) -> None:
        store = S3Store(
            "radfed",
            endpoint_url=f"http://127.0.0.1:{free_port()}",
            connect_timeout_s=2,
            read_timeout_s=2,
            max_attempts=1,
            spool_dir=tmp_path,
            **KEYS,
        )

        with pytest.raises(CoordinatorError) as looking:
            store.exists(sha(b"x"))
        with pytest.raises(CoordinatorError) as putting:
            store.put_stream([b"x"], sha(b"x"))

        assert looking.value.code == putting.value.code == "object_store_unavailable"
        assert looking.value.retryable and putting.value.retryable

    def test_a_missing_bucket_is_a_permanent_error(self, s3_endpoint: str, tmp_path: Path) -> None:
        store = make_s3_store(s3_endpoint, tmp_path, bucket="no-such-bucket-here")

        with pytest.raises(CoordinatorError) as caught:
            store.put_stream([b"x"], sha(b"x"))

        assert caught.value.code == "object_store_error"
        assert caught.value.retryable is False

    def test_a_part_under_the_s3_minimum_is_refused(self) -> None:
        with pytest.raises(CoordinatorError, match='"part_size"'):
            S3Store("radfed", part_size=MIB, **KEYS)


class TestOpenStore:
    """The factory the coordinator's settings go through."""

    def test_the_filesystem_is_the_default(self, tmp_path: Path) -> None:
        store = open_store(root=tmp_path)

        assert isinstance(store, FilesystemStore)
        assert store.root == tmp_path

    def test_s3_is_built_from_the_settings_names(self) -> None:
        store = open_store(
            object_store="s3",
            s3_bucket="exams",
            s3_endpoint_url="http://127.0.0.1:9",
            s3_prefix="fed",
            s3_access_key_id="testing",
            s3_secret_access_key="testing",
        )

        assert isinstance(store, S3Store)
        assert store.bucket == "exams"
        assert store.key("0" * 64) == f"fed/objects/00/00/{'0' * 64}"

    @pytest.mark.parametrize(
        ("kwargs", "argument"),
        [({"object_store": "ftp"}, '"object_store"'), ({"object_store": "fs"}, '"root"')],
    )
    def test_bad_arguments_are_named(self, kwargs: dict[str, Any], argument: str) -> None:
        with pytest.raises(CoordinatorError) as caught:
            open_store(**kwargs)

        assert caught.value.code == "invalid_argument"
        assert argument in caught.value.message
