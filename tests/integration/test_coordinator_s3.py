"""The coordinator with its S3-compatible object store: moto's S3 API server as a process.

A node uploads an exam to ``radfed coordinator serve`` configured with
``object_store = "s3"``; the files land in the bucket under their digests, and
an exam refused for PHI leaves nothing there.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import pydicom
import pytest

from node import federation
from node.settings import load_settings
from node.share.manifest import ExamPackage, build_manifest, package
from node.share.upload import send_exam
from node.site import open_index
from protocols.api.coordinator import ExamManifest, Receipt, Rejection
from radfed.synth.site import write_site_corpus
from tests.helpers import CoordinatorProcess, run_cli
from tests.integration.test_coordinator_intake import Setup
from tests.unit.coordinator.test_objects import new_bucket, s3_client, s3_endpoint

pytestmark = pytest.mark.integration
__all__ = ["s3_endpoint"]  # the moto server fixture


def test_exams_go_to_the_bucket_and_refused_ones_leave_nothing(
    s3_endpoint: str, tmp_path: Path
) -> None:
    # Prepare
    bucket = new_bucket(s3_endpoint)
    home = tmp_path / "coordinator"
    env = {
        "RADFED_COORDINATOR_OBJECT_STORE": "s3",
        "RADFED_COORDINATOR_S3_BUCKET": bucket,
        "RADFED_COORDINATOR_S3_ENDPOINT_URL": s3_endpoint,
        "RADFED_COORDINATOR_S3_PREFIX": "radfed/",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
    }
    run_cli("coordinator", "init", "--home", str(home), env=env, check=True)
    token = run_cli(
        "coordinator", "site", "add", "st-marys", "--home", str(home), env=env, check=True
    ).stdout.strip()
    write_site_corpus(
        tmp_path / "export", patients=1, ct_slices=2, ct_size=32, cr_size=32, with_us=False
    )
    node_home = tmp_path / "node"
    run_cli("node", "ingest", str(tmp_path / "export"), "--home", str(node_home), "-q", check=True)
    settings = load_settings(node_home)
    with CoordinatorProcess(home, env=env) as coordinator:
        run_cli("node", "enroll", coordinator.url, token, "--home", str(node_home), check=True)
        setup = Setup(coordinator, env, "", settings, settings, tmp_path)
        files = federation.files(settings)
        good_uid = setup.study("CT\\SR")
        with federation.CoordinatorClient(settings) as client:
            good = package(
                open_index(settings), settings, good_uid, "st-marys", files.key, files.cert
            )

            # Execute: one clean exam, one with a name planted in it.
            receipt = send_exam(client, good)
            manifest, paths = build_manifest(
                open_index(settings), settings, setup.study("CR"), "st-marys"
            )
            (sha, path), *_ = paths.items()
            ds = pydicom.dcmread(path)
            ds.InstitutionName = "Mercy General Hospital"
            ds.PatientComments = "call John Smithfield on 555-0142"
            buffer = io.BytesIO()
            ds.save_as(buffer, enforce_file_format=True)
            planted = tmp_path / "planted.dcm"
            planted.write_bytes(buffer.getvalue())
            new_sha = hashlib.sha256(buffer.getvalue()).hexdigest()
            series = [
                s.model_copy(
                    update={
                        "instances": [
                            i.model_copy(update={"sha256": new_sha, "size": planted.stat().st_size})
                            if i.sha256 == sha
                            else i
                            for i in s.instances
                        ]
                    }
                )
                for s in manifest.exam.series
            ]
            changed = ExamManifest.model_validate(
                manifest.model_copy(
                    update={"exam": manifest.exam.model_copy(update={"series": series})}
                ).model_dump()
            )
            bad = ExamPackage(setup.sign(changed), {**paths, new_sha: planted})
            refused = send_exam(client, bad)

    # Assert
    keys = {
        item["Key"]
        for item in s3_client(s3_endpoint).list_objects_v2(Bucket=bucket).get("Contents", [])
    }
    assert isinstance(receipt, Receipt) and receipt.instances == len(good.files)
    assert {f"radfed/objects/{s[:2]}/{s[2:4]}/{s}" for s in good.files} <= keys
    assert isinstance(refused, Rejection) and refused.code == "phi_found"
    assert f"radfed/objects/{new_sha[:2]}/{new_sha[2:4]}/{new_sha}" not in keys
    assert not (home / "objects").exists()
