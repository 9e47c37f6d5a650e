"""Who took part in each round, and the round's outputs in the run directory.

A round's participants are classified from what the Grid saw, not from what a
strategy chose to aggregate:

* **sampled** — the nodes a training message of the round went to;
* **trained** — the nodes whose training result was aggregated, with their
  ``num-examples``;
* **declined** — nodes whose reply to a training message was an error whose
  reason starts with ``protocols.training.DECLINED_PREFIX``;
* **dropped** — sampled nodes that did not train because they sent no reply
  within ``round-timeout`` to one of the round's training messages, or an
  error of another kind (the ClientApp raised, the SuperLink reported the node
  unavailable or the message expired).

A node that answered every message but whose result was not aggregated (SecAgg+
halted because another node left) is in none of the last three lists.

:class:`ObservingGrid` wraps the Grid the ServerApp is given and reports every
exchange to the :class:`Ledger`. A reply is matched to its node through the
message it answers (``reply_to_message_id``): error replies that the SuperLink
makes up for an unreachable node carry the SuperLink's own node id as sender.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from flwr.app import Message, MessageType, RecordDict
from flwr.proto.node_pb2 import NodeInfo
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from cxr.rundir import RunDirectory
from protocols.training import DECLINED_PREFIX, RoundRecord, RunPhase

log = logging.getLogger(__name__)


class RunFailedError(RuntimeError):
    """The run cannot go on (too few nodes, nothing to aggregate); the message says why."""


@dataclass
class RoundLog:
    """What one round saw. ``number`` is the RadFed round (resumed runs continue counting)."""

    number: int
    sampled: set[int] = field(default_factory=set)
    #: node -> the first error reason it sent in the round's training exchanges
    errors: dict[int, str] = field(default_factory=dict)
    #: nodes that left a training message of the round unanswered
    silent: set[int] = field(default_factory=set)
    #: nodes that trained in an earlier round of the run and were not asked in this one
    #: (gone between rounds: no longer connected when the round sampled its nodes)
    departed: set[int] = field(default_factory=set)
    trained: dict[int, int] = field(default_factory=dict)
    evaluated: dict[int, int] = field(default_factory=dict)
    train_metrics: dict[str, float] = field(default_factory=dict)
    evaluate_metrics: dict[str, float] = field(default_factory=dict)
    central_metrics: dict[str, float] = field(default_factory=dict)

    @property
    def declined(self) -> list[int]:
        return sorted(
            node
            for node, reason in self.errors.items()
            if reason.startswith(DECLINED_PREFIX) and node not in self.trained
        )

    @property
    def dropped(self) -> list[int]:
        gone = (self.silent | set(self.errors) | self.departed) - set(self.trained)
        return sorted(gone - set(self.declined))

    def record(self, checkpoint: str | None) -> RoundRecord:
        return RoundRecord(
            round=self.number,
            sampled=[str(n) for n in sorted(self.sampled)],
            trained={str(n): c for n, c in sorted(self.trained.items())},
            declined=[str(n) for n in self.declined],
            dropped=[str(n) for n in self.dropped],
            train_metrics=self.train_metrics,
            evaluate_metrics=self.evaluate_metrics,
            evaluated={str(n): c for n, c in sorted(self.evaluated.items())},
            central_metrics=self.central_metrics,
            checkpoint=checkpoint,
            finished_at=dt.datetime.now(dt.UTC),
        )


def floats(metrics: Iterable[tuple[str, object]]) -> dict[str, float]:
    """The scalar numeric metrics of a metric mapping, as floats."""
    return {
        k: float(v) for k, v in metrics if isinstance(v, int | float) and not isinstance(v, bool)
    }


class Ledger:
    """Keeps the current round's log and writes each finished round to the run directory."""

    def __init__(
        self,
        run_dir: RunDirectory,
        *,
        offset: int,
        rounds: int,
        min_nodes: int,
        metadata: dict[str, str],
    ) -> None:
        self.run_dir = run_dir
        self.offset = offset
        self.rounds = rounds
        self.min_nodes = min_nodes
        self.metadata = metadata
        self.current: RoundLog | None = None
        self.completed = offset
        #: every node that has trained in this run so far
        self.trainers: set[int] = set()

    def round_number(self, local_round: int) -> int:
        """The RadFed round of a strategy's round (``local_round`` counts from 1)."""
        return self.offset + local_round

    def begin(self, local_round: int) -> RoundLog:
        number = self.round_number(local_round)
        if self.current is None or self.current.number != number:
            self.current = RoundLog(number)
        return self.current

    @property
    def log(self) -> RoundLog:
        if self.current is None:
            raise RuntimeError("no round has begun")
        return self.current

    def observe(self, sent: list[Message], replies: list[Message]) -> None:
        """Classify one exchange's training replies (called by :class:`ObservingGrid`)."""
        if self.current is None:
            return
        to_node = {m.metadata.message_id: m.metadata.dst_node_id for m in sent}
        answered: dict[int, Message] = {}
        for reply in replies:
            node = to_node.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
            answered[node] = reply
        for message in sent:
            if message.metadata.message_type.split(".")[0] != MessageType.TRAIN:
                continue
            node = message.metadata.dst_node_id
            self.current.sampled.add(node)
            answer = answered.get(node)
            if answer is None:
                self.current.silent.add(node)
                log.info("round %d: node %d did not answer", self.current.number, node)
            elif answer.has_error():
                reason = answer.error.reason or ""
                self.current.errors.setdefault(node, reason)
                log.info("round %d: node %d answered %s", self.current.number, node, reason)

    def require_trainers(self) -> None:
        """Fail the run when fewer than ``min-nodes`` nodes trained in the current round."""
        current = self.log
        if len(current.trained) >= self.min_nodes:
            return
        raise self.fail(
            f"round {current.number}: {len(current.trained)} node(s) trained, "
            f"min-nodes is {self.min_nodes} "
            f"(sampled {len(current.sampled)}, declined {len(current.declined)}, "
            f"dropped {len(current.dropped)})"
        )

    def fail(self, reason: str) -> RunFailedError:
        """Record the current round as it stands (no checkpoint); returns the error to raise."""
        if self.current is not None and self.current.sampled:
            self.current.departed = self.trainers - self.current.sampled
            self.run_dir.append_round(self.current.record(checkpoint=None))
        return RunFailedError(reason)

    def finish(self, state: dict[str, torch.Tensor]) -> RoundRecord:
        """Write the current round: checkpoint, ``rounds.jsonl`` line, ``status.json``."""
        current = self.log
        current.departed = self.trainers - current.sampled
        self.trainers |= set(current.trained)
        checkpoint = self.run_dir.save_checkpoint(current.number, state, self.metadata)
        record = current.record(checkpoint=checkpoint)
        self.run_dir.append_round(record)
        self.completed = current.number
        self.run_dir.write_status(RunPhase.RUNNING, current.number, self.rounds)
        log.info(
            "round %d: trained %s, declined %s, dropped %s",
            current.number,
            record.trained,
            record.declined,
            record.dropped,
        )
        return record


class ObservingGrid(Grid):
    """A Grid that reports every exchange to a :class:`Ledger` and bounds every wait.

    Flower's legacy workflows wait for replies without a timeout; here a call
    without one waits ``timeout`` seconds.
    """

    def __init__(self, grid: Grid, ledger: Ledger, timeout: float) -> None:
        self.grid = grid
        self.ledger = ledger
        self.timeout = timeout

    def set_run(self, run: Run) -> None:
        self.grid.set_run(run)

    @property
    def run(self) -> Run:
        return self.grid.run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def get_nodes(self) -> Iterable[NodeInfo]:
        return self.grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        sent = list(messages)
        wait = self.timeout if timeout is None else timeout
        replies = list(self.grid.send_and_receive(sent, timeout=wait))
        self.ledger.observe(sent, replies)
        return replies


def wait_for_nodes(
    grid: Grid, minimum: int, timeout: float, sleep: Callable[[float], None] = time.sleep
) -> list[int]:
    """The connected nodes, once ``minimum`` are; :class:`RunFailedError` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        nodes = list(grid.get_node_ids())
        if len(nodes) >= minimum:
            return nodes
        if time.monotonic() >= deadline:
            raise RunFailedError(
                f"{len(nodes)} node(s) connected after {timeout:.0f} s, min-nodes is {minimum}"
            )
        log.info("waiting for nodes: %d connected, %d needed", len(nodes), minimum)
        sleep(1.0)
