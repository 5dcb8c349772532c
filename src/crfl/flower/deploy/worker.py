"""A long-lived ClientApp executor for deployed SuperNodes (``flower-supernode --isolation process``).

Flower 1.41's default (``--isolation subprocess``) starts a SuperExec beside every
SuperNode that polls for tasks once a second and starts a new ``flwr-clientapp``
process for **every message**; that process imports torch and crfl and rebuilds the
run (data, shards) before it trains, about 3-10 s per message on a small machine.

This worker replaces both for SuperNodes started with ``--isolation process``: one
Python process that asks one or more SuperNodes' Runtime APIs for ClientApp tasks
(``AcquireTask``, as the SuperExec does), and runs each task itself, the way
``flwr-clientapp`` runs one (pull the message, context and FAB with the task's token,
call the ClientApp, push the reply and the context), without exiting. The ClientApp
is loaded once per FAB, so the crfl ClientApp's cache of the prepared run
(:func:`crfl.flower.client_app.make_client_app`) survives from round to round and
from node to node: torch is imported and the data loaded once per worker.

    python -m crfl.flower.deploy.worker --insecure --runtime-api-address 127.0.0.1:9400 127.0.0.1:9401

Tasks are run one at a time; start one worker per core for more parallelism, each
serving its own SuperNodes. The SuperNodes keep their TLS and authentication towards
the SuperLink: the worker only talks to their Runtime APIs (``--insecure`` on
loopback, ``--root-certificates`` when a SuperNode serves its Runtime API over TLS).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import crfl.flower  # noqa: F401  (telemetry and update check off before flwr is imported)
from flwr.common.constant import SubStatus
from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
from flwr.supercore.app_utils import start_parent_process_monitor
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
import flwr.supernode.runtime.run_clientapp as run_clientapp
from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

from crfl.flower.deploy.nodes import ClientApps, call_client_app, fail, read_root_certificates
from crfl.flower.deploy.waits import shorten_object_backoff

log = logging.getLogger("crfl.flower")

#: Seconds between two rounds of AcquireTask over all served SuperNodes when none had a task
#: (Flower's SuperExec: 1 s, ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL``).
DEFAULT_POLL_INTERVAL = 0.05


@dataclass
class Worker:
    """Serves the ClientApp tasks of the SuperNodes at ``addresses``, one at a time, in this process."""

    addresses: list[str]
    insecure: bool = True
    root_certificates: bytes | None = None
    poll_interval: float = DEFAULT_POLL_INTERVAL
    tasks_done: int = 0
    _apps: ClientApps = field(default_factory=ClientApps)
    _acquire: dict[str, RuntimeHttpClient] = field(default_factory=dict)

    def _client(self, address: str, *interceptors: Any) -> RuntimeHttpClient:
        return RuntimeHttpClient.from_server_address(
            server_address=address, insecure=self.insecure, root_certificates=self.root_certificates,
            interceptors=list(interceptors), retry_invoker=make_simple_http_retry_invoker(),
        )

    def poll_once(self) -> int:
        """Ask every SuperNode once for a task and run the ones offered; returns how many ran."""
        ran = 0
        for address in self.addresses:
            if address not in self._acquire:
                self._acquire[address] = self._client(address, RuntimeVersionHttpInterceptor(component_name="SuperExec"))
            res = self._acquire[address].AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
            if res.HasField("task") and res.token:
                self.run_task(address, res.token)
                ran += 1
        return ran

    def serve_forever(self) -> None:
        # the task is offered as soon as the SuperNode has the message, sometimes before its objects:
        # retry those after 0.01 s, not Flower's 1 s
        shorten_object_backoff(run_clientapp, "pull_and_inflate_object_from_tree")
        while True:
            if not self.poll_once():
                time.sleep(self.poll_interval)

    def run_task(self, address: str, token: str) -> None:
        """One ClientApp task: what one ``flwr-clientapp`` process does, without exiting."""
        client = self._client(address, RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                              RuntimeTokenHttpInterceptor(token))
        heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
        heartbeat.start()
        context = reply = None
        status, details = SubStatus.FAILED, "ClientApp task failed"
        t0 = time.perf_counter()
        t1 = t2 = t0
        try:
            message, context, run, fab = pull_task_input(client)
            t1 = time.perf_counter()
            reply, ok = call_client_app(lambda: self._apps(run, fab), message, lambda: context)
            t2 = time.perf_counter()
            if ok:
                status, details = SubStatus.COMPLETED, ""
            else:
                details = reply.error.reason
        except Exception as ex:  # pulling the task's input failed: there is no message to answer
            details = f"{type(ex)}:<'{ex}'>"
            log.error("The task's input could not be pulled: %s", details, exc_info=ex)
        finally:
            try:
                if reply is not None and context is not None:
                    push_message(client, reply, context)
                push_task_output(client=client, context=context, sub_status=status, details=details)
            finally:
                if heartbeat.is_running:
                    heartbeat.stop()
                client.close()
                self.tasks_done += 1
                log.info("task of %s: %s in %.3f s (pull %.3f, ClientApp %.3f, push %.3f)", address, status,
                         time.perf_counter() - t0, t1 - t0, t2 - t1, time.perf_counter() - t2)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m crfl.flower.deploy.worker", description=__doc__.split("\n\n")[0])
    ap.add_argument("--runtime-api-address", nargs="+", required=True, metavar="HOST:PORT",
                    help="the Runtime API (--host:--port) of each SuperNode this worker serves")
    tls = ap.add_mutually_exclusive_group(required=True)
    tls.add_argument("--insecure", action="store_true", help="the SuperNodes' Runtime APIs are plain HTTP (loopback)")
    tls.add_argument("--root-certificates", type=Path, help="CA of the SuperNodes' Runtime API certificates")
    ap.add_argument("--poll-interval", type=float, default=DEFAULT_POLL_INTERVAL,
                    help=f"seconds between two task polls when idle (default {DEFAULT_POLL_INTERVAL})")
    ap.add_argument("--parent-pid", type=int, default=None, help="exit when this process exits")
    a = ap.parse_args(argv)
    if not (0.0 < a.poll_interval <= 60.0):
        ap.error(f"The 'poll-interval' parameter must be a float in (0, 60]. Got {a.poll_interval} instead.")
    return a


def main(argv: list[str] | None = None) -> None:
    a = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    if a.parent_pid is not None:
        start_parent_process_monitor(a.parent_pid)
    try:
        certs = read_root_certificates(a.root_certificates)
    except ValueError as ex:
        fail("python -m crfl.flower.deploy.worker", str(ex))
    import crfl.flower.client_app  # noqa: F401  (torch and crfl imported before the first task, not during round 1)

    worker = Worker(list(a.runtime_api_address), insecure=a.insecure, root_certificates=certs, poll_interval=a.poll_interval)
    log.info("crfl worker (pid %d) serving the SuperNodes at %s", os.getpid(), ", ".join(worker.addresses))
    try:
        worker.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
