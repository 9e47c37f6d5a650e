"""``radfed train …``: federated training runs for researchers (lands with its issue)."""

from __future__ import annotations

import typer
from rich.console import Console

app = typer.Typer(help="Federated training runs across the sites.")
err = Console(stderr=True)


@app.callback(invoke_without_command=True)
def train(ctx: typer.Context) -> None:
    """Not yet available: federated training lands with its issue."""
    if ctx.invoked_subcommand is None:
        err.print("radfed train: not yet available in this version.")
        raise typer.Exit(2)
