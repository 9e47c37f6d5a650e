"""``radfed node training …``: the site's training policy and its decisions on runs."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from node.errors import NodeError
from node.settings import NodeSettings, load_settings

if TYPE_CHECKING:
    from node.index.db import Database

# The index, alembic and SQLAlchemy load only when a command runs: `radfed` starts
# for every command, and most never touch training.

app = typer.Typer(help="Federated training on this site: policy and runs.", no_args_is_help=True)
out = Console()
err = Console(stderr=True)
HomeOption = Annotated[
    Path | None, typer.Option(help="Node home (default RADFED_NODE_HOME or ~/.radfed/node).")
]


def _fail(message: str) -> typer.Exit:
    err.print(f"[bold red]error:[/] {message}")
    return typer.Exit(2)


def _settings(home: Path | None) -> NodeSettings:
    try:
        return load_settings(home)
    except ValueError as exc:
        raise _fail(f"invalid node settings: {exc}") from exc


def _db(settings: NodeSettings) -> Database:
    from node.site import open_index

    return open_index(settings).db


@app.command("policy")
def policy(
    allow: Annotated[
        list[str] | None, typer.Option(help="Add an app bundle SHA-256 to the allowed list.")
    ] = None,
    disallow: Annotated[
        list[str] | None, typer.Option(help="Remove an app bundle SHA-256 from the list.")
    ] = None,
    manual_approval: Annotated[
        bool | None,
        typer.Option("--manual-approval/--no-manual-approval", help="Runs wait for an operator."),
    ] = None,
    eligible: Annotated[
        str | None, typer.Option(help='"approved" or "shared": the exams runs may read.')
    ] = None,
    home: HomeOption = None,
) -> None:
    """Show the training policy, or change it (validated whole; audited)."""
    from node.index import audit
    from node.training.policy import TrainingPolicy

    settings = _settings(home)
    try:
        before = TrainingPolicy.load(settings.training_policy_path)
        if allow or disallow or manual_approval is not None or eligible is not None:
            data = before.model_dump()
            data["apps"] = [
                a for a in data["apps"] + list(allow or []) if a not in (disallow or [])
            ]
            if manual_approval is not None:
                data["manual_approval"] = manual_approval
            if eligible is not None:
                data["eligible"] = eligible
            try:
                after = TrainingPolicy.model_validate(data)
            except ValueError as exc:
                raise _fail(f"the policy was not changed: {exc}") from exc
            after.save(settings.training_policy_path)
            db = _db(settings)
            with db.write() as session:
                audit.append(
                    session,
                    "cli",
                    "training.policy",
                    str(settings.training_policy_path),
                    before=before.model_dump(),
                    after=after.model_dump(),
                )
            before = after
    except NodeError as exc:
        raise _fail(exc.message) from exc
    out.print(f"# {settings.training_policy_path}")
    out.print(before.to_toml(), highlight=False, end="")


@app.command("runs")
def list_runs(home: HomeOption = None) -> None:
    """The runs this site was asked to join, and what it decided."""
    from node.training import runs

    settings = _settings(home)
    table = Table("run", "status", "decided by", "app", "samples", "rounds", "reason")
    for view in runs.list_runs(_db(settings)):
        table.add_row(
            view.run,
            view.status,
            view.decided_by,
            view.app_hash[:12],
            str(view.samples),
            str(view.rounds),
            view.reason,
        )
    out.print(table)


@app.command("approve")
def approve(
    run: str,
    reason: Annotated[str, typer.Option(help="Why (kept in the audit log).")] = "",
    home: HomeOption = None,
) -> None:
    """Let a run train here (it need not have arrived yet)."""
    from node.training import runs

    try:
        view = runs.decide(_db(_settings(home)), run, True, "cli", reason)
    except NodeError as exc:
        raise _fail(exc.message) from exc
    out.print(f"{view.run}: {view.status}")


@app.command("decline")
def decline(
    run: str,
    reason: Annotated[str, typer.Option(help="Why (kept in the audit log).")] = "",
    home: HomeOption = None,
) -> None:
    """Keep a run from training here."""
    from node.training import runs

    try:
        view = runs.decide(_db(_settings(home)), run, False, "cli", reason)
    except NodeError as exc:
        raise _fail(exc.message) from exc
    out.print(f"{view.run}: {view.status}")
