"""Prometheus metrics of the coordinator (``/metrics``, an operator token required).

Requests are counted as they are answered, by method, route template and
status; the federation's state — sites by status and health, registered exams
and instances, uploads and training runs by status, SuperLink restarts — is
read from the registry when scraped, so it is right after a restart. Per-site
series carry only the site's name, which operators see anyway; no exam-level
value is exported.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from coordinator import sites
from coordinator.registry.cache import ResponseCache
from coordinator.registry.db import Database
from coordinator.registry.models import Exam, ExamInstance, TrainingRun, Upload
from coordinator.settings import CoordinatorSettings
from protocols import heap
from protocols.sqltypes import utcnow


class CoordinatorMetrics:
    """One registry per coordinator process."""

    def __init__(
        self,
        db: Database,
        settings: CoordinatorSettings,
        superlink_restarts: Callable[[], int] = lambda: 0,
    ) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "radfed_coordinator_requests",
            "HTTP requests answered, by method, route template and status code.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.request_seconds = Histogram(
            "radfed_coordinator_request_seconds",
            "Time to answer an HTTP request, by method.",
            ["method"],
            registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
        )
        self.registry.register(_RegistryCollector(db, settings, superlink_restarts))
        self.heap = _HeapCollector()
        self.registry.register(self.heap)

    def watch(self, cache: ResponseCache) -> None:
        """Export the registry answer cache's hits, misses and size."""
        self.registry.register(_CacheCollector(cache))

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(method, route, str(status)).inc()
        self.request_seconds.labels(method).observe(seconds)


class RequestMetrics:
    """ASGI middleware counting each HTTP request by the route that answered it.

    Plain ASGI (no per-request task as Starlette's ``BaseHTTPMiddleware`` makes):
    upload chunks and model downloads stream through untouched.
    """

    def __init__(self, app: ASGIApp, metrics: CoordinatorMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        began = time.perf_counter()
        status = 500

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            route = scope.get("route")
            template = str(getattr(route, "path", "") or "unmatched")
            self.metrics.observe(
                str(scope.get("method", "")), template, status, time.perf_counter() - began
            )


class _CacheCollector(Collector):
    def __init__(self, cache: ResponseCache) -> None:
        self.cache = cache

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        yield CounterMetricFamily(
            "radfed_coordinator_registry_cache_hits",
            "Registry searches, exam details and statistics answered from the cache.",
            value=self.cache.hits,
        )
        yield CounterMetricFamily(
            "radfed_coordinator_registry_cache_misses",
            "Registry searches, exam details and statistics computed anew.",
            value=self.cache.misses,
        )
        _, size = self.cache.size
        yield GaugeMetricFamily(
            "radfed_coordinator_registry_cache_bytes",
            "Bytes of encoded registry answers held now (bounded by registry_cache_mib).",
            value=size,
        )


class _HeapCollector(Collector):
    """The process's C heap (glibc only): what ``malloc_arena_max`` and trimming bound."""

    def __init__(self) -> None:
        self.trimmer: heap.Trimmer | None = None  # set by ``serve`` when it trims

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        if self.trimmer is not None:
            yield CounterMetricFamily(
                "radfed_coordinator_heap_trims",
                "Times the free pages of the C heap were given back (malloc_trim_s).",
                value=self.trimmer.trims,
            )
            yield CounterMetricFamily(
                "radfed_coordinator_heap_trim_seconds",
                "Seconds spent giving them back, all together.",
                value=self.trimmer.seconds,
            )
        now = heap.figures()
        if now is None:
            return
        in_bytes = GaugeMetricFamily(
            "radfed_coordinator_heap_bytes",
            "C heap (malloc) bytes by state: in use, free but kept in the arenas, and "
            "large allocations mapped on their own.",
            labels=["state"],
        )
        in_bytes.add_metric(["in_use"], now.in_use)
        in_bytes.add_metric(["free"], now.free)
        in_bytes.add_metric(["mapped"], now.mapped)
        yield in_bytes
        yield GaugeMetricFamily(
            "radfed_coordinator_heap_arenas",
            "malloc arenas in this process (at most malloc_arena_max when it is set).",
            value=now.arenas,
        )


class _RegistryCollector(Collector):
    def __init__(
        self,
        db: Database,
        settings: CoordinatorSettings,
        superlink_restarts: Callable[[], int],
    ) -> None:
        self.db = db
        self.settings = settings
        self.superlink_restarts = superlink_restarts

    def collect(self) -> Iterator[GaugeMetricFamily]:
        states = sites.states(self.db, self.settings)
        by_status = GaugeMetricFamily(
            "radfed_coordinator_sites", "Sites by status and health.", labels=["status", "health"]
        )
        tally: dict[tuple[str, str], int] = {}
        for state in states:
            key = (state.status, state.health)
            tally[key] = tally.get(key, 0) + 1
        for (status, health), n in sorted(tally.items()):
            by_status.add_metric([status, health], n)
        yield by_status
        seen = GaugeMetricFamily(
            "radfed_coordinator_site_last_seen_seconds",
            "Seconds since each enrolled site's last heartbeat.",
            labels=["site"],
        )
        now = utcnow()
        for state in states:
            if state.status == "active" and state.last_seen is not None:
                seen.add_metric([state.name], (now - state.last_seen).total_seconds())
        yield seen
        with self.db.read() as session:
            exams = session.scalar(
                select(func.count()).select_from(Exam).where(Exam.withdrawn_at.is_(None))
            )
            withdrawn = session.scalar(
                select(func.count()).select_from(Exam).where(Exam.withdrawn_at.is_not(None))
            )
            instances = session.scalar(select(func.count()).select_from(ExamInstance))
            uploads = session.execute(
                select(Upload.status, func.count()).group_by(Upload.status)
            ).all()
            runs = session.execute(
                select(TrainingRun.status, func.count()).group_by(TrainingRun.status)
            ).all()
        yield GaugeMetricFamily(
            "radfed_coordinator_exams", "Registered exams (not withdrawn).", value=exams or 0
        )
        yield GaugeMetricFamily(
            "radfed_coordinator_exams_withdrawn",
            "Exams their sites withdrew.",
            value=withdrawn or 0,
        )
        yield GaugeMetricFamily(
            "radfed_coordinator_instances",
            "Registered instances (withdrawn exams' included).",
            value=instances or 0,
        )
        family = GaugeMetricFamily(
            "radfed_coordinator_uploads", "Uploads by status.", labels=["status"]
        )
        for status, n in uploads:
            family.add_metric([str(status)], n)
        yield family
        family = GaugeMetricFamily(
            "radfed_coordinator_training_runs", "Training runs by status.", labels=["status"]
        )
        for status, n in runs:
            family.add_metric([str(status)], n)
        yield family
        yield GaugeMetricFamily(
            "radfed_coordinator_superlink_restarts",
            "Times the supervised Flower SuperLink was restarted since the coordinator started.",
            value=self.superlink_restarts(),
        )
