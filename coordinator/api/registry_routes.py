"""The registry over HTTP: exam search and detail, statistics, releases, withdrawal.

Operators and researchers read (``Reader``); statistics show researchers
counts under k as ``<k`` and operators exact counts. Operators cut releases
(``Operator``); a node withdraws its own site's exams (``Node``).

Searches, exam details and statistics are answered from
``coordinator.registry.cache`` while the registry generation the request read
stands (``registry_cache_mib``): a repeated question costs one authentication
and one generation read, in one trip to the thread pool, and no SQL or
serialisation. Answers computed anew run in the thread pool as before.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, FastAPI, Query, Request, Response
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from coordinator import releases
from coordinator.api.app import (
    Node,
    Operator,
    Reader,
    caller,
    errors,
)
from coordinator.objects import ObjectStore
from coordinator.registry import search
from coordinator.registry.cache import ResponseCache, generation
from coordinator.registry.db import Database
from coordinator.settings import CoordinatorSettings
from protocols.api.coordinator import (
    ExamDetail,
    ExamPage,
    ExamSort,
    ExamWithdrawn,
    ReleaseCreate,
    ReleaseDiff,
    ReleasePublic,
    SortOrder,
    StatsTable,
    WithdrawRequest,
)


@dataclass(frozen=True)
class Viewer:
    """Who reads the registry (operators see exact counts) and the generation they see."""

    name: str
    operator: bool
    generation: int


def require_viewer(request: Request) -> Viewer:
    """An operator or a researcher, which of the two, and the registry generation now.

    One token check and the generation read after it, on one pooled connection
    (an answer kept under that generation is at least as new as the registry was
    when the request was let in).
    """
    cache: ResponseCache = request.app.state.registry_cache
    db: Database = request.app.state.db
    with db.reader.connect() as connection:
        name, role = caller(request, "operator", "researcher", connection=connection)
        seen = generation(connection) if cache.enabled else 0
    return Viewer(name, role == "operator", seen)


Viewing = Annotated[Viewer, Depends(require_viewer)]


def mount_registry(
    app: FastAPI, settings: CoordinatorSettings, db: Database, store: ObjectStore
) -> None:
    """Add the registry and release routes to the coordinator's app."""

    cache = ResponseCache(int(settings.registry_cache_mib * 2**20))
    app.state.registry_cache = cache
    app.state.metrics.watch(cache)

    async def answer(viewer: Viewer, key: Hashable, compute: Callable[[], BaseModel]) -> Response:
        """The kept answer to ``key`` at the viewer's generation, or ``compute``'s (then kept)."""
        body = cache.get(viewer.generation, key) if cache.enabled else None
        if body is None:
            # FastAPI's own encoding of the response model (by alias, compact).
            body = await run_in_threadpool(
                lambda: compute().model_dump_json(by_alias=True).encode()
            )
            if cache.enabled:
                cache.put(viewer.generation, key, body)
        return Response(body, media_type="application/json")

    @app.get("/api/v1/exams", response_model=ExamPage, responses=errors(422))
    async def list_exams(
        viewer: Viewing,
        site: str | None = None,
        modality: str | None = None,
        body_part: str | None = None,
        label: Annotated[
            list[str] | None, Query(description='"scheme:name=value", repeatable')
        ] = None,
        clinical: Annotated[list[str] | None, Query(description='"variable=value"')] = None,
        date_from: Annotated[dt.date | None, Query(description="shifted study date")] = None,
        date_to: Annotated[dt.date | None, Query(description="shifted study date")] = None,
        include_withdrawn: bool = False,
        sort: ExamSort = ExamSort.STUDY_DATE,
        order: SortOrder = SortOrder.DESC,
        limit: Annotated[int, Query(ge=1, le=search.MAX_LIMIT)] = 50,
        offset: Annotated[int, Query(ge=0)] = 0,
    ) -> Response:
        """Exams matching every filter given; withdrawn ones only with ``include_withdrawn``."""
        filters = search.make_filters(
            site=site,
            modality=modality,
            body_part=body_part,
            labels=label or [],
            clinical=clinical or [],
            study_date_from=date_from,
            study_date_to=date_to,
        )
        key = (
            "exams",
            filters.model_dump_json(),
            include_withdrawn,
            ExamSort(sort),
            SortOrder(order),
            limit,
            offset,
        )
        return await answer(
            viewer,
            key,
            lambda: search.search(
                db,
                filters,
                include_withdrawn=include_withdrawn,
                sort=sort,
                order=order,
                limit=limit,
                offset=offset,
            ),
        )

    @app.get("/api/v1/exams/{study_uid}", response_model=ExamDetail, responses=errors(404, 422))
    async def exam_detail(study_uid: str, viewer: Viewing) -> Response:
        return await answer(viewer, ("exam", study_uid), lambda: search.detail(db, study_uid))

    @app.get("/api/v1/stats/{dimension}", response_model=StatsTable, responses=errors(404, 422))
    async def exam_stats(
        dimension: str,
        viewer: Viewing,
        label: Annotated[
            str | None, Query(description='with dimension "label": one "scheme:name"')
        ] = None,
    ) -> Response:
        """Non-withdrawn exams counted by site, modality or label (``<k`` for researchers)."""
        k = settings.small_count_k
        return await answer(
            viewer,
            ("stats", dimension, label, viewer.operator, k),
            lambda: search.stats(db, dimension, k=k, exact=viewer.operator, label=label),
        )

    @app.post(
        "/api/v1/releases",
        response_model=ReleasePublic,
        status_code=201,
        responses=errors(409, 422, 500),
    )
    def create_release(body: ReleaseCreate, who: Operator) -> ReleasePublic:
        """Freeze the matching exams into a release (exported under the releases folder)."""
        return releases.create(
            db, store, settings, body.name, body.filters, who, export=body.export
        )

    @app.get("/api/v1/releases", response_model=list[ReleasePublic], responses=errors())
    def list_releases(_: Reader) -> list[ReleasePublic]:
        return releases.list_releases(db)

    @app.get("/api/v1/releases/{name}", response_model=ReleasePublic, responses=errors(404, 422))
    def show_release(name: str, _: Reader) -> ReleasePublic:
        return releases.get(db, name)

    @app.get(
        "/api/v1/releases/{a}/diff/{b}", response_model=ReleaseDiff, responses=errors(404, 422)
    )
    def diff_releases(a: str, b: str, _: Reader) -> ReleaseDiff:
        return releases.diff(db, a, b)

    @app.post(
        "/api/v1/node/exams/{study_uid}/withdraw",
        response_model=ExamWithdrawn,
        responses=errors(404, 422),
    )
    def withdraw_exam(study_uid: str, body: WithdrawRequest, node: Node) -> ExamWithdrawn:
        """A site withdraws one of its exams (idempotent)."""
        return releases.withdraw(db, node.site_id, study_uid, body.reason, f"site:{node.site}")
