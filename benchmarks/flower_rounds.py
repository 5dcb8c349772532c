"""Seconds per round: CRFL over Flower against the package's batched simulator (crfl.train.run_round).

Three ways to run the same rounds of the demo setting (mnist-5k, logistic regression, n_B = 50,
one local epoch, FedAvg + clip + noise) with N clients:

- ``simulator``: ``crfl.train.run_round``, all clients batched in one tensor program;
- ``flower-ray``: Flower's simulation engine (``flwr.simulation.run_simulation``, Ray), one
  ClientApp call per client, messages serialized as in a deployment; round time measured by the
  CRFL strategy from ``configure_train`` to the end of ``aggregate_train`` (``flower.json``);
- ``flower-inprocess``: the same ServerApp/ClientApp objects through the in-process test Grid
  (no Ray, no network): the cost of per-client training and of Flower's records alone;
- ``deployment`` (``--deployment hosted fast stock``): ``flwr run`` against a SuperLink and N
  SuperNodes on 127.0.0.1 (plain HTTP on loopback). ``stock``: N ``flower-supernode`` processes
  as Flower ships them (a new ``flwr-clientapp`` process per message); ``fast``: N
  ``python -m crfl.flower.deploy.supernode --isolation process`` served by ``--workers`` long-lived
  ``python -m crfl.flower.deploy.worker`` processes; ``hosted``: the N nodes in ``--workers``
  ``python -m crfl.flower.deploy.nodes`` processes (docs/flower.md). Besides the round times it records
  the CPU seconds per round of every process (rounds 2..T) and, with ``--count-requests``, every
  Flower process's HTTP requests by RPC method. Every process is stopped by PID;
- ``request-cost``: the SuperLink's CPU seconds per Fleet request (500 empty message-list pulls
  of one node against an idle SuperLink).

    python -m benchmarks.flower_rounds [--clients 10 50] [--rounds 8] [--threads 1] [--out bench.json]
    python -m benchmarks.flower_rounds --only deployment --deployment hosted fast stock --clients 10 --rounds 8 --count-requests
    python -m benchmarks.flower_rounds --only request-cost
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from crfl.config import resolve
from crfl.setup import prepare
from crfl.train import run_round
from tests.support.processes import descendants, free_port, process_table


LOGS: str | None = None  # --logs: copy the deployment's process logs there
CPU: dict[str, float] = {}  # CPU seconds of the deployment's processes during rounds 2..T, by program
COUNT_REQUESTS = False  # --count-requests
REQUESTS: dict[str, dict[str, int]] = {}  # the last deployment's requests, by process and RPC method
HOST_POLL = 0.1  # --host-poll-interval: idle tick of crfl.flower.deploy.nodes
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
    from tests.support.grid import run_local

    with tempfile.TemporaryDirectory() as d:
        run_local(make_server_app(_config(clients, rounds), Path(d) / "run", certify=False), make_client_app(), clients)
        return _round_seconds(Path(d) / "run")


ROOT = Path(__file__).resolve().parents[1]


def _app_dir(d: Path) -> Path:
    """A Flower app that is only the repository's ``[tool.flwr.app]`` tables (a small FAB; crfl is installed)."""
    text = (ROOT / "pyproject.toml").read_text()
    app = d / "app"
    app.mkdir()
    (app / "pyproject.toml").write_text('[project]\nname = "crflbench"\nversion = "0.1.0"\ndescription = "crfl benchmark"\nlicense = "Apache-2.0"\n\n'
                                        + text[text.index("[tool.flwr.app]"):])
    return app


def _stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM each started process group (each was started in its own session), then SIGKILL; by PID only."""
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGKILL)  # what is left of the group (flwr-clientapp, flower-superexec)
        except ProcessLookupError:
            pass
        p.wait()


#: Written as sitecustomize.py on the PYTHONPATH of every deployment process with --count-requests: each process
#: counts the protobuf-over-HTTP requests it sends (flwr's ProtobufClient, used by every Flower component in 1.41)
#: by RPC method and writes them to requests.<pid>.json at exit.
COUNTER = """\
import atexit, builtins, collections, json, os, sys
_counts, _import = collections.Counter(), builtins.__import__
def _hook(name, *args, **kwargs):
    module = _import(name, *args, **kwargs)
    client = sys.modules.get("flwr.supercore.protobuf.client")
    if client is not None and hasattr(client, "ProtobufClient") and builtins.__import__ is _hook:
        builtins.__import__ = _import  # once (imports already under way still return here)
        send = client.ProtobufClient._unary_unary
        def counted(self, *, rpc_method, **kw):
            _counts[rpc_method] += 1
            return send(self, rpc_method=rpc_method, **kw)
        client.ProtobufClient._unary_unary = counted
    return module
builtins.__import__ = _hook
def _dump():
    if _counts:
        name = os.path.basename(sys.argv[0]) if not sys.argv[0].endswith(".py") else sys.argv[0].split(os.sep)[-2] + "." + os.path.basename(sys.argv[0])
        with open(os.path.join(os.path.dirname(__file__), f"requests.{os.getpid()}.json"), "w") as f:
            json.dump({"process": name, "requests": _counts}, f)
atexit.register(_dump)
"""


#: The RPCs that move a message, its objects and its reply (as opposed to polling, heartbeats, registration, logs).
MESSAGE_RPCS = ("PushMessages", "PullObject", "PushObject", "ConfirmMessageReceived")
#: Processes whose Runtime API requests go to the SuperLink (the workers' and flwr-clientapps' go to SuperNodes).
SUPERLINK_RUNTIME_CLIENTS = ("flwr-serverapp", "flower-superexec", "flwr")


def superlink_requests(requests: dict[str, dict[str, int]], client_rounds: int) -> dict[str, float]:
    """The requests that reached the SuperLink, per client and round: message traffic, message-list pulls, the rest."""
    out = {"message_rpcs": 0.0, "pull_messages": 0.0, "other": 0.0}
    for process, methods in requests.items():
        for method, n in methods.items():
            api, rpc = method.split("/")
            if api == "Runtime" and process not in SUPERLINK_RUNTIME_CLIENTS:
                continue
            key = "message_rpcs" if rpc in MESSAGE_RPCS else "pull_messages" if rpc == "PullMessages" else "other"
            out[key] += n / client_rounds
    return {k: round(v, 2) for k, v in out.items()}


def _requests(directory: Path) -> dict[str, dict[str, int]]:
    """The counts of COUNTER's files in ``directory``, summed by process name and RPC method."""
    out: dict[str, dict[str, int]] = {}
    for f in directory.glob("requests.*.json"):
        rec = json.loads(f.read_text())
        mine = out.setdefault(rec["process"], {})
        for method, n in rec["requests"].items():
            mine[method.rsplit(".", 1)[-1]] = mine.get(method.rsplit(".", 1)[-1], 0) + n
    return out


def _label(pid: int) -> str:
    """A process's program: the module of ``python -m M``, else the script's or executable's file name."""
    try:
        args = [a for a in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0") if a]
    except OSError:
        return "?"
    args = args[1:] if args and Path(args[0]).name.startswith("python") else args
    if len(args) >= 2 and args[0] == "-m":
        return args[1]
    return Path(args[0]).name if args else "?"


def _process_cpu(roots: list[int]) -> dict[int, tuple[str, float]]:
    """pid -> (program, CPU seconds used so far) for every live process in the trees of ``roots``."""
    table = process_table()
    return {q: (_label(q), table[q][1]) for r in roots if r in table for q in [r, *descendants(r, table)]}


class CpuWindow:
    """CPU seconds per program between two moments, process by process: a process born in the window counts
    from 0, one that exits counts up to its last sample (at most one sampling interval early)."""

    def __init__(self) -> None:
        self.first: dict[int, float] = {}
        self.last: dict[int, tuple[str, float]] = {}
        self.open = False

    def sample(self, roots: list[int]) -> None:
        snap = _process_cpu(roots)
        for pid, (label, cpu) in snap.items():
            self.first.setdefault(pid, cpu if not self.open else 0.0)
            self.last[pid] = (label, cpu)
        self.open = True

    def by_program(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for pid, (label, cpu) in self.last.items():
            out[label] = out.get(label, 0.0) + cpu - self.first[pid]
        return out


def deployment(clients: int, rounds: int, mode: str, workers: int, poll: float) -> tuple[list[float], float]:
    """Round seconds of ``flwr run`` over a loopback SuperLink with ``clients`` SuperNodes (``stock`` or ``fast``)."""
    from tests.support.processes import wait_for_superlink

    bindir = Path(sys.executable).parent
    procs: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        home = d / "home"
        home.mkdir()
        env = dict(os.environ, PATH=f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}", FLWR_HOME=str(home),
                   FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1",
                   FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1", OMP_NUM_THREADS=str(THREADS))
        counted = d / "count"
        if COUNT_REQUESTS:
            counted.mkdir()
            (counted / "sitecustomize.py").write_text(COUNTER)
            env["PYTHONPATH"] = os.pathsep.join([str(counted), *filter(None, [os.environ.get("PYTHONPATH")])])
        link = free_port()
        (home / "config.toml").write_text(f'[superlink]\ndefault = "bench"\n\n[superlink.bench]\naddress = "127.0.0.1:{link}"\ninsecure = true\n')

        def start(args: list[str], name: str) -> subprocess.Popen:
            log = open(d / f"{name}.log", "w")  # noqa: SIM115 (closed when the directory goes)
            p = subprocess.Popen(args, cwd=d, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            procs.append(p)
            return p

        try:
            sl = start([str(bindir / "flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(link)], "superlink")
            wait_for_superlink(link, sl)
            ports = [free_port() for _ in range(clients)] if mode != "hosted" else []
            if mode == "hosted":
                for w in range(min(workers, clients)):
                    start([sys.executable, "-m", "crfl.flower.deploy.nodes", "--insecure", "--superlink", f"127.0.0.1:{link}",
                           "--count", str(len(range(w, clients, workers))), "--poll-interval", str(HOST_POLL)], f"host{w}")
            for i, port in enumerate(ports):
                node = ["--insecure", "--superlink", f"127.0.0.1:{link}", "--host", "127.0.0.1", "--port", str(port)]
                if mode == "stock":
                    start([str(bindir / "flower-supernode"), *node], f"supernode{i}")
                else:
                    start([sys.executable, "-m", "crfl.flower.deploy.supernode", "--poll-interval", str(poll), "--",
                           *node, "--isolation", "process"], f"supernode{i}")
            if mode == "fast":
                for w in range(min(workers, clients)):
                    start([sys.executable, "-m", "crfl.flower.deploy.worker", "--insecure", "--runtime-api-address",
                           *[f"127.0.0.1:{p}" for p in ports[w::workers]]], f"worker{w}")
            out = d / "run"
            overrides = (f"data.num_clients={clients}; server.rounds={rounds}; attack.rounds=[2]; "
                         f"run.eval_every={rounds}; run.threads={THREADS}")
            cmd = [str(bindir / "flwr"), "run", str(_app_dir(d)), "bench", "--stream", "--run-config",
                   f"overrides='{overrides}' out-dir='{out}' certify=false"]
            t0 = time.perf_counter()
            with tempfile.TemporaryFile("w+") as flwr_out:
                flwr = subprocess.Popen(cmd, cwd=d, env=env, stdout=flwr_out, stderr=subprocess.STDOUT, text=True)
                # CPU of rounds 2..T: from round 1's checkpoint to flower.json (written after round T), sampled every 0.1 s
                window = CpuWindow()
                while flwr.poll() is None and not (out / "flower.json").exists():
                    if window.open or (out / "checkpoint.pt").exists():
                        window.sample([p.pid for p in procs])
                    time.sleep(0.1)
                flwr.wait(timeout=3600)
                wall = time.perf_counter() - t0
                flwr_out.seek(0)
                run = subprocess.CompletedProcess(cmd, flwr.returncode, flwr_out.read(), "")
            CPU.clear()
            CPU.update(window.by_program())
            if run.returncode != 0 or not (out / "flower.json").exists():
                raise RuntimeError(f"flwr run failed ({run.returncode}):\n{(run.stdout + run.stderr)[-3000:]}")
            return _round_seconds(out), wall
        finally:
            _stop(procs)
            REQUESTS.clear()
            if COUNT_REQUESTS:
                REQUESTS.update(_requests(counted))
            if LOGS:
                import shutil
                dest = Path(LOGS) / f"{mode}-{clients}"
                dest.mkdir(parents=True, exist_ok=True)
                for f in d.glob("*.log"):
                    shutil.copy(f, dest / f.name)
                if (d / "run" / "flower.json").exists():
                    shutil.copy(d / "run" / "flower.json", dest / "flower.json")


def request_cost(requests: int = 500) -> dict[str, float]:
    """SuperLink CPU and wall seconds of one Fleet request: ``requests`` empty message-list pulls of one node."""
    from flwr.supernode.fleet_http_connection import http_request_response

    from tests.support.processes import wait_for_superlink

    bindir = Path(sys.executable).parent
    with tempfile.TemporaryDirectory() as d:
        env = dict(os.environ, FLWR_HOME=d, FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1",
                   PATH=f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}")
        port = free_port()
        sl = subprocess.Popen([str(bindir / "flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(port)],
                              cwd=d, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            wait_for_superlink(port, sl)
            with http_request_response(f"127.0.0.1:{port}", True, None, None) as conn:
                receive = conn[1]
                for _ in range(50):
                    receive()
                cpu0, t0 = _process_cpu([sl.pid])[sl.pid][1], time.perf_counter()
                for _ in range(requests):
                    assert receive() is None
                wall, cpu = time.perf_counter() - t0, _process_cpu([sl.pid])[sl.pid][1] - cpu0
        finally:
            _stop([sl])
    return {"requests": requests, "superlink_cpu_per_request": cpu / requests, "wall_per_request": wall / requests}


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
    ap.add_argument("--only", nargs="+", choices=["simulator", "inprocess", "ray", "deployment", "request-cost"], default=None,
                    help="run only these modes (default: all but deployment)")
    ap.add_argument("--deployment", nargs="+", choices=["stock", "fast", "hosted"], default=["hosted"],
                    help="SuperNode setups of the deployment mode")
    ap.add_argument("--workers", type=int, default=2,
                    help="processes serving the nodes: crfl.flower.deploy.worker (fast) or crfl.flower.deploy.nodes (hosted); at most N")
    ap.add_argument("--poll-interval", type=float, default=0.1, help="SuperNode idle poll of the fast deployment (s)")
    ap.add_argument("--host-poll-interval", type=float, default=0.1, help="idle tick of the hosted deployment (s)")
    ap.add_argument("--count-requests", action="store_true",
                    help="count every Flower process's HTTP requests by RPC method (a sitecustomize on their PYTHONPATH)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--logs", default=None, help="keep the deployment's process logs in this directory")
    a = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # `timeout`/kill: stop the deployment's processes first
    global THREADS, LOGS, HOST_POLL, COUNT_REQUESTS
    THREADS, LOGS, HOST_POLL, COUNT_REQUESTS = a.threads, a.logs, a.host_poll_interval, a.count_requests
    torch.set_num_threads(a.threads)
    out: dict[str, Any] = {"rounds": a.rounds, "torch_threads": torch.get_num_threads(), "results": {}}
    # Ray last: once Ray has run in this process, the batched simulator slows down ~10x here
    only = set(a.only or ["simulator", "inprocess"] + ([] if a.skip_ray else ["ray"]))
    out["loadavg_before"] = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else None
    for n in a.clients:
        res = out["results"].setdefault(str(n), {})
        if "simulator" in only:
            res["simulator"] = _stats(simulator(n, a.rounds))
        if "inprocess" in only:
            res["flower-inprocess"] = _stats(flower_inprocess(n, a.rounds))
        if "deployment" in only:  # separate processes: the order does not matter
            for mode in a.deployment:
                times, wall = deployment(n, a.rounds, mode, a.workers, a.poll_interval)
                res[f"deployment-{mode}"] = {**_stats(times), "wall_with_startup": wall,
                                             "cpu_per_round_after_first": {k: round(v / max(1, a.rounds - 1), 4) for k, v in CPU.items()}}
                if COUNT_REQUESTS:  # the whole run: startup, T rounds, shutdown
                    res[f"deployment-{mode}"]["requests_whole_run"] = {k: dict(v) for k, v in REQUESTS.items()}
                    res[f"deployment-{mode}"]["superlink_requests_per_client_round"] = superlink_requests(REQUESTS, n * a.rounds)
    if "request-cost" in only:
        out["superlink_request_cost"] = request_cost()
    if "ray" in only:
        for n in a.clients:
            times, wall = flower_ray(n, a.rounds, a.num_cpus)
            out["results"][str(n)]["flower-ray"] = {**_stats(times), "wall_with_startup": wall}
    out["loadavg_after"] = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else None
    for n, res in out["results"].items():
        print(f"N = {n}: " + ", ".join(f"{k} {v['median_after_first']:.3f} s/round" for k, v in res.items()), flush=True)
    text = json.dumps(out, indent=2)
    if a.out:
        Path(a.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
