"""``radfed train …``: federated training runs for researchers, through the coordinator API.

The coordinator's URL, an API token and the federation CA come from options or
from ``RADFED_URL``, ``RADFED_TOKEN`` and ``RADFED_CA``. ``submit`` prints the run
id (and with ``--wait`` follows the rounds); ``status`` shows each round with
the sites that trained (samples), declined or dropped, and the metrics;
``fetch`` downloads the final model (safetensors), checks its SHA-256 and writes
its provenance JSON beside it.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    import httpx

    from protocols.api.training import RunPublic

# httpx and the wire models load when a command runs: `radfed` starts for every command.

app = typer.Typer(help="Federated training runs across the sites.", no_args_is_help=True)
out = Console()
err = Console(stderr=True)

UrlOption = Annotated[str, typer.Option(envvar="RADFED_URL", help="Coordinator URL.")]
TokenOption = Annotated[str, typer.Option(envvar="RADFED_TOKEN", help="Your API token.")]
CaOption = Annotated[
    Path | None, typer.Option(envvar="RADFED_CA", help="The federation CA certificate (PEM).")
]


class Client:
    """The researcher's HTTP client of the coordinator."""

    def __init__(self, url: str, token: str, ca: Path | None) -> None:
        import httpx

        self.http = httpx.Client(
            base_url=url.rstrip("/"),
            headers={"Authorization": f"Bearer {token}"},
            verify=str(ca) if ca else True,
            timeout=httpx.Timeout(120.0, connect=10.0),
        )

    def call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        import httpx

        try:
            answer = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise _fail(f"cannot reach the coordinator: {exc}") from exc
        if answer.status_code >= 400:
            try:
                body = answer.json()
                message = f"{body.get('message')} ({body.get('code')})"
            except ValueError:
                message = f"HTTP {answer.status_code}"
            raise _fail(message)
        return answer

    def run(self, run_id: str) -> RunPublic:
        from protocols.api.training import RunPublic

        return RunPublic.model_validate(self.call("GET", f"/api/v1/runs/{run_id}").json())


def _fail(message: str) -> typer.Exit:
    err.print(f"[bold red]error:[/] {message}")
    return typer.Exit(2)


def _client(url: str, token: str, ca: Path | None) -> Client:
    return Client(url, token, ca)


@app.command("apps")
def apps(url: UrlOption, token: TokenOption, ca: CaOption = None) -> None:
    """The Flower apps on offer, with the bundle hash node policies allow."""
    from protocols.api.training import AppPublic

    found = [
        AppPublic.model_validate(a)
        for a in _client(url, token, ca).call("GET", "/api/v1/apps").json()
    ]
    table = Table("app", "version", "bundle sha256")
    for item in found:
        table.add_row(item.name, item.version, item.hash)
    out.print(table)


@app.command("submit")
def submit(
    url: UrlOption,
    token: TokenOption,
    ca: CaOption = None,
    app_name: Annotated[str, typer.Option("--app", help="Flower app on the coordinator.")] = "cxr",
    rounds: Annotated[int, typer.Option(min=1, help="Training rounds.")] = 3,
    min_nodes: Annotated[int, typer.Option(min=1, help="Sites each round needs.")] = 2,
    release: Annotated[str | None, typer.Option(help="Train on this release.")] = None,
    filter_: Annotated[
        list[str] | None,
        typer.Option("--filter", help='Or on exams matching "modality=CR", "label=s:n=v"...'),
    ] = None,
    strategy: Annotated[str, typer.Option(help="fedavg or fedprox.")] = "fedavg",
    proximal_mu: Annotated[float, typer.Option(help="FedProx mu.")] = 0.01,
    secagg: Annotated[bool, typer.Option(help="Secure aggregation (SecAgg+).")] = False,
    dp_clip: Annotated[float | None, typer.Option(help="Client-side clipping norm (DP).")] = None,
    dp_noise: Annotated[float, typer.Option(help="DP noise multiplier.")] = 0.0,
    local_epochs: Annotated[int, typer.Option(min=1)] = 1,
    batch_size: Annotated[int, typer.Option(min=1)] = 16,
    learning_rate: Annotated[float, typer.Option("--lr")] = 0.002,
    image_size: Annotated[int, typer.Option(min=16)] = 64,
    task: Annotated[str, typer.Option(help="binary or ricord4.")] = "binary",
    round_timeout: Annotated[float, typer.Option(help="Seconds a round waits.")] = 600.0,
    wait: Annotated[bool, typer.Option(help="Follow the run until it ends.")] = False,
) -> None:
    """Start a run; prints its id."""
    from protocols.api.training import RunCreate, RunPublic

    try:
        body = RunCreate(
            app=app_name,
            rounds=rounds,
            min_nodes=min_nodes,
            release=release,
            filter=filter_ or [],
            strategy=strategy,  # type: ignore[arg-type]
            proximal_mu=proximal_mu,
            secagg=secagg,
            dp_clip=dp_clip,
            dp_noise=dp_noise,
            local_epochs=local_epochs,
            batch_size=batch_size,
            learning_rate=learning_rate,
            image_size=image_size,
            task=task,  # type: ignore[arg-type]
            round_timeout=round_timeout,
        )
    except ValueError as exc:
        raise _fail(str(exc)) from exc
    client = _client(url, token, ca)
    run = RunPublic.model_validate(
        client.call("POST", "/api/v1/runs", json=body.model_dump(mode="json")).json()
    )
    out.print(run.id, highlight=False)
    if run.status == "failed":
        raise _fail(run.error or "the run failed to start")
    if wait:
        follow(client, run.id)


def follow(client: Client, run_id: str, poll: float = 2.0) -> RunPublic:
    """Show a run's rounds as a progress bar until it ends; exit 2 unless it finished."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    progress = Progress(
        TextColumn(f"[bold]{run_id}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[state]}"),
        TimeElapsedColumn(),
        console=err,
    )
    run = client.run(run_id)
    with progress:
        task = progress.add_task("rounds", total=run.rounds, state=run.status)
        while True:
            run = client.run(run_id)
            progress.update(task, completed=run.current_round, state=run.status)
            if run.status != "running":
                break
            time.sleep(poll)
    if run.status != "finished":
        raise _fail(f"{run_id} {run.status}: {run.error or ''}")
    return run


@app.command("wait")
def wait_for(run_id: str, url: UrlOption, token: TokenOption, ca: CaOption = None) -> None:
    """Follow a run until it ends (exit 2 unless it finished)."""
    follow(_client(url, token, ca), run_id)


@app.command("status")
def status(
    run_id: str,
    url: UrlOption,
    token: TokenOption,
    ca: CaOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="The run as JSON.")] = False,
) -> None:
    """Round, per-site participation and metrics of a run."""
    run = _client(url, token, ca).run(run_id)
    if as_json:
        out.print_json(run.model_dump_json())
        return
    flags = " (degraded)" if run.degraded else ""
    out.print(
        f"{run.id}: {run.status}{flags}, round {run.current_round}/{run.rounds}, "
        f"app {run.app} {run.app_hash[:12]}, strategy {run.request.strategy}"
        + (f", release {run.request.release}" if run.request.release else "")
    )
    if run.error:
        out.print(f"[red]{run.error}[/]")
    table = Table("round", "trained (samples)", "declined", "dropped", "metrics")
    for record in run.history:
        metrics = {
            **{f"train {k}": v for k, v in record.train_metrics.items()},
            **{f"eval {k}": v for k, v in record.evaluate_metrics.items()},
            **{f"central {k}": v for k, v in record.central_metrics.items()},
        }
        table.add_row(
            str(record.round),
            ", ".join(f"{s} ({n})" for s, n in record.trained.items()),
            ", ".join(record.declined),
            ", ".join(record.dropped),
            "; ".join(f"{k} {v:.4g}" for k, v in metrics.items()),
        )
    out.print(table)
    if run.participation:
        out.print("sites: " + ", ".join(f"{s} {p}" for s, p in run.participation.items()))
    if run.model:
        out.print(f"model: {run.model.sha256} ({run.model.size} bytes)")


@app.command("list")
def list_runs(url: UrlOption, token: TokenOption, ca: CaOption = None) -> None:
    """Recent runs."""
    from protocols.api.training import RunPublic

    found = [
        RunPublic.model_validate(r)
        for r in _client(url, token, ca).call("GET", "/api/v1/runs").json()
    ]
    table = Table("run", "status", "round", "app", "by", "started")
    for run in found:
        table.add_row(
            run.id,
            run.status + (" (degraded)" if run.degraded else ""),
            f"{run.current_round}/{run.rounds}",
            run.app,
            run.created_by,
            run.started_at.isoformat(timespec="seconds"),
        )
    out.print(table)


@app.command("logs")
def logs(run_id: str, url: UrlOption, token: TokenOption, ca: CaOption = None) -> None:
    """What the run's ServerApp logged."""
    out.print(
        _client(url, token, ca).call("GET", f"/api/v1/runs/{run_id}/logs").text,
        highlight=False,
        markup=False,
    )


@app.command("stop")
def stop(run_id: str, url: UrlOption, token: TokenOption, ca: CaOption = None) -> None:
    """Stop a running run (it can be resumed from its last checkpoint)."""
    from protocols.api.training import RunPublic

    run = RunPublic.model_validate(
        _client(url, token, ca).call("POST", f"/api/v1/runs/{run_id}/stop").json()
    )
    out.print(f"{run.id}: {run.status}")


@app.command("resume")
def resume(
    run_id: str,
    url: UrlOption,
    token: TokenOption,
    ca: CaOption = None,
    wait: Annotated[bool, typer.Option(help="Follow the run until it ends.")] = False,
) -> None:
    """Continue a failed or stopped run from its last checkpointed round."""
    from protocols.api.training import RunPublic

    client = _client(url, token, ca)
    run = RunPublic.model_validate(client.call("POST", f"/api/v1/runs/{run_id}/resume").json())
    out.print(f"{run.id}: {run.status} from round {run.current_round}")
    if wait:
        follow(client, run.id)


@app.command("fetch")
def fetch(
    run_id: str,
    url: UrlOption,
    token: TokenOption,
    ca: CaOption = None,
    out_dir: Annotated[Path, typer.Option("--out", help="Folder to write into.")] = Path(),
) -> None:
    """Download the final model (safetensors) and its provenance JSON."""
    from protocols.api.training import Provenance

    client = _client(url, token, ca)
    provenance = Provenance.model_validate(
        client.call("GET", f"/api/v1/runs/{run_id}/provenance").json()
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    model_path = out_dir / f"{run_id}.safetensors"
    partial = model_path.with_suffix(".safetensors.part")
    digest = hashlib.sha256()
    with client.http.stream("GET", f"/api/v1/runs/{run_id}/model") as answer:
        if answer.status_code != 200:
            raise _fail(f"model download refused: HTTP {answer.status_code}")
        with open(partial, "wb") as handle:
            for chunk in answer.iter_bytes():
                digest.update(chunk)
                handle.write(chunk)
    if digest.hexdigest() != provenance.model_sha256:
        partial.unlink(missing_ok=True)
        raise _fail("the downloaded model does not match its SHA-256; nothing was written")
    partial.replace(model_path)
    prov_path = out_dir / f"{run_id}.provenance.json"
    prov_path.write_text(
        json.dumps(provenance.model_dump(mode="json"), indent=2) + "\n", encoding="utf-8"
    )
    out.print(f"model: {model_path} (sha256 {provenance.model_sha256})")
    out.print(f"provenance: {prov_path}")
