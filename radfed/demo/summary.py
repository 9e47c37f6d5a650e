"""The demo's closing summary: asked of the running services' APIs, printed and saved as JSON.

Per site: files offered, instances de-identified and indexed, studies by state
and quarantined files (the node API); registry totals per site (the coordinator
API, as an operator); the release; the training run round by round; where the
model and its provenance are; and how to reach the UIs.
"""

from __future__ import annotations

import json
import ssl
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

from radfed.demo.flow import RELEASE, Federation

#: Study states shown per site, in the order of an exam's life.
STATES = ("deidentified", "held", "approved", "queued", "shared", "rejected", "failed", "withdrawn")


def collect(fed: Federation) -> dict[str, Any]:
    """Everything the summary shows, read from the services while they run."""
    sites = []
    for site in fed.sites:
        with httpx.Client(
            base_url=site.url,
            headers={"Authorization": f"Bearer {site.operator_token}"},
            timeout=30,
        ) as node:
            counts = node.get("/api/v1/counts").raise_for_status().json()
        sites.append(
            {
                "site": site.name,
                "files_offered": site.offered_files,
                "instances_deidentified": counts["instances"],
                "studies": counts["studies"],
                "by_status": counts["by_status"],
                "quarantined": counts["quarantined"],
                "ui": site.url,
                "dicom": f"127.0.0.1:{site.dicom_port} (AE RADFED)",
            }
        )
    with httpx.Client(
        base_url=fed.url,
        headers={"Authorization": f"Bearer {fed.operator_token}"},
        verify=ssl.create_default_context(cafile=str(fed.ca)),
        timeout=60,
    ) as api:
        by_site = api.get("/api/v1/stats/site").raise_for_status().json()
        exams = api.get("/api/v1/exams", params={"limit": 1}).raise_for_status().json()
        release = api.get(f"/api/v1/releases/{RELEASE}").raise_for_status().json()
        run = api.get(f"/api/v1/runs/{fed.run_id}").raise_for_status().json()
    return {
        "workdir": str(fed.config.workdir),
        "sites": sites,
        "registry": {
            "exams": exams["total"],
            "by_site": {row["key"]: row["count"] for row in by_site["rows"]},
        },
        "release": {
            "name": release["name"],
            "exams": release["exam_count"],
            "instances": release["instance_count"],
            "manifest_sha256": release["manifest_sha256"],
        },
        "reviewed": fed.reviewed,
        "run": {
            "id": run["id"],
            "status": run["status"],
            "degraded": run["degraded"],
            "rounds": [
                {
                    "round": r["round"],
                    "trained": r["trained"],
                    "declined": r["declined"],
                    "dropped": r["dropped"],
                    "train_metrics": r["train_metrics"],
                    "evaluate_metrics": r["evaluate_metrics"],
                    "central_metrics": r["central_metrics"],
                }
                for r in run["history"]
            ],
            "model": str(fed.model_path) if fed.model_path else None,
            "model_sha256": (run.get("model") or {}).get("sha256"),
            "provenance": str(fed.provenance_path) if fed.provenance_path else None,
        },
        "urls": {
            "coordinator": fed.url,
            "coordinator_ca": str(fed.ca),
            **{f"node {s.name}": s.url for s in fed.sites},
        },
        "timings_s": {k: round(v, 1) for k, v in fed.timings.items()},
    }


def save(summary: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")


def _metric(values: dict[str, float], *names: str) -> str:
    for name in names:
        if name in values:
            return f"{values[name]:.3f}"
    return "—"


def render(summary: dict[str, Any], console: Console) -> None:
    """Print the summary as tables."""
    console.rule("[bold]Summary")
    states = [st for st in STATES if any(s["by_status"].get(st) for s in summary["sites"])]
    sites = Table(
        "site", "files", "de-identified", "studies", *states, "quarantined", title="Sites"
    )
    for s in summary["sites"]:
        sites.add_row(
            s["site"],
            str(s["files_offered"]),
            str(s["instances_deidentified"]),
            str(s["studies"]),
            *(str(s["by_status"].get(state, 0)) for state in states),
            str(s["quarantined"]),
        )
    console.print(sites)
    registry = summary["registry"]
    per_site = ", ".join(f"{k}: {v}" for k, v in registry["by_site"].items())
    console.print(f"Registry: {registry['exams']} exams ({per_site})")
    rel = summary["release"]
    console.print(
        f"Release {rel['name']}: {rel['exams']} exams, {rel['instances']} instances, "
        f"manifest sha256 {rel['manifest_sha256']}"
    )
    run = summary["run"]
    rounds = Table(
        "round",
        "trained (samples)",
        "declined",
        "dropped",
        "train loss",
        "site eval acc.",
        "held-out acc.",
        title=f"Training run {run['id']}: {run['status']}"
        + (" (degraded)" if run["degraded"] else ""),
    )
    for r in run["rounds"]:
        rounds.add_row(
            str(r["round"]),
            ", ".join(f"{k} ({v})" for k, v in r["trained"].items()),
            ", ".join(r["declined"]) or "—",
            ", ".join(r["dropped"]) or "—",
            _metric(r["train_metrics"], "train-loss", "loss"),
            _metric(r["evaluate_metrics"], "eval-accuracy", "accuracy"),
            _metric(r["central_metrics"], "eval-accuracy", "accuracy"),
        )
    console.print(rounds)
    console.print(f"Model: {run['model']} (sha256 {run['model_sha256']})")
    console.print(f"Provenance: {run['provenance']}")
    urls = summary["urls"]
    console.print(f"Coordinator UI and API: {urls['coordinator']} (CA: {urls['coordinator_ca']})")
    for s in summary["sites"]:
        console.print(f"Node {s['site']} UI and API: {s['ui']}, DICOM {s['dicom']}")
