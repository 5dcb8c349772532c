"""Sweeps: one YAML spec, a grid of runs, content-addressed, resumable, parallel (Section 6).

A spec names a base (preset + overrides), a grid of training overrides and,
optionally, a grid of certification settings::

    name: fig5-attackers
    title: "Fig. 5: number of attackers R"
    finding: "The stronger the attack (larger R), the smaller the certified radius."
    base: {preset: mnist, dataset: fashion-mnist, set: {server.rounds: 100}}
    grid: {attack.num_attackers: [1, 2, 3, 4]}
    certify: {set: {certify.method: exact}, grid: {certify.M: [100, 1000]}}
    radii: [0.0, 0.05, 0.1]

Every training run lives in ``OUT/runs/<config hash>/`` (:func:`crfl.rundir.config_hash` of
the grid point's config: its training part, :func:`crfl.config.training_part`) and every
certification of it in ``cert-<hash of the certify settings>/`` inside: a
finished run is never recomputed, an interrupted one resumes from its
checkpoint, and certification settings that differ only in M or alpha share one
training run (and several sweeps can share one store of runs, ``runs_dir``). Runs go in parallel over processes; a failing run writes
``error.txt`` and a ``failed`` row, and the others go on. ``results.csv`` has one
row per (training run, certification setting).

A spec with ``kind: numeric`` evaluates Corollary 1 on a grid without training
(Fig. 9b: RAD against rho/sigma and T for fixed p_A, p_B).
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import functools
import hashlib
import itertools
import json
import logging
import multiprocessing as mp
import os
import signal
import threading
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from crfl import plugins, rundir
from crfl import progress as progress_mod
from crfl.config import from_dict, read_yaml_mapping, resolve
from crfl.io import atomic_write_text, load_yaml, write_csv, write_json
from crfl.validation import ConfigError, check_real, did_you_mean

DONE = "DONE"
log = logging.getLogger("crfl.sweep")


@dataclass(frozen=True)
class Spec:
    name: str
    title: str
    finding: str
    preset: str | None
    base_set: dict[str, Any]
    grid: dict[str, list[Any]]
    cert_set: dict[str, Any]
    cert_grid: dict[str, list[Any]]
    radii: list[float]
    kind: str = "train"
    malicious: list[int] = field(default_factory=lambda: [0])  # m of the client-level curves (ensemble runs)
    numeric: dict[str, Any] = field(default_factory=dict)
    label: str | None = None
    raw: dict[str, Any] = field(default_factory=dict)


def spec_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("crfl.experiments").iterdir() if p.name.endswith(".yaml"))


SPEC_KEYS = {"name", "title", "finding", "base", "grid", "certify", "radii", "kind", "numeric", "label", "notes", "malicious"}
NUMERIC_KEYS = {"p_a", "p_b", "sigma", "t_adv", "p", "gamma", "tau", "eta", "poison_ratio", "rho_t_adv",
                "rho_over_sigma", "rounds"}


def load_spec(path_or_name: str | Path) -> Spec:
    """Read a spec file, or a built-in one by name (``crfl sweep fig5-attackers``), validated like a config."""
    p = Path(path_or_name)
    if p.is_file():
        raw = read_yaml_mapping(p, "SPEC", "spec keys")
        where = f"the sweep spec {str(p)!r}"
    elif str(path_or_name) in spec_names():
        raw = load_yaml(resources.files("crfl.experiments").joinpath(f"{path_or_name}.yaml").read_text()) or {}
        where = f"the built-in sweep spec {str(path_or_name)!r}"
    else:
        raise ConfigError(
            f"The 'SPEC' parameter must be a YAML file or one of {', '.join(spec_names())}. Got {str(path_or_name)!r} instead."
            + did_you_mean(str(path_or_name), spec_names())
        )
    unknown = sorted(set(raw) - SPEC_KEYS)
    if unknown:
        raise ConfigError(f"Unknown key(s) {unknown} in {where}; allowed: {', '.join(sorted(SPEC_KEYS))}.")

    def field_(key: str, allowed: str, value: Any) -> ConfigError:
        return ConfigError(f"The '{key}' parameter of {where} must be {allowed}. Got {value!r} instead.")

    def mapping(key: str, value: Any, keys: set[str] | None = None) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise field_(key, "a mapping", value)
        if keys is not None and set(value) - keys:
            raise field_(key, f"a mapping with keys among {', '.join(sorted(keys))}", sorted(set(value) - keys))
        return value

    def grid_of(key: str, value: Any) -> dict[str, list[Any]]:
        out = {}
        for k, v in mapping(key, value).items():
            if not isinstance(v, list) or not v:
                raise field_(f"{key}.{k}", "a non-empty list of values", v)
            out[str(k)] = list(v)
        return out

    def real(key: str, x: Any) -> float:
        try:
            return check_real(key, x, low=0.0)
        except ConfigError:
            raise field_(key, "a float in [0, inf)", x) from None

    kind = raw.get("kind") or "train"
    if kind not in ("train", "numeric"):
        raise field_("kind", "one of 'train', 'numeric'", kind)
    base = mapping("base", raw.get("base"), {"preset", "dataset", "set"})
    set_ = dict(mapping("base.set", base.get("set")))
    if base.get("dataset"):
        set_["data.name"] = base["dataset"]
    if base.get("preset") is not None and not isinstance(base["preset"], str):
        raise field_("base.preset", "a preset name", base["preset"])
    cert = mapping("certify", raw.get("certify"), {"set", "grid"})
    radii_raw = raw.get("radii") or [0.0]
    if not isinstance(radii_raw, list):
        raise field_("radii", "a list of radii in [0, inf)", radii_raw)
    radii = [real(f"radii[{i}]", r) for i, r in enumerate(radii_raw)]
    mal_raw = raw.get("malicious") or [0]
    if not isinstance(mal_raw, list) or not all(isinstance(m, int) and not isinstance(m, bool) and m >= 0 for m in mal_raw):
        raise field_("malicious", "a list of integers m >= 0 (numbers of malicious clients)", mal_raw)
    numeric = mapping("numeric", raw.get("numeric"), NUMERIC_KEYS)
    for k, v in numeric.items():
        for x in v if isinstance(v, list) else [v]:
            real(f"numeric.{k}", x)
    for k in ("name", "title", "finding", "label"):
        if raw.get(k) is not None and not isinstance(raw[k], (str, int, float)):
            raise field_(k, "a string", raw[k])
    return Spec(
        name=str(raw.get("name") or p.stem),
        title=str(raw.get("title") or raw.get("name") or p.stem),
        finding=str(raw.get("finding") or ""),
        preset=base.get("preset"),
        base_set=set_,
        grid=grid_of("grid", raw.get("grid")),
        cert_set=dict(mapping("certify.set", cert.get("set"))),
        cert_grid=grid_of("certify.grid", cert.get("grid")),
        radii=radii,
        malicious=[int(m) for m in mal_raw],
        kind=kind,
        numeric=dict(numeric),
        label=raw.get("label"),
        raw=raw,
    )


def _product(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    keys = list(grid)
    return [dict(zip(keys, vals)) for vals in itertools.product(*(grid[k] for k in keys))] or [{}]


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class Job:
    train_hash: str
    config: dict[str, Any]
    point: dict[str, Any]
    certs: list[tuple[str, dict[str, Any], dict[str, Any]]]  # (cert hash, overrides, full grid point)


def expand(spec: Spec, extra: dict[str, Any] | None = None) -> list[Job]:
    """The spec's runs, in a fixed order; ``extra`` overrides apply to every run (e.g. --dataset).

    Grid points that resolve to the same training configuration (a grid over a certify key, or
    an override equal to the default) become one job with several certifications, so no two
    processes ever write the same run directory.
    """
    jobs: dict[str, Job] = {}
    for point in _product(spec.grid):
        over = {**spec.base_set, **(extra or {}), **point}
        cfg = resolve(spec.preset, None, over)
        h = rundir.config_hash(cfg.to_dict())  # of crfl.config.training_part, as the run directory's check
        job = jobs.setdefault(h, Job(h, cfg.to_dict(), point, []))
        for cp in _product(spec.cert_grid):
            full = cfg.replace(**{**spec.cert_set, **cp})  # validates the certify overrides
            cz = full.to_dict()["certify"]
            co = {f"certify.{k}": v for k, v in cz.items()}  # the whole block: a shared run's config may differ
            ch = _hash(cz)[:10]
            if all(c[0] != ch for c in job.certs):
                job.certs.append((ch, co, {**point, **cp}))
    return list(jobs.values())


def _pending(job: Job, run_root: Path) -> bool:
    """Whether a job still has work: its training run or one of its certifications is not done."""
    run = run_root / job.train_hash
    return not (run / DONE).is_file() or any(not (run / f"cert-{ch}" / DONE).is_file() for ch, _, _ in job.certs)


def check_data(spec: Spec, job_list: list[Job], run_root: Path) -> None:
    """Load every dataset the sweep's unfinished grid points need, once each, before any run starts.

    A dataset that cannot be loaded (missing files, no ``--data-dir``, a corrupt file) raises one
    :class:`~crfl.data.DataError` naming the spec, the dataset, how many grid points use it, the
    loader's reason and what to pass instead; finished runs need no data.
    """
    from crfl.data import DataError

    needed: dict[str, list[Job]] = {}
    for j in job_list:
        if _pending(j, run_root):
            d = j.config["data"]
            key = json.dumps([d.get("name"), d.get("data_dir"), d.get("options") or {}], sort_keys=True, default=str)
            needed.setdefault(key, []).append(j)
    for key, jobs in needed.items():
        name, data_dir, _ = json.loads(key)
        try:
            _worker_dataset(_data_key(jobs[0].config))  # with --jobs 1 the runs reuse it
        except (DataError, OSError) as e:
            where = f" in --data-dir {data_dir!r}" if data_dir else " (no --data-dir given)"
            raise DataError(
                f"The sweep {spec.name!r} cannot start: {len(jobs)} of its {len(job_list)} run(s) use the dataset "
                f"{name!r}, which cannot be loaded{where}: {rundir._first_line(e)}. Pass --data-dir DIR with its files, "
                "or run the grid on another dataset with --dataset NAME (e.g. fashion-mnist, or the built-in mnist-5k). "
                "No run was started."
            ) from None


def _data_key(config: dict[str, Any]) -> str:
    """What :func:`crfl.setup.load_data` reads from a config: the data section and the seed (mnist-5k's split)."""
    return json.dumps({"data": config.get("data"), "seed": config.get("seed")}, sort_keys=True, default=str)


@functools.lru_cache(maxsize=2)
def _worker_dataset(key: str) -> Any:
    """The dataset of a :func:`_data_key`, loaded once per worker process: the jobs of a sweep (and the
    training and certifications of one job) share it instead of loading and decoding it again each."""
    from crfl.setup import load_data

    return load_data(from_dict(json.loads(key)))


def run_job(job: Job, run_dir: str, threads: int) -> list[dict[str, Any]]:
    """Train (or resume, or reuse) one run and certify it under each setting. Never raises."""
    import torch

    torch.set_num_threads(max(1, threads))
    from crfl.certify import certify_run
    from crfl.train import train

    run = Path(run_dir)
    rows = []
    t0 = time.perf_counter()
    dataset = lambda: _worker_dataset(_data_key(job.config))  # noqa: E731  (loaded when first needed)

    def failed(e: Exception, ch: str, cp: dict[str, Any]) -> dict[str, Any]:
        run.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run / "error.txt", "".join(traceback.format_exception(e)))
        return {"status": "failed", "train_hash": job.train_hash, "cert_hash": ch, "point": job.point,
                "cert_point": cp, "error": f"{type(e).__name__}: {e}", "summary": {}}

    try:
        if not (run / DONE).is_file():
            if (run / "checkpoint.pt").is_file() or (run / "config.yaml").is_file():
                train(None, run, resume=True, dataset=dataset())  # type: ignore[arg-type]
            else:
                train(from_dict(job.config), run, dataset=dataset())
            atomic_write_text(run / DONE, "trained\n")
        rundir.RunDir(run).verify_files()  # a reused run: every recorded file as written (crfl.rundir integrity record)
        train_seconds = rundir.RunDir(run).read_summary(required=True)["training"]["seconds"]
    except Exception as e:  # noqa: BLE001 - a failing run must not stop the sweep
        rows = [failed(e, ch, cp) for ch, _, cp in job.certs]
    else:
        for ch, co, cp in job.certs:  # a failing certification setting fails its own row only
            cdir = run / f"cert-{ch}"
            try:
                if not (cdir / DONE).is_file():
                    certify_run(run, overrides=co, out_dir=cdir, dataset=dataset())
                    atomic_write_text(cdir / DONE, "certified\n")
                rundir.RunDir(cdir).verify_files()
                summary = rundir.RunDir(cdir).read_summary(required=True)
                rows.append({"status": "ok", "train_hash": job.train_hash, "cert_hash": ch, "point": job.point,
                             "cert_point": cp, "summary": summary, "train_seconds": train_seconds})
            except Exception as e:  # noqa: BLE001
                rows.append(failed(e, ch, cp))
    for r in rows:
        r["wall_seconds"] = time.perf_counter() - t0
    return rows


def result_row(spec: Spec, row: dict[str, Any], run_root: Path) -> dict[str, Any]:
    from crfl.metrics import certification_status, certified_accuracy, certified_rate

    out: dict[str, Any] = {**row["cert_point"], "status": row["status"],
                           "run": f"runs/{row['train_hash']}/cert-{row['cert_hash']}"}
    s = row.get("summary") or {}
    tr = s.get("training", {})
    out["final_clean_acc"] = tr.get("final_clean_acc")
    out["final_backdoor_acc"] = tr.get("final_backdoor_acc")
    res = s.get("results") or {}
    cdir = run_root / row["train_hash"] / f"cert-{row['cert_hash']}"
    if (s.get("certificate") or {}).get("reading") == "client-level":
        return _client_level_row(spec, row, out, s, cdir)
    # certified means certified: every radius and cert_* number of this row is a certificate only where
    # radius_certified is true (crfl.metrics.certification_status); otherwise the reason says what fails
    out["reading"] = (s.get("certificate") or {}).get("reading")
    certified, why = certification_status(s) if s else (None, "")
    out["radius_certified"] = certified
    out["not_certified_because"] = why or None
    for k in ("clean", "backdoor"):
        r = res.get(k, {})
        out[f"{k}_base_acc"] = r.get("base_accuracy")
        out[f"{k}_smoothed_acc"] = r.get("smoothed_accuracy")
        out[f"{k}_abstain"] = r.get("abstain_rate")
        out[f"{k}_max_radius"] = r.get("max_radius")
        f = cdir / f"certificates_{k}.csv"
        if row["status"] == "ok" and f.is_file():
            c = rundir.RunDir(cdir).read_certificates(k)
            acc = certified_accuracy(c.radius, c.prediction, c.label, spec.radii)
            rate = certified_rate(c.radius, c.prediction, spec.radii)
            for r_, a_, c_ in zip(spec.radii, acc, rate):
                out[f"{k}_cert_acc@{r_:g}"] = float(a_)
                out[f"{k}_cert_rate@{r_:g}"] = float(c_)
    out["train_seconds"] = row.get("train_seconds")
    out["wall_seconds"] = row.get("wall_seconds")
    out["error"] = row.get("error")
    return out


def _client_level_row(spec: Spec, row: dict[str, Any], out: dict[str, Any], s: dict[str, Any], cdir: Path) -> dict[str, Any]:
    """An ensemble run's row: the ensemble's accuracy and certified accuracy at each m of ``spec.malicious``."""
    cert = s.get("certificate") or {}
    out["certificate"] = "client-level"
    out["client_level_certified"] = cert.get("client_level_certified")
    out["radius_certified"] = False
    for k in ("clean", "backdoor"):
        r = (s.get("client_level") or {}).get(k) or {}
        out[f"{k}_ensemble_acc"] = r.get("ensemble_accuracy")
        out[f"{k}_abstain"] = r.get("abstain_rate")
        out[f"{k}_median_m_star"] = r.get("median_m_star")
        f = cdir / f"client_level_{k}.csv"
        if row["status"] == "ok" and f.is_file():
            rows = rundir.RunDir(cdir).read_rows(f.name, ["m_star", "correct"])  # checked against the integrity record
            m_star = [int(x["m_star"]) for x in rows]
            ok = [x["correct"] == "1" for x in rows]
            for m in spec.malicious:
                out[f"{k}_cert_acc@m={m}"] = sum(o and ms >= m for o, ms in zip(ok, m_star)) / max(1, len(rows))
    out["train_seconds"] = row.get("train_seconds")
    out["wall_seconds"] = row.get("wall_seconds")
    out["error"] = row.get("error")
    return out


def _claim_sweep(out: Path) -> rundir.Claim:
    """Claim the sweep directory: new, empty, or a sweep's (sweep.json); one sweep at a time."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"The '--out' parameter must name a directory. Got {str(out)!r} instead (a file).")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise rundir.RunDirError(f"Cannot create the sweep directory {str(out)!r}: {e.strerror}; choose a writable --out.") from None
    claim = rundir.Claim.acquire(out, "sweep")
    names = [n for n in os.listdir(out) if not rundir._is_ours(n)]
    if names and "sweep.json" not in names:
        claim.release()
        raise ConfigError(
            f"The '--out' parameter must name a new, empty or sweep directory. Got {str(out)!r} instead "
            f"(it holds {', '.join(sorted(names)[:5])}, and no sweep.json); crfl never writes into it."
        )
    rundir.sweep_stale(out)
    return claim


def _link_runs(out: Path, store: Path) -> None:
    """``OUT/runs`` as a (relative) link to the shared run store; refused when OUT/runs is other runs."""
    store.mkdir(parents=True, exist_ok=True)
    link = out / "runs"
    if link.is_symlink() and link.resolve() == store.resolve():
        return
    if link.exists() or link.is_symlink():
        raise ConfigError(
            f"The '--runs' parameter must be the run store this sweep already uses. Got {str(store)!r} instead "
            f"({str(link)!r} holds {'a link to ' + str(link.resolve()) if link.is_symlink() else 'its own runs'})."
        )
    os.symlink(os.path.relpath(store.resolve(), out.resolve()), link, target_is_directory=True)


def _write_results(out: Path, spec: Spec, job_list: list[Job], results: dict[int, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    root = out / "runs"
    rows = [result_row(spec, r, root) for i in range(len(job_list)) if i in results for r in results[i]]
    header: list[str] = []
    for r in rows:
        header += [k for k in r if k not in header]
    write_csv(out / "results.csv", header or ["status"], [[r.get(k) for k in header] for r in rows])
    return rows


def _worker_init(parent: int, plugin_specs: tuple[str, ...] = ()) -> None:
    """A sweep worker dies with its parent (pid ``parent``): PR_SET_PDEATHSIG where Linux has it, a
    watchdog thread always, and at once if the parent died while this worker was starting. It
    imports the parent's plugins (``--plugin``, :func:`crfl.plugins.specs`) and the installed ones
    (entry points) before its first job, so the user's parts are registered as in the parent."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        pass
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops the workers
    if os.getppid() != parent:
        os._exit(1)

    def watch() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, daemon=True).start()
    for spec in plugin_specs:
        plugins.load(spec)
    plugins.load_entry_points()


def _stop_workers(ex: cf.ProcessPoolExecutor) -> None:
    procs = list((getattr(ex, "_processes", None) or {}).values())
    ex.shutdown(wait=False, cancel_futures=True)
    for proc in procs:
        if proc.is_alive():
            proc.kill()
    for proc in procs:
        proc.join(timeout=5)


def sweep(
    spec_path: str | Path,
    out_dir: str | Path,
    *,
    jobs: int = 1,
    extra: dict[str, Any] | None = None,
    progress: bool = True,
    runs_dir: str | Path | None = None,
) -> list[dict[str, Any]]:
    """Run a sweep into ``out_dir``; return the results rows (also written to results.csv).

    ``runs_dir``: a store of training runs shared by several sweeps (``crfl sweep --runs DIR``):
    ``OUT/runs`` becomes a link to it, so a training configuration that two sweeps share (e.g.
    the paper's MNIST default point of Fig. 2, 5, 6 and 11) is trained once, and a certification
    setting they share is computed once. Sweeps sharing a store run one after another (a run
    being trained is claimed; a second sweep training it at the same time fails that job).

    The sweep directory is claimed for the whole sweep (a second sweep on it is refused); every
    training run is claimed by the job that trains it. Workers die with the parent; Ctrl-C stops
    them at once and writes results.csv for the jobs that finished, then re-raises.
    """
    spec = load_spec(spec_path)
    _worker_dataset.cache_clear()  # datasets are shared within one sweep only (its files may change between sweeps)
    jobs = int(jobs)
    if jobs < 1:
        raise ConfigError(f"The 'jobs' parameter must be an integer in [1, inf). Got {jobs!r} instead.")
    job_list = expand(spec, extra) if spec.kind == "train" else []
    out = Path(out_dir)
    check_data(spec, job_list, out / "runs")  # one clear error before any run starts, not one error.txt per run
    claim = _claim_sweep(out)
    try:
        if runs_dir is not None and spec.kind == "train":
            _link_runs(out, Path(runs_dir))
        if spec.kind == "numeric":
            rows = numeric_study(spec)
            write_csv(out / "results.csv", list(rows[0]), [list(r.values()) for r in rows])
            write_json(out / "sweep.json", {"spec": spec.raw, "kind": "numeric"})
            return rows
        return _run_jobs(spec, job_list, out, jobs, extra, progress)
    finally:
        claim.release()


def sweep_many(
    spec_paths: list[str | Path],
    out_dir: str | Path,
    *,
    jobs: int = 1,
    extra: dict[str, Any] | None = None,
    progress: bool = True,
    runs_dir: str | Path | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """Several sweeps as one: ``OUT/<spec name>/`` each, their runs in one store (``runs_dir``, default
    ``OUT/runs``), and their jobs in one pool, so that a training configuration or a (run, certification
    setting) pair that several specs share is computed once, and no core waits at the end of one sweep while
    the next could start. Jobs go longest first (rounds, twice with a twin). Each sweep directory is
    what :func:`sweep` writes (``sweep.json``, ``results.csv``); the rows by spec name are returned.
    Numeric specs (no training) run on their own.
    """
    jobs = int(jobs)
    if jobs < 1:
        raise ConfigError(f"The 'jobs' parameter must be an integer in [1, inf). Got {jobs!r} instead.")
    out = Path(out_dir)
    store = Path(runs_dir) if runs_dir is not None else out / "runs"
    specs = [load_spec(p) for p in spec_paths]
    names = [sp.name for sp in specs]
    if len(set(names)) != len(names):
        raise ConfigError(f"The 'spec' parameter must name each sweep once. Got {names} instead.")
    rows: dict[str, list[dict[str, Any]]] = {}
    for path, sp in zip(spec_paths, specs):
        if sp.kind != "train":
            rows[sp.name] = sweep(path, out / sp.name, jobs=jobs, extra=extra, progress=progress)
    trains = [sp for sp in specs if sp.kind == "train"]
    _worker_dataset.cache_clear()
    lists = {sp.name: expand(sp, extra) for sp in trains}
    merged: dict[str, Job] = {}  # one job per training configuration, with every certification any spec asks of it
    for sp in trains:
        check_data(sp, lists[sp.name], store)
        for j in lists[sp.name]:
            m = merged.setdefault(j.train_hash, Job(j.train_hash, j.config, j.point, []))
            m.certs += [c for c in j.certs if all(c[0] != have[0] for have in m.certs)]
    order = sorted(merged.values(), key=lambda j: -int(j.config["server"]["rounds"]) * (2 if j.config["certify"].get("twin") else 1))
    claims = [_claim_sweep(out / sp.name) for sp in trains]
    try:
        for sp in trains:
            _link_runs(out / sp.name, store)
            _write_sweep_json(out / sp.name, sp, lists[sp.name], extra)
        interrupted = None
        try:
            done = _execute(order, store, jobs, progress)
        except _Interrupted as e:
            done, interrupted = e.results, e
        by_cert = {(r["train_hash"], r["cert_hash"]): r for res in done.values() for r in res}
        with _sigint_deferred():
            for sp in trains:
                own = {}
                for i, j in enumerate(lists[sp.name]):
                    got = [by_cert.get((j.train_hash, ch)) for ch, _, _ in j.certs]
                    if all(g is not None for g in got):
                        own[i] = [{**g, "point": j.point, "cert_point": cp} for g, (_, _, cp) in zip(got, j.certs)]
                rows[sp.name] = _write_results(out / sp.name, sp, lists[sp.name], own)
        if interrupted is not None:
            raise KeyboardInterrupt
    finally:
        for c in claims:
            c.release()
    return rows


def _write_sweep_json(out: Path, spec: Spec, job_list: list[Job], extra: dict[str, Any] | None) -> None:
    write_json(out / "sweep.json", {
        "spec": spec.raw, "extra": extra or {}, "kind": "train",
        "jobs": [{"train_hash": j.train_hash, "point": j.point, "certs": [[h, cp] for h, _, cp in j.certs]} for j in job_list],
    })


def _run_jobs(
    spec: Spec, job_list: list[Job], out: Path, jobs: int, extra: dict[str, Any] | None, progress: bool
) -> list[dict[str, Any]]:
    root = out / "runs"
    _write_sweep_json(out, spec, job_list, extra)
    try:
        results = _execute(job_list, root, jobs, progress)
    except _Interrupted as e:
        with _sigint_deferred():
            _write_results(out, spec, job_list, e.results)
        raise KeyboardInterrupt from None
    with _sigint_deferred():  # a Ctrl-C arriving while the last results are written waits for the write
        rows = _write_results(out, spec, job_list, results)
    failed = [r for r in rows if r["status"] != "ok"]
    if failed and progress:
        print(f"{len(failed)} run(s) failed; see error.txt in: " + ", ".join(sorted({r['run'].split('/cert-')[0] for r in failed})))
    return rows


class _Interrupted(Exception):
    """Ctrl-C during :func:`_execute`, carrying the results of the jobs that finished."""

    def __init__(self, results: dict[int, list[dict[str, Any]]]) -> None:
        super().__init__("interrupted")
        self.results = results


def _execute(job_list: list[Job], root: Path, jobs: int, progress: bool) -> dict[int, list[dict[str, Any]]]:
    """Run the jobs (in ``jobs`` worker processes when > 1) into the run store ``root``; their rows by job index.
    A Ctrl-C stops the workers and raises :class:`_Interrupted` with the rows of the jobs that finished."""
    cores = os.cpu_count() or 1
    jobs = max(1, min(jobs, len(job_list)))
    threads = max(1, cores // jobs)
    results: dict[int, list[dict[str, Any]]] = {}
    watch = _watch(job_list, root)
    report = progress and watch.bar.mode != "tty"  # on a terminal the bar says which runs are done
    try:
        if jobs == 1:
            for i, j in enumerate(job_list):
                with progress_mod.showing(None):  # the sweep's bar shows the run's rounds
                    results[i] = run_job(j, str(root / j.train_hash), threads)
                watch.finished(i)
                _report(report, i, len(job_list), j, results[i])
        else:
            ex = cf.ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn"),
                                        initializer=_worker_init, initargs=(os.getpid(), tuple(plugins.specs())))
            try:
                futs = {ex.submit(run_job, j, str(root / j.train_hash), threads): i for i, j in enumerate(job_list)}
                for n, fut in enumerate(cf.as_completed(futs)):
                    i = futs[fut]
                    results[i] = fut.result()
                    watch.finished(i)
                    _report(report, n, len(job_list), job_list[i], results[i])
            except BaseException:
                _stop_workers(ex)
                raise
            ex.shutdown()
    except KeyboardInterrupt:
        watch.__exit__()
        raise _Interrupted(results) from None
    finally:
        watch.__exit__()
    return results


@contextlib.contextmanager
def _sigint_deferred() -> Iterator[None]:
    """Hold a Ctrl-C until the block (writing results.csv) is done, then raise it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: got.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if got:
        raise KeyboardInterrupt


def _watch(job_list: list[Job], root: Path) -> progress_mod.Watch:
    """The sweep's bar (:class:`crfl.progress.Watch`, started): rounds over all jobs, from each run's growing rounds.csv."""
    runs = [(str(root / j.train_hash / rundir.ROUNDS), int(j.config["server"]["rounds"])) for j in job_list]
    already = {i for i, j in enumerate(job_list) if (root / j.train_hash / DONE).is_file()}
    return progress_mod.Watch(runs, "sweep", already).__enter__()


def _report(progress: bool, n: int, total: int, job: Job, rows: list[dict[str, Any]]) -> None:
    if progress:
        status = ",".join(sorted({r["status"] for r in rows}))
        log.info("sweep: [%d/%d] %s %s (%.1fs)", n + 1, total, job.point or "(base)", status, rows[0].get("wall_seconds", 0))


def numeric_study(spec: Spec) -> list[dict[str, Any]]:
    """Corollary 1 on a grid of rho/sigma and T with fixed p_A, p_B (Fig. 9b); rows say ``radius_certified: False``."""
    from crfl import lipschitz, radius

    n = spec.numeric
    p_a, p_b = float(n.get("p_a", 0.7)), float(n.get("p_b", 0.1))
    sigma = float(n.get("sigma", 0.01))
    t_adv = int(n.get("t_adv", 10))
    p, gamma, tau = float(n.get("p", 0.05)), float(n.get("gamma", 10)), int(n.get("tau", 30))
    eta, q = float(n.get("eta", 0.001)), float(n.get("poison_ratio", 0.05))
    rho_adv = float(n.get("rho_t_adv", 3.0))
    L_Z = lipschitz.lz_paper(rho_adv)
    rows = []
    for ratio in n.get("rho_over_sigma", [1, 2, 3, 4, 5]):
        for T in n.get("rounds", [20, 50, 100, 200]):
            k = max(0, int(T) - t_adv)
            lc = radius.log_contraction([ratio * sigma] * k, [sigma] * k)
            rad = radius.certified_radius(
                [p_a], [p_b], sigma_t_adv=sigma, L_Z=L_Z, p=[p], gamma=[gamma], tau=[tau], eta=[eta],
                poison_ratio=[q], log_contraction=lc,
            )[0]
            # Corollary 1 as printed (the paper reading): a number for reproduction, never a certified radius
            rows.append({"rho_over_sigma": ratio, "T": int(T), "log_contraction": lc, "radius": float(rad),
                         "radius_certified": False})
    return rows
