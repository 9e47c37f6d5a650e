"""``radfed coordinator …``: the commands a coordinator operator runs."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from coordinator.errors import CoordinatorError
from coordinator.settings import CoordinatorSettings, load_settings

if TYPE_CHECKING:
    from coordinator.objects import ObjectStore
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
release_app = typer.Typer(
    help="Dataset releases: immutable, named sets of exams, exported as folders.",
    no_args_is_help=True,
)
exam_app = typer.Typer(help="Registered exams: search, detail, statistics.", no_args_is_help=True)
tls_app = typer.Typer(help="The coordinator's TLS server certificate.", no_args_is_help=True)
app.add_typer(audit_app, name="audit")
app.add_typer(tls_app, name="tls")
app.add_typer(release_app, name="release")
app.add_typer(exam_app, name="exam")
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


def _store(settings: CoordinatorSettings) -> ObjectStore:
    from coordinator.objects import open_store

    try:
        return open_store(
            object_store=settings.object_store,
            root=settings.objects_dir,
            s3_bucket=settings.s3_bucket,
            s3_endpoint_url=settings.s3_endpoint_url,
            s3_region=settings.s3_region,
            s3_prefix=settings.s3_prefix,
        )
    except CoordinatorError as exc:
        raise _fail(exc.message) from exc


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
    names = _with_loopback(server_name or settings.server_names)
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


#: Names the coordinator's own clients dial (its ``flwr`` calls reach the SuperLink on
#: loopback, over TLS with this certificate): always in it, whatever else is.
LOOPBACK_NAMES = ("localhost", "127.0.0.1")


def _with_loopback(names: list[str]) -> list[str]:
    """``names`` in order (the first is what nodes dial), then the loopback names."""
    return list(dict.fromkeys([*names, *LOOPBACK_NAMES]))


@tls_app.command("renew")
def tls_renew(
    home: HomeOption = None,
    server_name: Annotated[
        list[str] | None,
        typer.Option(help="Names for the certificate (repeat); default: the server_names setting."),
    ] = None,
) -> None:
    """Issue a new server certificate (397 days) from the federation CA; restart to use it.

    Nodes keep their certificates and the CA does not change, so nothing needs to be
    done at the sites. Also what to run after changing ``server_names``.
    """
    from coordinator import audit, pki

    settings = _settings(home)
    names = _with_loopback(server_name or settings.server_names)
    try:
        cert = pki.issue_server_certificate(pki.Paths(settings.pki_dir), names)
        db = _db(settings)
        with db.write() as session:
            audit.append(
                session,
                "cli",
                "tls.renew",
                cert.subject.rfc4514_string(),
                server_names=names,
                not_after=cert.not_valid_after_utc.isoformat(),
            )
        db.close()
    except CoordinatorError as exc:
        raise _fail(exc.message) from exc
    out.print(
        f"new server certificate for {', '.join(names)}, valid until "
        f"{cert.not_valid_after_utc:%Y-%m-%d}; restart the coordinator to use it"
    )


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


# -- releases and exams -----------------------------------------------------------------

FilterOption = Annotated[
    list[str] | None,
    typer.Option(
        "--filter",
        help="KEY=VALUE (repeat; all must hold). Keys: site, modality, body_part, "
        "label (scheme:name=value), clinical (variable=value), date_from, date_to "
        "(YYYY-MM-DD; study dates are shifted per patient).",
    ),
]


def _when(value: object) -> str:
    if isinstance(value, dt.datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    return "-" if value is None else str(value)


@release_app.command("create")
def release_create(
    name: str,
    filters: FilterOption = None,
    dest: Annotated[
        Path | None,
        typer.Option("--out", help="Export folder (default <home>/releases/NAME); must not exist."),
    ] = None,
    export: Annotated[bool, typer.Option(help="Export the folder tree too.")] = True,
    home: HomeOption = None,
) -> None:
    """Freeze the non-withdrawn exams matching every --filter into the release NAME."""
    from coordinator import releases
    from coordinator.registry import search

    settings = _settings(home)
    try:
        wanted = search.parse_filters(filters or [])
        made = releases.create(
            _db(settings), _store(settings), settings, name, wanted, "cli", dest=dest, export=export
        )
    except CoordinatorError as exc:
        raise _fail(exc.message) from exc
    where = f"; exported to {dest or settings.releases_dir / name}" if export else ""
    out.print(
        f"release {made.name}: {made.exam_count} exams, {made.instance_count} instances, "
        f"manifest sha256 {made.manifest_sha256}{where}",
        highlight=False,
        soft_wrap=True,
    )


@release_app.command("list")
def release_list(home: HomeOption = None) -> None:
    """Every release, oldest first, with the exams withdrawn since it was made."""
    from coordinator import releases

    settings = _settings(home)
    table = Table("release", "created (UTC)", "by", "exams", "instances", "withdrawn since")
    for r in releases.list_releases(_db(settings)):
        table.add_row(
            r.name,
            _when(r.created_at),
            r.created_by,
            str(r.exam_count),
            str(r.instance_count),
            str(len(r.withdrawn)),
        )
    out.print(table)


@release_app.command("show")
def release_show(name: str, home: HomeOption = None) -> None:
    """One release: its filters, counts, manifest digest and the exams withdrawn since."""
    from coordinator import releases

    settings = _settings(home)
    try:
        r = releases.get(_db(settings), name)
    except CoordinatorError as exc:
        raise _fail(exc.message) from exc
    filters = r.filters.model_dump(exclude_defaults=True, mode="json")
    out.print(f"release:          {r.name}", highlight=False)
    out.print(f"created (UTC):    {_when(r.created_at)} by {r.created_by}", highlight=False)
    out.print(f"filters:          {json.dumps(filters) if filters else 'none'}", highlight=False)
    out.print(f"exams:            {r.exam_count}", highlight=False)
    out.print(f"instances:        {r.instance_count}", highlight=False)
    out.print(f"manifest sha256:  {r.manifest_sha256}", highlight=False)
    out.print(f"withdrawn since:  {len(r.withdrawn)}", highlight=False)
    for uid in r.withdrawn:
        out.print(f"  {uid}", highlight=False)


@release_app.command("diff")
def release_diff(a: str, b: str, home: HomeOption = None) -> None:
    """Exams B holds and A does not (+) and the other way (-)."""
    from coordinator import releases

    settings = _settings(home)
    try:
        d = releases.diff(_db(settings), a, b)
    except CoordinatorError as exc:
        raise _fail(exc.message) from exc
    for uid in d.added:
        out.print(f"+ {uid}", highlight=False)
    for uid in d.removed:
        out.print(f"- {uid}", highlight=False)
    out.print(
        f"{a} -> {b}: {len(d.added)} added, {len(d.removed)} removed, {d.unchanged} in both",
        highlight=False,
    )


@release_app.command("export")
def release_export(name: str, dest: Path, home: HomeOption = None) -> None:
    """Write release NAME to DEST (a new folder), the same bytes as every export of it."""
    from coordinator import releases

    settings = _settings(home)
    try:
        path = releases.export(_db(settings), _store(settings), settings, name, dest)
    except CoordinatorError as exc:
        raise _fail(exc.message) from exc
    out.print(f"release {name} exported to {path}", highlight=False, soft_wrap=True)


@exam_app.command("search")
def exam_search(
    filters: FilterOption = None,
    include_withdrawn: Annotated[bool, typer.Option(help="List withdrawn exams too.")] = False,
    sort: Annotated[str, typer.Option(help="study_date or registered_at.")] = "study_date",
    order: Annotated[str, typer.Option(help="asc or desc.")] = "desc",
    limit: Annotated[int, typer.Option(help="At most 500.")] = 50,
    offset: int = 0,
    home: HomeOption = None,
) -> None:
    """Registered exams matching every --filter, a page at a time."""
    from coordinator.registry import search
    from protocols.api.coordinator import ExamSort, SortOrder

    settings = _settings(home)
    try:
        page = search.search(
            _db(settings),
            search.parse_filters(filters or []),
            include_withdrawn=include_withdrawn,
            sort=ExamSort(sort),
            order=SortOrder(order),
            limit=limit,
            offset=offset,
        )
    except ValueError as exc:
        raise _fail(f"--sort or --order: {exc}") from exc
    except CoordinatorError as exc:
        raise _fail(exc.message) from exc
    table = Table("study UID", "site", "pseudonym", "date", "modality", "body part", "files")
    for e in page.items:
        withdrawn = " (withdrawn)" if e.withdrawn_at else ""
        table.add_row(
            e.study_instance_uid + withdrawn,
            e.site,
            e.pseudonym,
            _when(e.study_date),
            "\\".join(e.modalities),
            e.body_part or "-",
            str(e.instance_count),
        )
    out.print(table)
    shown = f"{page.offset + 1}-{page.offset + len(page.items)}" if page.items else "none"
    out.print(f"{shown} of {page.total}", highlight=False)


@exam_app.command("show")
def exam_show(study_uid: str, home: HomeOption = None) -> None:
    """One exam as JSON: series, instances, labels, clinical values, de-identification."""
    from coordinator.registry import search

    settings = _settings(home)
    try:
        found = search.detail(_db(settings), study_uid)
    except CoordinatorError as exc:
        raise _fail(exc.message) from exc
    out.print_json(found.model_dump_json())


@exam_app.command("stats")
def exam_stats(
    dimension: Annotated[str, typer.Argument(help="site, modality or label.")],
    label: Annotated[
        str | None, typer.Option(help='With "label": one scheme:name, by value.')
    ] = None,
    suppressed: Annotated[
        bool, typer.Option(help="Show what researchers see (counts under k as <k).")
    ] = False,
    home: HomeOption = None,
) -> None:
    """Non-withdrawn exams counted by site, modality or label (exact: this is the operator)."""
    from coordinator.registry import search

    settings = _settings(home)
    try:
        found = search.stats(
            _db(settings), dimension, k=settings.small_count_k, exact=not suppressed, label=label
        )
    except CoordinatorError as exc:
        raise _fail(exc.message) from exc
    table = Table(found.dimension, "exams")
    for row in found.rows:
        table.add_row(row.key, row.display)
    out.print(table)


@exam_app.command("withdraw")
def exam_withdraw(
    study_uid: str,
    site: Annotated[str, typer.Option(help="The site that contributed it (and asks).")],
    reason: Annotated[str, typer.Option(help="Why (kept in the audit log).")],
    home: HomeOption = None,
) -> None:
    """Withdraw an exam on its site's behalf: out of search, statistics and later releases."""
    from sqlalchemy import select

    from coordinator import releases
    from coordinator.registry.models import Site

    settings = _settings(home)
    db = _db(settings)
    with db.read() as session:
        site_id = session.scalar(select(Site.id).where(Site.name == site))
    if site_id is None:
        raise _fail(f"no site named {site}")
    try:
        done = releases.withdraw(db, site_id, study_uid, reason, "cli")
    except CoordinatorError as exc:
        raise _fail(exc.message) from exc
    held = f"; still in releases {', '.join(done.releases)}" if done.releases else ""
    out.print(f"exam {study_uid} withdrawn{held}", highlight=False, soft_wrap=True)
