"""A Grid that delivers messages straight to a ClientApp, for driving a ServerApp in-process.

Each simulated node has its own ``Context`` (node config, run config and the
state that mods such as ``secaggplus_mod`` keep between messages). Messages are
copied on the way in, as the wire would; a ClientApp that raises yields an
error reply, as a SuperNode's would; a *silent* node never answers, as one
that is gone or too slow.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict, UserConfigValue
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.run import Run


@dataclass
class Exchange:
    """One ``send_and_receive``: what went out and what came back."""

    sent: list[Message]
    replies: list[Message] = field(default_factory=list)


def _assign_id(message: Message) -> str:
    # Flower's own grids set the id of a pushed message this way.
    message.metadata.__dict__["_message_id"] = uuid4().hex
    return message.metadata.message_id


class LocalGrid(Grid):
    def __init__(
        self,
        app: ClientApp,
        run_config: Mapping[str, UserConfigValue],
        nodes: Mapping[int, Mapping[str, UserConfigValue]],
        silent: Iterable[int] = (),
    ) -> None:
        self.app = app
        self._run = Run.create_empty(run_id=1)
        self.contexts = {
            node: Context(
                run_id=1,
                node_id=node,
                node_config=dict(config),
                state=RecordDict(),
                run_config=dict(run_config),
            )
            for node, config in nodes.items()
        }
        self.silent = set(silent)
        self.exchanges: list[Exchange] = []
        self._pending: dict[str, Message] = {}

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for message in messages:
            ids.append(_assign_id(message))
            # What was pushed is what is delivered, whatever the sender changes later.
            self._pending[message.metadata.message_id] = copy.deepcopy(message)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        replies = []
        for message_id in message_ids:
            message = self._pending.pop(message_id, None)
            if message is None or message.metadata.dst_node_id in self.silent:
                continue
            replies.append(self._deliver(message))
        return replies

    def _deliver(self, message: Message) -> Message:
        received = copy.deepcopy(message)  # each node gets its own copy, as off the wire
        context = self.contexts[message.metadata.dst_node_id]
        try:
            reply = self.app(received, context)
        except Exception as exc:
            error = Error(
                code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"{type(exc).__name__}: {exc}"
            )
            reply = Message(error, reply_to=received)
        _assign_id(reply)
        return reply

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        messages = list(messages)
        ids = list(self.push_messages(messages))
        exchange = Exchange(sent=[copy.deepcopy(self._pending[i]) for i in ids])
        exchange.replies = self.pull_messages(ids)
        self.exchanges.append(exchange)
        return exchange.replies

    def train_exchanges(self) -> list[Exchange]:
        return [e for e in self.exchanges if e.sent and e.sent[0].metadata.message_type == "train"]
