"""``flower-supernode`` with shorter waits, for crfl deployments where round time matters.

Flower 1.41's SuperNode main loop (``flwr.supernode.start_client_internal``) has three
waits that are not configurable:

- 3 s after a pull from the SuperLink that brought no message (so a round's message
  waits on average 1.5 s, at worst 3 s, before a SuperNode sees it);
- 0.5 s between two looks for the ClientApp's reply in its own node state;
- 0.5 s between two looks for a reply object's content;

and it retries an object of a message that has not reached the SuperLink yet after 1 s
(then 2, 4, 8 s).

This launcher runs Flower's own ``flower-supernode`` entry point in this process with
the first wait set to ``--poll-interval`` seconds (one more HTTP(S) request per node to
the SuperLink every interval while idle), the two local waits set to 0.01 s and the
object retry starting at 0.01 s (:func:`crfl.flower.deploy.waits.shorten_object_backoff`). All
other arguments go to ``flower-supernode`` unchanged (TLS, ``--auth-supernode-private-key``,
``--isolation``, ``--node-config``, ...), so authentication and TLS are Flower's own.

    python -m crfl.flower.deploy.supernode --poll-interval 0.1 -- \\
        --root-certificates ca.crt --superlink 127.0.0.1:9300 --auth-supernode-private-key node0 \\
        --isolation process --host 127.0.0.1 --port 9400

The waits are found by their values in flwr 1.41.0's source (:mod:`crfl.flower.deploy.waits` lists
all of them); with another flwr version whose loop differs the launcher says so and runs the SuperNode unchanged.
"""

from __future__ import annotations

import argparse
import inspect
import sys
import time
from types import ModuleType
from typing import Any

import crfl.flower  # noqa: F401  (telemetry and update check off before flwr is imported)
from crfl.flower.deploy.waits import shorten_object_backoff

#: The waits of flwr 1.41.0's SuperNode loop, in seconds: the idle pull and the two local looks.
IDLE_WAIT, LOCAL_WAIT = 3, 0.5
DEFAULT_POLL_INTERVAL = 0.1
LOCAL_POLL_INTERVAL = 0.01


class _Clock:
    """The ``time`` module as the SuperNode loop sees it: its known waits shortened, all else unchanged."""

    def __init__(self, idle: float, local: float) -> None:
        self._idle, self._local = idle, local

    def sleep(self, seconds: float) -> None:
        if seconds == IDLE_WAIT:
            seconds = self._idle
        elif seconds == LOCAL_WAIT:
            seconds = self._local
        time.sleep(seconds)

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def shorten_waits(module: ModuleType, idle: float, local: float = LOCAL_POLL_INTERVAL) -> bool:
    """Give ``module`` (Flower's SuperNode loop) the shorter waits; False (and nothing changed) if its loop is not the known one."""
    source = inspect.getsource(module)
    if f"time.sleep({IDLE_WAIT})" not in source or f"time.sleep({LOCAL_WAIT})" not in source:
        return False
    module.time = _Clock(idle, local)  # type: ignore[attr-defined]
    return True


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="python -m crfl.flower.deploy.supernode", usage="%(prog)s [--poll-interval S] -- FLOWER_SUPERNODE_ARGS...")
    ap.add_argument("--poll-interval", type=float, default=DEFAULT_POLL_INTERVAL,
                    help=f"seconds between two pulls from the SuperLink while idle (Flower: 3; default {DEFAULT_POLL_INTERVAL})")
    split = argv.index("--") if "--" in argv else len(argv)
    a = ap.parse_args(argv[:split])
    if not (0.0 < a.poll_interval <= 3.0):
        ap.error(f"The 'poll-interval' parameter must be a float in (0, 3]. Got {a.poll_interval} instead.")

    import flwr.supernode.start_client_internal as loop
    from flwr.supernode.cli.flower_supernode import flower_supernode

    shorten_object_backoff(loop)  # a message is listed before its objects reach the SuperLink
    if not shorten_waits(loop, a.poll_interval):
        print(f"crfl.flower.deploy.supernode: the SuperNode loop of flwr {getattr(sys.modules.get('flwr'), '__version__', '?')} "
              "is not the known one (flwr 1.41.0); running it with Flower's waits.", file=sys.stderr)
    sys.argv = ["flower-supernode", *argv[split + 1:]]
    flower_supernode()


if __name__ == "__main__":
    main()
