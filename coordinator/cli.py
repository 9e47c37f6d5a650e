"""``radfed coordinator …``: the commands a coordinator operator runs."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from coordinator.errors import CoordinatorError
from coordinator.settings import CoordinatorSettings, load_settings

if TYPE_CHECKING:
    from coordinator.registry.db import Database

app = typer.Typer(
    help="The coordinator: federation CA, enrollment, intake, registry, releases.",
    no_args_is_help=True,
)
site_app = typer.Typer(help="Sites of the federation.", no_args_is_help=True)
token_app = typer.Typer(help="API tokens of operators and researchers.", no_args_is_help=True)
audit_app = typer.Typer(help="The coordinator's hash-chained audit log.", no_args_is_help=True)
app.add_typer(site_app, name="site")
app.add_typer(token_app, name="token")
app.add_typer(audit_app, name="audit")
out = Console()
err = Console(stderr=True)

HomeOption = Annotated[
    Path | None,
    typer.Option(
        help="Coordinator home (default RADFED_COORDINATOR_HOME or ~/.radfed/coordinator)."
    ),
]


def _fail(message: str, code: int = 2) -> typer.Exit:
    err.print(f"[red]error:[/red] {message}", highlight=False)
    return typer.Exit(code)


def _settings(home: Path | None) -> CoordinatorSettings:
    try:
        return load_settings(home)
    except ValueError as exc:
        raise _fail(f"settings: {exc}") from exc


def _db(settings: CoordinatorSettings) -> Database:
    from coordinator.registry.db import Database

    try:
        return Database.open(settings.db_url)
    except Exception as exc:
        raise _fail(f"cannot open the registry at {settings.db_url}: {exc}") from exc


@app.command()
def init(
    home: HomeOption = None,
    federation: Annotated[str | None, typer.Option(help="Name of the federation.")] = None,
    server_name: Annotated[
        list[str] | None,
        typer.Option(help="A DNS name or IP address nodes reach the coordinator at (repeat)."),
    ] = None,
) -> None:
    """Create the federation: CA key and certificate, server certificate, registry."""
    from coordinator import audit, pki

    settings = _settings(home)
    names = server_name or settings.server_names
    try:
        settings.home.mkdir(parents=True, exist_ok=True, mode=0o700)
        ca = pki.create(pki.Paths(settings.pki_dir), federation or settings.federation, names)
        db = _db(settings)
        with db.write() as session:
            audit.append(
                session,
                "cli",
                "federation.init",
                ca.subject.rfc4514_string(),
                ca=pki.fingerprint(ca),
                server_names=names,
            )
        db.close()
    except CoordinatorError as exc:
        raise _fail(exc.message) from exc
    out.print(f"federation created in {settings.home}")
    out.print(f"CA fingerprint (SHA-256): {pki.fingerprint(ca)}")


@app.command()
def serve(
    home: HomeOption = None,
    port: Annotated[int | None, typer.Option(help="HTTPS port (default 8443).")] = None,
) -> None:
    """Run the coordinator API over TLS until interrupted."""
    from coordinator.serve import serve as run

    settings = _settings(home)
    if port is not None:
        settings = settings.model_copy(update={"api_port": port})
    try:
        run(settings)
    except CoordinatorError as exc:
        raise _fail(exc.message) from exc


@site_app.command("add")
def site_add(name: str, home: HomeOption = None) -> None:
    """Add a site; prints its one-time, expiring enrollment token."""
    from coordinator import sites

    settings = _settings(home)
    try:
        token = sites.add(_db(settings), settings, name, actor="cli")
    except CoordinatorError as exc:
        raise _fail(exc.message) from exc
    err.print(
        f"site {name} added; its node runs `radfed node enroll URL TOKEN` within "
        f"{settings.enrollment_ttl_hours:g} hours:"
    )
    out.print(token, highlight=False, soft_wrap=True)


@site_app.command("token")
def site_token(name: str, home: HomeOption = None) -> None:
    """A new enrollment token for an existing site (a rebuilt node, a lost key)."""
    from coordinator import sites

    settings = _settings(home)
    try:
        token = sites.new_token(_db(settings), settings, name, actor="cli")
    except CoordinatorError as exc:
        raise _fail(exc.message) from exc
    out.print(token, highlight=False, soft_wrap=True)


@site_app.command("revoke")
def site_revoke(
    name: str,
    reason: Annotated[str, typer.Option(help="Why (kept in the audit log).")] = "",
    home: HomeOption = None,
) -> None:
    """Revoke a site: its certificate is refused from its next request on."""
    from coordinator import sites

    settings = _settings(home)
    try:
        sites.revoke(_db(settings), name, actor="cli", reason=reason)
    except CoordinatorError as exc:
        raise _fail(exc.message) from exc
    out.print(f"site {name} revoked")


@site_app.command("list")
def site_list(home: HomeOption = None) -> None:
    """Sites with their status, health, last heartbeat and counts."""
    from coordinator import sites

    settings = _settings(home)
    table = Table("site", "status", "health", "last seen (UTC)", "version", "counts", "last error")
    for s in sites.states(_db(settings), settings):
        table.add_row(
            s.name,
            s.status,
            s.health,
            s.last_seen.strftime("%Y-%m-%d %H:%M:%S") if s.last_seen else "-",
            s.version or "-",
            ", ".join(f"{k} {v}" for k, v in sorted(s.counts.items())) or "-",
            s.last_error or "",
        )
    out.print(table)


@token_app.command("create")
def token_create(
    name: str,
    role: Annotated[str, typer.Option(help="operator or researcher.")] = "researcher",
    home: HomeOption = None,
) -> None:
    """Create an API token; printed once, stored hashed."""
    from coordinator import tokens

    settings = _settings(home)
    try:
        token = tokens.create(_db(settings), name, role, actor="cli")
    except CoordinatorError as exc:
        raise _fail(exc.message) from exc
    out.print(token, highlight=False, soft_wrap=True)


@token_app.command("revoke")
def token_revoke(name: str, home: HomeOption = None) -> None:
    """Revoke an API token."""
    from coordinator import tokens

    settings = _settings(home)
    try:
        tokens.revoke(_db(settings), name, actor="cli")
    except CoordinatorError as exc:
        raise _fail(exc.message) from exc
    out.print(f"token {name} revoked")


@audit_app.command("verify")
def audit_verify(home: HomeOption = None) -> None:
    """Recompute the audit chain; exit 1 naming the first entry that does not hold."""
    from coordinator import audit

    settings = _settings(home)
    db = _db(settings)
    with db.read() as session:
        result = audit.verify(session)
    if not result.ok:
        err.print(f"audit log broken at entry {result.broken_at}: {result.reason}")
        raise typer.Exit(1)
    out.print(f"audit log intact: {result.entries} entries")
