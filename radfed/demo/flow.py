"""The demo's flow: a federation on one machine, from PHI-laden exports to a trained model.

Every step is the product's own: the setup steps run the ``radfed`` CLI commands
an operator would type (in this process, to save their start-up), the services
run as processes (``radfed coordinator serve`` with its Flower SuperLink,
``radfed node serve`` with its SuperNode), and the review, the release and the
training run go through the node and coordinator HTTP APIs as a reviewer, an
operator and a researcher would.
"""

from __future__ import annotations

import json
import os
import secrets
import ssl
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console

from radfed.demo.services import Service, ServiceError, free_port

#: The two sites of the demo federation.
SITES = ("north", "south")
#: The reference app and its settings for a quick run on two cores: the learnable
#: signal of the generated cohort is still learnt at this size.
APP = "cxr"
RELEASE = "v1.0"
TRAIN = {"image_size": 32, "local_epochs": 8, "batch_size": 8, "learning_rate": 0.002}


class DemoError(RuntimeError):
    """A step of the demo failed; the message says which and where to look."""


@dataclass(frozen=True)
class DemoConfig:
    workdir: Path
    patients: int = 3
    ct_slices: int = 16
    cohort: int = 28
    heldout: int = 40
    rounds: int = 3
    jobs: int = 0


@dataclass
class Site:
    """One demo site: its node home, generated exports, ports and API tokens."""

    name: str
    number: int
    root: Path
    api_port: int = field(default_factory=free_port)
    dicom_port: int = field(default_factory=free_port)
    supernode_port: int = field(default_factory=free_port)
    operator_token: str = ""
    ui_password: str = ""
    offered_files: int = 0
    service: Service | None = None

    @property
    def home(self) -> Path:
        return self.root / "node-home"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"


@dataclass
class Federation:
    """Everything the demo started, and what the summary reports."""

    config: DemoConfig
    sites: list[Site]
    coordinator_home: Path
    api_port: int = field(default_factory=free_port)
    superlink_port: int = field(default_factory=free_port)
    operator_token: str = ""
    researcher_token: str = ""
    coordinator: Service | None = None
    reviewed: list[dict[str, str]] = field(default_factory=list)
    run_id: str = ""
    model_path: Path | None = None
    provenance_path: Path | None = None
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.api_port}"

    @property
    def ca(self) -> Path:
        return self.coordinator_home / "pki" / "ca.crt"

    def services(self) -> list[Service]:
        found = [s.service for s in self.sites if s.service is not None]
        return found + ([self.coordinator] if self.coordinator is not None else [])

    def stop(self) -> None:
        """Stop the nodes, then the coordinator: each stops its Flower processes."""
        for service in self.services():
            service.stop()


def cli(*args: str) -> None:
    """Run a ``radfed`` command in this process, as an operator would type it."""
    import typer

    from radfed.cli import app

    command = typer.main.get_command(app)
    try:
        code = command.main(list(args), prog_name="radfed", standalone_mode=False)
    except SystemExit as exc:  # a command that exits itself
        code = exc.code
    if isinstance(code, int) and code != 0:
        raise DemoError(f"`radfed {' '.join(args)}` exited with status {code}")


class Demo:
    """Runs the stages in order, printing what happens and how long each took."""

    def __init__(self, config: DemoConfig, console: Console) -> None:
        self.config = config
        self.out = console
        base = config.workdir
        self.fed = Federation(
            config=config,
            sites=[Site(name, n, base / name) for n, name in enumerate(SITES)],
            coordinator_home=base / "coordinator",
        )
        self._started = time.monotonic()

    @contextmanager
    def stage(self, title: str) -> Iterator[None]:
        self.out.rule(f"[bold]{title}")
        began = time.monotonic()
        yield
        took = time.monotonic() - began
        self.fed.timings[title] = took
        self.out.print(
            f"[green]done[/] in {took:.1f} s (demo at {time.monotonic() - self._started:.0f} s)"
        )

    def run(self) -> Federation:
        fed = self.fed
        with self.stage("1. Generate a PHI-laden export and research files for each site"):
            self.generate()
        with self.stage("2. Start the coordinator (federation CA, registry, Flower SuperLink)"):
            self.start_coordinator()
        for site in fed.sites:
            with self.stage(f"3. {site.name}: enroll, ingest, de-identify, scan, vet, annotate"):
                self.take_in(site)
        with self.stage("4. Start the nodes (API + web UI, DICOM listener, Flower SuperNode)"):
            for site in fed.sites:
                self.start_node(site)
        with self.stage("5. Review: the held exams, approved through the node API"):
            self.review()
        with self.stage("6. Share: each node sends its approved exams; the coordinator registers"):
            self.wait_shared()
        with self.stage(f"7. Release {RELEASE} of the registry"):
            self.release()
        with self.stage(f"8. Federated training: {self.config.rounds} rounds on {RELEASE}"):
            self.train()
        return fed

    # -- 1 -----------------------------------------------------------------
    def generate(self) -> None:
        from radfed.synth.cohort import cohort_manifest, write_cohort
        from radfed.synth.labels import write_label_corpus
        from radfed.synth.site import write_site_corpus

        cfg = self.config
        for site in self.fed.sites:
            corpus = write_site_corpus(
                site.root / "pacs-export",
                patients=cfg.patients,
                ct_slices=cfg.ct_slices,
                ct_size=256,
                cr_size=512,
                seed=site.number,
            )
            (site.root / "pacs-export" / "README.txt").write_text(
                "exported by the PACS; not a DICOM file\n"
            )
            write_label_corpus(corpus, site.root / "research", seed=site.number)
            cohort = write_cohort(
                site.root / "cxr-cohort",
                n=cfg.cohort,
                seed=100 + site.number,
                size=64,
                site=site.name,
            )
            site.offered_files = len(corpus.files) + len(cohort.images) + 1
            self.out.print(
                f"{site.name}: {len(corpus.files)} CT/CR/US/SR files of {cfg.patients} patients "
                f"and {len(cohort.images)} labelled chest radiographs, with names, MRNs, "
                "accession numbers and dates planted; labels.csv, clinical.csv and CT masks "
                f"in {site.root / 'research'}"
            )
        heldout = write_cohort(
            cfg.workdir / "held-out", n=cfg.heldout, seed=999, size=64, site="held-out"
        )
        manifest = cfg.workdir / "held-out.json"
        manifest.write_text(
            cohort_manifest(heldout, run="held-out", site="held-out").model_dump_json()
        )
        self.out.print(
            f"held-out test set for the coordinator's centralised evaluation: "
            f"{len(heldout.images)} radiographs ({manifest})"
        )

    # -- 2 -----------------------------------------------------------------
    def start_coordinator(self) -> None:
        from coordinator import tokens
        from coordinator.registry.db import Database
        from coordinator.settings import load_settings

        fed = self.fed
        home = fed.coordinator_home
        home.mkdir(parents=True, exist_ok=True)
        _write_toml(
            home / "config.toml",
            {
                "federation": "RadFed demo federation",
                "api_port": fed.api_port,
                "superlink_port": fed.superlink_port,
                "central_eval_manifest": str(self.config.workdir / "held-out.json"),
                "training_poll_s": 1.0,
            },
        )
        cli("coordinator", "init", "--home", str(home))
        settings = load_settings(home)
        db = Database.open(settings.db_url)
        try:
            fed.operator_token = tokens.create(db, "demo-operator", "operator", actor="demo")
            fed.researcher_token = tokens.create(db, "demo-researcher", "researcher", actor="demo")
        finally:
            db.close()
        fed.coordinator = Service(
            "coordinator",
            ["coordinator", "serve", "--home", str(home)],
            env={},
            log_path=self.config.workdir / "logs" / "coordinator.log",
            health_url=f"{fed.url}/healthz",
            verify=ssl.create_default_context(cafile=str(fed.ca)),
        )
        fed.coordinator.start()
        self.out.print(
            f"coordinator API on {fed.url}, Flower SuperLink on 127.0.0.1:{fed.superlink_port}"
        )

    # -- 3 -----------------------------------------------------------------
    def take_in(self, site: Site) -> None:
        from coordinator import sites
        from coordinator.registry.db import Database
        from coordinator.settings import load_settings as coordinator_settings
        from coordinator.training import fab_hash
        from node.index.users import create_user
        from node.settings import load_settings
        from node.site import open_index

        fed = self.fed
        settings = coordinator_settings(fed.coordinator_home)
        db = Database.open(settings.db_url)
        try:
            token = sites.add(db, settings, site.name, actor="demo")
        finally:
            db.close()
        site.home.mkdir(parents=True, exist_ok=True)
        _write_toml(
            site.home / "config.toml",
            {
                "site_id": site.name.upper(),
                "api_port": site.api_port,
                "dicom_port": site.dicom_port,
                "supernode_port": site.supernode_port,
                "outbox_seconds": 1.0,
                "heartbeat_seconds": 5.0,
                "study_stable_seconds": 2.0,
            },
        )
        home = str(site.home)
        cli("node", "enroll", fed.url, token, "--home", home)
        jobs = str(self.config.jobs)
        cli("node", "ingest", str(site.root / "pacs-export"), "--jobs", jobs, "--home", home)
        # The cohort's folders of DICOM; its labels.csv beside them is imported below.
        folders = sorted(str(p) for p in (site.root / "cxr-cohort").iterdir() if p.is_dir())
        cli("node", "ingest", *folders, "--jobs", jobs, "--home", home)
        research = site.root / "research"
        cli("node", "labels", "import", str(research / "labels.csv"), "--home", home)
        cli(
            "node", "labels", "import", str(site.root / "cxr-cohort" / "labels.csv"), "--home", home
        )
        cli("node", "clinical", "import", str(research / "clinical.csv"), "--home", home)
        cli(
            "node",
            "seg",
            "import",
            str(research / "segmentations" / "manifest.csv"),
            "--home",
            home,
        )
        app_hash = fab_hash(settings.apps_dir / APP)
        cli("node", "training", "policy", "--allow", app_hash, "--home", home)
        index = open_index(load_settings(site.home))
        site.operator_token = index.create_token("demo-operator", "operator", actor="demo")
        site.ui_password = secrets.token_urlsafe(12)
        create_user(index, "demo", "operator", site.ui_password, actor="demo")

    # -- 4 -----------------------------------------------------------------
    def start_node(self, site: Site) -> None:
        site.service = Service(
            f"node {site.name}",
            ["node", "serve", "--home", str(site.home)],
            env={},
            log_path=self.config.workdir / "logs" / f"node-{site.name}.log",
            health_url=f"{site.url}/healthz",
        )
        site.service.start()
        self.out.print(
            f"{site.name}: API and web UI on {site.url}, DICOM on 127.0.0.1:{site.dicom_port} "
            f"(AE RADFED), SuperNode on 127.0.0.1:{site.supernode_port}"
        )

    def _node(self, site: Site) -> httpx.Client:
        return httpx.Client(
            base_url=site.url,
            headers={"Authorization": f"Bearer {site.operator_token}"},
            timeout=30,
        )

    # -- 5 -----------------------------------------------------------------
    def review(self) -> None:
        """Each held exam is shown with why it is held; one held by policy alone (no PHI
        finding: an SR, which the default policy never approves by itself) is approved
        after review, as a reviewer would in the UI. Exams with findings stay held."""
        for site in self.fed.sites:
            with self._node(site) as node:
                held = _ok(node.get("/api/v1/studies", params={"status": "held"})).json()["items"]
                clean = []
                for study in held:
                    uid = study["study_instance_uid"]
                    findings = _ok(node.get(f"/api/v1/studies/{uid}/findings")).json()
                    why = ", ".join(sorted({f["kind"] for f in findings})) or "the policy"
                    modalities = ", ".join(study["modalities"])
                    self.out.print(
                        f"{site.name}: {study['pseudonym']} ({modalities}) held for {why}"
                    )
                    if not findings:
                        clean.append(study)
                if not clean:
                    self.out.print(f"{site.name}: no held exam is free of findings to approve")
                    continue
                chosen = clean[0]
                answer = _ok(
                    node.post(
                        f"/api/v1/studies/{chosen['study_instance_uid']}/approve",
                        json={"reason": "demo: report and images reviewed, nothing identifying"},
                    )
                ).json()
                self.fed.reviewed.append(
                    {
                        "site": site.name,
                        "pseudonym": chosen["pseudonym"],
                        "study_instance_uid": chosen["study_instance_uid"],
                    }
                )
                self.out.print(
                    f"{site.name}: approved {chosen['pseudonym']} through the node API → "
                    f"{answer['status']}"
                )

    # -- 6 -----------------------------------------------------------------
    def wait_shared(self, timeout: float = 240.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            waiting = {}
            for site in self.fed.sites:
                with self._node(site) as node:
                    counts = _ok(node.get("/api/v1/counts")).json()["by_status"]
                pending = sum(counts.get(s, 0) for s in ("approved", "queued"))
                if pending:
                    waiting[site.name] = pending
            if not waiting:
                break
            if time.monotonic() > deadline:
                raise DemoError(
                    f"sharing did not finish in {timeout:.0f} s: still to send {waiting}; "
                    f"logs in {self.config.workdir / 'logs'}"
                )
            time.sleep(1)
        for site in self.fed.sites:
            with self._node(site) as node:
                counts = _ok(node.get("/api/v1/counts")).json()["by_status"]
            self.out.print(f"{site.name}: {counts}")

    def _coordinator(self, role: str) -> httpx.Client:
        token = self.fed.operator_token if role == "operator" else self.fed.researcher_token
        return httpx.Client(
            base_url=self.fed.url,
            headers={"Authorization": f"Bearer {token}"},
            verify=ssl.create_default_context(cafile=str(self.fed.ca)),
            timeout=60,
        )

    # -- 7 -----------------------------------------------------------------
    def release(self) -> None:
        with self._coordinator("operator") as api:
            made = _ok(api.post("/api/v1/releases", json={"name": RELEASE})).json()
        self.out.print(
            f"release {made['name']}: {made['exam_count']} exams, {made['instance_count']} "
            f"instances, manifest sha256 {made['manifest_sha256'][:16]}…"
        )

    # -- 8 -----------------------------------------------------------------
    def train(self) -> None:
        from protocols.api.training import RunCreate
        from radfed.train import Client, fetch, follow

        fed = self.fed
        body = RunCreate(
            app=APP,
            rounds=self.config.rounds,
            min_nodes=len(fed.sites),
            release=RELEASE,
            **TRAIN,
        )
        client = Client(fed.url, fed.researcher_token, fed.ca)
        run = client.call("POST", "/api/v1/runs", json=body.model_dump(mode="json")).json()
        fed.run_id = run["id"]
        self.out.print(
            f"run {fed.run_id}: app {APP} on release {RELEASE}, {self.config.rounds} rounds, "
            f"both sites needed each round (FedAvg; each message starts a fresh Flower ClientApp "
            "behind the node's policy gate)"
        )
        follow(client, fed.run_id)
        models = self.config.workdir / "models"
        fetch(fed.run_id, fed.url, fed.researcher_token, fed.ca, out_dir=models)
        fed.model_path = models / f"{fed.run_id}.safetensors"
        fed.provenance_path = models / f"{fed.run_id}.provenance.json"


def _ok(answer: httpx.Response) -> httpx.Response:
    if answer.status_code >= 400:
        raise DemoError(
            f"{answer.request.method} {answer.request.url.path} answered {answer.status_code}: "
            f"{answer.text[:500]}"
        )
    return answer


def _write_toml(path: Path, values: dict[str, Any]) -> None:
    lines = [f"{key} = {json.dumps(value)}" for key, value in values.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def run_demo(
    config: DemoConfig,
    console: Console,
    report: Callable[[Federation], None],
    keep: Callable[[Federation], None] | None = None,
) -> Federation:
    """Run the whole flow, ``report`` on it while everything is up, then ``keep`` (if
    given: it returns when the user is done browsing), then stop every service."""
    config.workdir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    demo = Demo(config, console)
    try:
        fed = demo.run()
        report(fed)
        if keep is not None:
            keep(fed)
        return fed
    except ServiceError as exc:
        raise DemoError(str(exc)) from exc
    finally:
        demo.fed.stop()
