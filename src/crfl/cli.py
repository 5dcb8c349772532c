"""The ``crfl`` command line: a thin layer over the library that writes self-describing run directories.

    crfl train   [--preset NAME] [--config FILE] [--dataset NAME] [--data-dir DIR] [--set k=v ...] --out DIR
    crfl train   --resume DIR
    crfl certify RUN_DIR [--method exact|monte-carlo] [--M N] [--alpha A] [--bound B] [--sigma-T S]
                         [--lipschitz paper|sound] [--coverage simultaneous|paper] [--num-test N]
    crfl run     (train + certify; no arguments: the demo preset on the built-in data)
    crfl sweep   SPEC --out DIR [--jobs N] [--dataset NAME] [--set k=v ...]
    crfl plot    DIR
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

from crfl.config import preset_names, resolve
from crfl.data.base import DataError
from crfl.validation import ConfigError


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
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_certify_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", choices=["auto", "exact", "monte-carlo"], help="smoothing: exact (linear models) or Monte Carlo")
    p.add_argument("--M", type=int, help="number of noisy models (Monte Carlo)")
    p.add_argument("--alpha", type=float, help="failure probability of the confidence bounds")
    p.add_argument("--bound", choices=["hoeffding", "clopper-pearson"], help="confidence bound")
    p.add_argument("--coverage", choices=["simultaneous", "paper"], help="how the (p_A, p_B) pair is covered")
    p.add_argument("--sigma-T", dest="sigma_T", type=float, help="smoothing noise sigma_T")
    p.add_argument("--lipschitz", choices=["sound", "paper"], help="L_Z: sound for ||x|| <= B, or Lemma 1 as printed")
    p.add_argument("--num-test", dest="num_test", type=int, help="certify only the first N test points")


def _certify_overrides(args: argparse.Namespace) -> dict[str, Any]:
    out = {}
    for k in ("method", "M", "alpha", "bound", "coverage", "sigma_T", "lipschitz", "num_test"):
        v = getattr(args, k, None)
        if v is not None:
            out[f"certify.{k}"] = v
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


def cmd_train(args: argparse.Namespace) -> int:
    from crfl.train import train

    if args.resume:
        res = train(None, args.resume, resume=True, progress=not args.quiet)  # type: ignore[arg-type]
    else:
        if not args.out:
            raise ConfigError("The '--out' parameter must name the run directory. Got nothing instead.")
        cfg = _config_from_args(args)
        res = train(cfg, args.out, progress=not args.quiet, twin=cfg.certify.twin)
    _print_training(res)
    return 0


def cmd_certify(args: argparse.Namespace) -> int:
    from crfl.certify import certify_run, print_summary

    summary = certify_run(args.run_dir, overrides=_certify_overrides(args))
    print_summary(summary)
    return 0


def _fresh_dir(base: Path) -> str:
    """runs/demo, or runs/demo-2, runs/demo-3, ... : never overwrite an earlier run."""
    if not base.exists():
        return str(base)
    n = 2
    while Path(f"{base}-{n}").exists():
        n += 1
    return f"{base}-{n}"


def cmd_run(args: argparse.Namespace) -> int:
    from crfl.certify import certify_run, print_summary
    from crfl.train import train

    if args.resume:
        res = train(None, args.resume, resume=True, progress=not args.quiet)  # type: ignore[arg-type]
    else:
        cfg = _config_from_args(args, default_preset="demo")
        out = args.out or _fresh_dir(Path("runs") / (cfg.preset or "run"))
        res = train(cfg, out, progress=not args.quiet, twin=cfg.certify.twin)
    _print_training(res)
    summary = certify_run(res.out_dir, overrides=_certify_overrides(args))
    print_summary(summary)
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from crfl.config import parse_override
    from crfl.sweep import sweep

    extra: dict[str, Any] = dict(parse_override(o) for o in args.overrides)
    if args.dataset:
        extra["data.name"] = args.dataset
    if args.data_dir:
        extra["data.data_dir"] = args.data_dir
    rows = sweep(args.spec, args.out, jobs=args.jobs, extra=extra, progress=not args.quiet)
    failed = sum(r.get("status", "ok") != "ok" for r in rows)
    print(f"{len(rows)} result row(s), {failed} failed: {Path(args.out) / 'results.csv'}")
    return 1 if failed else 0


def cmd_plot(args: argparse.Namespace) -> int:
    from crfl.plots import plot_run, plot_sweep

    d = Path(args.dir)
    if (d / "sweep.json").is_file():
        paths = plot_sweep(d)
    elif (d / "rounds.csv").is_file():
        paths = plot_run(d)
    else:
        raise ConfigError(f"The 'DIR' parameter must be a run or sweep directory. Got {str(d)!r} instead (no rounds.csv or sweep.json).")
    for p in paths:
        print(p)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="crfl", description="Certifiably Robust Federated Learning (Xie et al., ICML 2021)")
    sub = parser.add_subparsers(dest="command", required=True)
    p_train = sub.add_parser("train", help="federated training with clipping and noise (Algorithm 1)")
    _add_train_args(p_train, out_required=False)
    p_train.set_defaults(func=cmd_train)
    p_cert = sub.add_parser("certify", help="certify a training run (Algorithm 2, Corollary 1)")
    p_cert.add_argument("run_dir")
    _add_certify_args(p_cert)
    p_cert.add_argument("--quiet", action="store_true")
    p_cert.set_defaults(func=cmd_certify)
    p_run = sub.add_parser("run", help="train and certify in one command (default: the demo preset)")
    _add_train_args(p_run, out_required=False)
    _add_certify_args(p_run)
    p_run.set_defaults(func=cmd_run)
    p_sweep = sub.add_parser("sweep", help="run a sweep spec (a grid of runs): content-addressed, resumable, parallel")
    p_sweep.add_argument("spec", help="a sweep YAML file or a built-in spec name (fig5-attackers-mnist, ...)")
    p_sweep.add_argument("--out", required=True, help="the sweep directory")
    p_sweep.add_argument("--jobs", type=int, default=1, help="parallel processes")
    p_sweep.add_argument("--dataset", help="run every point on this dataset (e.g. fashion-mnist, loan-openintro)")
    p_sweep.add_argument("--data-dir", help="directory with the dataset's files")
    p_sweep.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p_sweep.add_argument("--quiet", action="store_true")
    p_sweep.set_defaults(func=cmd_sweep)
    p_plot = sub.add_parser("plot", help="plot a run or a sweep directory (reads only result files)")
    p_plot.add_argument("dir")
    p_plot.set_defaults(func=cmd_plot)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, DataError) as e:
        print(f"crfl: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ncrfl: interrupted; every file written so far is complete. Resume with --resume DIR.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
