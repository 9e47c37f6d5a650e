"""Training runs in the UI: the list, and a run's page with its status, each round's
participation, metric curves and the model with its provenance to download.

Reads ``coordinator.training`` as the API does (operators and researchers alike).
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response, StreamingResponse
from markupsafe import Markup

from coordinator import training
from coordinator.api.training_routes import model_download
from coordinator.web import views
from coordinator.web.plots import line_chart
from coordinator.web.ui import Reader, UiContext

router = APIRouter()


@router.get("/runs")
def runs_page(request: Request, ui: UiContext, user: Reader) -> HTMLResponse:
    return ui.page("runs.html", request, user, runs=training.list_runs(ui.db, 200))


@router.get("/runs/{run_id}")
def run_page(request: Request, run_id: str, ui: UiContext, user: Reader) -> HTMLResponse:
    run = training.get(ui.db, run_id)
    sites, rows = views.participation(run.history)
    charts = [
        (
            measure,
            Markup(  # noqa: S704 - built by line_chart, which escapes every text
                line_chart(
                    series,
                    title=f"{measure} per round",
                    x_label="round",
                    y_label=measure,
                    x_integer=True,
                    y_from_zero=measure == "accuracy",
                )
            ),
        )
        for measure, series in views.metric_charts(run.history)
    ]
    return ui.page("run.html", request, user, run=run, sites=sites, rows=rows, charts=charts)


@router.get("/runs/{run_id}/model.safetensors")
def run_model(run_id: str, ui: UiContext, _: Reader) -> StreamingResponse:
    """The final model; its SHA-256 in ``X-Model-Sha256`` (as the API serves it)."""
    return model_download(ui.db, ui.store, run_id)


@router.get("/runs/{run_id}/provenance.json")
def run_provenance(run_id: str, ui: UiContext, _: Reader) -> Response:
    provenance = training.model(ui.db, run_id)[2]
    return Response(
        provenance.model_dump_json(indent=1),
        media_type="application/json",
        headers={"Content-Disposition": f'attachment; filename="{run_id}-provenance.json"'},
    )
