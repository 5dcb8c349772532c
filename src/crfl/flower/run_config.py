"""The Flower run config of the crfl app: every key with its default and meaning, in one place.

:func:`crfl.flower.server_app.make_server_app` reads a run's values over these defaults;
``pyproject.toml``'s ``[tool.flwr.app.config]`` and the table in docs/flower.md list the same keys
with the same defaults (``tests/test_flower_run_config.py`` checks both), and
:func:`toml_table` writes that section for a generated app. Importable without Flower or torch.
"""

from __future__ import annotations

import json
from typing import Any

#: key -> (default, meaning).
RUN_CONFIG: dict[str, tuple[Any, str]] = {
    "preset": ("demo", "crfl preset (demo, mnist, emnist, loan, flcert); empty for none"),
    "config-file": ("", "a crfl YAML config file, layered over the preset"),
    "overrides": ("", "'key=value' overrides separated by ';', e.g. 'server.rounds=5; data.num_clients=4'"),
    "out-dir": ("runs/flower-{run_id}", "run directory; {run_id} is replaced by Flower's run id; prefer an absolute path"),
    "certify": (True, "certify the final model after training (crfl.certify.certify_run)"),
    "round-timeout": (600.0, "seconds to wait for the replies of one round"),
    "node-timeout": (120.0, "seconds a round waits for the nodes it needs to be connected"),
    "noise-seed": (-1, "seed of the server noise; -1 uses the run seed (as the simulator does)"),
    "sample-fraction": (1.0, "fraction of the N clients sampled per round (ceil(fraction N)); 1: all (Algorithm 1)"),
    "sample-count": (0, "number of clients sampled per round; 0: use sample-fraction"),
    "node-partitions": ("", "the operator's binding 'NODE_ID=PARTITION ...'; empty: the first N nodes seen, by node id"),
    "input-norm-bound": (-1.0, "B >= ||x|| for every client input, for the certificate; -1: sqrt(d), inputs in [0, 1]^d "
                               "(not with model.input_norm_bound, which the model enforces)"),
    "resume": (False, "continue the interrupted run in out-dir from its checkpoint.pt"),
    "log-every": (0, "log the per-round lines every N rounds (and the first and last); 0: about ten per run; 1: every round"),
}


def defaults() -> dict[str, Any]:
    """key -> default value."""
    return {k: v[0] for k, v in RUN_CONFIG.items()}


def toml_value(value: Any) -> str:
    """A default as TOML writes it: ``true``, ``-1``, ``600.0``, ``"demo"``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(value)  # a TOML basic string for the plain strings used here


def toml_table() -> str:
    """The ``[tool.flwr.app.config]`` section with every default."""
    return "[tool.flwr.app.config]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in defaults().items())
