"""Strategy wrappers that feed the round ledger, for both of Flower's server APIs.

Aggregation is Flower's: :class:`Recording` wraps a message-API strategy
(``FedAvg``/``FedProx``, possibly inside ``DifferentialPrivacyClientSideFixedClipping``)
and :class:`LegacyRecording` a legacy one (the SecAgg+ path). Each wrapper

* starts the round's log when the round is configured;
* records the nodes whose results are aggregated and the aggregated metrics;
* fails the run when fewer than ``min-nodes`` nodes trained;
* hands the inner strategy the successful replies only (the errors are already
  in the ledger), so that one declining or failing node does not make Flower's
  DP wrappers skip the round's aggregation.

The end of a round (checkpoint, ``rounds.jsonl``, status) is written by the
server app: from the message API's ``evaluate_fn``, and after the legacy
workflow's federated evaluation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common import (
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    NDArrays,
    Parameters,
    Scalar,
    parameters_to_ndarrays,
)
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.serverapp.strategy.dp_fixed_clipping import DifferentialPrivacyFixedClippingBase

from cxr.rounds import Ledger, floats, wait_for_nodes

#: The metric that weights averages (and that every reply must carry).
NUM_EXAMPLES = "num-examples"
#: Train config key: the RadFed round (continues across a resumed run).
ROUND_KEY = "radfed-round"


def _num_examples(reply: Message) -> int:
    for record in reply.content.metric_records.values():
        value = record.get(NUM_EXAMPLES)
        if isinstance(value, int | float):
            return int(value)
    return 0


class Recording(Strategy):
    """Wraps a message-API strategy; see the module docstring."""

    def __init__(
        self,
        inner: Strategy,
        ledger: Ledger,
        *,
        min_nodes: int,
        node_timeout: float,
        dp: DifferentialPrivacyFixedClippingBase | None = None,
    ) -> None:
        self.inner = inner
        self.ledger = ledger
        self.min_nodes = min_nodes
        self.node_timeout = node_timeout
        self.dp = dp

    def summary(self) -> None:
        self.inner.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        current = self.ledger.begin(server_round)
        wait_for_nodes(grid, self.min_nodes, self.node_timeout)
        config[ROUND_KEY] = current.number
        return list(self.inner.configure_train(server_round, arrays, config, grid))

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        current = self.ledger.begin(server_round)
        valid = [reply for reply in replies if not reply.has_error()]
        for reply in valid:
            current.trained[reply.metadata.src_node_id] = _num_examples(reply)
        self.ledger.require_trainers()
        if self.dp is not None:
            # The noise is scaled to the number of updates actually averaged.
            self.dp.num_sampled_clients = len(valid)
        arrays, metrics = self.inner.aggregate_train(server_round, valid)
        if arrays is None:
            raise self.ledger.fail(f"round {current.number}: the strategy aggregated no model")
        current.train_metrics = floats(metrics.items()) if metrics is not None else {}
        return arrays, metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        current = self.ledger.begin(server_round)
        wait_for_nodes(grid, self.min_nodes, self.node_timeout)
        config[ROUND_KEY] = current.number
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        current = self.ledger.begin(server_round)
        valid = [reply for reply in replies if not reply.has_error()]
        for reply in valid:
            current.evaluated[reply.metadata.src_node_id] = _num_examples(reply)
        if not valid:
            return None
        metrics = self.inner.aggregate_evaluate(server_round, valid)
        current.evaluate_metrics = floats(metrics.items()) if metrics is not None else {}
        return metrics


def weighted_average(results: list[tuple[int, dict[str, Scalar]]]) -> dict[str, Scalar]:
    """Average each numeric metric weighted by the examples (legacy aggregation hook)."""
    total = sum(count for count, _ in results)
    if total <= 0:
        return {}
    keys = {k for _, metrics in results for k, v in metrics.items() if isinstance(v, int | float)}
    return {
        key: sum(count * float(metrics.get(key, 0.0)) for count, metrics in results) / total
        for key in sorted(keys)
    }


class LegacyRecording(LegacyStrategy):
    """Wraps a legacy strategy for the SecAgg+ workflow; see the module docstring.

    Flower's legacy workflow runs, per round: ``configure_fit``, the fit
    workflow (SecAgg+ here: four exchanges, then ``aggregate_fit`` unless the
    protocol halted), ``evaluate`` (centralised evaluation: here also the check
    that enough nodes trained and the capture of the round's parameters),
    then federated evaluation.
    """

    def __init__(
        self,
        inner: LegacyStrategy,
        ledger: Ledger,
        *,
        central: Callable[[NDArrays], dict[str, float]] | None = None,
    ) -> None:
        self.inner = inner
        self.ledger = ledger
        self.central = central
        self.latest: NDArrays | None = None

    def __repr__(self) -> str:
        return f"LegacyRecording({self.inner!r})"

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        parameters = self.inner.initialize_parameters(client_manager)
        if parameters is not None:
            self.latest = parameters_to_ndarrays(parameters)
        return parameters

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        current = self.ledger.begin(server_round)
        instructions = self.inner.configure_fit(server_round, parameters, client_manager)
        for _, ins in instructions:
            ins.config[ROUND_KEY] = current.number
        return instructions

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        current = self.ledger.begin(server_round)
        for proxy, res in results:
            current.trained[int(proxy.node_id)] = int(res.num_examples)
        self.ledger.require_trainers()
        parameters, metrics = self.inner.aggregate_fit(server_round, results, [])
        if parameters is None:
            raise self.ledger.fail(f"round {current.number}: the strategy aggregated no model")
        current.train_metrics = floats(metrics.items())
        return parameters, metrics

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        current = self.ledger.begin(server_round)
        instructions = self.inner.configure_evaluate(server_round, parameters, client_manager)
        for _, ins in instructions:
            ins.config[ROUND_KEY] = current.number
        return instructions

    def aggregate_evaluate(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ) -> tuple[float | None, dict[str, Scalar]]:
        current = self.ledger.begin(server_round)
        for proxy, res in results:
            current.evaluated[int(proxy.node_id)] = int(res.num_examples)
        if not results:
            return None, {}
        loss, metrics = self.inner.aggregate_evaluate(server_round, results, [])
        merged = floats(metrics.items())
        if loss is not None:
            merged["eval-loss"] = float(loss)
        current.evaluate_metrics = merged
        return loss, metrics

    def evaluate(
        self, server_round: int, parameters: Parameters
    ) -> tuple[float, dict[str, Scalar]] | None:
        if server_round == 0:
            return None
        current = self.ledger.begin(server_round)
        # SecAgg+ that halted (a node declined or dropped) never calls aggregate_fit.
        self.ledger.require_trainers()
        self.latest = [np.asarray(a) for a in parameters_to_ndarrays(parameters)]
        if self.central is None:
            return None
        metrics = self.central(self.latest)
        current.central_metrics = metrics
        scalars: dict[str, Scalar] = dict(metrics)
        return metrics.get("eval-loss", 0.0), scalars
