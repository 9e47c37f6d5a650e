"""The ``radfed`` command as an operator meets it: groups, errors, exit codes, settings."""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from tests.helpers import report_lines, run_cli

pytestmark = pytest.mark.integration


def write_ct(
    path: Path, sop_uid: str = "1.2.3.9.1", name: str = "DOE^JOHN", instance: int = 1
) -> Path:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = "1.2.3.9.2"
    ds.SeriesInstanceUID = "1.2.3.9.3"
    ds.PatientName = name
    ds.PatientID = "MRN-CLI-1"
    ds.Modality = "CT"
    ds.InstanceNumber = instance
    ds.DeviceSerialNumber = "SN-CLI"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def test_the_four_command_groups_are_mounted() -> None:
    proc = run_cli("--help", check=True)

    for group in ("node", "coordinator", "train", "demo"):
        assert group in proc.stdout


def test_the_train_group_lists_its_commands() -> None:
    proc = run_cli("train")

    assert proc.returncode == 2  # no command given: help
    for command in ("apps", "submit", "status", "logs", "stop", "resume", "fetch", "wait"):
        assert command in proc.stdout + proc.stderr


def test_train_needs_the_coordinator_url_and_a_token() -> None:
    proc = run_cli("train", "status", "run-0001")

    assert proc.returncode == 2
    assert "--url" in proc.stderr or "RADFED_URL" in proc.stderr


def test_the_coordinator_group_lists_its_commands() -> None:
    proc = run_cli("coordinator")

    assert proc.returncode == 2  # no command given: help, like `radfed node`
    for command in ("init", "serve", "site", "token", "audit", "release"):
        assert command in proc.stdout + proc.stderr


def test_a_folder_with_a_non_dicom_file_still_succeeds(tmp_path: Path) -> None:
    write_ct(tmp_path / "in" / "a.dcm")
    (tmp_path / "in" / "notes.txt").write_text("not DICOM")
    (tmp_path / "in" / "broken.dcm").write_bytes((tmp_path / "in" / "a.dcm").read_bytes()[:300])

    proc = run_cli(
        "node",
        "deid",
        str(tmp_path / "in"),
        str(tmp_path / "out"),
        "--home",
        str(tmp_path / "home"),
        "-q",
    )

    assert proc.returncode == 0, proc.stderr
    assert "quarantined (unreadable)        2" in proc.stdout
    assert "not_dicom" in proc.stdout and "truncated" in proc.stdout
    statuses = {
        Path(line["source"]).name: line["status"] for line in report_lines(tmp_path / "home")
    }
    assert statuses == {"a.dcm": "written", "notes.txt": "quarantined", "broken.dcm": "quarantined"}


def test_same_uid_different_content_is_a_conflict_and_nothing_is_overwritten(
    tmp_path: Path,
) -> None:
    write_ct(tmp_path / "in" / "1" / "a.dcm", instance=1)
    write_ct(tmp_path / "in" / "2" / "b.dcm", instance=2)  # same UID, different image
    write_ct(tmp_path / "in" / "3" / "c.dcm", name="ROE^RICHARD")  # differs only in PHI

    proc = run_cli(
        "node",
        "deid",
        str(tmp_path / "in"),
        str(tmp_path / "out"),
        "--home",
        str(tmp_path / "home"),
        "-q",
        "--jobs",
        "1",
    )

    assert proc.returncode == 1
    assert "1 readable file(s) were not written" in proc.stderr
    report = {Path(line["source"]).name: line for line in report_lines(tmp_path / "home")}
    assert report["a.dcm"]["status"] == "written"
    assert report["b.dcm"]["status"] == "failed" and report["b.dcm"]["code"] == "conflict"
    assert report["c.dcm"]["status"] == "unchanged"  # de-identified, it is the same file
    written = list((tmp_path / "out").rglob("*.dcm"))
    assert len(written) == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--option", "retain-everything"], 'Unknown option "retain-everything"'),
        (
            [
                "--option",
                "retain-longitudinal-full-dates",
                "--option",
                "retain-longitudinal-modified-dates=on",
            ],
            "mutually exclusive",
        ),
    ],
)
def test_bad_options_are_named(tmp_path: Path, args: list[str], message: str) -> None:
    write_ct(tmp_path / "in" / "a.dcm")

    proc = run_cli(
        "node",
        "deid",
        str(tmp_path / "in"),
        str(tmp_path / "out"),
        "--home",
        str(tmp_path / "home"),
        *args,
    )

    assert proc.returncode == 2
    assert message in proc.stderr
    assert not (tmp_path / "out").exists()


def test_a_missing_source_is_named(tmp_path: Path) -> None:
    proc = run_cli("node", "deid", str(tmp_path / "nope"), str(tmp_path / "out"))

    assert proc.returncode == 2 and 'Argument "src"' in proc.stderr


def test_site_settings_come_from_the_config_file_and_the_environment(tmp_path: Path) -> None:
    write_ct(tmp_path / "in" / "a.dcm")
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.toml").write_text('site_id = "BERN-01"\n')

    proc = run_cli(
        "node",
        "deid",
        str(tmp_path / "in"),
        str(tmp_path / "out"),
        "-q",
        env={"RADFED_NODE_HOME": str(home), "RADFED_NODE_DEID__RETAIN_DEVICE_IDENTITY": "true"},
    )

    assert proc.returncode == 0, proc.stderr
    out = pydicom.dcmread(next((tmp_path / "out").rglob("*.dcm")))
    assert out.PatientID.startswith("BERN-01-")
    assert out.DeviceSerialNumber == "SN-CLI"
    assert (home / "keys" / "site.secret").stat().st_mode & 0o777 == 0o600


def test_a_bad_config_file_is_a_clear_error(tmp_path: Path) -> None:
    write_ct(tmp_path / "in" / "a.dcm")
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "config.toml").write_text('site_id = "no spaces please"\n')

    proc = run_cli(
        "node",
        "deid",
        str(tmp_path / "in"),
        str(tmp_path / "out"),
        "--home",
        str(tmp_path / "home"),
    )

    assert proc.returncode == 2
    assert "site_id" in proc.stderr and "Traceback" not in proc.stderr


def test_the_same_secret_gives_the_same_pseudonyms_on_another_node(tmp_path: Path) -> None:
    write_ct(tmp_path / "in" / "a.dcm")
    secret = tmp_path / "shared.secret"
    secret.write_text("cd" * 32)
    secret.chmod(0o600)

    pseudonyms = set()
    for node in ("one", "two"):
        run_cli(
            "node",
            "deid",
            str(tmp_path / "in"),
            str(tmp_path / node),
            "-q",
            "--home",
            str(tmp_path / f"home-{node}"),
            "--site-secret-file",
            str(secret),
            check=True,
        )
        pseudonyms.add(pydicom.dcmread(next((tmp_path / node).rglob("*.dcm"))).PatientID)

    assert len(pseudonyms) == 1


def test_a_single_file_can_be_deidentified(tmp_path: Path) -> None:
    source = write_ct(tmp_path / "DOE_JOHN_MRN-CLI-1.dcm")

    run_cli(
        "node",
        "deid",
        str(source),
        str(tmp_path / "out"),
        "-q",
        "--home",
        str(tmp_path / "home"),
        check=True,
    )

    outputs = list((tmp_path / "out").rglob("*.dcm"))
    assert len(outputs) == 1 and "DOE" not in str(outputs[0])


def test_the_report_stays_in_the_node_home(tmp_path: Path) -> None:
    write_ct(tmp_path / "in" / "DOE_JOHN" / "a.dcm")

    run_cli(
        "node",
        "deid",
        str(tmp_path / "in"),
        str(tmp_path / "out"),
        "-q",
        "--home",
        str(tmp_path / "home"),
        check=True,
    )

    assert {p.suffix for p in (tmp_path / "out").rglob("*") if p.is_file()} == {".dcm"}
    report = next((tmp_path / "home" / "runs").glob("*.jsonl"))
    assert os.stat(report).st_mode & 0o777 == 0o600
    assert "DOE_JOHN" in json.loads(report.read_text().splitlines()[0])["source"]


def test_a_site_allowlist_keeps_its_private_attribute(tmp_path: Path) -> None:
    source = write_ct(tmp_path / "in" / "a.dcm")
    ds = pydicom.dcmread(source)
    ds.private_block(0x0019, "ACME 1.0", create=True).add_new(0x1A, "DS", "2.5")
    ds.private_block(0x0019, "ACME 1.0").add_new(0x1B, "LO", "DOE JOHN")
    ds.save_as(source)
    home = tmp_path / "home"
    home.mkdir()
    allow = tmp_path / "allow.json"
    allow.write_text(
        json.dumps([{"creator": "ACME 1.0", "group": "0019", "element": "1A", "vr": "DS"}])
    )
    (home / "config.toml").write_text(
        f'safe_private_allowlist = "{allow}"\n[deid]\nretain_safe_private = true\n'
    )

    run_cli(
        "node",
        "deid",
        str(tmp_path / "in"),
        str(tmp_path / "out"),
        "-q",
        "--home",
        str(home),
        check=True,
    )

    out = pydicom.dcmread(next((tmp_path / "out").rglob("*.dcm")))
    assert out.private_block(0x0019, "ACME 1.0")[0x1A].value == 2.5
    assert (0x0019, 0x101B) not in out


def test_quarantine_is_listed_and_its_source_unsealed_on_request(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "DOE_JOHN_notes.txt").write_text("not DICOM")
    home = str(tmp_path / "home")
    run_cli("node", "ingest", str(tmp_path / "in"), "--home", home, "-q", check=True)

    listed = run_cli("node", "quarantine", "list", "--home", home, check=True)
    source = run_cli(
        "node", "quarantine", "source", "1", "--reason", "locate it", "--home", home, check=True
    )
    verified = run_cli("node", "audit", "verify", "--home", home, check=True)

    assert "not_dicom" in listed.stdout and "DOE_JOHN" not in listed.stdout
    assert source.stdout.strip().endswith("DOE_JOHN_notes.txt")
    assert "audit log intact: 2 entries" in verified.stdout  # the quarantine and the read


def test_the_coordinator_certificate_is_renewed_for_its_names_and_loopback_stays_in(
    tmp_path: Path,
) -> None:
    # Prepare
    from cryptography import x509

    home = tmp_path / "coordinator"
    run_cli("coordinator", "init", "--home", str(home), "--server-name", "a.example", check=True)
    first = x509.load_pem_x509_certificate((home / "pki" / "server.crt").read_bytes())
    ca_before = (home / "pki" / "ca.crt").read_bytes()

    # Execute
    renewed = run_cli(
        "coordinator", "tls", "renew", "--home", str(home), "--server-name", "b.example"
    )
    cert = x509.load_pem_x509_certificate((home / "pki" / "server.crt").read_bytes())
    verified = run_cli("coordinator", "audit", "verify", "--home", str(home))

    # Assert: the names asked for first, loopback kept (the coordinator's own Flower
    # client dials it), a new key, the same CA, and the renewal in the audit chain.
    def names(c: x509.Certificate) -> list[str]:
        san = c.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        return [str(n.value) for n in san]

    assert renewed.returncode == 0, renewed.stderr
    assert names(first) == ["a.example", "localhost", "127.0.0.1"]
    assert names(cert) == ["b.example", "localhost", "127.0.0.1"]
    assert cert.public_key() != first.public_key()
    assert (home / "pki" / "ca.crt").read_bytes() == ca_before
    assert oct((home / "pki" / "server.key").stat().st_mode & 0o777) == "0o600"
    assert verified.returncode == 0, verified.stdout + verified.stderr
    with sqlite3.connect(home / "registry.sqlite") as db:
        actions = [a for (a,) in db.execute("SELECT action FROM audit_log ORDER BY seq")]
    assert actions[-1] == "tls.renew"
    assert "restart the coordinator" in renewed.stdout
