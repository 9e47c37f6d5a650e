"""``radfed coordinator …``: the commands a coordinator operator runs."""

from __future__ import annotations

import typer
from rich.console import Console

app = typer.Typer(help="The coordinator: enrollment, intake, registry, releases.")
err = Console(stderr=True)


@app.callback(invoke_without_command=True)
def coordinator(ctx: typer.Context) -> None:
    """Not yet available: the coordinator service lands with its issue."""
    if ctx.invoked_subcommand is None:
        err.print("radfed coordinator: not yet available in this version.")
        raise typer.Exit(2)
