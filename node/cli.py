"""``radfed node …``: the commands a site runs on its node."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

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
from node.site import engine_config, open_index, open_vault
from protocols.deid.options import DeidOptionsError

app = typer.Typer(
    help="The site's node: de-identify, index, vet and share exams.", no_args_is_help=True
)
token_app = typer.Typer(help="API tokens of the node's operators.", no_args_is_help=True)
audit_app = typer.Typer(help="The node's hash-chained audit log.", no_args_is_help=True)
quarantine_app = typer.Typer(help="Files the node could not take in.", no_args_is_help=True)
app.add_typer(token_app, name="token")
app.add_typer(audit_app, name="audit")
app.add_typer(quarantine_app, name="quarantine")
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
    if not result.run.ok:
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


@token_app.command("create")
def token_create(
    name: Annotated[str, typer.Argument(help="Who or what the token is for.")],
    role: Annotated[str, typer.Option(help="Role: operator.")] = "operator",
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
