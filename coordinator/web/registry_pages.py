"""The registry in the UI: the overview (statistics, contributions over time), the exam
browser with its filters, exam pages with thumbnails, and releases (list, create, diff, export).

Every page reads through the same service functions as the API
(``coordinator.registry.search``, ``coordinator.releases``): statistics show a
researcher counts under k as ``<k`` exactly as ``/api/v1/stats`` does, and
cutting or exporting a release is an operator's, as in the API.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any
from urllib.parse import quote, urlencode

from fastapi import APIRouter, Form, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from markupsafe import Markup

from coordinator import releases, sites, training
from coordinator.api.app import ERROR_STATUS
from coordinator.errors import CoordinatorError
from coordinator.registry import search
from coordinator.web import thumbnails, views
from coordinator.web.plots import line_chart
from coordinator.web.ui import PREFIX, Operator, Reader, UiContext
from protocols.api.coordinator import ExamFilters, ExamSort, SortOrder
from protocols.websession import WebUser

router = APIRouter()
#: Exams per page of the browser.
PAGE = 50
#: Thumbnails shown per series on an exam page (every instance is listed below them).
THUMBS_PER_SERIES = 8
#: SOP classes without an image to show (structured reports, documents, presentation
#: states, waveforms).
NO_PIXELS = (
    "1.2.840.10008.5.1.4.1.1.88.",
    "1.2.840.10008.5.1.4.1.1.104.",
    "1.2.840.10008.5.1.4.1.1.11.",
    "1.2.840.10008.5.1.4.1.1.9.",
)


@dataclass(frozen=True)
class FilterForm:
    """The filter fields of the exam browser and of the release form, as typed."""

    site: str = ""
    modality: str = ""
    body_part: str = ""
    labels: tuple[str, ...] = ()
    clinical: tuple[str, ...] = ()
    date_from: str = ""
    date_to: str = ""

    def filters(self) -> ExamFilters:
        """The registry's filters; ``invalid_filter`` names a field that does not hold."""
        return search.make_filters(
            site=self.site.strip() or None,
            modality=self.modality.strip().upper() or None,
            body_part=self.body_part.strip() or None,
            labels=[x.strip() for x in self.labels if x.strip()],
            clinical=[x.strip() for x in self.clinical if x.strip()],
            study_date_from=self.date_from.strip() or None,
            study_date_to=self.date_to.strip() or None,
        )

    def query(self) -> list[tuple[str, str]]:
        """The fields as URL query items (empty ones left out)."""
        items = [
            ("site", self.site),
            ("modality", self.modality),
            ("body_part", self.body_part),
            *(("label", x) for x in self.labels),
            *(("clinical", x) for x in self.clinical),
            ("date_from", self.date_from),
            ("date_to", self.date_to),
        ]
        return [(k, v) for k, v in items if v.strip()]


def _form(
    site: str,
    modality: str,
    body_part: str,
    label: list[str] | None,
    clinical: list[str] | None,
    date_from: str,
    date_to: str,
) -> FilterForm:
    return FilterForm(
        site, modality, body_part, tuple(label or ()), tuple(clinical or ()), date_from, date_to
    )


def describe(filters: ExamFilters) -> str:
    """Filters in one line, as a person reads them."""
    parts = [
        f"{name} = {value}"
        for name, value in (
            ("site", filters.site),
            ("modality", filters.modality),
            ("body part", filters.body_part),
            ("from", filters.study_date_from),
            ("to", filters.study_date_to),
        )
        if value is not None
    ]
    parts += [f"label {x}" for x in filters.labels] + [f"clinical {x}" for x in filters.clinical]
    return "; ".join(parts) or "every exam"


def _choices(ui: UiContext, dimension: str) -> list[str]:
    """The values a filter may take (the keys of the statistics, never their counts)."""
    table = search.stats(ui.db, dimension, k=ui.settings.small_count_k, exact=True)
    return sorted(row.key for row in table.rows)


# -- overview ------------------------------------------------------------------------------


@router.get("/")
def overview(request: Request, ui: UiContext, user: Reader) -> HTMLResponse:
    exact = user.role == "operator"
    k = ui.settings.small_count_k
    tables = [search.stats(ui.db, dimension, k=k, exact=exact) for dimension in search.DIMENSIONS]
    by_site = exact  # a researcher sees the federation's curve, not each site's
    series = views.cumulative(search.contributions(ui.db, by_site=by_site))
    chart = line_chart(
        series,
        title="Exams registered (cumulative)" + (" per site" if by_site else ""),
        x_label="day of registration (UTC)",
        y_label="exams",
        x_format=views.day_label,
        x_integer=True,
        y_from_zero=True,
        width=760,
    )
    site_states = sites.states(ui.db, ui.settings) if exact else []
    return ui.page(
        "overview.html",
        request,
        user,
        tables=tables,
        k=k,
        chart=Markup(chart),  # noqa: S704 - built by line_chart, which escapes every text
        exams=search.search(ui.db, ExamFilters(), limit=1).total,
        release_count=len(releases.list_releases(ui.db)),
        run_count=training.count_runs(ui.db),
        site_states=site_states,
    )


# -- exams ---------------------------------------------------------------------------------


@router.get("/exams")
def exams(
    request: Request,
    ui: UiContext,
    user: Reader,
    site: str = "",
    modality: str = "",
    body_part: str = "",
    label: Annotated[list[str] | None, Query()] = None,
    clinical: Annotated[list[str] | None, Query()] = None,
    date_from: str = "",
    date_to: str = "",
    include_withdrawn: str = "",
    sort: str = ExamSort.STUDY_DATE.value,
    order: str = SortOrder.DESC.value,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> HTMLResponse:
    form = _form(site, modality, body_part, label, clinical, date_from, date_to)
    sort_key = sort if sort in {s.value for s in ExamSort} else ExamSort.STUDY_DATE.value
    direction = order if order in {o.value for o in SortOrder} else SortOrder.DESC.value
    error = ""
    found = None
    try:
        found = search.search(
            ui.db,
            form.filters(),
            include_withdrawn=bool(include_withdrawn),
            sort=ExamSort(sort_key),
            order=SortOrder(direction),
            limit=PAGE,
            offset=offset,
        )
    except CoordinatorError as exc:
        if exc.code != "invalid_filter":
            raise
        error = exc.message
    kept = [
        *form.query(),
        *([("include_withdrawn", "on")] if include_withdrawn else []),
        ("sort", sort_key),
        ("order", direction),
    ]
    return ui.page(
        "exams.html",
        request,
        user,
        status_code=422 if error else 200,
        form=form,
        error=error,
        page=found,
        pager=views.Pager(found.total, PAGE, offset) if found else None,
        query=urlencode(kept),
        release_query=urlencode(form.query()),
        include_withdrawn=bool(include_withdrawn),
        sort=sort_key,
        order=direction,
        site_choices=_choices(ui, "site"),
        modality_choices=_choices(ui, "modality"),
    )


@router.get("/exams/{study_uid}")
def exam_page(request: Request, study_uid: str, ui: UiContext, user: Reader) -> HTMLResponse:
    exam = search.detail(ui.db, study_uid)
    images = {
        i.sop_instance_uid
        for s in exam.series
        for i in s.instances
        if not i.sop_class_uid.startswith(NO_PIXELS)
    }
    return ui.page(
        "exam.html",
        request,
        user,
        exam=exam,
        images=images,
        per_series=THUMBS_PER_SERIES,
    )


@router.get("/exams/{study_uid}/instances/{sop_uid}.png")
def thumbnail(
    study_uid: str,
    sop_uid: str,
    ui: UiContext,
    _: Reader,
    size: Annotated[int, Query(ge=16, le=thumbnails.MAX_SIZE)] = 160,
) -> Response:
    """A thumbnail of one de-identified instance (pixels only, no header value)."""
    sha = search.instance_object(ui.db, study_uid, sop_uid)
    with ui.store.open(sha) as handle:
        data = handle.read()
    return Response(
        thumbnails.thumbnail_png(data, size),
        media_type="image/png",
        # The object never changes (it is named by its hash); the page is per user.
        headers={"Cache-Control": "private, max-age=3600"},
    )


# -- releases ------------------------------------------------------------------------------


def _releases_page(
    request: Request,
    ui: UiContext,
    user: WebUser,
    status_code: int = 200,
    **context: Any,
) -> HTMLResponse:
    listed = releases.list_releases(ui.db)
    context.setdefault("error", "")
    context.setdefault("form", FilterForm())
    context.setdefault("name", "")
    context.setdefault("export", True)
    return ui.page(
        "releases.html",
        request,
        user,
        status_code,
        releases=listed,
        describe=describe,
        site_choices=_choices(ui, "site"),
        modality_choices=_choices(ui, "modality"),
        **context,
    )


@router.get("/releases")
def releases_page(
    request: Request,
    ui: UiContext,
    user: Reader,
    site: str = "",
    modality: str = "",
    body_part: str = "",
    label: Annotated[list[str] | None, Query()] = None,
    clinical: Annotated[list[str] | None, Query()] = None,
    date_from: str = "",
    date_to: str = "",
) -> HTMLResponse:
    form = _form(site, modality, body_part, label, clinical, date_from, date_to)
    return _releases_page(request, ui, user, form=form)


@router.post("/releases")
def create_release(
    request: Request,
    ui: UiContext,
    user: Operator,
    csrf: Annotated[str, Form()] = "",
    name: Annotated[str, Form()] = "",
    site: Annotated[str, Form()] = "",
    modality: Annotated[str, Form()] = "",
    body_part: Annotated[str, Form()] = "",
    labels: Annotated[str, Form()] = "",
    clinical: Annotated[str, Form()] = "",
    date_from: Annotated[str, Form()] = "",
    date_to: Annotated[str, Form()] = "",
    export: Annotated[str, Form()] = "",
) -> Response:
    ui.check_csrf(user, csrf)
    form = FilterForm(
        site,
        modality,
        body_part,
        tuple(labels.splitlines()),
        tuple(clinical.splitlines()),
        date_from,
        date_to,
    )
    try:
        created = releases.create(
            ui.db,
            ui.store,
            ui.settings,
            name.strip(),
            form.filters(),
            user.name,
            export=bool(export),
        )
    except CoordinatorError as exc:
        if ERROR_STATUS.get(exc.code, 400) >= 500:
            raise
        return _releases_page(
            request,
            ui,
            user,
            ERROR_STATUS.get(exc.code, 400),
            error=exc.message,
            form=form,
            name=name,
            export=bool(export),
        )
    message = f"Release {created.name} created: {created.exam_count} exams."
    return RedirectResponse(
        f"{PREFIX}/releases/{quote(created.name)}?flash={quote(message)}", status_code=303
    )


@router.get("/releases/diff")
def release_diff(request: Request, ui: UiContext, user: Reader, a: str, b: str) -> HTMLResponse:
    return ui.page("release_diff.html", request, user, diff=releases.diff(ui.db, a, b), a=a, b=b)


@router.get("/releases/{name}")
def release_page(request: Request, name: str, ui: UiContext, user: Reader) -> HTMLResponse:
    release = releases.get(ui.db, name)
    exported = releases.exported(ui.settings, name) if user.role == "operator" else None
    return ui.page(
        "release.html",
        request,
        user,
        release=release,
        filters=describe(release.filters),
        exported=exported,
        others=[r.name for r in releases.list_releases(ui.db) if r.name != name],
    )


@router.post("/releases/{name}/export")
def export_release(
    name: str, ui: UiContext, user: Operator, csrf: Annotated[str, Form()] = ""
) -> Response:
    ui.check_csrf(user, csrf)
    target = releases.export(ui.db, ui.store, ui.settings, name)
    message = f"Release {name} exported to {target}."
    return RedirectResponse(
        f"{PREFIX}/releases/{quote(name)}?flash={quote(message)}", status_code=303
    )


@router.get("/releases/{name}/manifest.json")
def release_manifest(name: str, ui: UiContext, _: Operator) -> Response:
    """The release's manifest, checked against its sha256 (what an export writes)."""
    body = releases.manifest(ui.db, ui.store, name)[1]
    return Response(
        body,
        media_type="application/json",
        headers={"Content-Disposition": f'attachment; filename="{name}-manifest.json"'},
    )
