"""The reference CXR Flower app: a ServerApp driven in-process against its ClientApp.

Most tests run the real ServerApp with a :class:`LocalGrid` that hands each
message straight to the real ClientApp of 2–4 simulated nodes (no SuperLink,
no processes). The last one runs the app in Flower's simulation runtime.
"""

from __future__ import annotations

import copy
import math
import sys
import tomllib
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
from cxr import task
from cxr.client_app import app as client_app
from cxr.rounds import RunFailedError
from cxr.rundir import read_weights
from cxr.server_app import app as server_app
from cxr.settings import DEFAULTS, Settings, SettingsError
from flwr.app import Context, Message, RecordDict, UserConfigValue
from flwr.clientapp import ClientApp
from flwr.clientapp.client_app import ClientAppException
from flwr.serverapp import Grid, ServerApp

from protocols.training import (
    DECLINED_CODE,
    DECLINED_PREFIX,
    NODE_CONFIG_MANIFEST,
    RoundRecord,
    RunPhase,
    RunState,
    TrainingManifest,
)
from tests.unit.apps.conftest import APP_DIR, Site
from tests.unit.apps.grid import LocalGrid

RUN = "run-1"


def run_config(run_dir: Path, **overrides: UserConfigValue) -> dict[str, UserConfigValue]:
    """Small and fast: 32-pixel images, one local epoch, one round unless overridden."""
    config: dict[str, UserConfigValue] = {
        **DEFAULTS,
        "radfed-run": RUN,
        "run-dir": str(run_dir),
        "num-rounds": 1,
        "image-size": 32,
        "batch-size": 8,
        "round-timeout": 5.0,
    }
    config.update(overrides)
    return config


def node(site: Site | None) -> dict[str, UserConfigValue]:
    return {NODE_CONFIG_MANIFEST: str(site.manifest)} if site is not None else {}


def serve(grid: Grid, config: dict[str, UserConfigValue]) -> None:
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=config)
    server_app(grid, context)


def rounds(run_dir: Path) -> list[RoundRecord]:
    lines = (run_dir / "rounds.jsonl").read_text().splitlines()
    return [RoundRecord.model_validate_json(line) for line in lines]


def status(run_dir: Path) -> RunState:
    return RunState.model_validate_json((run_dir / "status.json").read_text())


def accuracy(model_file: Path, site: Site) -> float:
    state, _ = read_weights(model_file)
    model = task.new_model("binary", 0)
    model.load_state_dict(state)
    manifest = TrainingManifest.model_validate_json(site.manifest.read_text())
    images, targets = task.tensors(
        task.examples(manifest, "ricord:appearance", "binary", "all"), 32
    )
    return task.evaluate(model, images, targets)["eval-accuracy"]


def update_norm(sent: Message, reply: Message) -> float:
    before = next(iter(sent.content.array_records.values())).to_numpy_ndarrays()
    after = next(iter(reply.content.array_records.values())).to_numpy_ndarrays()
    return math.sqrt(sum(float(np.sum((a - b) ** 2)) for a, b in zip(after, before, strict=True)))


def test_pyproject_run_config_is_the_settings_defaults() -> None:
    pyproject = tomllib.loads((APP_DIR / "pyproject.toml").read_text())

    app = pyproject["tool"]["flwr"]["app"]

    assert app["config"] == DEFAULTS
    assert app["publisher"] == "radfed"
    assert app["components"] == {
        "serverapp": "cxr.server_app:app",
        "clientapp": "cxr.client_app:app",
    }


@pytest.mark.parametrize(
    ("key", "value"),
    [("strategy", "fedsgd"), ("task", "ricord5"), ("num-rounds", -1), ("secagg", "maybe")],
)
def test_a_bad_run_config_value_names_its_key(key: str, value: UserConfigValue) -> None:
    with pytest.raises(SettingsError, match=f'"{key}"'):
        Settings.from_run_config({key: value})


def test_fedavg_learns_and_writes_the_run_directory(sites: dict[str, Site], tmp_path: Path) -> None:
    # Prepare: two sites, three rounds, centralised evaluation on the held-out cohort.
    run_dir = tmp_path / "run"
    config = run_config(
        run_dir,
        **{"num-rounds": 3, "local-epochs": 6, "central-eval": str(sites["held-out"].manifest)},
    )
    grid = LocalGrid(client_app, config, {11: node(sites["A"]), 12: node(sites["B"])})

    # Execute
    serve(grid, config)

    # Assert: the model beats chance clearly on images it never saw.
    assert accuracy(run_dir / "model.safetensors", sites["held-out"]) >= 0.75
    assert status(run_dir).phase == RunPhase.FINISHED
    assert status(run_dir).round == 3
    records = rounds(run_dir)
    assert [r.round for r in records] == [1, 2, 3]
    for record in records:
        assert record.sampled == ["11", "12"]
        assert set(record.trained) == {"11", "12"}
        assert all(count > 30 for count in record.trained.values())
        assert record.declined == [] and record.dropped == []
        assert set(record.train_metrics) == {"train-loss", "train-accuracy"}
        assert set(record.evaluate_metrics) == {"eval-loss", "eval-accuracy"}
        assert set(record.evaluated) == {"11", "12"}
        assert record.central_metrics["num-examples"] == 40
        assert (run_dir / str(record.checkpoint)).is_file()
    assert records[-1].central_metrics["eval-accuracy"] >= 0.75
    final, _ = read_weights(run_dir / "model.safetensors")
    last, metadata = read_weights(run_dir / "checkpoints" / "round-3.safetensors")
    assert metadata["round"] == "3"
    assert all(torch.equal(final[k], last[k]) for k in final)


def test_fedprox_sends_mu_and_the_clients_train_with_it(
    sites: dict[str, Site], tmp_path: Path
) -> None:
    # Prepare: the same round with FedAvg and with FedProx.
    losses = {}
    for strategy in ("fedavg", "fedprox"):
        config = run_config(tmp_path / strategy, strategy=strategy, **{"proximal-mu": 1.0})
        grid = LocalGrid(client_app, config, {11: node(sites["A"]), 12: node(sites["B"])})

        # Execute
        serve(grid, config)

        losses[strategy] = rounds(tmp_path / strategy)[0].train_metrics["train-loss"]
        sent = grid.train_exchanges()[0].sent[0]
        mu = next(iter(sent.content.config_records.values())).get("proximal-mu")
        assert mu == (1.0 if strategy == "fedprox" else None)

    # Assert: the proximal term is part of the clients' loss.
    assert status(tmp_path / "fedprox").phase == RunPhase.FINISHED
    assert losses["fedprox"] != losses["fedavg"]


def test_dp_clips_every_update_on_the_client(sites: dict[str, Site], tmp_path: Path) -> None:
    # Prepare
    run_dir = tmp_path / "run"
    config = run_config(run_dir, **{"dp-clip": 0.05, "dp-noise": 0.5})
    grid = LocalGrid(client_app, config, {11: node(sites["A"]), 12: node(sites["B"])})

    # Execute
    serve(grid, config)

    # Assert: what left each node moved the model by at most the clipping norm.
    exchange = grid.train_exchanges()[0]
    by_node = {m.metadata.dst_node_id: m for m in exchange.sent}
    assert len(exchange.replies) == 2
    for reply in exchange.replies:
        assert update_norm(by_node[reply.metadata.src_node_id], reply) <= 0.05 + 1e-5
    assert status(run_dir).phase == RunPhase.FINISHED
    assert set(rounds(run_dir)[0].trained) == {"11", "12"}


@pytest.mark.parametrize("dp_clip", [0.0, 1.0], ids=["plain", "dp"])
def test_declining_failing_and_silent_nodes_are_told_apart(
    sites: dict[str, Site], tmp_path: Path, dp_clip: float
) -> None:
    # Prepare: 13 has no manifest for the run (declines), 14's manifest has no sample
    # with the label (its ClientApp raises), 15 never answers. With DP too: Flower's DP
    # wrapper alone would skip a round with any error reply.
    unlabelled = TrainingManifest.model_validate_json(sites["B"].manifest.read_text())
    unlabelled = unlabelled.model_copy(
        update={"samples": [s.model_copy(update={"labels": {}}) for s in unlabelled.samples]}
    )
    (tmp_path / "unlabelled.json").write_text(unlabelled.model_dump_json())
    run_dir = tmp_path / "run"
    config = run_config(run_dir, **{"dp-clip": dp_clip})
    nodes = {
        11: node(sites["A"]),
        12: node(sites["B"]),
        13: node(None),
        14: {NODE_CONFIG_MANIFEST: str(tmp_path / "unlabelled.json")},
        15: node(sites["A"]),
    }
    grid = LocalGrid(client_app, config, nodes, silent={15})

    # Execute
    serve(grid, config)

    # Assert
    record = rounds(run_dir)[0]
    assert record.sampled == ["11", "12", "13", "14", "15"]
    assert set(record.trained) == {"11", "12"}
    assert record.declined == ["13"]
    assert record.dropped == ["14", "15"]
    assert set(record.train_metrics) == {"train-loss", "train-accuracy"}
    assert status(run_dir).phase == RunPhase.FINISHED
    replies = {r.metadata.src_node_id: r for r in grid.train_exchanges()[0].replies}
    assert replies[13].error.code == DECLINED_CODE
    assert replies[13].error.reason.startswith(DECLINED_PREFIX)
    assert "NoSamplesError" in replies[14].error.reason
    assert "ricord:appearance" in replies[14].error.reason


class LeavingGrid(LocalGrid):
    """Node 12 is connected for the first round only (gone before round 2 samples)."""

    def get_node_ids(self) -> list[int]:
        ids = super().get_node_ids()
        return [n for n in ids if n != 12 or len(self.train_exchanges()) < 1]


def test_a_node_gone_between_rounds_is_recorded_as_dropped(
    sites: dict[str, Site], tmp_path: Path
) -> None:
    # Prepare: two rounds that need one node; 12 trains in round 1, then disappears.
    run_dir = tmp_path / "run"
    config = run_config(run_dir, **{"num-rounds": 2, "min-nodes": 1})
    grid = LeavingGrid(client_app, config, {11: node(sites["A"]), 12: node(sites["B"])})

    # Execute
    serve(grid, config)

    # Assert
    first, second = rounds(run_dir)
    assert set(first.trained) == {"11", "12"} and first.dropped == []
    assert set(second.trained) == {"11"} and second.sampled == ["11"]
    assert second.dropped == ["12"]
    assert status(run_dir).phase == RunPhase.FINISHED


def test_a_manifest_of_another_run_or_a_directory_without_the_run_declines(
    sites: dict[str, Site], tmp_path: Path
) -> None:
    # Prepare: a node keeping manifests per run in a directory, with this run's file,
    # and nodes whose manifest is another run's or whose directory lacks this run.
    per_run = tmp_path / "manifests"
    per_run.mkdir()
    (per_run / f"{RUN}.json").write_text(sites["A"].manifest.read_text())
    other = TrainingManifest.model_validate_json(sites["B"].manifest.read_text())
    (tmp_path / "other.json").write_text(
        other.model_copy(update={"run": "run-0"}).model_dump_json()
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    run_dir = tmp_path / "run"
    config = run_config(run_dir, **{"min-nodes": 1})
    nodes = {
        11: {NODE_CONFIG_MANIFEST: str(per_run)},
        12: {NODE_CONFIG_MANIFEST: str(tmp_path / "other.json")},
        13: {NODE_CONFIG_MANIFEST: str(empty)},
    }
    grid = LocalGrid(client_app, config, nodes)

    # Execute
    serve(grid, config)

    # Assert
    record = rounds(run_dir)[0]
    assert list(record.trained) == ["11"]
    assert record.declined == ["12", "13"]


def test_too_few_trainers_fail_the_run(sites: dict[str, Site], tmp_path: Path) -> None:
    # Prepare: min-nodes 2, and one of the two nodes declines.
    run_dir = tmp_path / "run"
    config = run_config(run_dir, **{"num-rounds": 2})
    grid = LocalGrid(client_app, config, {11: node(sites["A"]), 12: node(None)})

    # Execute
    with pytest.raises(RunFailedError, match="min-nodes is 2"):
        serve(grid, config)

    # Assert
    state = status(run_dir)
    assert state.phase == RunPhase.FAILED
    assert state.round == 0
    assert "1 node(s) trained" in str(state.error)
    (record,) = rounds(run_dir)
    assert record.trained == {"11": record.trained["11"]}
    assert record.declined == ["12"]
    assert record.checkpoint is None
    assert not (run_dir / "model.safetensors").exists()


def test_resume_continues_from_the_checkpoint(sites: dict[str, Site], tmp_path: Path) -> None:
    # Prepare: a run of two rounds.
    run_dir = tmp_path / "run"
    nodes = {11: node(sites["A"]), 12: node(sites["B"])}
    first = run_config(run_dir, **{"num-rounds": 2})
    serve(LocalGrid(client_app, first, nodes), first)
    checkpoint = run_dir / "checkpoints" / "round-2.safetensors"
    saved, _ = read_weights(checkpoint)
    config = run_config(run_dir, **{"num-rounds": 4, "resume-from": str(checkpoint)})
    grid = LocalGrid(client_app, config, nodes)

    # Execute: continue to four rounds.
    serve(grid, config)

    # Assert: rounds 3 and 4 ran, from the checkpoint's weights, and were appended.
    assert [r.round for r in rounds(run_dir)] == [1, 2, 3, 4]
    assert len(grid.train_exchanges()) == 2
    sent = grid.train_exchanges()[0].sent[0]
    started = next(iter(sent.content.array_records.values())).to_torch_state_dict()
    assert all(torch.equal(started[k], saved[k]) for k in saved)
    assert next(iter(sent.content.config_records.values()))["radfed-round"] == 3
    assert (run_dir / "checkpoints" / "round-4.safetensors").is_file()
    assert status(run_dir).phase == RunPhase.FINISHED
    assert status(run_dir).round == 4


def test_secagg_with_a_declining_node_halts_and_names_it(
    sites: dict[str, Site], tmp_path: Path
) -> None:
    # Prepare: SecAgg+ over three sampled nodes, one of which declines at the setup stage.
    run_dir = tmp_path / "run"
    config = run_config(run_dir, secagg=True)
    nodes = {11: node(sites["A"]), 12: node(sites["B"]), 13: node(None)}
    grid = LocalGrid(client_app, config, nodes)

    # Execute
    with pytest.raises(RunFailedError):
        serve(grid, config)

    # Assert: the protocol stopped, nobody's update was aggregated, 13 declined, and
    # 11 and 12, which did their part, are neither declined nor dropped.
    (record,) = rounds(run_dir)
    assert record.sampled == ["11", "12", "13"]
    assert record.trained == {}
    assert record.declined == ["13"]
    assert record.dropped == []
    assert status(run_dir).phase == RunPhase.FAILED


# --- Flower's simulation runtime ---------------------------------------------------------

RAY_BACKEND = "flwr.server.superlink.fleet.vce.backend.raybackend"


class InProcessBackend:
    """Runs ClientApps in the simulation engine's own worker thread, one at a time.

    Flower's simulation runtime has one backend, Ray, which is not installed here.
    This stands in for it (the module Flower imports it from is replaced for the
    test) and, as a SuperNode started with ``--node-config`` would, gives each
    simulated node its manifest, and the run its run config (the Python simulation
    API passes none).
    """

    manifests: ClassVar[dict[int, str]] = {}
    run_config: ClassVar[dict[str, UserConfigValue]] = {}

    def __init__(self, backend_config: object) -> None:
        self.app_fn: Callable[[], ClientApp] | None = None

    def build(self, app_fn: Callable[[], ClientApp]) -> None:
        self.app_fn = app_fn

    @property
    def num_workers(self) -> int:
        return 1

    def is_worker_idle(self) -> bool:
        return True

    def terminate(self) -> None:
        self.app_fn = None

    def process_message(self, message: Message, context: Context) -> tuple[Message, Context]:
        assert self.app_fn is not None
        partition = int(context.node_config["partition-id"])
        # The runtime refuses changes to the configs it handed out: the app gets a view.
        view = Context(
            run_id=context.run_id,
            node_id=context.node_id,
            node_config={**context.node_config, NODE_CONFIG_MANIFEST: self.manifests[partition]},
            state=context.state,
            run_config={**context.run_config, **self.run_config},
        )
        try:
            # Ray hands an actor a copy of the message; so do we.
            reply = self.app_fn()(copy.deepcopy(message), view)
        except Exception as exc:
            raise ClientAppException(str(exc)) from exc
        context.state = view.state
        return reply, context


@pytest.fixture
def in_process_backend(monkeypatch: pytest.MonkeyPatch) -> Iterator[type[InProcessBackend]]:
    module = types.ModuleType(RAY_BACKEND)
    module.RayBackend = InProcessBackend  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, RAY_BACKEND, module)
    yield InProcessBackend
    InProcessBackend.manifests = {}
    InProcessBackend.run_config = {}


def test_secagg_runs_in_flowers_simulation_runtime(
    sites: dict[str, Site], tmp_path: Path, in_process_backend: type[InProcessBackend]
) -> None:
    # Prepare: two simulated nodes, SecAgg+ with client-side clipping, two rounds.
    from flwr.simulation import run_simulation

    run_dir = tmp_path / "run"
    config = run_config(run_dir, secagg=True, **{"num-rounds": 2, "dp-clip": 10.0})
    in_process_backend.manifests = {0: str(sites["A"].manifest), 1: str(sites["B"].manifest)}
    in_process_backend.run_config = config
    wrapper = ServerApp()

    @wrapper.main()
    def main(grid: Grid, context: Context) -> None:
        context.run_config = {**context.run_config, **config}  # as `flwr run --run-config`
        server_app(grid, context)

    # Execute
    run_simulation(wrapper, client_app, num_supernodes=2, backend_name="in-process")

    # Assert
    records = rounds(run_dir)
    assert [r.round for r in records] == [1, 2]
    for record in records:
        assert len(record.sampled) == 2
        assert sorted(record.trained.values()) == sorted(
            len(task.examples(m, "ricord:appearance", "binary", "train"))
            for m in (
                TrainingManifest.model_validate_json(sites[s].manifest.read_text()) for s in "AB"
            )
        )
        assert record.declined == [] and record.dropped == []
        assert set(record.evaluate_metrics) == {"eval-loss", "eval-accuracy"}
    assert status(run_dir).phase == RunPhase.FINISHED
    assert (run_dir / "model.safetensors").is_file()
