"""CRFL (Xie et al., ICML 2021) on a real federation with Flower (flwr 1.41, Message API).

- :mod:`crfl.flower.strategy`: :class:`CRFL`, the server step of Algorithm 1
  (clip the aggregated model to rho_t, add seeded N(0, sigma_t^2 I) for t <= T-1)
  as a wrapper around any Flower strategy, with server-owned weights, partition
  binding (:class:`Roster`) and client sampling (:class:`Sampling`);
  :class:`PackageAggregation` and :class:`RFA`, the package's aggregation rules as
  Flower strategies.
- :mod:`crfl.flower.client_app`: the client (benign or attacker) as a ``ClientApp``.
- :mod:`crfl.flower.server_app`: the ``ServerApp``; writes the run directory of
  ``crfl run``, resumes it, and certifies the final model.
- :mod:`crfl.flower.simulation`: the app over Flower's simulation engine (Ray) from Python.
- :mod:`crfl.flower.records`: what travels in Flower messages (the model, the config, a reply).
- :mod:`crfl.flower.deploy`: not the app but machinery for fast deployments that patches or
  reimplements Flower internals: several deployed nodes in one process
  (:mod:`crfl.flower.deploy.nodes`), ``flower-supernode`` with shorter waits
  (:mod:`crfl.flower.deploy.supernode`), a long-lived ClientApp process
  (:mod:`crfl.flower.deploy.worker`) and which waits (:mod:`crfl.flower.deploy.waits`).
  ``crfl.flower.nodes``, ``.supernode`` and ``.worker`` are deprecated aliases of those.

``flwr run`` loads ``crfl.flower.server_app:app`` and ``crfl.flower.client_app:app``
(see docs/flower.md). Importing this package turns Flower's telemetry and update
check off unless the environment already sets ``FLWR_TELEMETRY_ENABLED`` /
``FLWR_DISABLE_UPDATE_CHECK``; Flower reads them when it is first imported. The
names below are imported from :mod:`crfl.flower.strategy` on first use. The
marker of a Flower run directory (``provenance.engine: flower``) is the core's
(:mod:`crfl.rundir`, :mod:`crfl.driver`): nothing outside this package imports it.
"""

from __future__ import annotations

import os
from typing import Any

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

__all__ = ["CRFL", "RFA", "ClientReply", "PackageAggregation", "ReplyRejected", "Roster", "RoundLog", "Sampling", "check_reply"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from crfl.flower import strategy

        return getattr(strategy, name)
    raise AttributeError(f"module 'crfl.flower' has no attribute {name!r}")
