"""The coordinator's web UI in headless Chromium (Debian's, driven by Playwright).

One real coordinator (``radfed coordinator serve`` over TLS, SQLite) with two
real nodes that took in synthetic sites (``radfed node ingest``) and then, through
the node's own code, enrolled, imported labels, shared their approved exams and
sent a heartbeat; a third site still pending; a release ``v1`` cut through the
API; and a finished three-round training run whose run directory the
coordinator's own run watcher read (no Flower: a real run takes minutes).

An operator signs in with an API token and goes through every page: sites with
their heartbeats, a new site's one-time token, the contributions plot, the
registry with filters and an exam's thumbnails, a release cut, compared and
exported, the training run's participation, curves and model, a site revoked
(its node is refused by the API afterwards) and the verified audit chain. A
researcher sees the registry with small counts suppressed but neither the
sites nor the audit log. Forms without their CSRF token are refused, and no
page loads anything from anywhere but the coordinator. Screenshots of every
page go to ``test-artifacts/coordinator-ui/``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from coordinator import sites, tokens
from coordinator.flower import FlowerCli
from coordinator.registry.db import Database
from coordinator.registry.models import Site, TrainingRun
from coordinator.settings import CoordinatorSettings, load_settings
from coordinator.training import RunWatcher
from node import federation
from node.annotations.importer import import_labels
from node.errors import NodeError
from node.settings import load_settings as load_node_settings
from node.share.outbox import Sender
from node.site import open_index
from node.vetting.policy import VettingPolicy
from protocols.api.training import RunCreate
from protocols.training import RoundRecord, RunPhase, RunState
from protocols.version import SOFTWARE_VERSION
from radfed.synth.labels import write_label_corpus
from radfed.synth.site import write_site_corpus
from tests.helpers import CHROMIUM, CHROMIUM_ARGS, ROOT, CoordinatorProcess, run_cli

pytestmark = pytest.mark.integration

ARTIFACTS = ROOT / "test-artifacts" / "coordinator-ui"
RUN = "run-0001"
ROUNDS = 3
MODEL = b"synthetic weights for the web UI test"
#: Flower node ids the run directory names (the coordinator maps them to sites).
NODE_IDS = {"st-marys": "101", "north-general": "202"}
NOW = dt.datetime(2026, 5, 1, 12, 0, tzinfo=dt.UTC)


@dataclass
class Setup:
    coordinator: CoordinatorProcess
    settings: CoordinatorSettings
    operator: str
    researcher: str
    nodes: dict[str, Path]
    foreign: list[str] = field(default_factory=list)

    def api(self, method: str, path: str, token: str | None = None, **kwargs: Any) -> Any:
        answer = httpx.request(
            method,
            f"{self.coordinator.url}{path}",
            headers={"Authorization": f"Bearer {token or self.operator}"},
            verify=self.coordinator.tls(),
            timeout=30,
            **kwargs,
        )
        answer.raise_for_status()
        return answer.json() if answer.content else None


def _site(url: str, token: str, home: Path, labels: Path | None) -> None:
    """A node as its site runs it (the node's own code): enroll, take labels in, share
    what was approved, report. In this process: a CLI process per step costs seconds."""
    settings = load_node_settings(home)
    federation.enroll(settings, url, token)
    index = open_index(settings)
    if labels is not None:
        assert import_labels(index, labels, actor="test").applied
    sender = Sender(
        index,
        settings,
        lambda: federation.CoordinatorClient(settings),
        lambda: VettingPolicy.load(settings.policy_path),
    )
    try:
        sender.run_once(everything=True)
    finally:
        sender.stop()
    with federation.CoordinatorClient(settings) as client:
        federation.send_heartbeat(client, index.counts().by_status, None)


def _heartbeat_refusal(home: Path) -> NodeError | None:
    """What the coordinator answers a node's heartbeat: None when it takes it."""
    settings = load_node_settings(home)
    try:
        with federation.CoordinatorClient(settings) as client:
            federation.send_heartbeat(client, {}, None)
    except NodeError as exc:
        return exc
    return None


def _finished_run(settings: CoordinatorSettings) -> None:
    """A three-round run, recorded as the coordinator records one (north-general drops out)."""
    db = Database.open(settings.db_url)
    try:
        with db.write() as session:
            for name, node_id in NODE_IDS.items():
                site = session.scalar(select(Site).where(Site.name == name))
                assert site is not None
                site.flower_node_id = node_id
            run_dir = settings.runs_dir / RUN
            session.add(
                TrainingRun(
                    name=RUN,
                    app="cxr",
                    status="running",
                    config=RunCreate(release="v1", rounds=ROUNDS, min_nodes=1).model_dump_json(),
                    created_by="rita",
                    app_hash="ab" * 32,
                    rounds=ROUNDS,
                    run_dir=str(run_dir),
                    metrics=json.dumps({"superlink_restarts": 0}),
                )
            )
        run_dir.mkdir(parents=True)
        ids = list(NODE_IDS.values())
        records = [
            RoundRecord(
                round=r,
                sampled=ids,
                trained={ids[0]: 4, **({ids[1]: 2} if r < ROUNDS else {})},
                dropped=[ids[1]] if r == ROUNDS else [],
                train_metrics={"train-loss": 1.0 / r, "train-accuracy": 0.5 + 0.1 * r},
                evaluate_metrics={"eval-loss": 1.2 / r, "eval-accuracy": 0.45 + 0.1 * r},
                central_metrics={
                    "eval-loss": 1.1 / r,
                    "eval-accuracy": 0.4 + 0.1 * r,
                    "num-examples": 6.0,
                },
                finished_at=NOW + dt.timedelta(minutes=r),
            )
            for r in range(1, ROUNDS + 1)
        ]
        (run_dir / "rounds.jsonl").write_text("".join(r.model_dump_json() + "\n" for r in records))
        (run_dir / "model.safetensors").write_bytes(MODEL)
        (run_dir / "status.json").write_text(
            RunState(
                phase=RunPhase.FINISHED, round=ROUNDS, rounds=ROUNDS, updated_at=NOW
            ).model_dump_json()
        )
        RunWatcher(db, settings, settings.store(), FlowerCli(settings)).poll()
    finally:
        db.close()


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    if not Path(CHROMIUM).exists():
        pytest.fail("Debian's chromium is missing: `make test` installs it (apt chromium)")
    shutil.rmtree(ARTIFACTS, ignore_errors=True)
    ARTIFACTS.mkdir(parents=True)
    base = tmp_path_factory.mktemp("coordinator-ui")
    home = base / "coordinator"
    run_cli("coordinator", "init", "--home", str(home), check=True)
    settings = load_settings(home)
    db = Database.open(settings.db_url)
    try:
        operator = tokens.create(db, "olga", "operator", actor="test")
        researcher = tokens.create(db, "rita", "researcher", actor="test")
        enroll = {n: sites.add(db, settings, n, actor="test") for n in NODE_IDS}
        sites.add(db, settings, "lakeside", actor="test")  # never enrolls
    finally:
        db.close()
    nodes = {name: base / name for name in NODE_IDS}
    corpora = {name: base / f"{name}-export" for name in NODE_IDS}
    # No SR (its free text holds a study for review); st-marys keeps its ultrasound held.
    st_marys = write_site_corpus(
        corpora["st-marys"], patients=2, ct_slices=2, ct_size=64, cr_size=64, with_sr=False
    )
    write_site_corpus(
        corpora["north-general"],
        patients=1,
        ct_slices=2,
        ct_size=64,
        cr_size=64,
        seed=1,
        with_us=False,
        with_sr=False,
    )
    labels = {
        "st-marys": write_label_corpus(st_marys, base / "st-marys-labels").labels_csv,
        "north-general": None,
    }
    with ThreadPoolExecutor(max_workers=2) as pool:
        ingested = [
            pool.submit(
                run_cli,
                "node",
                "ingest",
                str(corpora[n]),
                "--home",
                str(nodes[n]),
                "-q",
                check=True,
            )
            for n in NODE_IDS
        ]
        coordinator = CoordinatorProcess(home, env={"RADFED_COORDINATOR_SCAN_WORKERS": "1"})
        coordinator.start()
        try:
            for done in ingested:
                done.result()
            for n in NODE_IDS:  # one after the other: Alembic's migrations are not thread-safe
                _site(coordinator.url, enroll[n], nodes[n], labels[n])
            ready = Setup(coordinator, settings, operator, researcher, nodes)
            ready.api(
                "POST",
                "/api/v1/releases",
                json={"name": "v1", "filters": {"site": "st-marys"}, "export": False},
            )
            _finished_run(settings)
            yield ready
        finally:
            coordinator.stop()


# -- the browser ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser(setup: Setup) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        launched = pw.chromium.launch(
            executable_path=CHROMIUM,
            args=CHROMIUM_ARGS,
        )
        yield launched
        launched.close()


def signed_in(browser: Any, setup: Setup, token: str, start: str = "/ui/") -> Any:
    """A fresh browser context signed in with ``token`` (its requests recorded), on ``start``."""
    context = browser.new_context(ignore_https_errors=True, viewport={"width": 1360, "height": 900})
    origin = setup.coordinator.url + "/"

    def record(request: Any) -> None:
        if not (request.url.startswith(origin) or request.url.startswith("data:")):
            setup.foreign.append(request.url)

    context.on("request", record)
    page = context.new_page()
    page.goto(setup.coordinator.url + start)
    assert "/ui/login" in page.url
    page.fill("#token", token)
    page.click("#login")
    page.wait_for_load_state()
    assert "/ui/login" not in page.url, page.content()
    return page


def shot(page: Any, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def chart(page: Any, selector: str) -> dict[str, list[str]]:
    """Series name -> the titles of its points, read from an inline SVG chart."""
    found: dict[str, list[str]] = page.eval_on_selector_all(
        f"{selector} svg g.series",
        """groups => Object.fromEntries(groups.map(g => [
            g.dataset.series,
            Array.from(g.querySelectorAll('circle.point')).map(c => c.textContent),
        ]))""",
    )
    return found


def cell(page: Any, selector: str) -> str:
    text: str = page.inner_text(selector)
    return text.strip()


def test_the_login_page_comes_first_and_a_wrong_token_is_refused(
    setup: Setup, browser: Any
) -> None:
    # Prepare
    context = browser.new_context(ignore_https_errors=True)
    page = context.new_page()

    # Execute
    page.goto(f"{setup.coordinator.url}/")
    at_login = page.url
    shot(page, "01-login")
    page.fill("#token", "rfc_" + "A" * 43)
    page.click("#login")
    page.wait_for_selector("#error")
    refused = cell(page, "#error")
    health = httpx.get(f"{setup.coordinator.url}/healthz", verify=setup.coordinator.tls())
    context.close()

    # Assert
    assert at_login.startswith(f"{setup.coordinator.url}/ui/login")
    assert refused == "Unknown or revoked API token."
    assert health.status_code == 200 and health.json()["status"] == "ok"


def test_an_operator_sees_the_sites_and_adds_one(setup: Setup, browser: Any) -> None:
    # Prepare
    page = signed_in(browser, setup, setup.operator, "/ui/sites")
    listed = {s["name"]: s for s in setup.api("GET", "/api/v1/sites")}

    # Execute
    rows = {
        name: {
            "status": cell(page, f"tr[data-site='{name}'] td.status"),
            "health": cell(page, f"tr[data-site='{name}'] td.health"),
            "version": cell(page, f"tr[data-site='{name}'] td.version"),
            "shared": cell(page, f"tr[data-site='{name}'] td.count-shared"),
            "registered": cell(page, f"tr[data-site='{name}'] td.registered"),
        }
        for name in ("st-marys", "north-general", "lakeside")
    }
    shot(page, "02-sites")
    page.fill("#site-name", "riverside")
    page.click("#add-site-submit")
    page.wait_for_selector("#token-value")
    token = cell(page, "#token-value")
    shot(page, "03-site-added-token-shown-once")
    page.goto(f"{setup.coordinator.url}/ui/sites")
    shown_again = page.locator("#token-value").count()
    after = {s["name"]: s for s in setup.api("GET", "/api/v1/sites")}
    page.context.close()

    # Assert
    for name in ("st-marys", "north-general"):
        assert rows[name]["status"] == "active" and rows[name]["health"] == "ok"
        assert rows[name]["version"] == SOFTWARE_VERSION == listed[name]["version"]
        assert rows[name]["shared"] == str(listed[name]["counts"]["shared"])
        assert int(rows[name]["registered"]) == listed[name]["counts"]["shared"] > 0
    assert rows["lakeside"]["status"] == "pending" and rows["lakeside"]["health"] == "never"
    assert token.startswith("rfe1.") and shown_again == 0
    assert after["riverside"]["status"] == "pending"
    assert setup.foreign == []


def test_the_overview_plots_contributions_per_site(setup: Setup, browser: Any) -> None:
    # Prepare
    page = signed_in(browser, setup, setup.operator)
    per_site = {row["key"]: row["count"] for row in setup.api("GET", "/api/v1/stats/site")["rows"]}
    days: dict[str, set[str]] = {}
    for exam in setup.api("GET", "/api/v1/exams", params={"limit": 500})["items"]:
        days.setdefault(exam["site"], set()).add(exam["registered_at"][:10])

    # Execute
    lines = chart(page, "#contributions")
    total = cell(page, "#count-exams")
    shot(page, "04-overview")
    page.context.close()

    # Assert: one line per contributing site, its last point the site's exams so far.
    assert set(lines) == set(per_site) == set(NODE_IDS)
    for site, points in lines.items():
        assert len(points) == len(days[site])  # a point per day the site's exams came in
        assert points[-1] == f"{site}: {max(days[site])}, {per_site[site]}"
    assert int(total) == sum(per_site.values())
    assert setup.foreign == []


def test_the_registry_browser_filters_and_shows_an_exams_thumbnails(
    setup: Setup, browser: Any
) -> None:
    # Prepare
    everything = setup.api("GET", "/api/v1/exams", params={"limit": 500})
    at_st_marys = setup.api("GET", "/api/v1/exams", params={"site": "st-marys"})
    ct = next(e for e in everything["items"] if e["modalities"] == ["CT"])
    labelled = next(
        d
        for d in (
            setup.api("GET", f"/api/v1/exams/{e['study_instance_uid']}")
            for e in at_st_marys["items"]
        )
        if d["labels"]
    )
    label = labelled["labels"][0]
    condition = f"{label['scheme']}:{label['name']}={label['value']}"
    with_label = setup.api("GET", "/api/v1/exams", params={"label": condition})
    page = signed_in(browser, setup, setup.operator, "/ui/exams")

    # Execute
    all_rows = page.locator("tr.exam").count()
    shot(page, "05-registry")
    page.select_option("#f-site", "st-marys")
    page.click("#f-apply")
    page.wait_for_load_state()
    site_rows = page.eval_on_selector_all("tr.exam", "rows => rows.map(r => r.dataset.site)")
    page.goto(f"{setup.coordinator.url}/ui/exams")
    page.fill("#f-label", condition)
    page.click("#f-apply")
    page.wait_for_load_state()
    label_rows = page.eval_on_selector_all("tr.exam", "rows => rows.map(r => r.dataset.uid)")
    shot(page, "06-registry-filtered-by-label")
    page.goto(f"{setup.coordinator.url}/ui/exams?date_from=2020-02-30")
    bad_date = cell(page, "#error")
    page.goto(f"{setup.coordinator.url}/ui/exams")
    page.click(f"tr[data-uid='{ct['study_instance_uid']}'] a")
    page.wait_for_selector("img.thumbnail")
    page.wait_for_load_state("load")  # every image of the page is in
    widths = page.eval_on_selector_all("img.thumbnail", "imgs => imgs.map(i => i.naturalWidth)")
    source = page.get_attribute("img.thumbnail", "src")
    png = page.request.get(setup.coordinator.url + str(source))
    png_type, body = png.headers["content-type"], png.body()
    shot(page, "07-exam-with-thumbnails")
    page.context.close()

    # Assert
    assert all_rows == everything["total"] > 0
    assert site_rows and set(site_rows) == {"st-marys"} and len(site_rows) == at_st_marys["total"]
    assert sorted(label_rows) == sorted(e["study_instance_uid"] for e in with_label["items"])
    assert "study_date_from" in bad_date
    assert len(widths) == ct["instance_count"] and all(w > 0 for w in widths)
    assert png.ok and png_type == "image/png"
    assert body.startswith(b"\x89PNG") and b"tEXt" not in body and b"iTXt" not in body
    assert setup.foreign == []


def test_a_release_is_cut_compared_and_exported(setup: Setup, browser: Any) -> None:
    # Prepare
    total = setup.api("GET", "/api/v1/exams")["total"]
    v1 = setup.api("GET", "/api/v1/releases/v1")
    page = signed_in(browser, setup, setup.operator, "/ui/releases")

    # Execute: v2 takes every exam, not exported yet; then compare and export it.
    page.fill("#r-name", "v2")
    page.uncheck("#r-export")
    shot(page, "08-releases")
    page.click("#r-submit")
    page.wait_for_selector("#release-digest")
    digest = cell(page, "#release-digest")
    exams = cell(page, "#release-exams")
    not_exported = page.locator("#not-exported").count()
    shot(page, "09-release-v2")
    page.goto(f"{setup.coordinator.url}/ui/releases")
    page.select_option("#diff-a", "v1")
    page.select_option("#diff-b", "v2")
    page.click("#diff-submit")
    page.wait_for_selector("#diff-added")
    added, removed, unchanged = (
        int(cell(page, f"#diff-{what}")) for what in ("added", "removed", "unchanged")
    )
    shot(page, "10-release-diff")
    page.goto(f"{setup.coordinator.url}/ui/releases/v2")
    page.click("#export")
    page.wait_for_selector("#export-path")
    exported = Path(cell(page, "#export-path"))
    shot(page, "11-release-exported")
    page.context.close()
    v2 = setup.api("GET", "/api/v1/releases/v2")

    # Assert
    assert v2["exam_count"] == int(exams) == total
    assert digest == v2["manifest_sha256"]
    assert not_exported == 1
    assert (added, removed, unchanged) == (total - v1["exam_count"], 0, v1["exam_count"])
    manifest = (exported / "manifest.json").read_bytes()
    assert hashlib.sha256(manifest).hexdigest() == digest
    assert (exported / "labels.csv").is_file()
    assert setup.foreign == []


def test_a_training_run_shows_participation_curves_and_its_model(
    setup: Setup, browser: Any
) -> None:
    # Prepare
    page = signed_in(browser, setup, setup.operator, "/ui/runs")

    # Execute
    listed = cell(page, f"tr[data-run='{RUN}']")
    shot(page, "12-runs")
    page.click(f"tr[data-run='{RUN}'] a")
    page.wait_for_selector("#participation")
    status = cell(page, "#run-status")
    last_round = {
        site: cell(page, f"tr[data-round='{ROUNDS}'] td[data-site='{site}']") for site in NODE_IDS
    }
    rounds = page.locator("#participation tbody tr").count()
    loss = chart(page, "#chart-loss")
    accuracy = chart(page, "#chart-accuracy")
    shot(page, "13-run")
    model = page.request.get(f"{setup.coordinator.url}/ui/runs/{RUN}/model.safetensors")
    weights, model_sha = model.body(), model.headers.get("x-model-sha256")
    provenance = page.request.get(f"{setup.coordinator.url}/ui/runs/{RUN}/provenance.json")
    recorded = provenance.json()
    page.context.close()

    # Assert
    assert "finished" in listed and f"{ROUNDS} / {ROUNDS}" in listed
    assert status == "finished" and rounds == ROUNDS
    assert last_round == {"st-marys": "trained (4)", "north-general": "dropped"}
    assert set(loss) == {
        "training (federated): train-loss",
        "evaluation (federated): eval-loss",
        "evaluation (centralised): eval-loss",
    }
    assert all(len(points) == ROUNDS for points in [*loss.values(), *accuracy.values()])
    assert len(accuracy) == 3
    assert model.ok and weights == MODEL and model_sha == hashlib.sha256(MODEL).hexdigest()
    assert provenance.ok and recorded["run"] == RUN and recorded["sites"] == sorted(NODE_IDS)
    assert setup.foreign == []


def test_an_operator_revokes_a_site_and_the_audit_chain_holds(setup: Setup, browser: Any) -> None:
    # Prepare
    page = signed_in(browser, setup, setup.operator, "/ui/sites")

    # Execute
    page.click("tr[data-site='north-general'] a.revoke")
    page.wait_for_selector("#revoke-form")
    page.fill("#revoke-reason", "decommissioned")
    page.fill("#revoke-confirm", "north-general")
    shot(page, "14-revoke-confirm")
    page.click("#revoke-submit")
    page.wait_for_selector("#flash")
    status = cell(page, "tr[data-site='north-general'] td.status")
    shot(page, "15-site-revoked")
    refused = _heartbeat_refusal(setup.nodes["north-general"])
    page.goto(f"{setup.coordinator.url}/ui/audit")
    chain = page.get_attribute("#chain", "data-ok")
    banner = cell(page, "#chain")
    actions = page.eval_on_selector_all(
        "tr.entry",
        "rows => rows.map(r => [r.dataset.action, r.children[2].textContent,"
        " r.children[4].textContent])",
    )
    shot(page, "16-audit")
    page.context.close()
    verified = setup.api("GET", "/api/v1/audit/verify")

    # Assert
    assert status == "revoked"
    assert refused is not None and refused.code == "site_revoked"
    assert chain == "true" and banner.startswith("Chain verified")
    assert verified["ok"] and str(verified["entries"]) in banner
    assert ["site.revoke", "olga", "north-general"] in actions
    assert ["login", "olga", "olga"] in actions
    assert setup.foreign == []


def test_a_researcher_sees_the_registry_but_not_the_sites_or_the_audit_log(
    setup: Setup, browser: Any
) -> None:
    # Prepare
    k = setup.settings.small_count_k
    exact = {row["key"]: row["count"] for row in setup.api("GET", "/api/v1/stats/site")["rows"]}
    page = signed_in(browser, setup, setup.researcher)

    # Execute
    nav = page.eval_on_selector_all("header nav a", "links => links.map(a => a.id)")
    shown = {site: cell(page, f"#stats-site tr[data-key='{site}'] td.num") for site in exact}
    lines = chart(page, "#contributions")
    shot(page, "17-researcher-overview")
    refused = {}
    for path in ("/ui/sites", "/ui/audit", "/ui/sites/st-marys/revoke"):
        answer = page.goto(setup.coordinator.url + path)
        refused[path] = answer.status if answer is not None else 0
    shot(page, "18-researcher-refused")
    page.goto(f"{setup.coordinator.url}/ui/releases")
    release_form = page.locator("#release-form").count()
    page.goto(f"{setup.coordinator.url}/ui/runs/{RUN}")
    run_status = cell(page, "#run-status")
    page.context.close()

    # Assert: counts under k read "<k", as /api/v1/stats answers a researcher.
    assert "nav-sites" not in nav and "nav-audit" not in nav and "nav-exams" in nav
    for site, count in exact.items():
        assert shown[site] == (f"<{k}" if 0 < count < k else str(count))
    assert list(lines) == ["all sites"]
    assert refused == {path: 403 for path in refused}
    assert release_form == 0 and run_status == "finished"
    assert setup.foreign == []


# -- forms and sessions, without a browser -------------------------------------------------


def _session(setup: Setup, token: str) -> tuple[httpx.Client, str]:
    """A signed-in client (as a browser would be) and its session's CSRF token."""
    client = httpx.Client(base_url=setup.coordinator.url, verify=setup.coordinator.tls())
    form = client.get("/ui/login")
    csrf = re.search(r'name="csrf" value="([0-9a-f]+)"', form.text)
    assert csrf is not None
    signed = client.post("/ui/login", data={"token": token, "csrf": csrf.group(1)})
    assert signed.status_code == 303, signed.text
    page = client.get("/ui/")
    session_csrf = re.search(r'name="csrf" value="([0-9a-f]+)"', page.text)
    assert session_csrf is not None
    return client, session_csrf.group(1)


def test_forms_without_their_csrf_token_are_refused(setup: Setup) -> None:
    # Prepare
    operator, csrf = _session(setup, setup.operator)
    researcher, researcher_csrf = _session(setup, setup.researcher)
    stranger = httpx.Client(base_url=setup.coordinator.url, verify=setup.coordinator.tls())

    # Execute
    without = operator.post("/ui/sites", data={"name": "no-csrf"})
    forged = operator.post("/ui/sites", data={"name": "forged", "csrf": researcher_csrf})
    by_researcher = researcher.post(
        "/ui/releases", data={"name": "by-rita", "csrf": researcher_csrf}
    )
    login_without = stranger.post("/ui/login", data={"token": setup.operator})
    with_csrf = operator.post("/ui/sites", data={"name": "with-csrf", "csrf": csrf})
    listed = {s["name"] for s in setup.api("GET", "/api/v1/sites")}
    names = {r["name"] for r in setup.api("GET", "/api/v1/releases")}
    for client in (operator, researcher, stranger):
        client.close()

    # Assert
    assert without.status_code == 403 and forged.status_code == 403
    assert by_researcher.status_code == 403
    assert login_without.status_code == 403 and "radfed_coordinator_session" not in stranger.cookies
    assert with_csrf.status_code == 200 and "rfe1." in with_csrf.text
    assert "no-csrf" not in listed and "forged" not in listed and "with-csrf" in listed
    assert "by-rita" not in names
    for response in (without, with_csrf):
        assert "default-src 'self'" in response.headers["content-security-policy"]
        assert response.headers["x-frame-options"] == "DENY"


def test_revoking_an_api_token_ends_its_web_sessions(setup: Setup) -> None:
    # Prepare
    db = Database.open(setup.settings.db_url)
    try:
        token = tokens.create(db, "temp", "operator", actor="test")
        client, _ = _session(setup, token)
        before = client.get("/ui/sites")
        tokens.revoke(db, "temp", actor="test")
    finally:
        db.close()

    # Execute
    after = client.get("/ui/sites")
    client.close()

    # Assert
    assert before.status_code == 200
    assert after.status_code == 303 and after.headers["location"].startswith("/ui/login")
