"""The ServerApp: federated training rounds, with their record in the run directory.

One run trains the :mod:`cxr.task` model for ``num-rounds`` rounds over the
connected nodes (at least ``min-nodes``; every connected node is sampled):

* ``strategy = "fedavg"`` (default) or ``"fedprox"`` — Flower's message-API
  ``FedAvg``/``FedProx``, wrapped in ``DifferentialPrivacyClientSideFixedClipping``
  when ``dp-clip`` > 0 (the ClientApp then clips with ``fixedclipping_mod``);
* ``secagg = true`` — SecAgg+ through Flower's legacy workflow
  (``DefaultWorkflow`` with ``SecAggPlusWorkflow``, a ``LegacyContext`` and the
  legacy ``FedAvg``/``FedProx``, DP-wrapped the same way), the message-API
  strategies not supporting it. With ``min-nodes`` ≤ 2 every share is needed
  (``num_shares = reconstruction_threshold = 1.0``: no node may drop out);
  with more, two thirds of the shares reconstruct a dropped node's mask.

Every round ends with federated evaluation on the nodes' validation splits,
centralised evaluation on ``central-eval`` (a ``TrainingManifest`` of files on
the coordinator) when given, and the round written to ``run-dir`` by
:class:`cxr.rounds.Ledger`. A round in which fewer than ``min-nodes`` nodes
trained fails the run: ``status.json`` says ``failed`` with the reason, and
the ServerApp raises so that Flower marks the run failed too. At the end
``model.safetensors`` holds the final weights and the status is ``finished``.

``resume-from`` names a checkpoint of this app: its weights start the run, its
round number is where counting resumes, and only the rounds left to
``num-rounds`` are run, appending to ``rounds.jsonl``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.common import NDArrays, Scalar, ndarrays_to_parameters
from flwr.server import LegacyContext, ServerConfig
from flwr.server import strategy as legacy
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    FedAvg,
    FedProx,
)

from cxr import task
from cxr.rounds import Ledger, ObservingGrid, RunFailedError, wait_for_nodes
from cxr.rundir import CheckpointError, RunDirectory, read_weights
from cxr.settings import Settings, SettingsError
from cxr.strategy import LegacyRecording, Recording, weighted_average
from protocols.training import RunPhase

log = logging.getLogger(__name__)

app = ServerApp()


class CentralEvaluation:
    """Evaluates a model on every labelled sample of the ``central-eval`` manifest."""

    def __init__(self, settings: Settings) -> None:
        manifest = task.read_manifest(settings.central_eval)
        items = task.examples(manifest, settings.label, settings.task, "all")
        self.images, self.targets = task.tensors(items, settings.image_size)
        self.settings = settings

    def __call__(self, state: dict[str, torch.Tensor]) -> dict[str, float]:
        model = task.new_model(self.settings.task, self.settings.seed)
        model.load_state_dict(state, strict=True)
        metrics = task.evaluate(model, self.images, self.targets)
        return {"num-examples": float(len(self.targets)), **metrics}


def _metadata(settings: Settings) -> dict[str, str]:
    return {
        "radfed-run": settings.radfed_run,
        "task": settings.task,
        "label": settings.label,
        "image-size": str(settings.image_size),
    }


def _resume(settings: Settings, model: torch.nn.Module) -> int:
    """Load ``resume-from`` into ``model``; returns the checkpoint's round."""
    state, metadata = read_weights(Path(settings.resume_from))
    for key in ("task", "label", "image-size"):
        if metadata.get(key) != _metadata(settings)[key]:
            raise CheckpointError(
                f"{settings.resume_from}: {key} {metadata.get(key)!r} does not match the "
                f"run's {_metadata(settings)[key]!r}"
            )
    try:
        model.load_state_dict(state, strict=True)
        return int(metadata["round"])
    except (KeyError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{settings.resume_from}: cannot resume from it ({exc})") from exc


def _state(model: torch.nn.Module, arrays: NDArrays) -> dict[str, torch.Tensor]:
    task.from_ndarrays(model, arrays)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the federated training the run config describes (see the module docstring)."""
    settings = Settings.from_run_config(context.run_config)
    if not settings.run_dir:
        raise SettingsError('Run config "run-dir" must name the run directory.')
    run_dir = RunDirectory(Path(settings.run_dir))
    completed = 0
    ledger: Ledger | None = None
    try:
        model = task.new_model(settings.task, settings.seed)
        completed = _resume(settings, model) if settings.resume_from else 0
        ledger = Ledger(
            run_dir,
            offset=completed,
            rounds=settings.num_rounds,
            min_nodes=settings.min_nodes,
            metadata=_metadata(settings),
        )
        run_dir.write_status(RunPhase.RUNNING, completed, settings.num_rounds)
        remaining = max(settings.num_rounds - completed, 0)
        if remaining:
            central = CentralEvaluation(settings) if settings.central_eval else None
            observed = ObservingGrid(grid, ledger, settings.round_timeout)
            wait_for_nodes(observed, settings.min_nodes, settings.round_timeout)
            run = _secagg if settings.secagg else _message_api
            run(observed, context, settings, ledger, model, remaining, central)
        else:
            log.info(
                "checkpoint round %d: nothing left of %d rounds", completed, settings.num_rounds
            )
        completed = ledger.completed
        run_dir.save_model(model.state_dict(), _metadata(settings))
        run_dir.write_status(RunPhase.FINISHED, completed, settings.num_rounds)
    except BaseException as exc:
        done = ledger.completed if ledger is not None else completed
        run_dir.write_status(
            RunPhase.FAILED, done, settings.num_rounds, error=f"{type(exc).__name__}: {exc}"
        )
        raise


def _message_api(
    grid: Grid,
    context: Context,
    settings: Settings,
    ledger: Ledger,
    model: torch.nn.Module,
    rounds: int,
    central: CentralEvaluation | None,
) -> None:
    inner: FedAvg
    if settings.fedprox:
        inner = FedProx(
            fraction_train=1.0,
            fraction_evaluate=1.0,
            min_train_nodes=settings.min_nodes,
            min_evaluate_nodes=settings.min_nodes,
            min_available_nodes=settings.min_nodes,
            proximal_mu=settings.proximal_mu,
        )
    else:
        inner = FedAvg(
            fraction_train=1.0,
            fraction_evaluate=1.0,
            min_train_nodes=settings.min_nodes,
            min_evaluate_nodes=settings.min_nodes,
            min_available_nodes=settings.min_nodes,
        )
    dp = (
        DifferentialPrivacyClientSideFixedClipping(
            inner,
            noise_multiplier=settings.dp_noise,
            clipping_norm=settings.dp_clip,
            num_sampled_clients=settings.min_nodes,
        )
        if settings.dp
        else None
    )
    strategy = Recording(
        dp or inner,
        ledger,
        min_nodes=settings.min_nodes,
        node_timeout=settings.round_timeout,
        dp=dp,
    )

    def end_of_round(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0:
            return None
        state = arrays.to_torch_state_dict()
        model.load_state_dict(state, strict=True)
        current = ledger.begin(server_round)
        if central is not None:
            current.central_metrics = central(state)
        ledger.finish(model.state_dict())
        return MetricRecord(dict(current.central_metrics)) if current.central_metrics else None

    strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(model.state_dict()),
        num_rounds=rounds,
        timeout=settings.round_timeout,
        train_config=ConfigRecord(),
        evaluate_config=ConfigRecord(),
        evaluate_fn=end_of_round,
    )


def _secagg(
    grid: Grid,
    context: Context,
    settings: Settings,
    ledger: Ledger,
    model: torch.nn.Module,
    rounds: int,
    central: CentralEvaluation | None,
) -> None:
    def round_config(server_round: int) -> dict[str, Scalar]:
        return {"server-round": server_round}

    initial = ndarrays_to_parameters(task.to_ndarrays(model))
    inner: legacy.Strategy
    if settings.fedprox:
        inner = legacy.FedProx(
            fraction_fit=1.0,
            fraction_evaluate=1.0,
            min_fit_clients=settings.min_nodes,
            min_evaluate_clients=settings.min_nodes,
            min_available_clients=settings.min_nodes,
            initial_parameters=initial,
            on_fit_config_fn=round_config,
            on_evaluate_config_fn=round_config,
            fit_metrics_aggregation_fn=weighted_average,
            evaluate_metrics_aggregation_fn=weighted_average,
            proximal_mu=settings.proximal_mu,
        )
    else:
        inner = legacy.FedAvg(
            fraction_fit=1.0,
            fraction_evaluate=1.0,
            min_fit_clients=settings.min_nodes,
            min_evaluate_clients=settings.min_nodes,
            min_available_clients=settings.min_nodes,
            initial_parameters=initial,
            on_fit_config_fn=round_config,
            on_evaluate_config_fn=round_config,
            fit_metrics_aggregation_fn=weighted_average,
            evaluate_metrics_aggregation_fn=weighted_average,
        )
    if settings.dp:
        inner = legacy.DifferentialPrivacyClientSideFixedClipping(
            inner,
            noise_multiplier=settings.dp_noise,
            clipping_norm=settings.dp_clip,
            num_sampled_clients=settings.min_nodes,
        )
    evaluate_central: Callable[[NDArrays], dict[str, float]] | None = None
    if central is not None:
        evaluate_central = lambda arrays: central(_state(model, arrays))  # noqa: E731
    strategy = LegacyRecording(inner, ledger, central=evaluate_central)
    federated_evaluation = DefaultWorkflow().evaluate_workflow

    def evaluate_and_record(grid: Grid, context: Context) -> None:
        federated_evaluation(grid, context)
        if strategy.latest is None:
            raise RunFailedError("the SecAgg+ round produced no parameters")
        ledger.finish(_state(model, strategy.latest))

    everyone = settings.min_nodes <= 2
    workflow = DefaultWorkflow(
        fit_workflow=SecAggPlusWorkflow(
            num_shares=1.0,
            reconstruction_threshold=1.0 if everyone else 0.67,
            timeout=settings.round_timeout,
        ),
        evaluate_workflow=evaluate_and_record,
    )
    legacy_context = LegacyContext(
        context=context,
        config=ServerConfig(num_rounds=rounds, round_timeout=settings.round_timeout),
        strategy=strategy,
    )
    workflow(grid, legacy_context)
