"""Flower 1.41's fixed waits on the path of a deployed round, and crfl's shorter ones.

A deployed round of flwr 1.41.0 passes through waits that are not configurable; on loopback
they, not the training, set the round time:

========================================  ==========  =====================================
where                                      Flower      crfl
========================================  ==========  =====================================
SuperNode: pull from SuperLink when idle   3 s         ``--poll-interval`` of
                                                       :mod:`crfl.flower.deploy.supernode` (0.1 s)
SuperNode: look for the ClientApp's reply  0.5 s       0.01 s (:mod:`crfl.flower.deploy.supernode`)
SuperExec: look for a task                 1 s         0.05 s (:mod:`crfl.flower.deploy.worker`)
flwr-clientapp: one process per message    3-10 s      one long-lived worker (same)
SuperNode / ClientApp / ServerApp: first  1 s, x2     0.01 s, x2, at most 0.2 s
  retry of an object that is not there     up to 10 s  (:func:`shorten_object_backoff`)
  yet (a message is listed before its
  objects arrive)
ServerApp Grid: pull replies               3 s         0.02 s
                                                       (:func:`crfl.flower.server_app.send_and_receive`)
========================================  ==========  =====================================

:mod:`crfl.flower.deploy.nodes` replaces the SuperNode, the SuperExec and flwr-clientapp altogether
(its own poll loop, the ClientApp in-process), so only the object retry and the Grid's pull
apply to it.

The adjustments touch only timing (how soon something is looked at again), never what is
sent or who may send it. Each checks that the Flower code it adjusts is the known one and
otherwise leaves it alone (it returns False).
"""

from __future__ import annotations

import functools
import inspect
from types import ModuleType

#: First retry delay and cap (s) of a pull of an object that is not there yet.
OBJECT_BACKOFF, OBJECT_BACKOFF_CAP = 0.01, 0.2


def shorten_object_backoff(module: ModuleType, name: str = "pull_objects") -> bool:
    """Make ``module.<name>`` (flwr's ``pull_objects`` as that module imported it) retry after 0.01 s instead of 1 s."""
    fn = getattr(module, name, None)
    if fn is None or getattr(fn, "_crfl_backoff", False):
        return fn is not None
    params = inspect.signature(fn).parameters
    if "initial_backoff" not in params or "backoff_cap" not in params:
        return False
    short = functools.partial(fn, initial_backoff=OBJECT_BACKOFF, backoff_cap=OBJECT_BACKOFF_CAP)
    short._crfl_backoff = True  # type: ignore[attr-defined]
    setattr(module, name, short)
    return True
