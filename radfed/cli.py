"""The ``radfed`` command: mounts the node, coordinator, train and demo groups."""

from __future__ import annotations

import typer

from coordinator.cli import app as coordinator_app
from node.cli import app as node_app
from radfed import __version__
from radfed.demo.cli import app as demo_app
from radfed.train import app as train_app

app = typer.Typer(
    help="RadFed: a federated edge-node appliance for open radiology databases.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(node_app, name="node")
app.add_typer(coordinator_app, name="coordinator")
app.add_typer(train_app, name="train")
app.add_typer(demo_app, name="demo")


@app.command()
def version() -> None:
    """Print the RadFed version."""
    typer.echo(__version__)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
