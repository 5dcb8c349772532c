"""Several Flower SuperNodes in one process, each running the ClientApp in-process: the fast deployment.

A Flower 1.41 deployment on one small machine is slow for reasons that have nothing to do
with training (:mod:`crfl.flower.deploy.waits`): every SuperNode is a Python process that polls
the SuperLink, hands each message to a ClientApp process through its Runtime API (a
second HTTP hop, object by object) and relays the reply back. With N SuperNodes on two
cores these processes, not the clients' SGD, fill the round.

:class:`NodeHost` keeps the SuperLink side exactly as Flower's SuperNode does it and
drops the rest. Every hosted node opens its own Fleet connection with Flower's
:func:`flwr.supernode.fleet_http_connection.http_request_response`: its own key pair
(``--auth-supernode-private-key``, registered with ``flwr supernode register`` when the
SuperLink runs ``--enable-supernode-auth``), TLS to the SuperLink
(``--root-certificates``), activation, heartbeats, pull, object pulls and the
confirmation, push and object pushes, deactivation. What the host does differently:

- the message's objects are pulled straight into the ClientApp (no node state, no Runtime
  API, no task), and the reply is pushed straight from it, as ``flwr-clientapp`` pushes it;
- the ClientApp is installed from the run's FAB and loaded once per FAB
  (:class:`ClientApps`), so torch, crfl and the prepared run stay in memory from round to
  round and from node to node;
- one poll loop serves all hosted nodes: while idle it asks **one** node per tick
  (in turn); once a node has a message it asks **every** hosted node (a round's messages
  are sent together) and keeps asking all of them until a pass finds nothing. Every node
  is also asked at least every ``sweep_interval`` seconds (counted from the end of the
  previous full pass). While idle a host of N nodes thus sends about
  ``1 / poll_interval + N / sweep_interval`` pulls a second to the SuperLink (12 for 10
  nodes with the defaults), plus Flower's heartbeat of every node (one per about 20 s).

Messages are handled one at a time (run one host per core, each with its share of the
nodes). A node whose message-list pull fails (after Flower's retries) leaves the host and
the others go on; the host exits with status 1 when none is left.

**One process is one trust domain.** The ClientApp runs in the process that holds every
hosted node's private key and Fleet connection, so code in the ClientApp could act as any
of them. Host several keys in one process only for nodes of one operator. FAB signature
verification (Flower's ``--trusted-entities``) is not implemented: the host runs the FAB the
SuperLink serves, as a SuperNode without trusted entities does.

    python -m crfl.flower.deploy.nodes --insecure --superlink 127.0.0.1:9300 --count 10
    python -m crfl.flower.deploy.nodes --root-certificates ca.crt --superlink 127.0.0.1:9300 \\
        --auth-supernode-private-key node0 node1
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import crfl.flower  # noqa: F401  (telemetry and update check off before flwr is imported)
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key
from flwr.app import Context, Error, Message, RecordDict
from flwr.cli.install import install_from_fab
from flwr.clientapp.client_app import ClientApp, LoadClientAppError
from flwr.clientapp.utils import get_load_client_app_fn
from flwr.common.config import get_fused_config_from_fab
from flwr.common.constant import ErrorCode
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, get_object_tree, no_object_id_recompute
from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree, push_objects
from flwr.supercore.run import RunNotRunningException
from flwr.supernode.fleet_http_connection import http_request_response

from crfl.flower.deploy.waits import OBJECT_BACKOFF, OBJECT_BACKOFF_CAP

log = logging.getLogger("crfl.flower")

#: Seconds between two idle ticks (one pull of one node each).
DEFAULT_POLL_INTERVAL = 0.1
#: Every hosted node is asked at least this often (s), whatever the rotation.
DEFAULT_SWEEP_INTERVAL = 5.0
#: Seconds a message's objects may take to arrive before the message is dropped (Flower: about 100 s).
OBJECT_PULL_MAX_TIME = 30.0
#: The reason flwr-clientapp gives when the ClientApp cannot be loaded.
LOAD_ERROR_REASON = "An exception was raised when attempting to load `ClientApp`"

KeyPair = tuple[ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey]


class ClientApps:
    """The ClientApp of a run, installed from its FAB and loaded once per FAB hash (one FAB at a time)."""

    def __init__(self) -> None:
        self._apps: dict[str, ClientApp] = {}

    def __call__(self, run: Any, fab: Any) -> ClientApp:
        if fab.hash_str not in self._apps:
            install_from_fab(fab.content, skip_prompt=True)
            load = get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)
            self._apps = {fab.hash_str: load(run.fab_id, run.fab_version, fab.hash_str)}
        return self._apps[fab.hash_str]


def call_client_app(app: Callable[[], ClientApp], message: Message, context: Callable[[], Context]) -> tuple[Message, bool]:
    """The ClientApp's reply to ``message``, or the error reply ``flwr-clientapp`` would send; and whether it succeeded.

    ``app`` and ``context`` are called here, so a failure to load the app or to build the
    context is answered with an error reply too (the server is not left waiting).
    """
    try:
        return app()(message=message, context=context()), True
    except Exception as ex:  # the task fails with an error reply, as in flwr-clientapp
        if isinstance(ex, LoadClientAppError):
            code, reason = ErrorCode.LOAD_CLIENT_APP_EXCEPTION, LOAD_ERROR_REASON
        else:
            code, reason = ErrorCode.CLIENT_APP_RAISED_EXCEPTION, f"{type(ex)}:<'{ex}'>"
        log.error("The ClientApp raised: %s", reason, exc_info=ex)
        return Message(Error(code=code, reason=reason), reply_to=message), False


@dataclass
class HostedNode:
    """One SuperNode's Fleet connection (Flower's own) and its contexts, one per run series."""

    label: str
    node_id: int
    receive: Callable[[], Any]
    send: Callable[..., tuple[set[str], str]]
    get_run: Callable[[int], Any]
    get_fab: Callable[[str, int], Any]
    pull_object: Callable[[int, str], bytes]
    push_object: Callable[[int, str, str, bytes], None]
    confirm: Callable[[int, str], None]
    node_config: dict[str, Any] = field(default_factory=dict)
    contexts: dict[int, Context] = field(default_factory=dict)
    handled: int = 0
    failed: bool = False  # its message-list pull failed: it is no longer asked


@dataclass
class NodeHost:
    """Serves several SuperNodes' messages in this process (see the module docstring)."""

    superlink: str
    keys: list[KeyPair | None]
    insecure: bool = True
    root_certificates: bytes | None = None
    node_config: dict[str, Any] = field(default_factory=dict)
    poll_interval: float = DEFAULT_POLL_INTERVAL
    sweep_interval: float = DEFAULT_SWEEP_INTERVAL
    max_retries: int | None = None
    max_wait_time: float | None = None
    nodes: list[HostedNode] = field(default_factory=list)
    _apps: ClientApps = field(default_factory=ClientApps)
    _runs: dict[int, tuple[Any, Any]] = field(default_factory=dict)
    _turn: int = 0
    _last_sweep: float = 0.0

    @contextlib.contextmanager
    def connected(self) -> Iterator[NodeHost]:
        """Open every node's Fleet connection (activation, heartbeats); deactivate them all on exit."""
        with contextlib.ExitStack() as stack:
            for i, keys in enumerate(self.keys):
                conn = stack.enter_context(http_request_response(self.superlink, self.insecure, self.root_certificates, keys,
                                                                 self.max_retries, self.max_wait_time))
                node_id, receive, send, get_run, get_fab, pull_object, push_object, confirm = conn
                self.nodes.append(HostedNode(f"node {i}", node_id, receive, send, get_run, get_fab, pull_object,
                                             push_object, confirm, dict(self.node_config)))
                log.info("hosted SuperNode %d: node id %d", i, node_id)
            try:
                yield self
            finally:
                self.nodes.clear()

    # -- one message ---------------------------------------------------------------------------------

    def _run_and_fab(self, node: HostedNode, run_id: int) -> tuple[Any, Any]:
        if run_id not in self._runs:
            run = node.get_run(run_id)
            self._runs = {run_id: (run, node.get_fab(run.fab_hash, run_id))}  # one run at a time
        return self._runs[run_id]

    def _context(self, node: HostedNode, run: Any, fab: Any) -> Context:
        """The node's context of ``run``: new for a new run, with the state of the previous run of its series (as a SuperNode keeps it)."""
        ctx = node.contexts.get(run.series_id)
        if ctx is None or ctx.run_id != run.run_id:
            state = ctx.state if ctx is not None else RecordDict()
            ctx = Context(run_id=run.run_id, node_id=node.node_id, node_config=dict(node.node_config), state=state,
                          run_config=get_fused_config_from_fab(fab.content, run), series_id=run.series_id)
            node.contexts = {run.series_id: ctx}  # one run at a time
        return ctx

    def handle(self, node: HostedNode, message: Message, tree: Any) -> None:
        """Pull ``message``'s content, call the ClientApp, push the reply (what SuperNode + flwr-clientapp do)."""
        run_id = message.metadata.run_id
        t0 = time.perf_counter()
        run, fab = self._run_and_fab(node, run_id)
        message = pull_and_inflate_object_from_tree(
            tree, partial(node.pull_object, run_id), partial(node.confirm, run_id), return_type=Message,
            initial_backoff=OBJECT_BACKOFF, backoff_cap=OBJECT_BACKOFF_CAP, max_time=OBJECT_PULL_MAX_TIME)
        message.metadata.__dict__["_message_id"] = tree.object_id
        t1 = time.perf_counter()
        reply, ok = call_client_app(lambda: self._apps(run, fab), message, lambda: self._context(node, run, fab))
        t2 = time.perf_counter()
        reply.metadata.__dict__["_message_id"] = reply.object_id
        with no_object_id_recompute():
            reply_tree = get_object_tree(reply)
            to_push, session = node.send(reply, reply_tree, t2 - t1)
            push_objects(get_all_nested_objects(reply), partial(node.push_object, run_id, session), object_ids_to_push=to_push)
        node.handled += 1
        log.info("%s (id %d), %s message: %s in %.3f s (pull %.3f, ClientApp %.3f, push %.3f)", node.label, node.node_id,
                 message.metadata.message_type, "completed" if ok else "failed", time.perf_counter() - t0, t1 - t0, t2 - t1,
                 time.perf_counter() - t2)

    def poll_node(self, node: HostedNode) -> bool:
        """Ask the SuperLink once for ``node``'s next message and handle it; True if there was one.

        As in Flower's SuperNode, a message whose objects cannot be pulled or whose reply cannot be
        pushed is dropped with a log line (the server counts the node as missing in that round).
        A node whose message-list pull fails (after Flower's retries) leaves the host; the
        others go on.
        """
        try:
            received = node.receive()
        except RunNotRunningException:
            return False
        except Exception as ex:  # noqa: BLE001 (the other nodes go on)
            node.failed = True
            log.error("%s (id %d) leaves the host: pulling its messages failed: %s: %s", node.label, node.node_id,
                      type(ex).__name__, ex)
            return False
        if received is None:
            return False
        try:
            self.handle(node, *received)
        except RunNotRunningException:
            log.info("%s: the run is no longer running; message ignored", node.label)
        except Exception as ex:  # noqa: BLE001 (the other nodes go on)
            log.error("%s (id %d): message dropped: %s: %s", node.label, node.node_id, type(ex).__name__, ex)
        return True

    # -- the loop ------------------------------------------------------------------------------------

    def _live(self) -> list[HostedNode]:
        live = [n for n in self.nodes if not n.failed]
        if not live:
            raise RuntimeError(f"none of the {len(self.nodes)} hosted nodes can pull its messages (see the log)")
        return live

    def _full_pass(self) -> int:
        """Ask every live node once, starting where the rotation stands (no node is always last)."""
        live = self._live()
        start = self._turn % len(live)
        hits = sum(self.poll_node(n) for n in live[start:] + live[:start])
        self._last_sweep = time.monotonic()
        return hits

    def poll_once(self) -> int:
        """One tick: one node in turn, or every node when a sweep is due; then every node again while any had a message."""
        if time.monotonic() - self._last_sweep >= self.sweep_interval:
            hits = self._full_pass()
        else:
            live = self._live()
            hits = int(self.poll_node(live[self._turn % len(live)]))
            self._turn += 1
        total = hits
        while hits:  # a round's messages travel together: look at all hosted nodes until a pass finds none
            hits = self._full_pass()
            total += hits
        return total

    def serve_forever(self) -> None:
        while True:
            if not self.poll_once():
                time.sleep(self.poll_interval)


def load_key(path: Path) -> KeyPair:
    """An ECDSA private key in OpenSSH format (``ssh-keygen -t ecdsa``) and its public key, as ``flower-supernode`` reads it."""
    try:
        key = load_ssh_private_key(path.expanduser().read_bytes(), None)
    except TypeError as ex:  # cryptography: "Key is password-protected, but password was not given"
        raise ValueError(f"The 'auth-supernode-private-key' file {str(path)!r} is protected by a passphrase, which the node "
                         "host cannot ask for; give it a copy without one (ssh-keygen -p -N '' -f COPY), readable by this "
                         "user only.") from ex
    except (OSError, ValueError, UnsupportedAlgorithm) as ex:
        why = ex.strerror if isinstance(ex, OSError) and ex.strerror else ex
        raise ValueError(f"The 'auth-supernode-private-key' file {str(path)!r} cannot be read as an OpenSSH private key: {why}") from ex
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"The 'auth-supernode-private-key' file {str(path)!r} holds a {type(key).__name__}; "
                         "SuperNode authentication needs an ECDSA key (ssh-keygen -t ecdsa -b 384).")
    return key, key.public_key()


def read_root_certificates(path: Path | None) -> bytes | None:
    """The PEM CA certificate(s) of ``--root-certificates`` (None: --insecure); ValueError naming the file otherwise."""
    if path is None:
        return None
    from cryptography import x509

    try:
        data = path.expanduser().read_bytes()
    except OSError as ex:
        raise ValueError(f"The 'root-certificates' file {str(path)!r} cannot be read: {ex.strerror or ex}; "
                         "give the CA certificate (PEM) of the SuperLink's TLS certificate.") from ex
    try:
        if not x509.load_pem_x509_certificates(data):
            raise ValueError("no certificate")
    except ValueError as ex:
        raise ValueError(f"The 'root-certificates' file {str(path)!r} holds no PEM certificate; give the CA "
                         "certificate of the SuperLink's TLS certificate (-----BEGIN CERTIFICATE-----).") from ex
    return data


def fail(prog: str, message: str) -> None:
    """One line ``PROG: error: MESSAGE`` on stderr and exit status 2 (a bad argument or file, as argparse does)."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    sys.exit(2)


def _node_config(text: str | None) -> dict[str, Any]:
    from flwr.common.config import parse_config_args

    return dict(parse_config_args([text])) if text else {}


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m crfl.flower.deploy.nodes", description=__doc__.split("\n\n")[0])
    ap.add_argument("--superlink", required=True, metavar="HOST:PORT", help="the SuperLink's Fleet API")
    tls = ap.add_mutually_exclusive_group(required=True)
    tls.add_argument("--insecure", action="store_true", help="plain HTTP to the SuperLink (loopback only)")
    tls.add_argument("--root-certificates", type=Path, help="CA certificate of the SuperLink's TLS certificate")
    who = ap.add_mutually_exclusive_group(required=True)
    who.add_argument("--count", type=int, help="host this many self-registered nodes (SuperLink without --enable-supernode-auth)")
    who.add_argument("--auth-supernode-private-key", type=Path, nargs="+", metavar="KEY",
                     help="one registered node per private key (needs TLS)")
    ap.add_argument("--node-config", default=None, help="node_config of every hosted node, e.g. \"data-dir='/data'\"")
    ap.add_argument("--poll-interval", type=float, default=DEFAULT_POLL_INTERVAL,
                    help=f"seconds between two idle pulls (one node each; default {DEFAULT_POLL_INTERVAL})")
    ap.add_argument("--sweep-interval", type=float, default=DEFAULT_SWEEP_INTERVAL,
                    help=f"every node is asked at least this often, in seconds (default {DEFAULT_SWEEP_INTERVAL})")
    ap.add_argument("--max-retries", type=int, default=None,
                    help="retries of a failed request to the SuperLink before the host gives up (default: no limit)")
    ap.add_argument("--max-wait-time", type=float, default=None,
                    help="seconds of retrying a failed request before the host gives up (default: no limit)")
    ap.add_argument("--parent-pid", type=int, default=None, help="exit when this process exits")
    a = ap.parse_args(argv)
    if a.count is not None and not (1 <= a.count <= 1000):
        ap.error(f"The 'count' parameter must be an integer in [1, 1000]. Got {a.count} instead.")
    if not (0.0 < a.poll_interval <= 60.0):
        ap.error(f"The 'poll-interval' parameter must be a float in (0, 60]. Got {a.poll_interval} instead.")
    if not (a.poll_interval <= a.sweep_interval <= 3600.0):
        ap.error(f"The 'sweep-interval' parameter must be a float in [poll-interval, 3600]. Got {a.sweep_interval} instead.")
    if a.max_retries is not None and a.max_retries < 0:
        ap.error(f"The 'max-retries' parameter must be an integer >= 0. Got {a.max_retries} instead.")
    if a.max_wait_time is not None and not (0.0 < a.max_wait_time < float("inf")):
        ap.error(f"The 'max-wait-time' parameter must be a float in (0, inf). Got {a.max_wait_time} instead.")
    if a.auth_supernode_private_key:
        seen = [str(k.expanduser().resolve()) for k in a.auth_supernode_private_key]
        if len(set(seen)) != len(seen):
            dup = next(k for k in seen if seen.count(k) > 1)
            ap.error(f"The 'auth-supernode-private-key' parameter lists {dup!r} twice; every hosted node needs its own key.")
    if a.auth_supernode_private_key and a.insecure:
        ap.error("The 'auth-supernode-private-key' parameter needs TLS (--root-certificates); got --insecure.")
    return a


def main(argv: list[str] | None = None) -> None:
    a = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # leave the `with`: every node is deactivated
    if a.parent_pid is not None:
        from flwr.supercore.app_utils import start_parent_process_monitor

        start_parent_process_monitor(a.parent_pid)
    try:
        keys: list[KeyPair | None] = [load_key(p) for p in a.auth_supernode_private_key] if a.auth_supernode_private_key else [None] * a.count
        certs = read_root_certificates(a.root_certificates)
    except ValueError as ex:
        fail("python -m crfl.flower.deploy.nodes", str(ex))
    import crfl.flower.client_app  # noqa: F401  (torch and crfl imported before the first message, not during round 1)

    host = NodeHost(a.superlink, keys, insecure=a.insecure, root_certificates=certs, node_config=_node_config(a.node_config),
                    poll_interval=a.poll_interval, sweep_interval=a.sweep_interval, max_retries=a.max_retries,
                    max_wait_time=a.max_wait_time)
    with host.connected():
        log.info("crfl node host (pid %d): %d SuperNodes on %s", os.getpid(), len(host.nodes), a.superlink)
        try:
            host.serve_forever()
        except KeyboardInterrupt:  # Ctrl-C, or Flower's heartbeat of a node the SuperLink no longer knows
            pass
        except RuntimeError as ex:  # every node left the host
            log.error("%s", ex)
            sys.exit(1)


if __name__ == "__main__":
    main()
