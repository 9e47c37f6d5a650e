"""Prometheus metrics of the node (``/metrics``): intake counts, queue sizes, errors.

Rates are what Prometheus computes from these counters. Study and quarantine
totals are read from the index when scraped, so they are right after a restart.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from node.index.store import NodeIndex


class NodeMetrics:
    """One registry per node process."""

    def __init__(self, index: NodeIndex, spool: Path) -> None:
        self.registry = CollectorRegistry()
        self.received = Counter(
            "radfed_node_instances_received",
            "Instances taken in, by route and result.",
            ["via", "result"],
            registry=self.registry,
        )
        self.store_seconds = Histogram(
            "radfed_node_cstore_seconds",
            "Time from a C-STORE arriving to its durable recording.",
            registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
        )
        self.errors = Counter(
            "radfed_node_errors", "Errors by kind.", ["kind"], registry=self.registry
        )
        self.registry.register(_IndexCollector(index, spool))


class _IndexCollector(Collector):
    def __init__(self, index: NodeIndex, spool: Path) -> None:
        self.index = index
        self.spool = spool

    def collect(self) -> Iterator[GaugeMetricFamily]:
        counts = self.index.counts()
        studies = GaugeMetricFamily(
            "radfed_node_studies", "Studies in the index by status.", labels=["status"]
        )
        for status, n in counts.by_status.items():
            studies.add_metric([status], n)
        yield studies
        instances = GaugeMetricFamily(
            "radfed_node_instances", "Instances in the index by modality.", labels=["modality"]
        )
        for modality, n in counts.by_modality.items():
            instances.add_metric([modality or "unknown"], n)
        yield instances
        yield GaugeMetricFamily(
            "radfed_node_quarantined", "Quarantine entries.", value=counts.quarantined
        )
        pending = sum(1 for _ in self.spool.glob("*.dcm")) if self.spool.exists() else 0
        yield GaugeMetricFamily(
            "radfed_node_spool_pending",
            "Instances acknowledged over DICOM and waiting to be taken in.",
            value=pending,
        )
