"""``radfed node …``: the commands a site runs on its node."""

from __future__ import annotations

import os
import time
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

from node.deid import keys
from node.deid.runner import EngineConfig, FileOutcome, RunSummary, count_files, run
from node.deid.vault import Vault
from node.settings import load_settings
from protocols.deid.options import DeidOptionsError
from protocols.deid.safe_private import DEFAULT_SAFE_PRIVATE, SafePrivateError, load_allowlist

app = typer.Typer(
    help="The site's node: de-identify, index, vet and share exams.", no_args_is_help=True
)
out = Console()
err = Console(stderr=True)


def _fail(message: str, code: int = 2) -> typer.Exit:
    err.print(f"[bold red]error:[/] {message}")
    return typer.Exit(code)


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
    jobs: Annotated[
        int, typer.Option("--jobs", "-j", help="Worker processes (0: all cores).", min=0)
    ] = 0,
    home: Annotated[
        Path | None, typer.Option(help="Node home (default RADFED_NODE_HOME or ~/.radfed/node).")
    ] = None,
    report: Annotated[
        Path | None, typer.Option(help="Per-file report (JSON Lines; default in the node home).")
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """De-identify SRC into DST/<pseudonym>/<study>/<series>/<instance>.dcm.

    Exit status 0 when every readable DICOM file was written (unreadable files are
    quarantined and listed); 1 when some readable files could not be written.
    """
    if not src.exists():
        raise _fail(f'Argument "src": {src} does not exist.')
    if src.resolve() == dst.resolve():
        raise _fail('Argument "dst" must differ from "src": input is never modified.')
    try:
        settings = load_settings(home)
        options = settings.deid
        if basic:
            options = options.basic()
        options = options.with_settings(option or [])
    except DeidOptionsError as exc:
        raise _fail(str(exc)) from exc
    except ValueError as exc:
        raise _fail(f"invalid node settings: {exc}") from exc
    try:
        secret = keys.site_secret(settings.keys_dir, site_secret_file)
        vault_key = keys.vault_key(settings.keys_dir)
    except keys.KeyFileError as exc:
        raise _fail(str(exc)) from exc
    safe_private = DEFAULT_SAFE_PRIVATE
    if settings.safe_private_allowlist is not None:
        try:
            safe_private = load_allowlist(settings.safe_private_allowlist)
        except SafePrivateError as exc:
            raise _fail(str(exc)) from exc
    config = EngineConfig(
        options=options,
        secret=secret,
        site_prefix=settings.site_id,
        shift_min_days=settings.date_shift_min_days,
        shift_max_days=settings.date_shift_max_days,
        safe_private=safe_private,
    )
    workers = jobs or os.cpu_count() or 1
    stamp = time.strftime("%Y%m%dT%H%M%S")
    report_path = report or settings.runs_dir / f"deid-{stamp}-{os.getpid()}.jsonl"
    vault = Vault(settings.vault_path, vault_key)

    total = count_files([src], exclude=dst)
    progress = Progress(
        TextColumn("[bold]de-identifying"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[rate]:>8.1f} files/s"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err,
        disable=quiet,
    )
    task = progress.add_task("deid", total=total, rate=0.0)
    started = time.perf_counter()

    def on_progress(_: FileOutcome) -> None:
        elapsed = max(time.perf_counter() - started, 1e-6)
        done = progress.tasks[0].completed + 1
        progress.update(task, advance=1, rate=done / elapsed)

    with progress:
        summary = run([src], dst, config, workers, vault, report_path, on_progress)
    print_summary(summary, dst, workers)
    if not summary.ok:
        err.print(
            f"[bold red]{summary.failed} readable file(s) were not written[/] — see {report_path}"
        )
        raise typer.Exit(1)


def print_summary(summary: RunSummary, dst: Path, workers: int) -> None:
    """The closing summary of a de-identification run."""
    table = Table(title="De-identification summary", show_header=False, box=None)
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
    for title, reasons in (
        ("quarantined", summary.quarantine_reasons),
        ("failed", summary.failure_reasons),
    ):
        for code, count in reasons.most_common():
            out.print(f"  {title}: {count} × {code} — e.g. {summary.examples.get(code, '')}")
