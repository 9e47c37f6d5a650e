"""``radfed node …``: the commands a site runs on its node."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from node.deid.runner import FileOutcome, RunSummary, count_files, run
from node.errors import NodeError
from node.settings import NodeSettings, load_settings
from node.site import engine_config, open_index, open_vault, safe_private
from node.training.cli import app as training_app
from protocols.deid.options import DeidOptionsError

app = typer.Typer(
    help="The site's node: de-identify, index, vet and share exams.", no_args_is_help=True
)
token_app = typer.Typer(help="API tokens of the node's operators.", no_args_is_help=True)
audit_app = typer.Typer(help="The node's hash-chained audit log.", no_args_is_help=True)
quarantine_app = typer.Typer(help="Files the node could not take in.", no_args_is_help=True)
user_app = typer.Typer(help="People who log in to the node's web UI.", no_args_is_help=True)
labels_app = typer.Typer(help="Expert labels (RICORD) from CSV.", no_args_is_help=True)
clinical_app = typer.Typer(help="Clinical variables from CSV.", no_args_is_help=True)
seg_app = typer.Typer(help="CT segmentation masks as DICOM SEG.", no_args_is_help=True)
app.add_typer(labels_app, name="labels")
app.add_typer(clinical_app, name="clinical")
app.add_typer(seg_app, name="seg")
app.add_typer(token_app, name="token")
app.add_typer(user_app, name="user")
app.add_typer(audit_app, name="audit")
app.add_typer(quarantine_app, name="quarantine")
app.add_typer(training_app, name="training")
out = Console()
err = Console(stderr=True)

HomeOption = Annotated[
    Path | None, typer.Option(help="Node home (default RADFED_NODE_HOME or ~/.radfed/node).")
]
JobsOption = Annotated[
    int, typer.Option("--jobs", "-j", help="Worker processes (0: all cores).", min=0)
]
QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")]


def _fail(message: str, code: int = 2) -> typer.Exit:
    err.print(f"[bold red]error:[/] {message}")
    return typer.Exit(code)


def _settings(home: Path | None) -> NodeSettings:
    try:
        return load_settings(home)
    except ValueError as exc:
        raise _fail(f"invalid node settings: {exc}") from exc


@contextmanager
def _progress(label: str, total: int, quiet: bool) -> Iterator[Callable[[FileOutcome], None]]:
    """A progress bar with the rate; yields the per-file callback."""
    progress = Progress(
        TextColumn(f"[bold]{label}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[rate]:>8.1f} files/s"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err,
        disable=quiet,
    )
    task = progress.add_task(label, total=total, rate=0.0)
    started = time.perf_counter()

    def advance(_: FileOutcome) -> None:
        done = progress.tasks[0].completed + 1
        progress.update(task, advance=1, rate=done / max(time.perf_counter() - started, 1e-6))

    with progress:
        yield advance


def _report_path(settings: NodeSettings, kind: str, given: Path | None) -> Path:
    stamp = time.strftime("%Y%m%dT%H%M%S")
    return given or settings.runs_dir / f"{kind}-{stamp}-{os.getpid()}.jsonl"


@app.command()
def deid(
    src: Annotated[Path, typer.Argument(help="A DICOM file or a folder (searched recursively).")],
    dst: Annotated[Path, typer.Argument(help="Output folder for the de-identified tree.")],
    site_secret_file: Annotated[
        Path | None,
        typer.Option(help="Pseudonymisation secret (default: created in the node home)."),
    ] = None,
    option: Annotated[
        list[str] | None,
        typer.Option(
            "--option",
            "-o",
            help="Profile option NAME, NAME=on or NAME=off (repeatable), e.g. "
            "retain-device-identity, clean-graphics=on, retain-patient-characteristics=off.",
        ),
    ] = None,
    basic: Annotated[
        bool, typer.Option("--basic", help="Start from the Basic Profile: every option off.")
    ] = False,
    jobs: JobsOption = 0,
    home: HomeOption = None,
    report: Annotated[
        Path | None, typer.Option(help="Per-file report (JSON Lines; default in the node home).")
    ] = None,
    quiet: QuietOption = False,
) -> None:
    """De-identify SRC into DST/<pseudonym>/<study>/<series>/<instance>.dcm.

    Exit status 0 when every readable DICOM file was written (unreadable files are
    quarantined and listed); 1 when some readable files could not be written.
    """
    if not src.exists():
        raise _fail(f'Argument "src": {src} does not exist.')
    if src.resolve() == dst.resolve():
        raise _fail('Argument "dst" must differ from "src": input is never modified.')
    settings = _settings(home)
    try:
        options = settings.deid.basic() if basic else settings.deid
        options = options.with_settings(option or [])
        config = engine_config(settings, options, site_secret_file)
        vault = open_vault(settings)
    except DeidOptionsError as exc:
        raise _fail(str(exc)) from exc
    except NodeError as exc:
        raise _fail(exc.message) from exc
    workers = jobs or os.cpu_count() or 1
    report_path = _report_path(settings, "deid", report)
    with _progress("de-identifying", count_files([src], exclude=dst), quiet) as advance:
        summary = run([src], dst, config, workers, vault, report_path, advance)
    print_summary(summary, dst, workers)
    if not summary.ok:
        err.print(
            f"[bold red]{summary.failed} readable file(s) were not written[/] — see {report_path}"
        )
        raise typer.Exit(1)


@app.command()
def ingest(
    paths: Annotated[list[Path], typer.Argument(help="DICOM files or folders (recursive).")],
    jobs: JobsOption = 0,
    home: HomeOption = None,
    quiet: QuietOption = False,
    vetting: Annotated[
        bool, typer.Option("--vet/--no-vet", help="Vet the new studies afterwards.")
    ] = True,
) -> None:
    """De-identify and index PATHS into the node: idempotent, safe to interrupt.

    Exit status 0 when every readable DICOM file was taken in (unreadable files are
    quarantined with their reason); 1 when some readable files could not be.
    """
    from node.intake.ingest import ingest as take_in

    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise _fail(f'Argument "paths": {", ".join(missing)} does not exist.')
    settings = _settings(home)
    try:
        config = engine_config(settings)
        index = open_index(settings)
    except NodeError as exc:
        raise _fail(exc.message) from exc
    workers = jobs or settings.ingest_jobs or os.cpu_count() or 1
    report_path = _report_path(settings, "ingest", None)
    total = count_files(paths, exclude=settings.store_dir)
    with _progress("ingesting", total, quiet) as advance:
        result = take_in(paths, settings, index, config, workers, report_path, advance)
    print_summary(
        result.run, settings.store_dir, workers, title="Ingest summary (de-identification + index)"
    )
    recorded = result.recorded
    out.print(
        f"  index: {recorded.instances} new instance(s), {recorded.unchanged} already indexed, "
        f"{len(recorded.studies_created)} new stud(ies), {recorded.quarantined} new quarantine "
        "entr(ies)"
    )
    counts = index.counts()
    out.print(
        f"  node now holds {counts.instances} instance(s) in {counts.studies} stud(ies); "
        f"{counts.quarantined} quarantined"
    )
    if vetting:
        vet(home=home)
    if not result.run.ok:
        raise typer.Exit(1)


@app.command()
def vet(home: HomeOption = None) -> None:
    """Vet every study waiting: PHI scan, burned-in text, then approve by policy or hold."""
    from node.vetting.policy import VettingPolicy
    from node.vetting.vet import vet_pending

    settings = _settings(home)
    try:
        index = open_index(settings)
        policy = VettingPolicy.load(settings.policy_path)
        total = vet_pending(index, settings, policy, settings.deid, limit=1_000_000)
    except NodeError as exc:
        raise _fail(exc.message) from exc
    out.print(
        f"vetted {total.studies} stud(ies): {total.approved} approved by policy, "
        f"{total.held} held for review, {total.findings} finding(s), {total.masked} masked"
    )


@app.command()
def scan(
    path: Annotated[Path, typer.Argument(help="A de-identified DICOM file or folder.")],
    fail_on: Annotated[
        str,
        typer.Option(help="Exit 1 on a finding at or above: info, low, medium, high, critical."),
    ] = "medium",
    originals: Annotated[
        bool, typer.Option(help="Also look for the originals this node keeps in its vault.")
    ] = True,
    home: HomeOption = None,
) -> None:
    """Scan de-identified DICOM for residual PHI; print every finding with where it is."""
    from node.deid.runner import iter_files
    from node.index.originals import original_identifiers
    from protocols.phi.findings import Severity
    from protocols.phi.scanner import Originals
    from protocols.phi.scanner import scan as scan_file

    try:
        threshold = Severity.parse(fail_on)
    except ValueError as exc:
        raise _fail(f'Option "--fail-on": {exc}') from exc
    if not path.exists():
        raise _fail(f'Argument "path": {path} does not exist.')
    settings = _settings(home)
    files = list(iter_files(path))
    known = None
    if originals:
        import pydicom

        try:
            index = open_index(settings)
        except NodeError as exc:
            raise _fail(exc.message) from exc
        uids = []
        for file in files:
            try:
                uids.append(str(pydicom.dcmread(file, stop_before_pixels=True).SOPInstanceUID))
            except Exception:  # noqa: S112 - unreadable files are findings of their own below
                continue
        records = original_identifiers(index, uids, actor="cli", purpose="radfed node scan")
        known = Originals.from_records(records.values()) if records else None
    worst = Severity.INFO
    shown = 0
    for file in files:
        for finding in scan_file(
            file,
            settings.deid,
            site_prefix=settings.site_id,
            originals=known,
            safe_private=safe_private(settings),
        ):
            shown += 1
            worst = max(worst, finding.severity)
            out.print(
                f"[{finding.severity.name.lower()}] {file}: {finding.kind} at "
                f"{finding.location}: {finding.message}"
                + (f" ({finding.excerpt})" if finding.excerpt else "")
            )
    out.print(f"{len(files)} file(s) scanned, {shown} finding(s)")
    if shown and worst >= threshold:
        raise typer.Exit(1)


@app.command()
def serve(
    home: HomeOption = None,
    api_port: Annotated[int | None, typer.Option(help="HTTP port (default 8080).")] = None,
    dicom_port: Annotated[int | None, typer.Option(help="DICOM port (default 11112).")] = None,
) -> None:
    """Run the node: the HTTP API and web UI, and the DICOM listener (C-STORE, C-ECHO)."""
    from node.serve import serve as run_node

    overrides: dict[str, int] = {}
    if api_port is not None:
        overrides["api_port"] = api_port
    if dicom_port is not None:
        overrides["dicom_port"] = dicom_port
    try:
        settings = load_settings(home, **overrides)
        run_node(settings)
    except ValueError as exc:
        raise _fail(f"invalid node settings: {exc}") from exc
    except NodeError as exc:
        raise _fail(exc.message) from exc


@app.command()
def enroll(
    url: Annotated[str, typer.Argument(help="The coordinator, e.g. https://coordinator:8443.")],
    token: Annotated[str, typer.Argument(help="The one-time token `site add` printed.")],
    home: HomeOption = None,
) -> None:
    """Join a federation: make this node's key, get its certificate from the coordinator."""
    from node import federation

    settings = _settings(home)
    try:
        done = federation.enroll(settings, url, token)
    except NodeError as exc:
        raise _fail(exc.message) from exc
    out.print(
        f"enrolled as site {done.site}; key and certificates in {federation.files(settings).root}"
    )


@app.command()
def heartbeat(home: HomeOption = None) -> None:
    """Report to the coordinator now (serve does it every `heartbeat_seconds`)."""
    from node import federation

    settings = _settings(home)
    try:
        index = open_index(settings)
        with federation.CoordinatorClient(settings) as client:
            federation.send_heartbeat(client, index.counts().by_status, None)
    except NodeError as exc:
        raise _fail(exc.message) from exc
    out.print("heartbeat delivered")


def _sender(settings: NodeSettings) -> Any:
    from node import federation
    from node.share.outbox import Sender
    from node.vetting.policy import VettingPolicy

    index = open_index(settings)
    policy = VettingPolicy.load(settings.policy_path)
    return Sender(index, settings, lambda: federation.CoordinatorClient(settings), lambda: policy)


@app.command()
def share(home: HomeOption = None) -> None:
    """Send now: queue every approved study, then send everything queued (retries too).

    Exit 0 when everything sent was registered; 1 when something was held, failed
    or will be retried (each is listed with its reason).
    """
    settings = _settings(home)
    try:
        sender = _sender(settings)
        outcomes = sender.run_once(everything=True)
    except NodeError as exc:
        raise _fail(exc.message) from exc
    finally:
        if "sender" in locals():
            sender.stop()
    table = Table("study", "what", "outcome", "detail")
    for outcome in outcomes:
        table.add_row(outcome.study_uid, outcome.kind, outcome.state, outcome.detail)
    out.print(table if outcomes else "nothing to send")
    if any(o.state not in ("shared", "done", "skipped") for o in outcomes):
        raise typer.Exit(1)


@app.command()
def withdraw(
    study: Annotated[str, typer.Argument(help="The de-identified Study Instance UID.")],
    reason: Annotated[str, typer.Option(help="Why (kept here and at the coordinator).")] = "",
    home: HomeOption = None,
) -> None:
    """Withdraw a study: never shared from now on; the coordinator is told (queued if away)."""
    from node.share import outbox

    settings = _settings(home)
    try:
        index = open_index(settings)
        tell = outbox.withdraw(index, study, reason or "withdrawn by the site", actor="cli")
    except NodeError as exc:
        raise _fail(exc.message) from exc
    if not tell:
        out.print(f"study {study} withdrawn (it never left this node)")
        return
    from node import federation

    if not federation.enrolled(settings):
        out.print(f"study {study} withdrawn; the coordinator will be told once enrolled")
        return
    sender = _sender(settings)
    try:
        results = [o for o in sender.run_once(everything=True) if o.study_uid == study]
    finally:
        sender.stop()
    told = any(o.kind == "withdrawal" and o.state == "done" for o in results)
    out.print(
        f"study {study} withdrawn; "
        + ("the coordinator was told" if told else "the coordinator will be told (queued)")
    )


@app.command()
def doctor(home: HomeOption = None) -> None:
    """Check the way to the coordinator: DNS, TCP, TLS, certificate, clock, proxy, protocol, disk.

    Exit 0 when every check passed, 1 otherwise (each failure says how to fix it).
    """
    from node import doctor as checks

    settings = _settings(home)
    results = checks.run(settings)
    for check in results:
        if check.skipped:
            mark = "[dim]  -[/dim]"
        else:
            mark = "[green] ok[/green]" if check.ok else "[red]FAIL[/red]"
        out.print(f"{mark}  {check.name}: {check.detail}", highlight=False)
        if not check.ok and check.fix:
            out.print(f"      fix: {check.fix}", highlight=False)
    if not all(c.ok for c in results):
        raise typer.Exit(1)


@token_app.command("create")
def token_create(
    name: Annotated[str, typer.Argument(help="Who or what the token is for.")],
    role: Annotated[
        str, typer.Option(help="Role: operator (everything) or reviewer (approve, reject).")
    ] = "operator",
    home: HomeOption = None,
) -> None:
    """Create an API token and print it (only its hash is kept: this is the one time)."""
    settings = _settings(home)
    try:
        token = open_index(settings).create_token(name, role, actor="cli")
    except NodeError as exc:
        raise _fail(exc.message) from exc
    typer.echo(token)


@token_app.command("revoke")
def token_revoke(name: str, home: HomeOption = None) -> None:
    """Revoke an API token by name."""
    settings = _settings(home)
    try:
        open_index(settings).revoke_token(name, actor="cli")
    except NodeError as exc:
        raise _fail(exc.message) from exc
    out.print(f"token {name} revoked")


@audit_app.command("verify")
def audit_verify(home: HomeOption = None) -> None:
    """Recompute the audit chain; name the first broken entry (exit 1) or say it holds."""
    from node.index import audit

    settings = _settings(home)
    try:
        index = open_index(settings)
    except NodeError as exc:
        raise _fail(exc.message) from exc
    with index.db.read() as session:
        result = audit.verify(session)
    if result.ok:
        out.print(f"audit log intact: {result.entries} entries")
        return
    err.print(f"[bold red]audit log broken at entry {result.broken_at}:[/] {result.reason}")
    raise typer.Exit(1)


@user_app.command("create")
def user_create(
    name: Annotated[str, typer.Argument(help="Login name.")],
    role: Annotated[str, typer.Option(help="reviewer or operator.")] = "reviewer",
    password_file: Annotated[
        Path | None, typer.Option(help="Read the password from this file (else prompt).")
    ] = None,
    home: HomeOption = None,
) -> None:
    """Create a web UI user (the password is stored as a scrypt hash)."""
    from node.index.users import create_user

    settings = _settings(home)
    if password_file is not None:
        password = password_file.read_text(encoding="utf-8").strip()
    else:
        password = typer.prompt("Password", hide_input=True, confirmation_prompt=True)
    try:
        create_user(open_index(settings), name, role, password, actor="cli")
    except NodeError as exc:
        raise _fail(exc.message) from exc
    out.print(f"user {name} ({role}) created")


@user_app.command("disable")
def user_disable(name: str, home: HomeOption = None) -> None:
    """Disable a web UI user."""
    from node.index.users import disable_user

    try:
        disable_user(open_index(_settings(home)), name, actor="cli")
    except NodeError as exc:
        raise _fail(exc.message) from exc
    out.print(f"user {name} disabled")


def _print_import(report: Any) -> None:
    """An import report: what was applied and every row or column it could not use."""
    state = "applied" if report.applied else "[bold red]nothing written[/]"
    out.print(
        f"{report.kind} import ({report.key}): {report.rows} row(s), {report.matched} matched, "
        f"{report.studies} stud(ies), {report.values} value(s) — {state}"
    )
    for item in report.unmatched:
        out.print(f"  row {item.row}: unmatched {item.key} — {item.reason}")
    for item in report.unparseable:
        out.print(f"  row {item.row}, {item.column}: {item.reason}")
    for item in report.ignored_columns:
        out.print(f"  column {item.column!r} ignored — {item.reason}")
    for obj in report.objects:
        out.print(
            f"  SEG {obj.sop_instance_uid}: {', '.join(obj.segments)}, {obj.frames} "
            f"frame(s), {obj.status}"
        )


def _run_import(home: Path | None, run: Callable[[Any, NodeSettings], Any]) -> None:
    settings = _settings(home)
    try:
        report = run(open_index(settings), settings)
    except NodeError as exc:
        raise _fail(exc.message) from exc
    _print_import(report)
    if not report.applied:
        raise typer.Exit(1)


@labels_app.command("import")
def labels_import(
    csv_path: Annotated[Path, typer.Argument(help="CSV keyed by accession_number or mrn.")],
    home: HomeOption = None,
) -> None:
    """Import appearance labels and airspace-disease grading (nothing half-imported)."""
    from node.annotations.importer import import_labels

    _run_import(home, lambda index, _: import_labels(index, csv_path, actor="cli"))


@clinical_app.command("import")
def clinical_import(
    csv_path: Annotated[Path, typer.Argument(help="CSV keyed by accession_number or mrn.")],
    home: HomeOption = None,
) -> None:
    """Import clinical variables, de-identified with the site's map (dates shifted)."""
    from node.annotations.importer import import_clinical

    _run_import(
        home, lambda index, settings: import_clinical(index, csv_path, "cli", settings.deid)
    )


@seg_app.command("import")
def seg_import(
    manifest: Annotated[Path, typer.Argument(help="CSV: sop_instance_uid, mask, label.")],
    home: HomeOption = None,
) -> None:
    """Build DICOM SEG objects referencing the de-identified CT images, store and index them."""
    from node.annotations.seg import import_segmentations

    _run_import(
        home, lambda index, settings: import_segmentations(index, settings, manifest, "cli")
    )


@quarantine_app.command("list")
def quarantine_list(
    home: HomeOption = None,
    limit: Annotated[int, typer.Option(min=1, max=500)] = 50,
    offset: Annotated[int, typer.Option(min=0)] = 0,
) -> None:
    """The newest quarantine entries with their reasons (sources stay sealed)."""
    settings = _settings(home)
    page = open_index(settings).quarantine(limit, offset)
    table = Table(title=f"Quarantine ({page.total} entries)")
    for column in ("id", "at", "code", "via", "reason"):
        table.add_column(column)
    for entry in page.items:
        table.add_row(
            str(entry.id),
            f"{entry.at:%Y-%m-%d %H:%M}",
            entry.code,
            entry.source_kind,
            entry.message,
        )
    out.print(table)


@quarantine_app.command("source")
def quarantine_source(
    entry: Annotated[int, typer.Argument(help="Quarantine entry id (see `quarantine list`).")],
    reason: Annotated[str, typer.Option(help="Why you need it (recorded in the audit log).")],
    home: HomeOption = None,
) -> None:
    """Unseal where a quarantined file came from. The read is audited."""
    from node.index.originals import quarantine_source as unseal

    settings = _settings(home)
    try:
        typer.echo(unseal(open_index(settings), entry, actor="cli", purpose=reason))
    except NodeError as exc:
        raise _fail(exc.message) from exc


def print_summary(
    summary: RunSummary, dst: Path, workers: int, title: str = "De-identification summary"
) -> None:
    """The closing summary of a de-identification or ingest run."""
    table = Table(title=title, show_header=False, box=None)
    table.add_row("files seen", str(summary.seen))
    table.add_row("written", str(summary.written))
    table.add_row("already present (identical)", str(summary.unchanged))
    table.add_row("flagged for burned-in risk", str(summary.flagged))
    table.add_row("quarantined (unreadable)", str(summary.quarantined))
    table.add_row("failed (readable, not written)", str(summary.failed))
    rate = summary.seen / summary.seconds if summary.seconds else 0.0
    mb = summary.bytes_in / 1e6
    table.add_row(
        "time", f"{summary.seconds:.1f} s, {rate:.1f} files/s, {mb:.1f} MB, {workers} worker(s)"
    )
    table.add_row("output", str(dst))
    table.add_row("report", str(summary.report_path))
    out.print(table)
    for heading, reasons in (
        ("quarantined", summary.quarantine_reasons),
        ("failed", summary.failure_reasons),
    ):
        for code, count in reasons.most_common():
            out.print(f"  {heading}: {count} × {code} — e.g. {summary.examples.get(code, '')}")
