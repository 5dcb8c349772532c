"""An in-process Flower ``Grid`` for tests and overhead measurements.

:class:`LocalGrid` delivers every message to a ``ClientApp`` called in this
process and returns the replies in a shuffled order (Flower promises no order).
It runs the very ServerApp, strategy and ClientApp objects that ``flwr run``
loads, without Ray or a SuperLink, so the round logic can be tested in a second
and a misbehaving client can be planted on one node. It is not an engine for
real runs: use Flower's simulation or deployment engines for those.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import numpy as np
from flwr.app import Context, Message, RecordDict
from flwr.app.error import Error
from flwr.serverapp import Grid
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from crfl.flower.records import NUM_PARTITIONS, PARTITION_ID

ClientFn = Callable[[Message, Context], Message]

#: Error code of a reply whose ClientApp raised (Flower's ClientApp exception code).
CLIENT_EXCEPTION = 0


class LocalGrid(Grid):
    """Nodes 0..N-1 (``partition-id`` = index) served in-process by ``client_app``.

    Args:
        client_app: the ClientApp (or any callable (message, context) -> message) of every node.
        num_nodes: N.
        overrides: partition id -> another callable for that node (e.g. a malformed client).
        shuffle_seed: seed of the reply order; None keeps the sending order.
        node_ids: the node ids (default: distinct large ids unrelated to the partition ids, increasing,
            so that the server's automatic binding gives node k partition k).
        unavailable: node indices whose messages come back as Flower's NODE_UNAVAILABLE error
            reply (a node that left after the round's messages were sent).
        connected: node indices listed by ``get_node_ids`` (default: all).
    """

    def __init__(
        self,
        client_app: ClientFn,
        num_nodes: int,
        *,
        overrides: Mapping[int, ClientFn] | None = None,
        shuffle_seed: int | None = 0,
        node_ids: list[int] | None = None,
        unavailable: Iterable[int] = (),
        connected: Iterable[int] | None = None,
    ) -> None:
        ids = node_ids or sorted(int(v) for v in np.random.default_rng(12345).choice(10**9, size=num_nodes, replace=False) + 10**9)
        self.node_ids = list(ids)
        self.unavailable = {ids[k] for k in unavailable}
        self.connected = set(ids) if connected is None else {ids[k] for k in connected}
        self._apps: dict[int, tuple[ClientFn, int]] = {}
        for k, nid in enumerate(ids):
            self._apps[nid] = ((overrides or {}).get(k, client_app), k)
        self._num = num_nodes
        self._rng = np.random.default_rng(shuffle_seed) if shuffle_seed is not None else None
        self._replies: dict[str, Message] = {}
        self._run = Run.create_empty(run_id=1)
        self.contexts: dict[int, Context] = {
            nid: Context(
                run_id=1, node_id=nid, node_config={PARTITION_ID: k, NUM_PARTITIONS: num_nodes},
                state=RecordDict(), run_config={},
            )
            for nid, (_, k) in self._apps.items()
        }

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return [n for n in self._apps if n in self.connected]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            mid = uuid.uuid4().hex
            msg.metadata.__dict__["_message_id"] = mid
            self._replies[mid] = self._deliver(msg)
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = [self._replies.pop(i) for i in list(message_ids) if i in self._replies]
        if self._rng is not None:
            replies = [replies[i] for i in self._rng.permutation(len(replies))]
        return replies

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(list(self.push_messages(messages)))

    def _deliver(self, msg: Message) -> Message:
        if msg.metadata.dst_node_id in self.unavailable:
            return Message(Error(code=ErrorCode.NODE_UNAVAILABLE, reason="the node is gone"), reply_to=msg)
        app, _ = self._apps[msg.metadata.dst_node_id]
        try:
            return app(msg, self.contexts[msg.metadata.dst_node_id])
        except Exception as err:  # a ClientApp that raises answers with an error reply, as in Flower
            return Message(Error(code=CLIENT_EXCEPTION, reason=f"{type(err).__name__}: {err}"), reply_to=msg)


@contextlib.contextmanager
def server_identity() -> Iterator[None]:
    """Stamp messages created in this process as the ServerApp's, as Flower's runtimes do."""
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
    try:
        yield
    finally:
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def run_local(server_app: Any, client_app: ClientFn, num_nodes: int, **grid_kwargs: Any) -> LocalGrid:
    """Run a ServerApp against a :class:`LocalGrid`; returns the grid (its contexts hold node state)."""
    grid = LocalGrid(client_app, num_nodes, **grid_kwargs)
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    with server_identity():
        server_app(grid, context)
    return grid
