"""The ``crfl`` command line: a thin layer over the library that writes self-describing run directories.

    crfl train   [--preset NAME] [--config FILE] [--dataset NAME] [--data-dir DIR] [--set k=v ...] --out DIR
    crfl train   --resume DIR
    crfl certify RUN_DIR [--method exact|monte-carlo] [--M N] [--alpha A] [--bound B] [--sigma-T S]
                         [--lipschitz paper|sound] [--coverage simultaneous|paper] [--num-test N] [--replay-seed S]
    crfl run     (train + certify; no arguments: the demo preset on the built-in data)
    crfl sweep   SPEC --out DIR [--jobs N] [--dataset NAME] [--set k=v ...]
    crfl plot    DIR
    crfl list    [datasets|aggregators|attacks|models|readings|specs|presets]

Every expected failure (a bad parameter, a corrupt or foreign file, an OS error, a full disk)
is one line ``crfl: error: ...`` naming the parameter or file, the problem and what to do,
with exit status 2; ``--debug`` shows the traceback instead. Ctrl-C exits with 130.

Discovery: ``crfl --version``, ``python -m crfl``, ``crfl COMMAND --help`` (a description and
examples), ``crfl list [datasets|aggregators|attacks|models|readings|specs|presets]`` (each name
with its registry's one-line description) and "Did you mean ...?" on mistyped commands, choice
values, ``--set`` keys, dataset/rule/attack/model, spec and preset names. ``--plugin MODULE``
(and entry points of the group ``crfl.plugins``) import the user's own parts first
(:mod:`crfl.plugins`). Diagnostics go through :mod:`logging` to stderr (``-v`` more, ``-q``
less), progress bars with an ETA to stderr on a terminal (``--progress`` elsewhere, off with
``-q``); results go to stdout, so ``crfl list specs | head`` ends quietly.
"""

from __future__ import annotations

import argparse
import difflib
import errno
import logging
import math
import os
import re
import sys
import typing
from pathlib import Path
from typing import Any

from crfl import progress
from crfl.config import CHOICES, CertifyConfig, preset_names, resolve
from crfl.data.base import DataError
from crfl.rundir import RunDirError
from crfl.validation import ConfigError, check_int

EXPECTED = (ConfigError, DataError, RunDirError)
log = logging.getLogger("crfl.cli")
RESUME_CONFLICTS = {"preset": "--preset", "config": "--config", "dataset": "--dataset", "data_dir": "--data-dir",
                    "overrides": "--set", "out": "--out", "twin": "--twin"}
INTERRUPTED = {
    "train": "every file written so far is complete. Resume with: crfl train --resume {dir}",
    "run": "every file written so far is complete. Resume with: crfl run --resume {dir}",
    "certify": "the run's previous results are unchanged. Rerun: crfl certify {dir}",
    "sweep": "results.csv lists the runs that finished. Rerun the same command to finish the sweep.",
    "plot": "no figure was half-written.",
    "list": "nothing was written.",
}


def _add_train_args(p: argparse.ArgumentParser, *, out_required: bool) -> None:
    p.add_argument("--preset", help=f"a preset: {', '.join(preset_names())}")
    p.add_argument("--config", help="a YAML config file (sections as in config.yaml)")
    p.add_argument("--dataset", help="dataset name (overrides data.name)")
    p.add_argument("--data-dir", help="directory with the dataset's files (overrides data.data_dir)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one parameter, e.g. --set attack.gamma=100 (repeatable)")
    p.add_argument("--out", required=out_required, help="the run directory to write")
    p.add_argument("--resume", metavar="DIR", help="continue an interrupted run in DIR")
    p.add_argument("--twin", action="store_true", help="also train the clean twin (model closeness, certificate check)")


#: One flag per ``certify.*`` parameter: ``--`` + the field name with ``-`` for ``_`` (``--sigma-T``).
#: The type, the choices and the default come from :class:`~crfl.config.CertifyConfig` and
#: :data:`crfl.config.CHOICES`; this table holds only what the user reads (help, metavar).
CERTIFY_FLAGS: dict[str, tuple[str, str | None]] = {
    "reading": ("what the certificate promises: coupled (this run vs its trigger-free twin, default), "
                "mixture (the law over training noise), paper (Corollary 1 as printed; not a certificate)", None),
    "training_samples": ("mixture reading with K independent continuations from the attack round "
                         "(implies --reading mixture)", "K"),
    "bound_form": ("how the probabilities become a distance budget: Neyman-Pearson (default) or the KL form", None),
    "input_norm_bound": ("a bound B >= ||x|| on every training input (default: the maximum over the training data)", "B"),
    "method": ("smoothing: exact (linear models) or Monte Carlo; margin: the linear base model itself (coupled)", None),
    "M": ("number of noisy models (Monte Carlo)", None),
    "alpha": ("failure probability of the confidence bounds", None),
    "bound": ("confidence bound", None),
    "coverage": ("how the (p_A, p_B) pair is covered", None),
    "selection": ("size of a separate selection sample for c_A (Monte Carlo; 0: none)", "N"),
    "sigma_T": ("smoothing noise sigma_T", None),
    "lipschitz": ("L_Z: sound for ||x|| <= B, or Lemma 1 as printed", None),
    "num_test": ("certify only the first N test points", "N"),
    "trigger_support": ("which triggers the certificate covers: anywhere (default), attack (the run's trigger's "
                        "pixels or features), or input indices '3,5,7'", "S"),
}
#: ``certify.*`` parameters without a certify flag, and where they are set instead.
CERTIFY_NOT_FLAGS = {
    "radii": "a list: --set certify.radii=[0.1,0.2] (crfl train/run) or config.yaml",
    "twin": "--twin of crfl train/run: it trains the twin, so it is a training flag",
}


#: Which certify flags a reading and a (resolved) method use: flag -> (test(reading, method), where it applies).
#: A flag given on the command line that the chosen reading and method do not use is an error (never ignored).
CERTIFY_FLAG_USE: dict[str, tuple[Any, str]] = {
    "M": (lambda r, m: m == "monte-carlo" and r != "mixture", "Monte Carlo smoothing (--method monte-carlo)"),
    "selection": (lambda r, m: m == "monte-carlo" and r != "mixture", "Monte Carlo smoothing (--method monte-carlo)"),
    "bound": (lambda r, m: m == "monte-carlo" and r != "mixture", "Monte Carlo smoothing (--method monte-carlo)"),
    "coverage": (lambda r, m: m == "monte-carlo" and r != "mixture", "Monte Carlo smoothing (--method monte-carlo)"),
    "alpha": (lambda r, m: m == "monte-carlo" or r == "mixture", "Monte Carlo smoothing or the mixture reading"),
    "training_samples": (lambda r, m: r == "mixture", "the mixture reading (--reading mixture)"),
    "bound_form": (lambda r, m: r != "paper" and m != "margin", "the coupled and mixture readings with smoothing"),
    "lipschitz": (lambda r, m: r == "paper", "the paper reading (--reading paper)"),
    "sigma_T": (lambda r, m: m != "margin", "smoothed certificates (every method but margin)"),
    "trigger_support": (lambda r, m: r != "paper", "the coupled and mixture readings"),
}


def _resolved_method(method: str, reading: str, linear: bool | None) -> str | None:
    """``certify.method`` as the reading resolves it (``auto``: exact for a linear model); None if unknown."""
    if method != "auto":
        return method
    return None if linear is None else ("exact" if linear else "monte-carlo")


def _refuse_unused_flags(args: argparse.Namespace, reading: str, method: str | None) -> None:
    """ConfigError for the first certify flag given that ``reading`` with ``method`` does not use."""
    for name, (used, where) in CERTIFY_FLAG_USE.items():
        v = getattr(args, name, None)
        if v is None or (method is None and name not in ("training_samples", "lipschitz")):
            continue
        if not used(reading, method):
            flag = "--" + name.replace("_", "-")
            shown = f"the {reading} reading" + (f" with the {method} method" if method else "")
            raise ConfigError(f"The '{flag}' parameter is not used by {shown}: it applies to {where}. "
                              f"Got {flag} {v} instead; drop it, or choose a reading and method that use it.")


def _check_certify_flags(args: argparse.Namespace, cfg: Any, linear: bool | None) -> None:
    """Before any work: flags the reading or method would ignore, and methods that do not apply to the model."""
    from crfl import ensemble

    if ensemble.is_ensemble(cfg):  # the client-level certificate (crfl.ensemble) uses only --num-test
        for name in CERTIFY_FLAGS:
            v = getattr(args, name, None)
            if v is not None and name != "num_test":
                flag = "--" + name.replace("_", "-")
                raise ConfigError(f"The '{flag}' parameter is not used by the client-level certificate of an ensemble run "
                                  f"(ensemble.kind = {cfg.ensemble.kind!r}), which takes only --num-test. Got {flag} {v} "
                                  "instead; drop it.")
        return
    cz = cfg.certify
    if linear is False and (cz.method in ("exact", "margin") or cz.reading == "mixture"):
        what = f"the {cz.reading} reading" if cz.reading == "mixture" else f"--method {cz.method}"
        raise ConfigError(f"The 'certify.method' parameter cannot certify the non-linear model {cfg.model.name!r}: {what} "
                          f"needs exact probabilities of a linear model. Got method {cz.method!r}, reading {cz.reading!r} "
                          "instead; use --method monte-carlo with the coupled or paper reading.")
    _refuse_unused_flags(args, cz.reading, _resolved_method(cz.method, cz.reading, linear))


def _model_is_linear(cfg: Any) -> bool | None:
    """Whether the configured model is linear (None if it cannot be built without the data)."""
    from crfl.model import build_model

    try:
        return bool(build_model(cfg.model.name, 784, 10).is_linear)
    except Exception:  # noqa: BLE001 - an option that needs the data: decided by the reading later
        return None


def _flag_type(name: str) -> type:
    """The argparse type of ``certify.<name>``: the non-None member of the field's annotation."""
    hint = typing.get_type_hints(CertifyConfig)[name]
    base = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    return base[0]


def _add_certify_args(p: argparse.ArgumentParser) -> None:
    for name, (help_, metavar) in CERTIFY_FLAGS.items():
        choices = CHOICES.get(f"certify.{name}")
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, type=_flag_type(name), choices=choices,
                       metavar=metavar, help=help_)


def _add_replay_arg(p: argparse.ArgumentParser) -> None:
    """--replay-seed of every command that certifies: not a certify.* parameter but a seed recorded by an earlier
    certification (summary.json smoothing.seed), given back to replay it; never in config.yaml or the config hash,
    so no input can be built against a seed before it is drawn (docs/theory.md (j))."""
    p.add_argument("--replay-seed", type=int, metavar="S",
                   help="replay a recorded certification seed (default: a fresh one from the OS's entropy); the "
                        "statement then holds only for inputs fixed before that seed was first drawn")


def _certify_overrides(args: argparse.Namespace) -> dict[str, Any]:
    out = {}
    for k in CERTIFY_FLAGS:
        v = getattr(args, k, None)
        if v is not None:
            out[f"certify.{k}"] = v
    if getattr(args, "training_samples", None) is not None and getattr(args, "reading", None) in (None, "mixture"):
        out["certify.reading"] = "mixture"
    if getattr(args, "twin", False):
        out["certify.twin"] = True
    return out


def _config_from_args(args: argparse.Namespace, default_preset: str | None = None):
    overrides: dict[str, Any] = {}
    from crfl.config import parse_override

    for o in args.overrides:
        k, v = parse_override(o)
        overrides[k] = v
    if args.dataset:
        overrides["data.name"] = args.dataset
    if args.data_dir:
        overrides["data.data_dir"] = args.data_dir
    overrides.update(_certify_overrides(args))
    preset = args.preset or (default_preset if not args.config else None)
    return resolve(preset, args.config, overrides)


def _print_training(res) -> None:
    last = res.records[-1]
    rows = [
        ("preset", str(res.setup.cfg.preset)),
        ("rounds", str(res.setup.rounds)),
        ("clients", str(res.setup.data.num_clients)),
        ("attackers / rounds", f"{list(res.setup.plan.attackers)} / {list(res.setup.plan.rounds)}"),
        ("final clean accuracy", f"{last.get('clean_acc', float('nan')):.4f}"),
        ("final backdoor accuracy", f"{last.get('backdoor_acc', float('nan')):.4f}"),
        ("wall time", f"{res.seconds:.2f} s ({res.seconds / max(1, len(res.records)):.3f} s/round)"),
        ("run directory", str(res.out_dir)),
    ]
    w = max(len(k) for k, _ in rows)
    print("training")
    for k, v in rows:
        print(f"  {k:<{w}}  {v}")


def _check_resume_alone(args: argparse.Namespace) -> None:
    """--resume continues a run with its own config.yaml: other training flags would be ignored, so refuse them."""
    given = [flag for k, flag in RESUME_CONFLICTS.items() if getattr(args, k, None)]
    if args.resume and given:
        raise ConfigError(
            f"The '--resume' parameter continues a run with its saved config.yaml and takes no {', '.join(given)}. "
            f"Got {', '.join(given)} instead; drop them, or start a new run with --out."
        )


def cmd_train(args: argparse.Namespace) -> int:
    from crfl.train import train

    _check_resume_alone(args)
    if args.resume:
        res = train(None, args.resume, resume=True)  # type: ignore[arg-type]
    else:
        if not args.out:
            raise ConfigError("The '--out' parameter must name the run directory. Got nothing instead.")
        cfg = _config_from_args(args, default_preset="demo")
        res = train(cfg, args.out, twin=cfg.certify.twin)
        if not args.preset and not args.config:  # said after the run, so that a bad value stays the only line
            log.warning("note: no --preset or --config given: trained the demo preset (as `crfl run` does); "
                        "pass --preset NAME (crfl list presets) or --config FILE to choose.")
    _print_training(res)
    return 0


def cmd_certify(args: argparse.Namespace) -> int:
    from crfl.certify import certify_run
    from crfl.rundir import load_run

    overrides = _certify_overrides(args)
    cfg, final, _ = load_run(args.run_dir, overrides)  # validated before any work; certify_run reads it again
    _check_certify_flags(args, cfg, final.get("linear"))
    summary = certify_run(args.run_dir, overrides=overrides, replay_seed=args.replay_seed)
    _report_certification(summary, Path(args.run_dir))
    return 0


def _fmt_radius(r: float | str | None) -> str:
    if r is None:
        return "not certified"
    return "inf" if r in (math.inf, "inf") else f"{r:.4g}"


def _print_failed_checks(summary: dict[str, Any]) -> None:
    failed = [k for k, c in summary.get("assumptions", {}).get("checks", {}).items() if not c.get("holds")]
    if failed:
        print(f"  not certified: {', '.join(failed)} (see summary.json 'assumptions')")


def _report_client_level(summary: dict[str, Any], run_dir: Path) -> None:
    """Print an ensemble's client-level certificate: certified accuracy against the number m of malicious clients."""
    cert, cl = summary["certificate"], summary.get("client_level") or {}
    k = f", k = {cert['clients_per_model']} clients per model" if cert.get("clients_per_model") else ""
    print(f"certification: client-level ({cert['kind']}: G = {cert['groups']} models over N = {cert['num_clients']} "
          f"clients{k}), certified: {cert.get('client_level_certified')}")
    print(f"  guarantee: {cert['guarantee']}")
    if not cert.get("client_level_certified"):
        _print_failed_checks(summary)
    for name in ("clean", "backdoor"):
        r = cl.get(name)
        if not r:
            continue
        print(f"  {name:8s} ensemble acc {r['ensemble_accuracy']:.4f}  abstain {r['abstain_rate']:.4f}  "
              f"median m* {r['median_m_star']:g}")
        curve = r.get("curve") or []
        top = curve[-1]["m"] if curve else 0
        shown = [c for c in curve if c["m"] in sorted({0, 1, 2, 5, 10, 20, 50, 100, top})]
        print("    malicious clients m  " + "  ".join(f"{c['m']:6d}" for c in shown))
        print("    certified accuracy   " + "  ".join(f"{c['certified_accuracy']:6.4f}" for c in shown))
    from crfl.plots import plot_run

    plot_run(run_dir)


def _report_certification(summary: dict[str, Any], run_dir: Path, radii_to_show: int = 5) -> None:
    """Print the certification summary (reading, guarantee, curve, fraction certified at the attack's ||delta||); plot it."""
    if (summary.get("certificate") or {}).get("reading") == "client-level":
        return _report_client_level(summary, run_dir)
    res = summary.get("results", {})
    cert = summary.get("certificate", {})
    sm = summary.get("smoothing", {})
    reading = cert.get("reading")
    extra = f", K = {cert['training_samples']}" if cert.get("training_samples") else ""
    sigma = f", sigma_T = {sm.get('sigma_T')}" if sm.get("sigma_T") is not None else ""
    from crfl.metrics import certification_status

    certified, why = certification_status(summary)
    print(f"certification: reading {reading} ({sm.get('method')}{sigma}{extra}), radius certified: {certified}")
    from crfl.certify import reading_dir

    where = reading_dir(run_dir, reading) if reading else run_dir
    if where != run_dir:  # readings side by side: the run's own reading stays in the run directory
        print(f"  result set: {where}")
    if cert.get("guarantee"):
        print(f"  guarantee: {cert['guarantee']}")
    if sm.get("seed") is not None:
        print(f"  certification seed {sm['seed']} ({sm.get('seed_source')}); replay: crfl certify {run_dir} "
              f"--replay-seed {sm['seed']} with the same certify flags")
    if not certified:
        print(f"  not certified: {why} (see summary.json 'assumptions'); the radii below are the reading's formula "
              "evaluated anyway, a vote-margin statistic, not a certificate")
    delta = cert.get("delta_norm")
    for k in ("clean", "backdoor"):
        r = res.get(k)
        if not r:
            continue
        mr = _fmt_radius(r["max_radius"]) if certified or r["max_radius"] is None else f"{_fmt_radius(r['max_radius'])} (not certified)"
        print(f"  {k:8s} base acc {r['base_accuracy']:.4f}  smoothed acc {r['smoothed_accuracy']:.4f}  "
              f"abstain {r['abstain_rate']:.4f}  max radius {mr}")
        if certified and r.get("certified_at_attack") is not None and delta is not None:
            print(f"    certified at the attack's ||delta|| = {delta:.4g}: {r['certified_at_attack']:.4f} of the points "
                  f"({r['certified_correct_at_attack']:.4f} certified and correct)")
            by = r.get("certified_at_attack_by_support") or {}
            if len(by) > 1:
                print("      by trigger support: " + ", ".join(f"{name} {v:.4f}" for name, v in by.items()))
        elif r.get("uncertified_at_attack") is not None and delta is not None:
            print(f"    not certified at the attack's ||delta|| = {delta:.4g}: {r['uncertified_at_attack']:.4f} of the points "
                  "have a vote margin whose formula radius exceeds it (not a certificate)")
        curve = r.get("curve") or []
        if curve:
            step = max(1, len(curve) // radii_to_show)
            shown = curve[::step][:radii_to_show]
            acc, rate = ("cert acc", "cert rate") if certified else ("unc. acc", "unc. rate")
            print("    radius   " + "  ".join(f"{c['radius']:9.4g}" for c in shown))
            print(f"    {acc:9s}" + "  ".join(f"{c['certified_accuracy']:9.4f}" for c in shown))
            print(f"    {rate:9s}" + "  ".join(f"{c['certified_rate']:9.4f}" for c in shown))
    tw = summary.get("twin")
    if tw:
        for k in ("clean", "backdoor"):
            print(f"  twin check ({k}): {tw[k]['covered_points']} points {'certified' if certified else 'covered (not certified)'} at RAD > ||delta|| = "
                  f"{tw['delta_norm']:.3g}; the twin ({tw.get('compared_with')}) agrees on {tw[k]['agreement']}, "
                  + (f"violations {tw[k].get('violations')}" if "violations" in tw[k]
                     else f"disagreements {tw[k].get('disagreements')} (statistical bounds)"))
        if tw.get("tightness") is not None:
            print(f"  twin distance ||w_T - w'_T|| = {tw['distance']:.4g}, proven bound {tw['deviation_bound']:.4g} "
                  f"(tightness {tw['tightness']:.4f})")
    from crfl.plots import plot_run

    plot_run(run_dir)


def _fresh_dir(base: Path) -> str:
    """runs/demo, or runs/demo-2, runs/demo-3, ... : never overwrite an earlier run."""
    if not base.exists():
        return str(base)
    n = 2
    while Path(f"{base}-{n}").exists():
        n += 1
    return f"{base}-{n}"


def cmd_run(args: argparse.Namespace) -> int:
    from crfl.certify import certify_run
    from crfl.train import train

    _check_resume_alone(args)
    if args.resume:
        from crfl.rundir import resume_run

        with resume_run(args.resume) as held:  # the saved config, read under the claim; flags checked before training
            cfg = held.load_config(_certify_overrides(args))
        _check_certify_flags(args, cfg, _model_is_linear(cfg))
        res = train(None, args.resume, resume=True)  # type: ignore[arg-type]
    else:
        cfg = _config_from_args(args, default_preset="demo")
        _check_certify_flags(args, cfg, _model_is_linear(cfg))  # before training
        out = args.out or _fresh_dir(Path("runs") / (cfg.preset or "run"))
        res = train(cfg, out, twin=cfg.certify.twin)
    _print_training(res)
    # certify with the dataset training just loaded (one load per run; the model and config come from the files)
    summary = certify_run(res.out_dir, overrides=_certify_overrides(args), replay_seed=args.replay_seed,
                          dataset=res.setup.dataset)
    _report_certification(summary, Path(res.out_dir))
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from crfl.config import parse_override
    from crfl.sweep import sweep

    check_int("--jobs", args.jobs, low=1)
    extra: dict[str, Any] = dict(parse_override(o) for o in args.overrides)
    if args.dataset:
        extra["data.name"] = args.dataset
    if args.data_dir:
        extra["data.data_dir"] = args.data_dir
    if len(args.spec) > 1:  # several specs as one (crfl.sweep.sweep_many)
        from crfl.sweep import sweep_many

        by_spec = sweep_many(args.spec, args.out, jobs=args.jobs, extra=extra, progress=not getattr(args, "quiet", False),
                             runs_dir=args.runs)
        failed = 0
        for name, rows in by_spec.items():
            failed += (bad := sum(r.get("status", "ok") != "ok" for r in rows))
            print(f"{name}: {len(rows)} result row(s), {bad} failed: {Path(args.out) / name / 'results.csv'}")
        return 1 if failed else 0
    rows = sweep(args.spec[0], args.out, jobs=args.jobs, extra=extra, progress=not getattr(args, "quiet", False),
                 runs_dir=args.runs)
    failed = sum(r.get("status", "ok") != "ok" for r in rows)
    print(f"{len(rows)} result row(s), {failed} failed: {Path(args.out) / 'results.csv'}")
    return 1 if failed else 0


def cmd_plot(args: argparse.Namespace) -> int:
    from crfl.plots import plot_run, plot_sweep

    dirs = [Path(x) for x in args.dir]
    for d in dirs:  # every directory is checked before any figure is drawn
        if not d.is_dir():
            raise ConfigError(f"The 'DIR' parameter must be a run or sweep directory. Got {str(d)!r} instead (no such directory).")
        if not (d / "sweep.json").is_file() and not (d / "rounds.csv").is_file():
            raise ConfigError(f"The 'DIR' parameter must be a run or sweep directory. Got {str(d)!r} instead (no rounds.csv or sweep.json).")
    for d in dirs:
        for p in plot_sweep(d) if (d / "sweep.json").is_file() else plot_run(d):
            print(p)
    return 0


def _error_message(e: BaseException) -> str:
    """The one line for an expected failure: the file or parameter, the problem, what to do."""
    if isinstance(e, EXPECTED):
        return str(e)
    if isinstance(e, OSError):
        where = f" {e.filename!r}" if e.filename else ""
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            return f"No space left on the device of{where} (disk full). Files already written are complete; free space and rerun."
        todo = {errno.EACCES: "check its permissions", errno.EPERM: "check its permissions",
                errno.EROFS: "choose a writable location", errno.ENOTDIR: "a path component is a file, not a directory",
                errno.ENOENT: "check the path"}.get(e.errno or 0, "check the path and the device")
        return f"Cannot access{where}: {e.strerror or e}; {todo}."
    if isinstance(e, UnicodeDecodeError):
        return f"A file is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8."
    return str(e)


#: What each command does and examples of it (``crfl COMMAND --help``).
COMMANDS: dict[str, tuple[str, str, str]] = {
    "train": (
        "federated training with clipping and noise (Algorithm 1)",
        "Train a CRFL model into a new run directory (config.yaml, rounds.csv growing round by round, "
        "checkpoint.pt; at the end model_final.pt, attack.json, summary.json). Without --preset or "
        "--config it trains the demo preset, as crfl run does, and says so.",
        "  crfl train --preset demo --out runs/demo\n"
        "  crfl train --preset mnist --dataset fashion-mnist --set server.rounds=20 --out runs/fm\n"
        "  crfl train --plugin examples/my_parts.py --dataset digits-1k --set aggregation.name=clipped-mean --out runs/mine\n"
        "  crfl train --resume runs/fm            # continue an interrupted run",
    ),
    "certify": (
        "certify a training run (Algorithm 2, Corollary 1)",
        "Certify a finished run: smoothed predictions, certified radii per test point "
        "(certificates_*.csv), summary.json's certificate, curves and certified.png.",
        "  crfl certify runs/demo\n"
        "  crfl certify runs/demo --reading mixture --training-samples 100\n"
        "  crfl certify runs/cnn --method monte-carlo --M 1000 --num-test 500",
    ),
    "run": (
        "train and certify in one command (default: the demo preset)",
        "Train, then certify, then print the certified accuracy table. With no arguments: the demo "
        "preset on the built-in MNIST digits, into runs/demo (runs/demo-2, ... when it exists).",
        "  crfl run\n"
        "  crfl run --preset flcert\n"
        "  crfl run --set attack.gamma=50 --twin --out runs/gamma50",
    ),
    "sweep": (
        "run a sweep spec (a grid of runs): content-addressed, resumable, parallel",
        "Run every grid point of a sweep spec (a YAML file, format in docs/sweeps.md, or a built-in "
        "spec: crfl list specs) into OUT/runs/<config hash>/ and write OUT/results.csv. Rerunning "
        "an interrupted sweep finishes it without recomputing what is done. Several specs run as one "
        "(OUT/<spec name>/ each, one store of runs, one pool of jobs: what they share is computed once).",
        "  crfl sweep fig5-attackers-mnist --dataset fashion-mnist --out runs/fig5\n"
        "  crfl sweep fig5-attackers-mnist fig11-M-mnist --dataset fashion-mnist --out runs/figs --jobs 2\n"
        "  crfl sweep my-spec.yaml --out runs/mine --jobs 2 --set server.rounds=20\n"
        "  crfl plot runs/fig5",
    ),
    "plot": (
        "plot a run or a sweep directory (reads only result files)",
        "Draw the figures of a run (rounds.png, certified.png) or of a sweep (one per swept "
        "parameter) from the files in DIR; nothing is recomputed.",
        "  crfl plot runs/demo\n"
        "  crfl plot runs/fig5",
    ),
    "list": (
        "list datasets, aggregation rules, attacks, models, readings, sweep specs or presets",
        "List what a name may be, each with its one-line description: datasets (data.name, "
        "--dataset), aggregators (aggregation.name), attacks (attack.kind), models (model.name), "
        "readings (--reading), specs (crfl sweep SPEC), presets (--preset). --plugin adds the "
        "user's parts.",
        "  crfl list\n"
        "  crfl list aggregators\n"
        "  crfl list datasets --plugin examples/my_parts.py",
    ),
}


def _first_comment(text: str) -> str:
    """A preset's description: the first line of its leading comment."""
    for line in text.splitlines():
        if line.startswith("#"):
            return line.lstrip("#").strip()
        if line.strip():
            break
    return ""


def listings() -> dict[str, dict[str, str]]:
    """What ``crfl list`` prints: kind -> name -> one-line description, from the registries and files."""
    from importlib import resources

    from crfl.aggregation import describe_aggregators
    from crfl.attacks import describe_attacks
    from crfl.data import describe_datasets
    from crfl.model import describe_models
    from crfl.readings import READINGS
    from crfl.registry import describe
    from crfl.sweep import load_spec, spec_names

    presets = {n: _first_comment(resources.files("crfl.presets").joinpath(f"{n}.yaml").read_text()) for n in preset_names()}
    return {
        "datasets": describe_datasets(),
        "aggregators": describe_aggregators(),
        "attacks": describe_attacks(),
        "models": describe_models(),
        "readings": describe(READINGS),
        "specs": {n: load_spec(n).title for n in spec_names()},
        "presets": presets,
    }


LIST_KINDS = ("datasets", "aggregators", "attacks", "models", "readings", "specs", "presets")


def cmd_list(args: argparse.Namespace) -> int:
    kinds = [args.what] if args.what else list(LIST_KINDS)
    table = listings()
    for n, kind in enumerate(kinds):
        entries = table[kind]
        if len(kinds) > 1:
            print(("\n" if n else "") + f"{kind}:")
        w = max((len(k) for k in entries), default=0)
        for name, desc in entries.items():
            print(f"  {name:<{w}}  {desc}".rstrip())
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with "Did you mean ...?" on an invalid choice (a command, a --reading value, ...)."""

    def error(self, message: str) -> typing.NoReturn:
        m = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if m:
            choices = re.findall(r"'([^']*)'", m.group(2))
            close = difflib.get_close_matches(m.group(1), choices, n=1, cutoff=0.6)
            if close:
                message += f". Did you mean {close[0]!r}?"
        super().error(message)


class _StderrHandler(logging.StreamHandler):
    """A handler writing to the current ``sys.stderr`` (not the one at creation: tests capture it)."""

    @property  # type: ignore[override]
    def stream(self):  # noqa: D401
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def _setup_logging(verbose: int, quiet: bool) -> logging.Handler:
    """crfl's diagnostics on stderr as ``crfl: ...``: INFO by default, WARNING with -q, DEBUG with -v."""
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    lg = logging.getLogger("crfl")
    for h in [h for h in lg.handlers if isinstance(h, _StderrHandler)]:
        lg.removeHandler(h)
    h = _StderrHandler()
    h.setFormatter(logging.Formatter("crfl: %(message)s"))
    lg.addHandler(h)
    lg.setLevel(level)
    lg.propagate = False
    return h


def _version() -> str:
    import importlib.metadata
    import platform

    from crfl import __version__

    try:
        torch = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - torch is a dependency
        torch = "not installed"
    return f"crfl {__version__} (torch {torch}, Python {platform.python_version()})"


def _load_plugins(args: argparse.Namespace) -> None:
    """Entry points of the group crfl.plugins, then every --plugin, before the command builds anything."""
    from crfl import plugins

    for p in plugins.load_entry_points():
        logging.getLogger("crfl").debug("plugin %s (entry point %s of %s)", p.module, p.entry_point, p.distribution)
    for spec in getattr(args, "plugins", None) or []:
        p = plugins.load(spec)
        logging.getLogger("crfl").debug("plugin %s (%s)", p.module, p.file or "module")


def _reader_gone(e: BaseException) -> bool:
    """Whether ``e`` is the end of the pipe stdout writes to (``crfl list | head``): an EPIPE naming no file."""
    return isinstance(e, BrokenPipeError) and e.filename is None


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks of errors")
    common.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS, help="more diagnostics on stderr")
    common.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                        help="no progress bars and only warnings on stderr")
    common.add_argument("--progress", action="store_true", default=argparse.SUPPRESS,
                        help="progress lines on stderr even when it is not a terminal (a log file)")
    plug = argparse.ArgumentParser(add_help=False)
    plug.add_argument("--plugin", dest="plugins", action="append", default=[], metavar="MODULE",
                      help="import a module (or a .py file) registering your own rules, datasets, attacks or models "
                           "first (repeatable); installed entry points of 'crfl.plugins' are imported always")
    parser = _Parser(prog="crfl", parents=[common],
                     description="Certifiably Robust Federated Learning against backdoor attacks (Xie et al., ICML 2021): "
                                 "train, certify, sweep and plot.",
                     epilog="Start with `crfl run` (the demo), `crfl list`, or `crfl COMMAND --help`.\n"
                            "Documentation: README.md, docs/sweeps.md, docs/theory.md.",
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    def add(name: str, plugins: bool = True) -> argparse.ArgumentParser:
        short, desc, examples = COMMANDS[name]
        return sub.add_parser(name, parents=[common, plug] if plugins else [common], help=short, description=desc,
                              epilog="examples:\n" + examples, formatter_class=argparse.RawDescriptionHelpFormatter)

    p_train = add("train")
    _add_train_args(p_train, out_required=False)
    p_train.set_defaults(func=cmd_train)
    p_cert = add("certify")
    p_cert.add_argument("run_dir", help="a finished run directory")
    _add_certify_args(p_cert)
    _add_replay_arg(p_cert)
    p_cert.set_defaults(func=cmd_certify)
    p_run = add("run")
    _add_train_args(p_run, out_required=False)
    _add_certify_args(p_run)
    _add_replay_arg(p_run)
    p_run.set_defaults(func=cmd_run)
    p_sweep = add("sweep")
    p_sweep.add_argument("spec", nargs="+", help="a sweep YAML file (docs/sweeps.md) or a built-in spec name "
                         "(crfl list specs); several run as one, into OUT/<spec name>/")
    p_sweep.add_argument("--out", required=True, help="the sweep directory (with several specs: their parent)")
    p_sweep.add_argument("--jobs", type=int, default=1, help="parallel processes")
    p_sweep.add_argument("--dataset", help="run every point on this dataset (e.g. fashion-mnist, loan-openintro)")
    p_sweep.add_argument("--data-dir", help="directory with the dataset's files")
    p_sweep.add_argument("--runs", default=None,
                         help="a store of training runs shared with other sweeps: a configuration they share is trained once")
    p_sweep.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                         help="override one parameter of every run, e.g. --set server.rounds=20 (repeatable)")
    p_sweep.set_defaults(func=cmd_sweep)
    p_plot = add("plot", plugins=False)
    p_plot.add_argument("dir", nargs="+", help="a run or a sweep directory (several: each in turn, one process)")
    p_plot.set_defaults(func=cmd_plot)
    p_list = add("list")
    p_list.add_argument("what", nargs="?", choices=LIST_KINDS, help="one kind (default: all)")
    p_list.set_defaults(func=cmd_list)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = getattr(args, "debug", False)
    quiet = getattr(args, "quiet", False)
    handler = _setup_logging(getattr(args, "verbose", 0) or 0, quiet)
    mode = progress.mode_for(sys.stderr, quiet=quiet, force=getattr(args, "progress", False))
    try:
        with progress.showing(mode):
            _load_plugins(args)
            return args.func(args)
    except KeyboardInterrupt:
        d = getattr(args, "resume", None) or getattr(args, "out", None) or getattr(args, "run_dir", None) or "DIR"
        print(f"\ncrfl: interrupted; {INTERRUPTED[args.command].format(dir=d)}", file=sys.stderr)
        return 130
    except (*EXPECTED, OSError, UnicodeDecodeError) as e:
        if _reader_gone(e):
            # the reader of stdout went away (`crfl list | head`): stop quietly, as command-line tools do
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 141
        if debug:
            raise
        print(f"crfl: error: {_error_message(e)}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - an unexpected failure: one line, the traceback behind --debug
        if debug:
            raise
        if isinstance(e, MemoryError) or (isinstance(e, RuntimeError) and "can't allocate memory" in str(e)):
            print(f"crfl: error: Out of memory ({str(e).splitlines()[0][:160] if str(e) else 'MemoryError'}): the configuration "
                  "asks for more than this machine has; reduce its sizes (model.hidden, clients.batch_size, "
                  "data.num_clients, certify.num_test, certify.training_samples).", file=sys.stderr)
            return 2
        print(f"crfl: internal error: {type(e).__name__}: {e}. Rerun with --debug for the traceback and report it.",
              file=sys.stderr)
        return 1
    finally:
        logging.getLogger("crfl").removeHandler(handler)


if __name__ == "__main__":
    sys.exit(main())
