"""The ClientApp: trains and evaluates on the samples a node offers a run.

The node tells the app where the run's ``TrainingManifest`` is through its
node config (``protocols.training.NODE_CONFIG_MANIFEST``): a JSON file, or a
directory holding one ``<radfed-run>.json`` per run the node accepted. The app
*declines* (an error reply with ``DECLINED_CODE`` and a reason starting with
``DECLINED_PREFIX``, before any other mod runs) when that key is unset, when
there is no manifest for the run, or when the manifest is another run's
(``radfed-run`` set and different). A RadFed node's own gate declines runs it
does not accept before any app code runs; this check is the app's own, for a
SuperNode that runs it without that gate. A node whose manifest has no sample of the
requested label, or none in the split, is not declining: the app raises
:class:`cxr.task.NoSamplesError`, which Flower reports as an error.

Messages come in two shapes:

* the message API (``FedAvg``/``FedProx``): an ``ArrayRecord`` and a
  ``ConfigRecord``; the reply carries the model and a ``MetricRecord`` with
  ``num-examples``, ``train-loss``, ``train-accuracy`` (train) or
  ``num-examples``, ``eval-loss``, ``eval-accuracy`` (evaluate);
* Flower's legacy ``FitIns``/``EvaluateIns`` records, which the SecAgg+
  workflow sends; these go to a ``NumPyClient`` doing the same work.

Mods, outermost first: the participation check; ``secaggplus_mod`` when the run
config sets ``secagg``; client-side fixed clipping (``fixedclipping_mod``, in
the shape of the message) on training replies when ``dp-clip`` > 0.
"""

from __future__ import annotations

import logging
import zlib
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Context, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.client import NumPyClient
from flwr.client.mod import fixedclipping_mod as legacy_fixedclipping_mod
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import NDArrays, Scalar

from cxr import task
from cxr.settings import Settings
from protocols.training import (
    DECLINED_CODE,
    DECLINED_PREFIX,
    NODE_CONFIG_MANIFEST,
    NODE_CONFIG_SITE,
    TrainingManifest,
)

log = logging.getLogger(__name__)

LEGACY_FIT_PARAMETERS = "fitins.parameters"
LEGACY_EVALUATE_PARAMETERS = "evaluateins.parameters"


class DeclinedError(Exception):
    """This node does not take part in the run; the message says why."""


def _category(message: Message) -> str:
    return message.metadata.message_type.split(".")[0]


def _is_legacy(message: Message) -> bool:
    records = message.content.array_records
    return LEGACY_FIT_PARAMETERS in records or LEGACY_EVALUATE_PARAMETERS in records


def _site(context: Context) -> str:
    return str(context.node_config.get(NODE_CONFIG_SITE, "") or f"node {context.node_id}")


def manifest_path(context: Context, settings: Settings) -> Path:
    """Where this node keeps the run's manifest; :class:`DeclinedError` when it keeps none."""
    configured = context.node_config.get(NODE_CONFIG_MANIFEST)
    if not isinstance(configured, str) or not configured:
        raise DeclinedError(f"{_site(context)} offers no training manifest (no node config)")
    path = Path(configured)
    if path.is_dir():
        if not settings.radfed_run:
            raise DeclinedError(f"{_site(context)} keeps manifests per run and the run has no id")
        path = path / f"{settings.radfed_run}.json"
    if not path.is_file():
        run = settings.radfed_run or "this run"
        raise DeclinedError(f"{_site(context)} has not accepted {run}")
    return path


def load_manifest(context: Context, settings: Settings) -> TrainingManifest:
    """The run's manifest on this node; :class:`DeclinedError` when there is none for the run."""
    manifest = task.read_manifest(manifest_path(context, settings))
    if settings.radfed_run and manifest.run != settings.radfed_run:
        raise DeclinedError(f"{_site(context)} has not accepted {settings.radfed_run}")
    return manifest


def participation_mod(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Reply with a declined error when the node has no manifest for this run."""
    if _category(message) not in (MessageType.TRAIN, MessageType.EVALUATE):
        return call_next(message, context)
    try:
        load_manifest(context, Settings.from_run_config(context.run_config))
    except DeclinedError as declined:
        log.info("declining: %s", declined)
        reason = f"{DECLINED_PREFIX} {declined}"
        return Message(Error(code=DECLINED_CODE, reason=reason), reply_to=message)
    return call_next(message, context)


def secagg_mod(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's ``secaggplus_mod`` when the run config sets ``secagg``."""
    if Settings.from_run_config(context.run_config).secagg:
        return secaggplus_mod(message, context, call_next)
    return call_next(message, context)


def clipping_mod(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's client-side fixed clipping on training replies when ``dp-clip`` > 0."""
    if _category(message) != MessageType.TRAIN:
        return call_next(message, context)
    if not Settings.from_run_config(context.run_config).dp:
        return call_next(message, context)
    if _is_legacy(message):
        return legacy_fixedclipping_mod(message, context, call_next)
    return fixedclipping_mod(message, context, call_next)


app = ClientApp(mods=[participation_mod, secagg_mod, clipping_mod])


def _seed(settings: Settings, round_number: int, node_id: int) -> int:
    return zlib.crc32(f"{settings.seed}:{round_number}:{node_id}".encode())


def _scalar(config: dict[str, object], key: str) -> float | None:
    value = config.get(key)
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def local_train(
    context: Context, model: torch.nn.Module, config: dict[str, object]
) -> tuple[int, dict[str, float]]:
    """Train ``model`` on this node's training split; returns examples and metrics."""
    settings = Settings.from_run_config(context.run_config)
    manifest = load_manifest(context, settings)
    items = task.examples(manifest, settings.label, settings.task, "train")
    images, targets = task.tensors(items, settings.image_size)
    mu = 0.0
    if settings.fedprox:
        sent = _scalar(config, "proximal-mu")
        legacy = _scalar(config, "proximal_mu")
        mu = sent if sent is not None else legacy if legacy is not None else settings.proximal_mu
    round_number = int(_scalar(config, "radfed-round") or _scalar(config, "server-round") or 0)
    metrics = task.fit(
        model,
        images,
        targets,
        epochs=settings.local_epochs,
        batch_size=settings.batch_size,
        learning_rate=settings.learning_rate,
        proximal_mu=mu,
        seed=_seed(settings, round_number, context.node_id),
    )
    log.info("%s trained on %d examples: %s", manifest.site, len(items), metrics)
    return len(items), metrics


def local_evaluate(context: Context, model: torch.nn.Module) -> tuple[int, dict[str, float]]:
    """Evaluate ``model`` on this node's validation split; returns examples and metrics."""
    settings = Settings.from_run_config(context.run_config)
    manifest = load_manifest(context, settings)
    items = task.examples(manifest, settings.label, settings.task, "validation")
    images, targets = task.tensors(items, settings.image_size)
    return len(items), task.evaluate(model, images, targets)


def _model(context: Context) -> torch.nn.Module:
    settings = Settings.from_run_config(context.run_config)
    return task.new_model(settings.task, settings.seed)


def _arrays_and_config(message: Message) -> tuple[ArrayRecord, dict[str, object]]:
    arrays = next(iter(message.content.array_records.values()))
    records = message.content.config_records
    config: dict[str, object] = dict(next(iter(records.values()))) if records else {}
    return arrays, config


@app.train()
def train(message: Message, context: Context) -> Message:
    """Train the received model on the node's training split."""
    if _is_legacy(message):
        return legacy_app(message, context)
    arrays, config = _arrays_and_config(message)
    model = _model(context)
    model.load_state_dict(arrays.to_torch_state_dict(), strict=True)
    count, metrics = local_train(context, model, config)
    content = RecordDict(
        {
            "arrays": ArrayRecord(model.state_dict()),
            "metrics": MetricRecord({"num-examples": count, **metrics}),
        }
    )
    return Message(content=content, reply_to=message)


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    """Evaluate the received model on the node's validation split."""
    if _is_legacy(message):
        return legacy_app(message, context)
    arrays, _ = _arrays_and_config(message)
    model = _model(context)
    model.load_state_dict(arrays.to_torch_state_dict(), strict=True)
    count, metrics = local_evaluate(context, model)
    content = RecordDict({"metrics": MetricRecord({"num-examples": count, **metrics})})
    return Message(content=content, reply_to=message)


class LegacyClient(NumPyClient):
    """The same work for Flower's legacy messages (the SecAgg+ workflow)."""

    def __init__(self, context: Context) -> None:
        self.context = context

    def get_parameters(self, config: dict[str, Scalar]) -> NDArrays:
        return task.to_ndarrays(_model(self.context))

    def fit(
        self, parameters: NDArrays, config: dict[str, Scalar]
    ) -> tuple[NDArrays, int, dict[str, Scalar]]:
        model = _model(self.context)
        task.from_ndarrays(model, parameters)
        count, metrics = local_train(self.context, model, dict(config))
        return task.to_ndarrays(model), count, dict(metrics)

    def evaluate(
        self, parameters: NDArrays, config: dict[str, Scalar]
    ) -> tuple[float, int, dict[str, Scalar]]:
        model = _model(self.context)
        task.from_ndarrays(model, parameters)
        count, metrics = local_evaluate(self.context, model)
        return metrics["eval-loss"], count, dict(metrics)


legacy_app = ClientApp(client_fn=lambda context: LegacyClient(context).to_client())
