"""Flower's federation in one process: a ``Grid`` that runs a ``ClientApp`` on each node in turn.

Flower's simulation engine (``flwr.simulation``, on Ray) runs the clients as
actors in other processes and hands their replies back in the order they
finish. This grid runs the very same ``ClientApp`` and strategy, with no
Ray, one node after another in node order: seconds instead of a cluster's
start-up, and replies in a fixed order, so a run is reproducible to the bit
(a sum of floating-point updates depends on its order). The tests and
``flower_sim --backend local`` use it.

Each message is deep-copied on its way to the client and back, as a real
transport serialises it: no side shares an object with the other.
"""

from __future__ import annotations

import copy
import uuid
from collections.abc import Callable, Iterable

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.task_identity import TaskIdentity

#: the first client's node id (the server is ``SUPERLINK_NODE_ID``)
FIRST_NODE_ID = 1001


class LocalGrid(Grid):
    """Nodes ``FIRST_NODE_ID + i`` for i < ``num_nodes``, each running ``client_app``; node i's
    ``node_config`` is ``node_config(i)`` (default: Flower's ``partition-id`` and
    ``num-partitions``, as the simulation engine sets them)."""

    def __init__(
        self,
        client_app: ClientApp,
        num_nodes: int,
        node_config: Callable[[int], dict] | None = None,
        run_config: dict | None = None,
    ):
        self.client_app = client_app
        self._run = None
        configs = node_config or (lambda i: {"partition-id": i, "num-partitions": num_nodes})
        self.contexts = {
            FIRST_NODE_ID + i: Context(
                run_id=0,
                node_id=FIRST_NODE_ID + i,
                node_config=configs(i),
                state=RecordDict(),
                run_config=dict(run_config or {}),
            )
            for i in range(num_nodes)
        }
        self._replies: dict[str, Message] = {}

    def serve(self, server_app: ServerApp) -> None:
        """Run ``server_app`` on this grid, as the server of run 0 (Flower's messages take their
        sender from the process's task identity, which a SuperLink would set)."""
        saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 0, SUPERLINK_NODE_ID, 0
        try:
            server_app(
                self,
                Context(
                    run_id=0,
                    node_id=SUPERLINK_NODE_ID,
                    node_config={},
                    state=RecordDict(),
                    run_config={},
                ),
            )
        finally:
            TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved

    def set_run(self, run) -> None:
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        # Node order, whatever order the strategy sampled the nodes in.
        for message in sorted(messages, key=lambda m: m.metadata.dst_node_id):
            node = message.metadata.dst_node_id
            if node not in self.contexts:
                raise ValueError(f"no node {node} in this grid")
            message_id = uuid.uuid4().hex
            message.metadata.__dict__["_message_id"] = message_id
            delivered = copy.deepcopy(message)
            try:
                reply = self.client_app(delivered, self.contexts[node])
            except Exception as err:  # noqa: BLE001 - a failing client is a reply with an error
                from flwr.app import Error

                reply = Message(
                    Error(code=0, reason=f"{type(err).__name__}: {err}"), reply_to=delivered
                )
            reply = copy.deepcopy(reply)
            reply.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            self._replies[message_id] = reply
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None):
        return list(self.pull_messages(self.push_messages(messages)))
