"""crfl benchmarks, in one process: ``python -m benchmarks`` (or ``scripts/dev bench``).

Measures the machine's ceilings (float32 matrix-multiply rate, memory bandwidth), then training
and certification against them and against the authors' figures, and writes ``out/benchmarks.md``
(untracked); ``--write-docs`` writes the tracked ``docs/benchmarks.md`` instead, ``--out FILE`` any file.
Options: ``--quick`` (fewer repetitions, smaller EMNIST stand-in), ``--only SECTION`` (re-measure one
section and replace it in the output file: ``ensemble``, ``e2e``, ``reproduce``, ``certification``; ``cnn``
prints JSON).
"""

from __future__ import annotations

import argparse
import ctypes
import datetime as dt
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import crfl
import crfl.io
from crfl.config import Config, resolve
from crfl.data import Dataset, load_dataset
from crfl.setup import prepare
from crfl.train import run_round, train

AUTHORS_ROUND_S = 6.29  # measured on this 2-core machine for the paper's MNIST setting (issue 5)
AUTHORS_SMOOTH_PER_MODEL_S = 1.64  # per noisy model, 1632 test points
AUTHORS_E2E_S = 631 + 27 * 60  # 100 rounds + M = 1000 smoothing (~38 min)


def best(fn, repeat: int = 5, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


# ---------------------------------------------------------------------------------------------
# ceilings


def matmul_rate(n: int = 2048, repeat: int = 5, dtype: torch.dtype = torch.float32) -> float:
    """GFLOP/s of an n x n torch.mm in ``dtype``: the ceiling for work done in that dtype."""
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    t = best(lambda: torch.mm(a, b), repeat)
    return 2 * n**3 / t / 1e9


def memory_bandwidth(mib: int = 512, repeat: int = 5) -> float:
    """STREAM-style copy: bytes read + written per second (GB/s)."""
    n = mib * 1024**2 // 4
    src = torch.ones(n)
    dst = torch.empty(n)
    t = best(lambda: dst.copy_(src), repeat)
    return 2 * n * 4 / t / 1e9


# ---------------------------------------------------------------------------------------------
# helpers


def synthetic_images(n_train: int, n_test: int, classes: int, seed: int = 0) -> Dataset:
    rng = np.random.default_rng(seed)
    return Dataset(
        name="synthetic", x_train=rng.integers(0, 256, (n_train, 784), dtype=np.uint8),
        y_train=rng.integers(0, classes, n_train), x_test=rng.integers(0, 256, (n_test, 784), dtype=np.uint8),
        y_test=rng.integers(0, classes, n_test), num_classes=classes, input_scale=255.0, image_shape=(28, 28),
        class_names=tuple(map(str, range(classes))), source={"kind": "synthetic"},
    )


def fashion_or_synthetic() -> tuple[Dataset, str]:
    try:
        return load_dataset("fashion-mnist"), "Fashion-MNIST (60,000 / 10,000)"
    except Exception:  # noqa: BLE001
        return synthetic_images(60000, 10000, 10), "synthetic data of MNIST's shape (Fashion-MNIST not installed)"


def mnist_config(ds: Dataset) -> Config:
    """The preset mnist on ``ds`` (from :func:`fashion_or_synthetic`; its synthetic stand-in runs as mnist-5k)."""
    return resolve("mnist", None, {"data.name": ds.name if ds.name != "synthetic" else "mnist-5k"})


def round_time(setup, rounds: int = 10) -> float:
    params = setup.model.init(torch.Generator().manual_seed(0))
    run_round(setup, params, 1)  # warm-up
    times = []
    for t in range(2, rounds + 2):
        t0 = time.perf_counter()
        params = run_round(setup, params, t).params
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def client_cost(setup) -> tuple[float, float]:
    """FLOP and minimal memory traffic (bytes) of one round of client work (linear model)."""
    steps = int(setup.tau.sum())
    nB = setup.cfg.clients.batch_size
    d, C = setup.dataset.num_features, setup.dataset.num_classes
    flop = steps * nB * (4 * d * C + 6 * C)  # forward X W^T, gradient G^T X, softmax and bias
    in_bytes = steps * nB * d * setup.dataset.x_train.itemsize  # each sample read once per step
    model_bytes = steps * 2 * (d * C + C) * 4  # parameters read and written per step
    return flop, in_bytes + model_bytes


# ---------------------------------------------------------------------------------------------


ENSEMBLE_BEGIN, ENSEMBLE_END = "<!-- ensemble: begin -->", "<!-- ensemble: end -->"


def ensemble_rounds(ds, models: list[str], G: int = 100, N: int = 1000, rounds: int = 3) -> dict:
    """Seconds per round: G group models over N clients (one batched round) against one global model
    over the same N clients; the work is the same (every client trains once from its model)."""
    from crfl.train import SimulatorRound, simulator_round

    out = {}
    for name in models:
        base = {"data.name": ds.name, "data.num_clients": N, "model.name": name, "attack.num_attackers": 0}
        setup = prepare(resolve("flcert", None, {**base, "ensemble.groups": G}), ds)
        ens, single = simulator_round(setup), SimulatorRound(setup)
        times = {}
        for label, step in (("single", single), ("ensemble", ens)):
            p = step.init_params()
            p = step(p, 1).params  # warm-up
            ts = []
            for t in range(2, rounds + 2):
                t0 = time.perf_counter()
                p = step(p, t).params
                ts.append(time.perf_counter() - t0)
            times[label] = statistics.median(ts)
        out[name] = {"single_s": times["single"], "ensemble_s": times["ensemble"],
                     "ratio": times["ensemble"] / times["single"], "G": G, "N": N}
    return out


#: per model, the settings of the flcert-groups-*-MODEL sweep specs (the CNN learns slowly at eta = 0.05)
HEADLINE_SETTINGS = {"cnn": {"clients.lr": 0.1, "server.rounds": 30, "run.eval_every": 10}}


def ensemble_headline(model: str) -> dict:
    """The headline experiment end to end in one process: train G = 100 models over N = 1,000 clients
    (the flcert preset) and certify them (client-level), timed from process start to summary written."""
    d = Path(tempfile.mkdtemp(prefix="crfl-bench-ens-"))
    try:
        t0 = time.perf_counter()
        extra = [x for k, v in HEADLINE_SETTINGS.get(model, {}).items() for x in ("--set", f"{k}={v}")]
        p = subprocess.run([sys.executable, "-m", "crfl.cli", "run", "--preset", "flcert", "--set", f"model.name={model}",
                            *extra, "--out", str(d / "run"), "--quiet"], capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if p.returncode != 0:
            return {"model": model, "error": p.stderr.strip().splitlines()[-1:]}
        s = json.loads((d / "run" / "summary.json").read_text())
        curve = {c["m"]: c["certified_accuracy"] for c in s["client_level"]["clean"]["curve"]}
        return {"model": model, "wall_s": wall, "train_s": s["training"]["seconds"],
                "certify_s": s.get("certify_seconds"), "accuracy": s["client_level"]["clean"]["ensemble_accuracy"],
                "cert_acc_m20": curve.get(20, 0.0), "cert_acc_m10": curve.get(10, 0.0)}
    finally:
        shutil.rmtree(d, ignore_errors=True)


def render_ensemble(E: dict, date: str, machine: dict) -> str:
    lines = [ENSEMBLE_BEGIN, "", "## Ensembles: G group models in one batched round (client-level certificate)", "",
             f"Measured {date} on {machine['cpu']}, {machine['cores']} cores; `python -m benchmarks --only ensemble` "
             "re-measures this section alone.", "",
             f"One round of G = {next(iter(E['rounds'].values()))['G']} group models over N = "
             f"{next(iter(E['rounds'].values()))['N']} clients against one round of a single global model over the same "
             f"clients ({E['data']}, n_B = 10, tau = 6; median of 3 rounds). Target: the ensemble costs <= 1.3x.", "",
             "| model | single model, s/round | G-group ensemble, s/round | ratio | target |", "|---|---|---|---|---|"]
    for name, r in E["rounds"].items():
        lines.append(f"| {name} | {r['single_s']:.3f} | {r['ensemble_s']:.3f} | {r['ratio']:.2f}x | "
                     f"{'met' if r['ratio'] <= 1.3 else '**missed**'} |")
    lines += ["", "The headline experiment end to end (`crfl run --preset flcert --set model.name=MODEL`, for the CNN "
              "with `--set clients.lr=0.1 --set server.rounds=30 --set run.eval_every=10` as in its sweep spec: train "
              "G = 100 models over N = 1,000 clients, certify 10,000 clean and 10,000 backdoored test points; process "
              "start to summary written):", "",
              "| model | wall time | training | certification | ensemble accuracy | certified accuracy m = 10 | m = 20 |",
              "|---|---|---|---|---|---|---|"]
    for h in E["headline"]:
        if "error" in h:
            lines.append(f"| {h['model']} | failed: {h['error']} | | | | | |")
            continue
        lines.append(f"| {h['model']} | {h['wall_s']:.0f} s | {h['train_s']:.0f} s | {h['certify_s']:.1f} s | "
                     f"{h['accuracy']:.3f} | {h['cert_acc_m10']:.3f} | {h['cert_acc_m20']:.3f} |")
    lines += ["", ENSEMBLE_END, ""]
    return "\n".join(lines)


def splice(text: str, section: str, begin: str = ENSEMBLE_BEGIN, end: str = ENSEMBLE_END) -> str:
    """``text`` with its section between ``begin`` and ``end`` replaced by ``section`` (appended when it has none)."""
    if begin in text and end in text:
        a, b = text.index(begin), text.index(end) + len(end)
        return text[:a] + section.rstrip("\n") + text[b:]
    return text.rstrip("\n") + "\n\n" + section


def ensemble_section(quick: bool) -> tuple[dict, str]:
    from crfl.model import model_names

    ds, name = fashion_or_synthetic()
    models = ["logistic"] + (["cnn"] if "cnn" in model_names() else [])
    E = {"data": name, "rounds": ensemble_rounds(ds, models, rounds=2 if quick else 3)}
    E["headline"] = [ensemble_headline(m) for m in models] if name != "synthetic" else []
    return E, name


ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "benchmarks.md"
UNTRACKED = ROOT / "out" / "benchmarks.md"


def _machine() -> dict:
    return {
        "cpu": _cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3, 1),
        "python": platform.python_version(), "torch": str(torch.__version__), "crfl": crfl.__version__,
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def _replace_section(out: Path, section: str, begin: str, end: str) -> None:
    base = out.read_text() if out.is_file() else (DOCS.read_text() if DOCS.is_file() else "# Benchmarks\n")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(splice(base, section, begin, end))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None, help=f"the output file (default {UNTRACKED.relative_to(ROOT)}, untracked)")
    ap.add_argument("--write-docs", action="store_true", help=f"write the tracked {DOCS.relative_to(ROOT)}")
    ap.add_argument("--json", default=None)
    ap.add_argument("--only", choices=["ensemble", "cnn", "e2e", "reproduce", "train", "certification"], default=None,
                    help="ensemble, e2e, reproduce, certification: re-measure that section and replace it in the output "
                         "file; cnn: the CNN step and epoch, printed as JSON; train: the training round, its table printed")
    ap.add_argument("--specs", nargs="*", default=None, help="--only reproduce: only these sweep specs")
    ap.add_argument("--jobs", type=int, default=2, help="--only reproduce: parallel runs per sweep")
    ap.add_argument("--keep-figures", default=None, help="--only reproduce: copy the sweeps' output folder here")
    a = ap.parse_args()
    if a.out is not None and a.write_docs:
        ap.error("--out and --write-docs exclude each other")
    out = Path(a.out) if a.out else (DOCS if a.write_docs else UNTRACKED)
    if a.only == "cnn":
        print(json.dumps({"step": bench_cnn_round(), "epoch": bench_cnn_epoch()}, indent=2))
        return
    rep = 3 if a.quick else 5
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    def section(label: str, measure, render, begin: str, end: str) -> None:  # noqa: ANN001
        """--only: measure one section, replace it in the output file, print its JSON."""
        print(f"{label} ...", flush=True)
        result = measure()
        _replace_section(out, render(result), begin, end)
        print(json.dumps(result, indent=2))
        print(f"written: {out}")

    if a.only == "ensemble":
        machine = {"cpu": _cpu_name(), "cores": os.cpu_count()}
        section("ensembles", lambda: ensemble_section(a.quick)[0], lambda E: render_ensemble(E, date, machine),
                ENSEMBLE_BEGIN, ENSEMBLE_END)
        return
    if a.only == "e2e":
        section("end to end through the CLI", lambda: cli_end_to_end(repeat=2 if a.quick else 3),
                lambda E: render_e2e(E, date, _machine()), E2E_BEGIN, E2E_END)
        return
    if a.only == "certification":
        def measure_certification() -> dict:
            ds, _ = fashion_or_synthetic()
            return certification(prepare(mnist_config(ds), ds), ds, rep)

        section("certification", measure_certification, lambda C: render_certification(C, date, _machine()),
                CERT_BEGIN, CERT_END)
        return
    if a.only == "train":
        print("training (paper MNIST setting) ...", flush=True)
        ds, ds_name = fashion_or_synthetic()
        setup = prepare(mnist_config(ds), ds)
        tr = training_round(setup, matmul_rate(repeat=rep), memory_bandwidth(repeat=rep), rounds=10 if a.quick else 20)
        print(json.dumps(tr, indent=2))
        print("\n".join(render_training(tr, ds_name)))
        return
    if a.only == "reproduce":
        section("scripts/reproduce-figures", lambda: reproduce_figures(a.specs, a.jobs, keep=a.keep_figures),
                lambda P: render_reproduce(P, date, _machine()), REPRO_BEGIN, REPRO_END)
        return
    R: dict = {"date": date, "machine": _machine()}
    print("ceilings ...", flush=True)
    R["matmul_gflops"] = matmul_rate(repeat=rep)
    R["matmul64_gflops"] = matmul_rate(repeat=rep, dtype=torch.float64)  # the ceiling of work done in float64
    R["bandwidth_gbs"] = memory_bandwidth(repeat=rep)

    print("training (paper MNIST setting) ...", flush=True)
    ds, ds_name = fashion_or_synthetic()
    R["train_data"] = ds_name
    cfg = mnist_config(ds)
    setup = prepare(cfg, ds)
    R["train"] = training_round(setup, R["matmul_gflops"], R["bandwidth_gbs"], rounds=10 if a.quick else 20)

    print("certification ...", flush=True)
    R["certify"] = certification(setup, ds, rep)

    print("mixture certification (K = 100) ...", flush=True)
    R["mixture"] = mixture_certification(ds)

    print("EMNIST scale ...", flush=True)
    R["emnist"] = emnist_scale(a.quick)

    print("end to end through the CLI ...", flush=True)
    R["e2e"] = cli_end_to_end(repeat=2 if a.quick else 3)
    print("ensembles ...", flush=True)
    R["ensemble"], _ = ensemble_section(a.quick)
    text = render(R)
    text = splice(text, render_e2e(R["e2e"], R["date"], R["machine"]), E2E_BEGIN, E2E_END)
    old = out.read_text() if out.is_file() else (DOCS.read_text() if DOCS.is_file() else "")
    if REPRO_BEGIN in old and REPRO_END in old:  # the reproduce section is measured on its own (--only reproduce)
        text = splice(text, old[old.index(REPRO_BEGIN) : old.index(REPRO_END) + len(REPRO_END)], REPRO_BEGIN, REPRO_END)
    text = splice(text, render_ensemble(R["ensemble"], R["date"], R["machine"]))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    if a.json:
        Path(a.json).write_text(json.dumps(R, indent=2))
    print(json.dumps(R, indent=2))
    print(f"written: {out}")


def _round_stepper(setup):
    """A function timing the next round of ``setup`` (from its own model), one round per call."""
    state = {"params": setup.model.init(torch.Generator().manual_seed(0)), "t": 1}

    def step() -> float:
        t0 = time.perf_counter()
        state["params"] = run_round(setup, state["params"], state["t"]).params
        state["t"] += 1
        return time.perf_counter() - t0

    return step


def _with_kernels(on: bool, fn):  # noqa: ANN001, ANN202
    """``fn`` run with the compiled kernels on or off (``CRFL_KERNELS``, read at every call)."""
    def run():  # noqa: ANN202
        old = os.environ.get("CRFL_KERNELS")
        os.environ["CRFL_KERNELS"] = "1" if on else "0"
        try:
            return fn()
        finally:
            if old is None:
                del os.environ["CRFL_KERNELS"]
            else:
                os.environ["CRFL_KERNELS"] = old
    return run


def training_round(setup, mm: float, bw: float, rounds: int) -> dict:
    """Seconds per round of the paper's MNIST setting (preset ``mnist``: float64) against its compute
    bound: the round's FLOP at the float64 matmul rate, measured interleaved with the rounds (the
    work runs in float64). A/B in the same process, alternating round by round, best of ``rounds``:
    the compiled local SGD (crfl/kernels/linear_sgd.cpp), the torch path (``CRFL_KERNELS=0``) and the
    generic local step; the same setting in float32 against the float32 rate, also measured
    interleaved (the higher of that and ``mm``, passed in, is the ceiling)."""
    from crfl import local
    from crfl.setup import prepare as prepare_setup

    flop, nbytes = client_cost(setup)
    cfg32 = resolve("mnist", None, {"data.name": setup.cfg.data.name, "run.dtype": "float32"})
    setup32 = prepare_setup(cfg32, setup.dataset)
    engine = local.linear_engine(setup.model, setup.data, setup.dtype)
    variants = {
        "kernel": _with_kernels(True, _round_stepper(setup)),
        "torch": _with_kernels(False, _round_stepper(setup)),
        "kernel32": _with_kernels(True, _round_stepper(setup32)),
    }
    variants.update(_round_parts(setup))  # where a round's time goes (the kernel's setting, float64)
    a = torch.randn(2048, 2048, dtype=torch.float64)
    a32 = a.float()
    times: dict[str, list[float]] = {k: [] for k in variants}
    rates, rates32 = [], []
    for fn in variants.values():
        fn()  # warm-up (and the kernel's build on a fresh machine)
    for _ in range(rounds):
        t0 = time.perf_counter()
        torch.mm(a, a)
        rates.append(2 * 2048**3 / (time.perf_counter() - t0) / 1e9)
        t0 = time.perf_counter()
        torch.mm(a32, a32)
        rates32.append(2 * 2048**3 / (time.perf_counter() - t0) / 1e9)
        for k, fn in variants.items():
            times[k].append(fn())
    real = local.fused_linear_applies
    local.fused_linear_applies = lambda model: False
    try:
        step = _round_stepper(setup)
        generic = min(step() for _ in range(max(3, rounds // 4)))
    finally:
        local.fused_linear_applies = real
    mm64, mm = max(rates), max(mm, *rates32)
    sec = min(times["kernel"])
    bound64 = flop / (mm64 * 1e9)
    out = {
        "engine": engine, "dtype": str(setup.dtype).replace("torch.", ""), "rounds_timed": rounds,
        "matmul64_gflops": mm64, "matmul32_gflops": mm,
        "seconds_per_round": sec, "rounds_per_second": 1 / sec, "gflop_per_round": flop / 1e9,
        "min_traffic_mb_per_round": nbytes / 1e6, "achieved_gflops": flop / sec / 1e9,
        "achieved_gbs": nbytes / sec / 1e9,
        "compute_bound_seconds": bound64, "memory_bound_seconds": nbytes / (bw * 1e9),
        "x_bound": sec / bound64,
        "torch_seconds_per_round": min(times["torch"]), "torch_x_bound": min(times["torch"]) / bound64,
        "kernel_speedup_over_torch": min(times["torch"]) / sec,
        "generic_seconds_per_round": generic, "generic_x_bound": generic / bound64,
        "float32_seconds_per_round": min(times["kernel32"]),
        "float32_x_bound": min(times["kernel32"]) / (flop / (mm * 1e9)),
        "median_seconds": {k: statistics.median(v) for k, v in times.items()},
        # the parts of a round (best of ``rounds`` each, in the same interleaved loop)
        "local_sgd_seconds": min(times["local_sgd"]), "local_sgd_x_bound": min(times["local_sgd"]) / bound64,
        "batches_seconds": min(times["batches"]), "server_seconds": min(times["server"]),
        "eval_seconds": min(times["eval"]), "eval_points": setup.cfg.run.eval_points,
    }
    return out


def _round_parts(setup) -> dict:
    """Timed functions (one call each) for the parts of a round of ``setup`` with the engine that runs
    here: the clients' local SGD alone (``crfl.local.linear_local_updates`` on one round's batches), the
    batches (``crfl.clients.round_batches``), the server (FedAvg of the 20 updates, clip, noise), and the
    per-round evaluation the CLI runs after it (``crfl.setup.evaluate`` on ``run.eval_points`` test points)."""
    from crfl import aggregation, local
    from crfl.clients import round_batches
    from crfl.server import server_step
    from crfl.setup import evaluate

    cfg = setup.cfg
    params = setup.model.init(torch.Generator().manual_seed(0)).to(setup.dtype)
    idx = round_batches(setup.data, cfg.clients.batch_size, setup.tau, cfg.seed, 2)
    upd, _ = local.linear_local_updates(setup.model, params, setup.data, idx, cfg.clients.lr, setup.dtype)
    state = {"t": 1}

    def timed(fn):  # noqa: ANN001, ANN202
        def run() -> float:
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0
        return run

    def batches() -> None:
        state["t"] += 1
        round_batches(setup.data, cfg.clients.batch_size, setup.tau, cfg.seed, state["t"])

    def server() -> None:
        agg = aggregation.aggregate(cfg.aggregation.name, upd.double(), setup.weights, **cfg.aggregation.options)
        server_step(params, agg.update.to(params.dtype), t=2, rounds=setup.rounds, rho_t=setup.rho(2),
                    sigma_t=setup.sigma(2), seed=cfg.seed)

    return {
        "local_sgd": timed(lambda: local.linear_local_updates(setup.model, params, setup.data, idx, cfg.clients.lr, setup.dtype)),
        "batches": timed(batches),
        "server": timed(server),
        "eval": timed(lambda: evaluate(setup, params, cfg.run.eval_points)),
    }


def render_training(tr: dict, data: str) -> list[str]:
    """The training section's table (also printed by ``--only train``)."""
    ok = lambda c: "met" if c else "**missed**"  # noqa: E731
    return [
        f"## Training: the paper's MNIST setting ({data})",
        "",
        f"N = 20 clients, n_B = 100, tau = 30, logistic regression 784 x 10, {tr['dtype']} (preset `mnist`), one "
        f"round = all 20 clients' local SGD + aggregation. Local SGD engine: {tr['engine']} "
        "(`crfl/kernels/linear_sgd.cpp`; `CRFL_KERNELS=0`: the torch path). The variants alternate round by round in one "
        f"process, best of {tr['rounds_timed']}; the float64 and float32 ceilings are measured between them.",
        "",
        "| quantity | value |",
        "|---|---|",
        f"| seconds per round | {tr['seconds_per_round']:.4f} s ({tr['rounds_per_second']:.1f} rounds/s) |",
        f"| client work per round | {tr['gflop_per_round']:.2f} GFLOP (4 n_B d C per local step), "
        f"{tr['min_traffic_mb_per_round']:.0f} MB minimal traffic |",
        f"| compute bound: that work at the float64 matmul rate ({tr['matmul64_gflops']:.0f} GFLOP/s) | "
        f"{tr['compute_bound_seconds'] * 1e3:.1f} ms; the memory bound {tr['memory_bound_seconds'] * 1e3:.1f} ms |",
        f"| **measured / compute bound** | **{tr['x_bound']:.2f}x** ({100 / tr['x_bound']:.0f}% of the float64 matmul "
        f"rate; target within 2x: {ok(tr['x_bound'] <= 2)}) |",
        f"| where a round goes (best of {tr['rounds_timed']} each) | the clients' local SGD alone "
        f"{tr['local_sgd_seconds'] * 1e3:.1f} ms = {tr['local_sgd_x_bound']:.2f}x the bound; the batches "
        f"{tr['batches_seconds'] * 1e3:.2f} ms; FedAvg + clip + noise {tr['server_seconds'] * 1e3:.2f} ms |",
        f"| the CLI's per-round evaluation (not in the round above) | {tr['eval_seconds'] * 1e3:.2f} ms on "
        f"{tr['eval_points'] or 'all'} test points (`run.eval_points`) = "
        f"{100 * tr['eval_seconds'] / tr['seconds_per_round']:.0f}% of a round |",
        f"| the torch path (`CRFL_KERNELS=0`), same process | {tr['torch_seconds_per_round']:.4f} s = "
        f"{tr['torch_x_bound']:.2f}x the bound (the kernel: {tr['kernel_speedup_over_torch']:.2f}x faster) |",
        f"| the generic local step (`crfl.clients.local_updates_generic`) | {tr['generic_seconds_per_round']:.4f} s = "
        f"{tr['generic_x_bound']:.2f}x the bound |",
        f"| the same round in float32 (kernel) vs the float32 rate ({tr['matmul32_gflops']:.0f} GFLOP/s) | "
        f"{tr['float32_seconds_per_round']:.4f} s = {tr['float32_x_bound']:.2f}x its bound |",
        f"| vs the authors' 6.29 s per round | {AUTHORS_ROUND_S / tr['seconds_per_round']:.0f}x faster |",
        "",
    ]


CERT_BEGIN, CERT_END = "<!-- certification: begin -->", "<!-- certification: end -->"


def _mc_parts(W, b, X, sigma: float, M: int, m: int = 250) -> dict:
    """Single-threaded CPU seconds of each part of the default Monte Carlo counts on the points X, for all M models
    (one chunk of m models timed, times the number of chunks): the products of every block of points, the votes
    kernel on each block's logits right after its product (as the threads run them), the chunk's preparation pass,
    its noise draw (crfl.noise's counter-based fill; torch.randn for comparison) and the exact pairs' integer argmax."""
    from crfl import exact_votes, noise, smoothing
    from crfl.smoothing import _addr

    lib = smoothing._votes_kernel()
    (C, d), n, k = W.shape, X.shape[0], smoothing.LINEAR_POINT_BLOCK
    D, chunks = C * d + C, -(-M // m)
    E = torch.randn((m, D), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    w_norms = torch.linalg.vector_norm(torch.cat([W, b.unsqueeze(1)], dim=1), dim=1).contiguous()
    Wcm = torch.empty((C * m, d + 1), dtype=torch.float32)
    pm, e_min, bad = torch.empty(m, dtype=torch.float64), torch.empty(m, dtype=torch.float64), torch.empty(m, dtype=torch.int32)

    def prep():
        lib.prep_mixed_f32(_addr(E), m, 0, m, _addr(W), _addr(b), _addr(w_norms), C, d, sigma, _addr(Wcm), _addr(pm),
                           _addr(e_min), _addr(bad))

    prep()
    px, _ = exact_votes.logit_error_scales(W, b, sigma, E[:0], X)
    terms = (X != 0).sum(dim=1)
    thr32 = exact_votes.margin_threshold(px, terms, torch.float32).contiguous()
    thr64 = exact_votes.margin_threshold(px, terms, torch.float64).contiguous()
    X32, buf = torch.cat([X.float(), torch.ones((n, 1))], dim=1), torch.empty((k, C * m), dtype=torch.float32)
    counts, done = torch.zeros((n, C), dtype=torch.int64), ctypes.c_int64(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t_prod = t_votes = 0.0
        pend = []
        for a in range(0, n, k):
            z = min(n, a + k)
            pending, cand = torch.empty((z - a) * m, dtype=torch.int64), torch.empty((z - a) * m, dtype=torch.int64)
            t0 = time.perf_counter()
            L = torch.mm(X32[a:z], Wcm.T, out=buf[: z - a])
            t1 = time.perf_counter()
            q = lib.votes_mixed_f32(_addr(L), z - a, m, C, m * C, m, _addr(thr32, a), _addr(pm), _addr(counts, a * C),
                                    a, _addr(pending), _addr(cand), (z - a) * m, ctypes.byref(done))
            t_votes += time.perf_counter() - t1
            t_prod += t1 - t0
            pend.append((pending[:q], cand[:q]))
        pending, cand = torch.cat([p for p, _ in pend]), torch.cat([c for _, c in pend])
        order = torch.argsort(pending % m, stable=True)
        pts, mods, cand = (pending[order] // m).contiguous(), (pending[order] % m).contiguous(), cand[order].contiguous()
        won = torch.empty_like(pts)
        t_rec = best(lambda: lib.recompute_f64(_addr(pts), _addr(mods), _addr(cand), pts.numel(), _addr(X), _addr(W),
                                               _addr(b), _addr(E), sigma, C, d, _addr(thr64), _addr(pm), _addr(won),
                                               None), 3, 0)
        X32s, pxs = torch.empty((n, d + 1), dtype=torch.float32), torch.empty(n, dtype=torch.float64)
        nnz, badx = torch.empty(n, dtype=torch.int64), torch.empty(n, dtype=torch.int32)
        t_scan = best(lambda: lib.scan_points(_addr(X), 0, n, d, _addr(X32s), _addr(pxs), _addr(nnz), _addr(badx)), 3, 0)
        out = {"products": t_prod * chunks, "votes": t_votes * chunks, "recompute": t_rec * chunks, "scan": t_scan,
               "prep": best(prep, 3, 0) * chunks,
               "randn": best(lambda: torch.randn((m, D), generator=torch.Generator().manual_seed(1),
                                                 dtype=torch.float64), 3, 0) * chunks}
        out["noise_fill"] = best(lambda: noise.fill_normal(noise.NoiseStream(1), 0, E, threads=1), 3, 0) * chunks
    finally:
        torch.set_num_threads(threads)
    return out


def certification(setup, ds, rep: int) -> dict:
    """Monte Carlo counts (M = 1000) on 2 x 10,000 points of the paper's MNIST setting, each variant against the
    ceiling of the dtype its products run in, measured in this process; the variants alternate (best of rep)."""
    from crfl import kernels, noise, smoothing

    params = setup.model.init(torch.Generator().manual_seed(0)) * 5
    W, b = (t.contiguous() for t in setup.model.split(params.double()))
    X = torch.from_numpy(ds.x_test[:10000]).double() / 255
    both = torch.cat([X, setup.plan.trigger.apply(X)]).contiguous()
    M, sigma = 1000, 0.01
    n, d, C = both.shape[0], both.shape[1], W.shape[0]
    flop = 2 * n * d * C * M  # the noisy logits X E^T
    counted = torch.float64  # a linear model's default counts: float64 noise, exact votes where the kernel runs
    gen = lambda: noise.NoiseStream(1)  # noqa: E731  (what `crfl certify` draws from: crfl.noise)
    stats = {}

    def default():  # what `crfl certify` runs: counts in `counted`, float32 products where the kernel proves the votes
        stats["default"] = smoothing._linear_votes(W, b, both, sigma, M, gen(), 250, 2048, None)[1:]

    def float32():
        smoothing._linear_votes(W, b, both, sigma, M, torch.Generator().manual_seed(1), 250, 2048, torch.float32)

    def torch_path():  # CRFL_KERNELS=0: products in the counted dtype, torch.argmax and a scatter-add
        old = os.environ.get("CRFL_KERNELS")
        os.environ["CRFL_KERNELS"] = "0"
        try:
            smoothing._linear_votes(W, b, both, sigma, M, torch.Generator().manual_seed(1), 250, 2048, counted)
        finally:
            os.environ.pop("CRFL_KERNELS") if old is None else os.environ.__setitem__("CRFL_KERNELS", old)

    Xs = torch.cat([both.float(), torch.ones((n, 1))], dim=1)  # [x, 1]: the bias as the (d + 1)-th term, as the default
    Ws = torch.randn(250 * C, d + 1).T

    kb = smoothing.LINEAR_POINT_BLOCK  # (not k: the variants' loop below rebinds it)
    mkl = smoothing._mkl_packed()
    Xp = torch.cat([Xs, torch.zeros((-(-n // kb) * kb - n, d + 1))])  # whole blocks, as the default pads them
    Wp = Ws.T.contiguous()  # (C m, d + 1) row-major, as the default's operands

    def products():  # the float32 products alone, blocked and scheduled as the default runs them (this design's floor)
        def run(_lo: int, _hi: int) -> None:
            buf = torch.empty((kb, Ws.shape[1]), dtype=torch.float32)
            while True:
                with lock:
                    a = next(blocks, None)
                if a is None:
                    return
                if mkl is not None:  # MKL's packed product, the weights packed once per chunk (as the default)
                    smoothing.packed_product(mkl, Xp.data_ptr() + a * (d + 1) * 4, kb, packed.data_ptr(), Wp.shape[0],
                                             d + 1, buf.data_ptr())
                else:
                    torch.mm(Xs[a : min(n, a + kb)], Ws, out=buf[: min(n, a + kb) - a])

        for _ in range(0, M, 250):
            if mkl is not None:
                packed = smoothing.pack_operand(mkl, Wp, kb)
            blocks, lock = iter(range(0, n, kb)), threading.Lock()
            smoothing._single_threaded_products(lambda threads: kernels.parallel_for(threads, run, threads=threads))

    def unpacked():  # the default with torch.mm per block (the weights re-packed by every block's product)
        old = os.environ.get("CRFL_MKL_PACKED")
        os.environ["CRFL_MKL_PACKED"] = "0"
        smoothing._mkl_packed.cache_clear()
        try:
            smoothing._linear_votes(W, b, both, sigma, M, gen(), 250, 2048, None)
        finally:
            os.environ.pop("CRFL_MKL_PACKED") if old is None else os.environ.__setitem__("CRFL_MKL_PACKED", old)
            smoothing._mkl_packed.cache_clear()

    E = torch.empty(250, C * d + C, dtype=torch.float64)  # one chunk's float64 noise, single-threaded
    g_randn = torch.Generator().manual_seed(2)

    def noise_stream():  # the counter-based stream (crfl.noise) the counts draw from
        noise.fill_normal(gen(), 0, E, threads=1)

    def noise_randn():  # torch's normal sampler, what the counts drew before (serial)
        torch.randn(E.shape, generator=g_randn, dtype=torch.float64, out=E)

    variants = {"default": default, "unpacked": unpacked, "float32": float32, "torch": torch_path, "products": products,
                "noise": noise_stream, "randn": noise_randn}
    times: dict[str, list[float]] = {k: [] for k in variants}
    mm32, mm64 = [], []
    parts: list[dict] = []
    default()
    for _ in range(max(2, rep - 2)):  # alternately, so that load from other processes hits all alike
        mm32.append(matmul_rate(repeat=3))
        mm64.append(matmul_rate(repeat=3, dtype=torch.float64))
        for k, fn in variants.items():
            times[k].append(best(fn, repeat=1, warmup=0))
        parts.append(_mc_parts(W, b, both, sigma, M) if smoothing.votes_arithmetic() == "exact" else {})
    t = {k: min(v) for k, v in times.items()}
    c32, c64 = max(mm32), max(mm64)
    rec, exact = stats["default"]
    t_exact = best(lambda: smoothing.exact_top_two(W, b, X, sigma), repeat=rep)
    ceiling = {torch.float32: c32, torch.float64: c64}
    default_products = torch.float32 if smoothing.votes_arithmetic() == "exact" else counted
    part = {k: min(p[k] for p in parts) for k in parts[0]} if parts and parts[0] else {}
    return {
        "mc_flop": flop, "mc_gflop": flop / 1e9, "counted_dtype": str(counted).replace("torch.", ""),
        "matmul_gflops_float32": c32, "matmul_gflops_float64": c64,
        "noise_source": "crfl.noise.NoiseStream",
        "mc_seconds_2x10k_M1000": t["default"], "mc_achieved_gflops": flop / t["default"] / 1e9,
        "mc_products_dtype": str(default_products).replace("torch.", ""),
        "mc_ratio_to_products_dtype": flop / t["default"] / 1e9 / ceiling[default_products],
        "mc_ratio_to_counted_dtype": flop / t["default"] / 1e9 / ceiling[counted],
        "votes_float64_share": rec / (n * M), "votes_exact": exact, "point_block": smoothing.LINEAR_POINT_BLOCK,
        "float32_seconds": t["float32"], "float32_ratio": flop / t["float32"] / 1e9 / c32,
        "torch_seconds": t["torch"], "torch_ratio": flop / t["torch"] / 1e9 / ceiling[counted],
        "products_seconds": t["products"], "products_ratio": flop / t["products"] / 1e9 / c32,
        "products_engine": "MKL packed (cblas_sgemm_compute)" if mkl is not None else "torch.mm",
        "unpacked_seconds": t["unpacked"], "unpacked_ratio": flop / t["unpacked"] / 1e9 / c32,
        "parts_cpu_seconds": part,
        "exact_seconds_10k": t_exact, "kernels": kernels.engine("votes"),
        "noise_chunk_seconds": t["noise"], "randn_chunk_seconds": t["randn"], "noise_engine": noise.engine(),
        "noise_normals_per_s": E.numel() / t["noise"],
        "all_seconds": times, "matmul_runs": {"float32": mm32, "float64": mm64},
    }


def render_certification(ce: dict, date: str, machine: dict) -> str:
    ok = lambda c: "met" if c else "**missed**"  # noqa: E731
    pct = lambda x: f"{100 * x:.0f}%"  # noqa: E731
    lines = [
        CERT_BEGIN, "", "## Certification (10,000 test points, clean and backdoored)", "",
        f"Measured {date} on {machine['cpu']}, {machine['cores']} cores (load average {machine.get('load_average')}); "
        "`python -m benchmarks --only certification` re-measures this section alone. The paper's MNIST model "
        f"(784 x 10, 5x its initial weights), sigma_T = 0.01: float64 noise and exact votes by default "
        "(`crfl.smoothing.votes_arithmetic`: float32 products, proven margins; docs/theory.md (c)). Ceilings measured in the same run: "
        f"{ce['matmul_gflops_float32']:.0f} GFLOP/s (float32), {ce['matmul_gflops_float64']:.0f} GFLOP/s (float64), "
        "2048 x 2048 torch.mm; the variants alternate with them, best of each.", "",
        "| quantity | value |",
        "|---|---|",
        f"| Monte Carlo, M = 1000, 2 x 10,000 points (what `crfl certify` runs; votes kernel: {ce['kernels']}; noise: "
        f"{ce.get('noise_source', 'torch.Generator')}) | {ce['mc_seconds_2x10k_M1000']:.2f} s |",
        f"| its work and rate | {ce['mc_gflop']:.0f} GFLOP, {ce['mc_achieved_gflops']:.0f} GFLOP/s = "
        f"{pct(ce['mc_ratio_to_products_dtype'])} of the {ce['mc_products_dtype']} matmul rate, the dtype its products "
        f"run in (target >= 80%: {ok(ce['mc_ratio_to_products_dtype'] >= 0.8)}); "
        f"{pct(ce['mc_ratio_to_counted_dtype'])} of the {ce['counted_dtype']} rate, the dtype it counts in |",
        f"| votes settled by the float32 logits / float64 logits / exact arithmetic | "
        f"{100 * (1 - ce['votes_float64_share']):.2f}% / {100 * ce['votes_float64_share']:.2f}% / {ce['votes_exact']} votes |",
        f"| the float32 products alone (the same blocks of {ce.get('point_block', 256)} points handed to the threads in "
        f"turn, {ce.get('products_engine', 'torch.mm')}, no noise, no votes) | {ce['products_seconds']:.2f} s = "
        f"{pct(ce['products_ratio'])} of the float32 rate |",
        *([f"| the default with one torch.mm per block instead (`CRFL_MKL_PACKED=0`: MKL re-packs the weights in every "
           f"block's product) | {ce['unpacked_seconds']:.2f} s = {pct(ce['unpacked_ratio'])} of the float32 rate |"]
          if "unpacked_seconds" in ce else []),
        *_parts_row(ce.get("parts_cpu_seconds") or {}),
        f"| counts in float32 (`dtype=torch.float32`) | {ce['float32_seconds']:.2f} s = {pct(ce['float32_ratio'])} "
        "of the float32 rate |",
        f"| the torch path (`CRFL_KERNELS=0`: {ce['counted_dtype']} products, torch.argmax) | {ce['torch_seconds']:.2f} s "
        f"= {pct(ce['torch_ratio'])} of the {ce['counted_dtype']} rate |",
        f"| vs the authors (1.64 s per noisy model on 1632 points) | "
        f"{AUTHORS_SMOOTH_PER_MODEL_S * 1000 * 20000 / 1632 / ce['mc_seconds_2x10k_M1000']:.0f}x faster per (test point, "
        "noisy model) pair |",
        f"| exact smoothing, 10,000 points | {ce['exact_seconds_10k']:.3f} s |",
        f"| the float64 noise of one chunk (250 x 7850), one thread: `crfl.noise` ({ce.get('noise_engine')}) vs "
        f"torch.randn | {1e3 * ce.get('noise_chunk_seconds', np.nan):.1f} ms "
        f"({ce.get('noise_normals_per_s', np.nan) / 1e6:.0f}M normals/s) vs {1e3 * ce.get('randn_chunk_seconds', np.nan):.1f} ms: "
        f"{ce.get('randn_chunk_seconds', np.nan) / ce.get('noise_chunk_seconds', np.nan):.1f}x faster |",
        "",
        CERT_NOTES.strip("\n"),
        "", CERT_END, "",
    ]
    return "\n".join(lines)


def _parts_row(parts: dict) -> list[str]:
    """The table row: each part of the default counts in single-threaded CPU seconds and as a share of the products'."""
    if not parts:
        return []
    names = {"votes": "votes from the float32 logits", "recompute": "float64 recomputation of the unsettled votes",
             "scan": "points scan (once)", "prep": "preparation pass", "noise_fill": "counter-based noise (crfl.noise)",
             "randn": "torch.randn noise instead (not run by default)"}
    p = parts["products"]
    rest = ", ".join(f"{names[k]} {v:.3f} s ({100 * v / p:.1f}%)" for k, v in parts.items() if k in names)
    return [f"| where the CPU time goes (single-threaded, summed over all blocks and chunks; share of the products) | "
            f"products {p:.2f} s; {rest} |"]


CERT_NOTES = """
How the Monte Carlo counts run (`crfl.smoothing.monte_carlo_counts_linear`, issue 20). One compiled pass over
the points (`scan_points`, `crfl/kernels/votes.cpp`) writes their float32 copy [x, 1] and, per point, ||[x;
1]||, the number of nonzero features and the range check. The M noisy models come in chunks of 250. The noise
is `crfl.noise`'s counter-based stream (Philox4x32-10 + Box-Muller, the compiled `crfl/kernels/normal.cpp`;
each model's noise a pure function of the seed and the model, the stream `--replay-seed` replays), so for each
chunk the worker threads write their share of the models' float64 noise rows and run over them, while they are
in cache, the preparation pass (`prep_mixed_f32`): the float32 operands [fl32(w + sigma e), fl32(b + sigma
e_b)] class-major (row c 250 + j: class c of model j, so that the 250 models' logits of a class are
contiguous; the bias is the 785th column, so one torch.mm gives the logits: an addmm would first copy the bias
into its output, about 6% of the products' time), each model's error scale pm and the side conditions of exact
votes; no float64 noisy weights are kept, and the buffers are reused from chunk to chunk. (With a
torch.Generator the noise is one serial torch.randn per chunk, about 6x the stream's time, drawn and prepared
on a helper thread while the previous chunk is counted.) Then the points go in blocks of 128 handed to the
threads in turn (`crfl.kernels.parallel_for`, torch's own threads set to 1): a thread multiplies its block
into its own buffer single-threaded with MKL's packed product (`cblas_sgemm_compute`, exported by torch's own
library: the chunk's operands are packed once per chunk by `cblas_sgemm_pack`, where torch.mm re-packs the
2500 x 785 weights in every block's product, which held the counts at 77% of the float32 rate; the last block
padded with zero rows, since a packed operand serves one block shape; `CRFL_MKL_PACKED=0` or a torch without
MKL: one torch.mm per block) (at 128 points the 1.28 MB of logits stay in the core's 2 MB L2; 192 and
256 points ran at 66% of the float32 rate against 90% for 128, two threads, interleaved), and the votes kernel
reads them at once: the top two of 8 models at a time in vector registers over the 10 classes, a vote counted
where the top-two gap exceeds the proven bound on twice a logit's rounding error (per point from its number of
nonzero features: a zero pixel's term is an exact zero), one add where a lane block of models is unanimous. A
block costs no torch operation besides its product (the kernel writes the unsettled pairs into per-thread
buffers): Python work between blocks holds the GIL the other thread needs (it cost 9% of this phase). No
barrier between blocks: a thread that finds no more blocks gives its own unsettled votes (about 0.25% here)
the float64 logits of the classes that can still win (`recompute_f64`: its pairs sorted by model, so that a
model's noise row is read into the cache once, w + sigma e formed on the fly, the next pair's point
prefetched; the proven votes added in the kernel), then the chunk ends (one barrier per chunk) and near ties
even in float64 go to exact integer arithmetic (`crfl.exact_votes`). Every vote is the exact vote of its noisy
model (docs/theory.md (c), "Float32 logits, exact votes"). The row "where the CPU time goes" times each part
single-threaded in the same run, as a share of the products' time. Counts in float32 (`dtype=torch.float32`)
keep the torch copy of the noisy weights and the plain votes kernel. Tried and not kept: one multi-threaded
product per block of 256-2048 points and a threaded votes pass (a barrier per block, 20-40% slower); the votes
in 16-128 lanes; the top two with the classes in an inner loop of a `#pragma omp simd` lane loop (GCC does not
vectorise it: twice as slow; hence the explicit vector registers); 16-lane (512-bit) vectors (no faster than
8); the float64 recomputation inside each block (each unsettled vote then reads its model's noise rows from
memory: about twice the time of the model-sorted pass); the gap test in float32 instead of float64 (2% of the
votes pass: not worth a second error argument). The block size does not change the votes.
"""


def mixture_certification(ds, K: int = 100) -> dict:
    """The mixture reading on the paper's MNIST setting: train once (T = 100, t_adv = 10), then time
    `certify_run(reading=mixture, K)` on 2 x 10,000 points: K continuations of rounds 11..100 (every
    client's local steps as one wide product over the K models) and per-run class bounds."""
    from crfl.certify import certify_run

    d = Path(tempfile.mkdtemp())
    try:
        cfg = mnist_config(ds)
        res = train(cfg, d / "run", dataset=ds)
        setup = res.setup
        t_adv = res.attack_log[0]["round"]
        steps = int(setup.tau.sum()) * (setup.rounds - t_adv)
        nB, dim, C = setup.cfg.clients.batch_size, setup.dataset.num_features, setup.dataset.num_classes
        flop = 4 * nB * dim * C * K * steps  # logits and gradient products of every continuation's steps
        t0 = time.perf_counter()
        from crfl import mixture

        mixture.continuations(setup, torch.load(d / "run" / "model_final.pt", weights_only=True)["attack_state"]["pre_noise"],
                              t_adv, K)
        t_cont = time.perf_counter() - t0
        t0 = time.perf_counter()
        s = certify_run(d / "run", overrides={"certify.reading": "mixture", "certify.training_samples": K}, dataset=ds)
        t_all = time.perf_counter() - t0
        return {"K": K, "rounds": setup.rounds - t_adv, "continuation_seconds": t_cont, "continuation_gflop": flop / 1e9,
                "continuation_gflops": flop / t_cont / 1e9, "certify_seconds": t_all, "points": s["results"]["clean"]["points"],
                "max_radius": s["results"]["clean"]["max_radius"], "smoothed_accuracy": s["results"]["clean"]["smoothed_accuracy"],
                "abstain_rate": s["results"]["clean"]["abstain_rate"]}
    finally:
        shutil.rmtree(d, ignore_errors=True)


def emnist_scale(quick: bool) -> dict:
    """N = 50, n_B = 200, tau = 70, 47 classes, ~700k training images (synthetic, uint8), in a subprocess."""
    code = f"""
import resource, statistics, time, torch, json, sys
sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r})
from benchmarks.__main__ import synthetic_images
from crfl.config import resolve
from crfl.setup import prepare
from crfl.train import run_round
ds = synthetic_images({100_000 if quick else 697_932}, 10_000, 47)
cfg = resolve("emnist", None, {{"data.name": "mnist-5k", "clients.local_iters": 70}})
setup = prepare(cfg, ds)
p = setup.model.init(torch.Generator().manual_seed(0))
ts = []
for t in range(1, {3 if quick else 5}):
    t0 = time.perf_counter(); p = run_round(setup, p, t).params; ts.append(time.perf_counter() - t0)
print(json.dumps({{"seconds_per_round": statistics.median(ts[1:] or ts), "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2,
                   "train_images": len(ds.y_train)}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


E2E_BEGIN, E2E_END = "<!-- e2e: begin -->", "<!-- e2e: end -->"
E2E_ARGS = ["run", "--preset", "mnist", "--dataset", "fashion-mnist", "--method", "monte-carlo", "--M", "1000", "--quiet"]


def _subprocess_seconds(code: str, repeat: int, env: dict[str, str] | None = None) -> float:
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, env=env)
        ts.append(time.perf_counter() - t0)
    return min(ts)


def _e2e_once(env: dict[str, str]) -> dict:
    """One ``crfl run`` in a fresh process, split by what it leaves on disk: config.yaml is written when
    training starts (after start-up: interpreter, imports, config, dataset load, partition, setup), the
    summary's ``training.seconds`` is the round loop (rounds, per-round evaluation, rows, checkpoints),
    ``certify_seconds`` the certification (``smoothing.seconds`` of it the vote counting) and summary.json's
    mtime the end; the rest is the final training result set and the certification's reading of the run."""
    d = Path(tempfile.mkdtemp(prefix="crfl-bench-e2e-"))
    try:
        t_start = time.time()
        t0 = time.perf_counter()
        p = subprocess.run([sys.executable, "-m", "crfl.cli", *E2E_ARGS, "--out", str(d / "run")],
                           capture_output=True, text=True, env=env)
        wall = time.perf_counter() - t0
        if p.returncode != 0:
            return {"error": (p.stderr.strip().splitlines() or ["?"])[-1]}
        run = d / "run"
        s = json.loads((run / "summary.json").read_text())
        cfg = crfl.io.load_yaml((run / "config.yaml").read_text())
        to_summary = (run / "summary.json").stat().st_mtime - t_start
        startup = (run / "config.yaml").stat().st_mtime - t_start
        train_s, certify_s = s["training"]["seconds"], s["certify_seconds"]
        # the products' dtype: float32 with exact votes (proven margins, docs/theory.md (c)), else float64
        mc_dtype = torch.float32 if s["smoothing"].get("votes") == "exact" else torch.float64
        return {"wall_s": wall, "to_summary_s": to_summary, "startup_s": startup, "train_s": train_s,
                "certify_s": certify_s, "counts_s": s["smoothing"]["seconds"],
                "between_s": to_summary - startup - train_s - certify_s, "train_dtype": cfg["run"]["dtype"],
                "counts_dtype": str(mc_dtype).replace("torch.", ""), "rounds": s["training"]["rounds"],
                "final_clean_acc": s["training"]["final_clean_acc"],
                "smoothed_acc": s["results"]["clean"]["smoothed_accuracy"],
                "certified_at_attack": s["results"]["clean"]["certified_at_attack"]}
    finally:
        shutil.rmtree(d, ignore_errors=True)


def cli_end_to_end(repeat: int = 3) -> dict:
    """``crfl run --preset mnist --dataset fashion-mnist --method monte-carlo --M 1000`` as a user runs it:
    a fresh process, timed from its start to summary.json written (the certification's last write; the
    CLI then prints and plots), best of ``repeat`` (the decoded-data cache is warm after the first).
    Each part beside its floor, measured in the same session and in the dtype the run computes in
    (the presets train and count in float64, so their floors are at the float64 matmul rate): start-up
    against a bare ``import torch``, the dataset load (cached), the round loop against T rounds' FLOP at
    the ceiling and against the same rounds timed alone (the loop's own evaluation, rows and checkpoints
    are the difference), the vote counting against its FLOP at the ceiling."""
    try:
        load_dataset("fashion-mnist")
    except Exception as e:  # noqa: BLE001
        return {"error": f"Fashion-MNIST not available: {e}"}
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    runs = []
    for _ in range(repeat):
        r = _e2e_once(env)
        if "error" in r:
            return r
        runs.append(r)
    best_run = min(runs, key=lambda r: r["to_summary_s"])
    # floors, measured now
    dt = {"float64": torch.float64, "float32": torch.float32}
    mm = {name: matmul_rate(repeat=3, dtype=dt[name]) for name in sorted({best_run["train_dtype"], best_run["counts_dtype"]})}
    ds = load_dataset("fashion-mnist")
    setup = prepare(resolve("mnist", None, {"data.name": "fashion-mnist"}), ds)
    flop, _ = client_cost(setup)
    n = 2 * len(ds.y_test)
    mc_flop = 2 * n * ds.num_features * ds.num_classes * 1000
    T = best_run["rounds"]
    rounds_alone = round_time(setup, rounds=10) * T
    return {
        "command": "crfl " + " ".join(E2E_ARGS), "runs": runs, "best": best_run, "matmul_gflops": mm,
        "floors": {
            "interpreter_s": _subprocess_seconds("pass", 3, env),
            "import_torch_s": _subprocess_seconds("import torch", 3, env),
            "import_crfl_cli_s": _subprocess_seconds("import crfl.cli", 3, env),
            "load_cached_s": best(lambda: load_dataset("fashion-mnist"), repeat=3),
            "rounds_alone_s": rounds_alone,
            "train_compute_bound_s": T * flop / (mm[best_run["train_dtype"]] * 1e9),
            "counts_compute_bound_s": mc_flop / (mm[best_run["counts_dtype"]] * 1e9),
        },
    }


def render_e2e(E: dict, date: str, machine: dict) -> str:
    lines = [E2E_BEGIN, "", "## End to end: the paper's MNIST experiment through the CLI", ""]
    if "error" in E:
        return "\n".join(lines + [f"Not measured: {E['error']}", "", E2E_END, ""])
    b, f, mm = E["best"], E["floors"], E["matmul_gflops"]
    tdt, cdt = b["train_dtype"], b["counts_dtype"]
    floor_total = f["import_torch_s"] + f["load_cached_s"] + f["train_compute_bound_s"] + f["counts_compute_bound_s"]
    lines += [
        f"Measured {date} on {machine['cpu']}, {machine['cores']} cores (load average {machine.get('load_average')}); "
        "`python -m benchmarks --only e2e` re-measures this section alone.", "",
        f"`{E['command']}`: T = {b['rounds']} rounds, attack at t_adv = 10, Monte Carlo certification (M = 1000) of the "
        "clean and the backdoored test set (2 x 10,000 points); training in "
        f"{tdt}, the votes' products in {cdt} (exact votes: a vote is taken from float32 logits only where their margin "
        "proves it, docs/theory.md (c)). A fresh process each time, timed from "
        f"its start to summary.json written (best of {len(E['runs'])}; the CLI then prints and draws the figures: "
        f"{b['wall_s'] - b['to_summary_s']:.1f} s more). Each part is split off by what the run leaves on disk "
        "(config.yaml is written when training starts, summary.json's `training.seconds`, `certify_seconds` and "
        "`smoothing.seconds`); each floor is measured in the same session, compute at the matrix-multiply rate of "
        f"the dtype the part runs in ({', '.join(f'{k}: {v:.0f} GFLOP/s' for k, v in mm.items())}).", "",
        "| part | measured | floor (same session) | measured / floor |", "|---|---|---|---|",
        f"| start-up: interpreter, imports, config, dataset load (cached), partition, setup | {b['startup_s']:.2f} s | "
        f"{f['import_torch_s'] + f['load_cached_s']:.2f} s: a bare `import torch` {f['import_torch_s']:.2f} s ("
        f"a bare interpreter: {f['interpreter_s']:.2f} s; `import crfl.cli`: {f['import_crfl_cli_s']:.2f} s) + loading the cached "
        f"dataset {f['load_cached_s']:.3f} s | {b['startup_s'] / (f['import_torch_s'] + f['load_cached_s']):.1f}x |",
        f"| training: the round loop ({tdt}) | {b['train_s']:.2f} s | {f['train_compute_bound_s']:.2f} s: the rounds' FLOP "
        f"at {mm[tdt]:.0f} GFLOP/s (the same rounds timed alone, without evaluation, rows and checkpoints: "
        f"{f['rounds_alone_s']:.2f} s) | {b['train_s'] / f['train_compute_bound_s']:.1f}x |",
        f"| certification: counting the votes ({cdt}) | {b['counts_s']:.2f} s | {f['counts_compute_bound_s']:.2f} s: the "
        f"noisy logits' FLOP at {mm[cdt]:.0f} GFLOP/s | {b['counts_s'] / f['counts_compute_bound_s']:.1f}x |",
        f"| certification: the rest (reading the run, B_0, bounds, radii, result files) | {b['certify_s'] - b['counts_s']:.2f} s "
        "| no compute floor | |",
        f"| between: the final training result set, certification start-up | {b['between_s']:.2f} s | no compute floor | |",
        f"| **process start to summary written** | **{b['to_summary_s']:.2f} s** (target <= 5 s: "
        f"{'met' if b['to_summary_s'] <= 5 else '**missed**'}) | {floor_total:.2f} s | "
        f"{b['to_summary_s'] / floor_total:.1f}x |",
        "",
        f"All runs (s to summary): {', '.join('%.2f' % r['to_summary_s'] for r in E['runs'])}; final clean accuracy "
        f"{b['final_clean_acc']:.4f}, smoothed accuracy {b['smoothed_acc']:.4f}, certified at the attack "
        f"{b['certified_at_attack']:.4f}.",
        "", E2E_END, "",
    ]
    return "\n".join(lines)


REPRO_BEGIN, REPRO_END = "<!-- reproduce: begin -->", "<!-- reproduce: end -->"


def reproduce_figures(specs: list[str] | None, jobs: int, keep: str | None = None) -> dict:
    """Run ``scripts/reproduce-figures`` (coupled reading) into a fresh folder: its timing.csv (wall time per
    ``crfl sweep`` call, the plots, the total) and, per sweep, what it asked for and what was computed for it.
    A sweep's training or certification is counted as done by the first sweep (in the script's order) that
    asks for it; the later ones reuse it from the shared store. Its work is the recorded ``training.seconds``
    and ``certify_seconds`` of what it computed (inside the worker processes, one thread each when JOBS = 2)."""
    d = Path(tempfile.mkdtemp(prefix="crfl-bench-figures-"))
    try:
        crfl_bin = Path(sys.executable).parent / "crfl"
        env = {**os.environ, "CRFL": str(crfl_bin) if crfl_bin.is_file() else "",
               "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
        if not crfl_bin.is_file():
            env["CRFL"] = f"{sys.executable} -m crfl.cli"
        t0 = time.perf_counter()
        p = subprocess.run(["bash", str(ROOT / "scripts" / "reproduce-figures"), str(d / "figures"), str(jobs), *(specs or [])],
                           capture_output=True, text=True, env=env)
        total = time.perf_counter() - t0
        from crfl.io import read_csv

        out = d / "figures"
        calls = read_csv(out / "timing.csv") if (out / "timing.csv").is_file() else []
        order = [s for c in calls if c["spec"] not in ("plots", "total") for s in c["spec"].split("+")]
        seen_runs: set[str] = set()
        seen_certs: set[tuple[str, str]] = set()
        sweeps = []
        for name in order:
            info = json.loads((out / name / "sweep.json").read_text()) if (out / name / "sweep.json").is_file() else {}
            rows = read_csv(out / name / "results.csv") if (out / name / "results.csv").is_file() else []
            row = {"spec": name, "rows": len(rows), "failed": sum(r.get("status", "ok") not in ("ok", "") for r in rows),
                   "trainings_requested": 0, "trainings_done": 0, "certifications_requested": 0, "certifications_done": 0,
                   "train_seconds": 0.0, "certify_seconds": 0.0}
            for job in info.get("jobs", []):
                h = job["train_hash"]
                row["trainings_requested"] += 1
                if h not in seen_runs:
                    seen_runs.add(h)
                    row["trainings_done"] += 1
                    row["train_seconds"] += _json_get(out / "runs" / h / "summary.json", "training", "seconds")
                for ch, _ in job["certs"]:
                    row["certifications_requested"] += 1
                    if (h, ch) not in seen_certs:
                        seen_certs.add((h, ch))
                        row["certifications_done"] += 1
                        row["certify_seconds"] += _json_get(out / "runs" / h / f"cert-{ch}" / "summary.json", "certify_seconds")
            sweeps.append(row)
        return {"total_s": total, "returncode": p.returncode, "jobs": jobs, "specs": specs or "all",
                "calls": [{"spec": r["spec"], "seconds": float(r["seconds"]), "status": r["status"]} for r in calls],
                "sweeps": sweeps, "training_runs": len(seen_runs), "certifications": len(seen_certs),
                "tail": p.stdout.strip().splitlines()[-1:] + p.stderr.strip().splitlines()[-3:]}
    finally:
        if keep is not None and (d / "figures").is_dir():  # --keep-figures DIR: the sweeps' results and figures
            shutil.copytree(d / "figures", keep, dirs_exist_ok=True)
        shutil.rmtree(d, ignore_errors=True)


def _json_get(path: Path, *keys: str) -> float:
    """A number inside a JSON file (0.0 when the file or the key is missing: a failed run)."""
    try:
        v: Any = json.loads(path.read_text())
        for k in keys:
            v = v[k]
        return float(v)
    except (OSError, ValueError, KeyError, TypeError):
        return 0.0


def render_reproduce(P: dict, date: str, machine: dict) -> str:
    sw = P["sweeps"]
    req_t, req_c = sum(r["trainings_requested"] for r in sw), sum(r["certifications_requested"] for r in sw)
    lines = [REPRO_BEGIN, "", "## Every figure: `scripts/reproduce-figures` (coupled reading)", "",
             f"Measured {date} on {machine['cpu']}, {machine['cores']} cores (load average {machine.get('load_average')}), "
             f"JOBS = {P['jobs']} worker processes; `python -m benchmarks --only reproduce` re-measures this section "
             f"({'specs: ' + ', '.join(P['specs']) if isinstance(P['specs'], list) else 'all sweeps'}). The sweeps on one "
             "dataset run as one `crfl sweep A B ...` (one store of runs, one pool of jobs, longest first), the figures "
             "are drawn by one `crfl plot` at the end.", "",
             f"**Total: {P['total_s'] / 60:.1f} min** (target <= 15 min: {'met' if P['total_s'] <= 900 else '**missed**'}; "
             f"exit status {P['returncode']}): {P['training_runs']} trainings for {req_t} requested, "
             f"{P['certifications']} certifications for {req_c} requested.", "",
             "| call | wall seconds | status |", "|---|---|---|"]
    for r in P["calls"]:
        lines.append(f"| {r['spec'].replace('+', ', ')} | {r['seconds']:.1f} | {r['status']} |")
    lines += ["", "Per sweep: what it asked for, what was computed for it (the rest came from the store), and the "
              "recorded seconds of that work inside the workers (training loop; certification).", "",
              "| sweep | result rows (failed) | trainings done / requested | certifications done / requested | "
              "training s | certification s |", "|---|---|---|---|---|---|"]
    for r in sw:
        lines.append(f"| {r['spec']} | {r['rows']} ({r['failed']}) | {r['trainings_done']} / {r['trainings_requested']} | "
                     f"{r['certifications_done']} / {r['certifications_requested']} | {r['train_seconds']:.1f} | "
                     f"{r['certify_seconds']:.1f} |")
    lines += ["", REPRO_END, ""]
    return "\n".join(lines)


def bench_cnn_round(ks: tuple[int, ...] = (100, 1000), n_B: int = 10, rep: int = 3, lr: float = 0.01) -> dict:
    """One local SGD step of the ``cnn`` model (LeNet, 28x28 inputs) for K clients x n_B images:
    torch.func's vmap(grad) over the nn.Module (ModuleModel) against CNNModel's grouped convolution.
    The two are timed alternately (best of ``rep``) so that load from other processes hits both alike."""
    from crfl.model import ModuleModel, build_model

    fast = build_model("cnn", 784, 10)
    slow = ModuleModel(fast.net, 784, 10, name="cnn-vmap")
    out: dict = {"model": "cnn", "num_params": fast.num_params, "n_B": n_B, "threads": torch.get_num_threads(), "K": {}}
    g = torch.Generator().manual_seed(0)
    for K in ks:
        P = torch.stack([fast.init(g) for _ in range(K)])
        X = torch.rand(K, n_B, 784, generator=g)
        Y = torch.randint(0, 10, (K, n_B), generator=g)
        W = torch.full((K, n_B), 1.0 / n_B)
        times: dict[str, list[float]] = {"vmap": [], "grouped": []}
        for i in range(rep + 1):
            for name, m in (("vmap", slow), ("grouped", fast)):
                t0 = time.perf_counter()
                P2 = P - lr * m.loss_grad(P, X, Y, W)
                if i > 0:  # the first pass warms up
                    times[name].append(time.perf_counter() - t0)
        del P2
        row = {name: {"seconds": min(ts), "images_per_second": K * n_B / min(ts)} for name, ts in times.items()}
        row["speedup"] = row["vmap"]["seconds"] / row["grouped"]["seconds"]
        out["K"][K] = row
    return out


def bench_cnn_epoch(num_clients: int = 1000, per_client: int = 60, n_B: int = 10, rounds: int = 2) -> dict:
    """One full local epoch (every client's tau = per_client / n_B steps, all clients batched) of the ``cnn``
    model on Fashion-MNIST-sized data (or synthetic data of its shape), through crfl.local.local_round."""
    from crfl.local import local_round

    ds, name = fashion_or_synthetic()
    cfg = resolve("mnist", None, {"data.name": "mnist-5k", "model.name": "cnn", "data.partition": "iid",
                                  "data.num_clients": num_clients, "clients.batch_size": n_B,
                                  "clients.local_epochs": 1, "clients.local_iters": None, "attack.num_attackers": 0})
    keep = num_clients * per_client
    ds = Dataset(name=ds.name, x_train=ds.x_train[:keep], y_train=ds.y_train[:keep], x_test=ds.x_test[:100],
                 y_test=ds.y_test[:100], num_classes=ds.num_classes, input_scale=ds.input_scale, image_shape=ds.image_shape,
                 class_names=ds.class_names, source=ds.source)
    setup = prepare(cfg, ds)
    params = setup.model.init(torch.Generator().manual_seed(0))
    times = []
    for t in range(1, rounds + 1):
        t0 = time.perf_counter()
        loc = local_round(setup, params, t)
        times.append(time.perf_counter() - t0)
    return {"data": name, "num_clients": setup.data.num_clients, "tau": int(setup.tau.max()), "n_B": n_B,
            "images_per_round": int(setup.tau.sum()) * n_B, "seconds_per_round": min(times), "all_seconds": times,
            "updates_finite": bool(torch.isfinite(loc.updates).all()), "peak_rss_gib": peak_rss_gib()}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def render(R: dict) -> str:
    m, tr, ce, em, mx = R["machine"], R["train"], R["certify"], R["emnist"], R["mixture"]
    mm, bw = R["matmul_gflops"], R["bandwidth_gbs"]
    ok = lambda c: "met" if c else "**missed**"  # noqa: E731
    lines = [
        "# Benchmarks",
        "",
        f"Measured {R['date']} on {m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads), "
        f"{m['memory_gib']} GiB, Python {m['python']}, torch {m['torch']}, crfl {m['crfl']}.",
        "",
        "Command: `scripts/dev bench --write-docs` (= `python -m benchmarks --write-docs`; without it the page goes to "
        "the untracked `out/benchmarks.md`), one process; this page is its output.",
        f"Load average when it started: {m.get('load_average')} (on a shared machine the ratios to the ceilings, measured "
        "in the same process, are the figures to compare).",
        "",
        "## Ceilings of this machine (measured)",
        "",
        "| ceiling | value |",
        "|---|---|",
        f"| float32 matrix multiply (2048 x 2048, torch.mm) | {mm:.0f} GFLOP/s |",
        f"| float64 matrix multiply (2048 x 2048, torch.mm): the ceiling of work in float64 (the presets' training and "
        f"Monte Carlo counts) | {R['matmul64_gflops']:.0f} GFLOP/s |",
        f"| memory bandwidth (512 MiB copy, read + write) | {bw:.1f} GB/s |",
        "",
        *render_training(tr, R["train_data"]),
        render_certification(ce, R["date"], m),
        "",
        f"## Mixture certification: K = {mx['K']} continuations (paper's MNIST setting, {R['train_data']})",
        "",
        f"`crfl certify RUN --reading mixture --training-samples {mx['K']}`: {mx['K']} independent continuations of rounds "
        f"t_adv+1..T ({mx['rounds']} rounds, 20 clients x 30 local steps each), then per-run class bounds on 2 x "
        f"{mx['points']:,} points and the Chernoff bounds over the runs.",
        "",
        "| quantity | value |",
        "|---|---|",
        f"| the {mx['K']} continuations alone | {mx['continuation_seconds']:.1f} s, {mx['continuation_gflop']:.0f} GFLOP, "
        f"{mx['continuation_gflops']:.0f} GFLOP/s = {100 * mx['continuation_gflops'] / R['matmul64_gflops']:.0f}% of the "
        f"float64 matmul rate, the dtype the preset trains in (target >= 50%: "
        f"{ok(mx['continuation_gflops'] >= 0.5 * R['matmul64_gflops'])}) |",
        f"| whole mixture certification (continuations + bounds + files) | {mx['certify_seconds']:.1f} s "
        f"(target <= 120 s: {ok(mx['certify_seconds'] <= 120)}) |",
        f"| smoothed (mixture) accuracy, abstention, largest radius | {mx['smoothed_accuracy']:.3f}, {mx['abstain_rate']:.3f}, "
        f"{mx['max_radius']:.3g} |",
        "",
        "## EMNIST scale (synthetic data of EMNIST's shape)",
        "",
        "N = 50, n_B = 200, tau = 70, 47 classes, uint8 images.",
        "",
        "| quantity | value |",
        "|---|---|",
        f"| training images | {em['train_images']:,} |",
        f"| seconds per round | {em['seconds_per_round']:.2f} s (target <= 3 s: {ok(em['seconds_per_round'] <= 3)}) |",
        f"| peak memory of the run | {em['peak_rss_gib']:.2f} GiB (target <= 4 GiB: {ok(em['peak_rss_gib'] <= 4)}) |",
        "",
    ]
    return "\n".join(lines) + NOTES


NOTES = """
## The mixture certificate's time

The K continuations are the work the mixture reading needs: every continuation trains rounds
t_adv+1..T of all 20 clients, 4 n_B d C K FLOP per local step, 16.9 TFLOP for K = 100. Each step is
two batched products per client, X (100 x 784) @ W^T (784 x 1000) for the logits of all K models and
G^T X for their gradients, the SGD update fused into the second (`LinearModel.sgd_step_shared_`).
Profiled quiet: the two products run at 157 and 185 GFLOP/s, i.e. at the square-matmul rate, and take
84% of a round (1.3 s); softmax and bookkeeping the rest. The time is therefore bound by the work: at
this machine's measured float64 rate (about 157 GFLOP/s; the preset trains in float64 since issue 17)
the 16.9 TFLOP take about 108 s even at 100% efficiency, so the whole certification cannot fit in 120 s here; the per-run class bounds (2 x 10,000 points x 100 runs,
quadrature only near decision boundaries) add ~20 s. On a machine with the 380 GFLOP/s that earlier
sessions measured, the same work is ~45 s at the matmul rate.

## The training round against its compute bound

The paper's MNIST round is compute-bound on paper (1.9 GFLOP against 85 MB of unavoidable traffic),
but its arithmetic comes as 600 small products, two per local step of 20 clients: (100 x 784) x
(784 x 10) for the logits and its transpose for the gradient, in float64 (preset `mnist`), so the
bound is the round's FLOP at the float64 matmul rate measured in the same run. A 784 x 10 weight
gives each product an output only 10 columns wide: BLAS runs such products well below the
square-matmul rate, and the torch path (`crfl.local.linear_local_updates_torch`: each step's rows
converted into one float buffer, the logits `baddbmm`, the update fused into a second `baddbmm`)
streams the 12.5 MB float64 batch of all 20 clients three times per step, out of cache.

The compiled local SGD (`crfl/kernels/linear_sgd.cpp`, issue 20) trains one client's tau steps in
one call, the 20 clients split over the torch threads (`crfl.kernels.parallel_for`). Per step it
gathers the batch's 100 rows as stored, uint8 pixels, into a 78 KB buffer; both products read it and
zero-extend and convert each vector of 8 pixels to float64 in registers as they load it (two
instructions, exact), so no float copy of the batch (627 KB) is written and read back. The logits
use 2 rows x 10 classes of vector partial sums in registers (class-major W, vectors along the
pixels, the pixels in two chunks so that a chunk of the weights stays in L1); the softmax's 1000
exponentials are computed 8 at a time by the kernel's own vector `exp` (proved within 2.7 u of e^x,
inside docs/theory.md (g) step 7's EXP_ULPS = 4 u; the C library's `exp` where a result would
underflow); the update W[c, i-block] += alpha sum_j G[j, c] X[j, i-block] uses 10 classes x 16
pixels of accumulators per block. The next step's rows (scattered over the 47 MB data set) are
prefetched into L2 one row per block of the logits: issued all at once, their 1300 cache lines
waited on the core's line fill buffers (9% of a step). The operations are the torch path's
(theory (g) step 7 covers both). Where a step goes now (rdtsc, single-threaded, 20 clients, best of
15 runs, machine shared): the logits 49% (with the prefetches; about 56 GFLOP/s), the update 40%
(about 69 GFLOP/s), the gather 6%, the softmax 3%, the bias 1%. Both products are bound by the
conversions: every vector of pixels costs two instructions on the same two ports as its ten
multiply-adds, so neither can pass 83% of the multiply-add rate. A/B against the previous kernel
(interleaved in one process, the same synthetic 60,000-image data set, best of 15; the other two
engineers' jobs ran at the same time, load average 2-3 on the 2 cores): 0.71x the time
single-threaded, 0.71-0.74x with two threads, 0.81x in float32; step by step: the conversion in
registers 0.81x, the prefetches spread 0.975x, the vector `exp` 0.92x. Tried and not kept (each A/B
interleaved): reading the rows where they lie in the data set instead of gathering them (no faster);
the logits writing a float64 copy of the batch for the update (1.06x the time); the weights for the
logits interleaved by pixel vector, one stream instead of ten (1.015x); one chunk of 784 pixels or
four of 196 instead of two of 392 (1.09x, 1.04x); the logits' chunks taken per group of 8-32 rows
(1.01-1.08x); the chunks' partial sums kept as scalars instead of vectors (1.01x); one call per
chunk for all row pairs instead of one per pair (equal); no prefetching (equal single-threaded, 1.08x
with two threads); the threads taking the clients one at a time instead of a slice each (no faster). glibc's libmvec `exp` was not used: its
documented bound, 4 ulps, is up to 8 u, outside (A3). The torch path remains the reference
(`CRFL_KERNELS=0`, or no C++ compiler): it and the generic local step are in the table for comparison.
On the shared machine the torch path's ~12 parallel regions per step make it erratic when another
process holds a core (0.05 to 1.5 s per round in alternating runs of one session), the kernel's one
parallel region per round much less so (0.03 to 0.10 s); compare the two only in quiet runs.

The rest of the round. Before the remaining steps of issue 20, a round of this setting spent, besides
the kernel (single-threaded, best of 40, machine shared: kernel 51 ms of a 55.5 ms round): 1.7 ms on
the batches (20 epoch permutations, each from its client's own generator: numpy's shuffle of 3000
positions is 30 us, seeding the generator 9 us, the rest Python), 1.4 ms on the aggregation's input
checks (an entry-by-entry `isfinite` over the 20 x 7850 updates) and 0.33 ms on the clip and the
server noise (0.18 ms of it torch's `randn` of 7850 float64 numbers, which must stay the same draws).
Now the batches are cut from each epoch's permutation in one reshape (1.4 ms; the same generator
calls), the updates are checked finite by one sum per row (a NaN or an infinity makes the sum
non-finite; only a non-finite sum is checked entry by entry), and the aggregator's options are
inspected only when there are options. In the kernel, the logits take the pixels in equal chunks
(784 float64 as 2 x 392 instead of 256 + 256 + 256 + 16, whose last chunk paid a block's set-up
for two vectors of work) and the update writes the next step's scaled weights W * inv with the block
it updates (no separate pass over W per step). Every result is bit-identical: the same batches, the
same noise, the same floats (the kernel checked against its previous build on 768 shapes and dtypes;
40 rounds of the `mnist` preset, the attack round included, give the same model bit for bit). A/B
in one process, alternating round by round, single-threaded (shared machine): 0.945x the time, best
and median of 40 rounds alike (55.2 -> 52.2 ms, 2.27x -> 2.14x the one-core float64 bound; with two
threads the machine's load hid the difference). Where a step of the
kernel goes (rdtsc, single-threaded, before these changes): gathering and converting the batch 21%,
issuing the prefetches of the next step's rows 9% (1300 cache lines from memory, bounded by the
core's fill buffers: without them a step takes 1.5x as long), logits 31%, softmax 10% (the 1000
libm `exp`; now in vectors, above), update 27%, scaling the weights 2%. Tried and not kept:
prefetching every second or fourth line of a row (3-5% slower), the data set in 2 MiB pages (7%
slower here). The table's "where a round goes" row measures these parts in the same run. Outside the
round, the CLI evaluates on `run.eval_points` test points after every round: one float64 product
over 24 MB of inputs, about 3 ms single-threaded (a tenth of a round), and much more when another
process holds a core; a different product (order) could move an accuracy, so it is left as it is.

## How the numbers are counted

- Client FLOP per round: every local step of every client costs 4 n_B d C for the forward product
  X W^T and the gradient G^T X, plus O(n_B C) for softmax and bias. Minimal traffic: every sample
  read once per step in its storage type (uint8 images) plus the parameters read and written.
- Monte Carlo work: the noisy logits X E^T of M noise draws over all points (2 n d C M FLOP); the
  noise-free part X W^T is computed once.
- Authors' figures: measured for the issue on this 2-core machine (6.3 s per round; 1.64 s per noisy
  model over 1632 points; ~38 minutes for the MNIST experiment end to end).
"""


if __name__ == "__main__":
    main()
