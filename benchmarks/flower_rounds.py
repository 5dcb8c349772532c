"""Seconds per round: CRFL over Flower against the package's batched simulator (crfl.train.run_round).

Three ways to run the same rounds of the demo setting (mnist-5k, logistic regression, n_B = 50,
one local epoch, FedAvg + clip + noise) with N clients:

- ``simulator``: ``crfl.train.run_round``, all clients batched in one tensor program;
- ``flower-ray``: Flower's simulation engine (``flwr.simulation.run_simulation``, Ray), one
  ClientApp call per client, messages serialized as in a deployment; round time measured by the
  CRFL strategy from ``configure_train`` to the end of ``aggregate_train`` (``flower.json``);
- ``flower-inprocess``: the same ServerApp/ClientApp objects through the in-process test Grid
  (no Ray, no network): the cost of per-client training and of Flower's records alone.

    python -m benchmarks.flower_rounds [--clients 10 50] [--rounds 8] [--threads 1] [--out bench.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from crfl.config import resolve
from crfl.setup import prepare
from crfl.train import run_round


THREADS = 1  # torch threads everywhere (set by --threads); on a busy 2-core machine 2 threads run 10-50x slower


def _config(clients: int, rounds: int):
    return resolve("demo", None, {"data.num_clients": clients, "server.rounds": rounds, "attack.rounds": [2],
                                  "run.eval_every": rounds, "run.threads": THREADS})


def simulator(clients: int, rounds: int) -> list[float]:
    setup = prepare(_config(clients, rounds))
    params = setup.w0.clone()
    times = []
    for t in range(1, rounds + 1):
        t0 = time.perf_counter()
        params = run_round(setup, params, t).params
        times.append(time.perf_counter() - t0)
    return times


def _round_seconds(run_dir: Path) -> list[float]:
    return [r["seconds"] for r in json.loads((run_dir / "flower.json").read_text())["rounds"]]


def flower_ray(clients: int, rounds: int, num_cpus: int | None) -> tuple[list[float], float]:
    from crfl.flower.simulation import simulate

    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        simulate(_config(clients, rounds), Path(d) / "run", num_cpus=num_cpus)
        wall = time.perf_counter() - t0
        return _round_seconds(Path(d) / "run"), wall


def flower_inprocess(clients: int, rounds: int) -> list[float]:
    from crfl.flower.client_app import make_client_app
    from crfl.flower.server_app import make_server_app
    from crfl.flower.testing import run_local

    with tempfile.TemporaryDirectory() as d:
        run_local(make_server_app(_config(clients, rounds), Path(d) / "run", certify=False), make_client_app(), clients)
        return _round_seconds(Path(d) / "run")


def _stats(times: list[float]) -> dict[str, Any]:
    steady = times[1:] if len(times) > 1 else times  # round 1 includes data loading on the clients
    return {"first": times[0], "median_after_first": statistics.median(steady), "all": times}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, nargs="+", default=[10, 50])
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--num-cpus", type=int, default=None, help="CPUs for Ray (default: all)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the simulator and of every client")
    ap.add_argument("--skip-ray", action="store_true")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    global THREADS
    THREADS = a.threads
    torch.set_num_threads(a.threads)
    out: dict[str, Any] = {"rounds": a.rounds, "torch_threads": torch.get_num_threads(), "results": {}}
    # Ray last: once Ray has run in this process, the batched simulator slows down ~10x here
    for n in a.clients:
        out["results"][str(n)] = {
            "simulator": _stats(simulator(n, a.rounds)),
            "flower-inprocess": _stats(flower_inprocess(n, a.rounds)),
        }
    if not a.skip_ray:
        for n in a.clients:
            times, wall = flower_ray(n, a.rounds, a.num_cpus)
            out["results"][str(n)]["flower-ray"] = {**_stats(times), "wall_with_startup": wall}
    for n, res in out["results"].items():
        print(f"N = {n}: " + ", ".join(f"{k} {v['median_after_first']:.3f} s/round" for k, v in res.items()), flush=True)
    text = json.dumps(out, indent=2)
    if a.out:
        Path(a.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
