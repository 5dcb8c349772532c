"""Run CRFL in Flower's simulation engine (Ray) from Python, one virtual SuperNode per client.

``flwr run`` is the command-line way (docs/flower.md); :func:`simulate` is the
same ServerApp and ClientApp started with ``flwr.simulation.run_simulation``
inside this process, for notebooks, tests and benchmarks::

    from crfl.config import resolve
    from crfl.flower.simulation import simulate
    run_dir = simulate(resolve("demo"), "runs/flower-demo")

Flower marks ``run_simulation`` as deprecated in favour of ``flwr run``; it is
still the only in-process entry point in flwr 1.41.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

import crfl.flower  # noqa: F401  (telemetry and update check off before flwr is imported)
from crfl.config import Config, resolve
from crfl.data import Dataset
from crfl.flower.client_app import make_client_app
from crfl.flower.server_app import make_server_app, parse_overrides
from crfl.validation import check_int


def simulate(
    cfg: Config,
    out_dir: str | Path,
    *,
    dataset: Dataset | None = None,
    certify: bool = False,
    num_cpus: int | None = None,
    client_cpus: float = 1.0,
    verbose: bool = False,
) -> Path:
    """Train ``cfg`` over Flower's Ray simulation with N = ``data.num_clients`` SuperNodes; return the run directory.

    Args:
        num_cpus: CPUs Ray may use (default: all); ``client_cpus`` per ClientApp, so at most
            num_cpus / client_cpus clients train at once.
    """
    from flwr.simulation import run_simulation

    if cfg.data.num_clients is None:
        raise ValueError("simulate() needs 'data.num_clients' (one SuperNode per client).")
    K = check_int("data.num_clients", cfg.data.num_clients, low=1)
    init_args: dict[str, Any] = {} if num_cpus is None else {"num_cpus": int(num_cpus)}
    run_simulation(
        server_app=make_server_app(cfg, out_dir, dataset=dataset, certify=certify),
        client_app=make_client_app(dataset),
        num_supernodes=K,
        backend_config={"client_resources": {"num_cpus": float(client_cpus), "num_gpus": 0.0}, "init_args": init_args},
        verbose_logging=verbose,
    )
    return Path(out_dir)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m crfl.flower.simulation", description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--config", default=None, help="a crfl YAML config file")
    ap.add_argument("--set", default="", help="overrides 'key=value; key=value'")
    ap.add_argument("--out", required=True)
    ap.add_argument("--certify", action="store_true")
    ap.add_argument("--num-cpus", type=int, default=None)
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)-8s: %(name)s: %(message)s")
    logging.getLogger("crfl").setLevel(logging.INFO)  # crfl's lines; other libraries' INFO (alembic, ...) stays off
    cfg = resolve(a.preset or None, a.config, parse_overrides(a.set))
    simulate(cfg, a.out, certify=a.certify, num_cpus=a.num_cpus)
    return 0


def _main_line(argv: list[str] | None = None) -> int:
    """``main`` with crfl's error contract: an expected failure is one line ``crfl: error: ...``, exit status 2."""
    from crfl.cli import EXPECTED

    try:
        return main(argv)
    except EXPECTED as e:
        print(f"crfl: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(_main_line())
