"""The ``radfed demo`` command: options, the run, the summary, and ``--keep-running``."""

from __future__ import annotations

import os
import signal
import tempfile
import threading
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

app = typer.Typer(help="Run the whole flow on one machine with synthetic data.")
out = Console()


@app.callback(invoke_without_command=True)
def demo(
    ctx: typer.Context,
    workdir: Annotated[
        Path | None,
        typer.Option(help="Working directory, new or empty (default: a fresh temporary one)."),
    ] = None,
    patients: Annotated[int, typer.Option(min=1, help="PACS-export patients per site.")] = 3,
    ct_slices: Annotated[int, typer.Option(min=1, help="Slices per CT series.")] = 16,
    cohort: Annotated[
        int, typer.Option(min=4, help="Labelled chest radiographs per site (for training).")
    ] = 28,
    rounds: Annotated[int, typer.Option(min=1, help="Federated training rounds.")] = 3,
    jobs: Annotated[int, typer.Option(min=0, help="Ingest worker processes (0: all cores).")] = 0,
    keep_running: Annotated[
        bool,
        typer.Option(help="Leave the coordinator and nodes up to browse, until Ctrl-C."),
    ] = False,
) -> None:
    """A coordinator and two sites on this machine: ingest, de-identify, vet, review, share,
    register, release v1.0 and train a model across the sites; then a summary."""
    if ctx.invoked_subcommand is not None:
        return
    from radfed.demo.flow import DemoConfig, DemoError, Federation, run_demo
    from radfed.demo.summary import collect, render, save

    base = workdir or Path(tempfile.mkdtemp(prefix="radfed-demo-"))
    if base.exists() and any(base.iterdir()):
        out.print(f'[bold red]error:[/] Option "--workdir": {base} is not empty.')
        raise typer.Exit(2)
    config = DemoConfig(
        workdir=base,
        patients=patients,
        ct_slices=ct_slices,
        cohort=cohort,
        rounds=rounds,
        jobs=jobs,
    )
    out.rule("[bold]RadFed demo")
    out.print(f"working directory: {base} (service logs in {base / 'logs'})")

    def report(fed: Federation) -> None:
        summary = collect(fed)
        save(summary, base / "summary.json")
        render(summary, out)
        out.print(f"summary saved to {base / 'summary.json'}")

    def keep(fed: Federation) -> None:
        credentials = base / "credentials.txt"
        lines = [
            f"coordinator UI {fed.url}: sign in with the operator token {fed.operator_token}",
            f"  researcher token: {fed.researcher_token}",
            *(f"node {s.name} UI {s.url}: user demo, password {s.ui_password}" for s in fed.sites),
        ]
        credentials.write_text("\n".join(lines) + "\n", encoding="utf-8")
        os.chmod(credentials, 0o600)
        out.rule("[bold]Running")
        for line in lines:
            out.print(line, highlight=False)
        out.print(f"(also in {credentials}, readable only by you) — press Ctrl-C to stop")
        _wait_for_interrupt()

    try:
        run_demo(config, out, report, keep if keep_running else None)
    except DemoError as exc:
        out.print(f"[bold red]demo failed:[/] {exc}")
        raise typer.Exit(1) from exc
    except KeyboardInterrupt:
        out.print("interrupted: everything the demo started was stopped")
        raise typer.Exit(130) from None
    out.print("[green]everything the demo started was stopped[/]")


def _wait_for_interrupt() -> None:
    """Block until SIGINT (Ctrl-C) or SIGTERM.

    Both handlers are set here: a process started with SIGINT ignored (by a
    supervisor, a CI runner, ``nohup``) would otherwise never see Ctrl-C.
    """
    done = threading.Event()
    previous = {
        sig: signal.signal(sig, lambda *_: done.set()) for sig in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        while not done.wait(1.0):
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
