"""Run configuration: typed sections, presets, ``--set key=value`` overrides.

A configuration is resolved in layers: defaults < preset < config file <
``--set`` overrides (< command-line shortcuts such as ``--dataset``). The
resolved configuration, with every parameter, is written next to every result
(``config.yaml``) and is all a run needs to be repeated.

Symbols follow the paper: ``clients.lr`` = eta, ``clients.batch_size`` = n_B,
``clients.local_iters`` = tau (or ``local_epochs``), ``attack.poison_per_batch``
= q_B, ``attack.gamma`` = gamma, ``attack.rounds`` = t_adv (``attack.every: 1``: every
round), ``attack.kind`` what the attackers do (the paper's ``backdoor`` by default; the kinds
and their ``attack.options`` are in :mod:`crfl.attacks`), ``server.rounds`` =
T, ``server.rho`` = rho_t, ``server.sigma`` = sigma_t, ``certify.sigma_T``,
``certify.M``, ``certify.alpha``.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from crfl.attacks import PAPER_PIXELS, TRIGGERS
from crfl.bounds import BOUNDS, COVERAGES
from crfl.data.partition import SCHEMES
from crfl.io import load_yaml, yaml_problem
from crfl.validation import ConfigError, check_choice, check_int, check_real, did_you_mean, fail


@dataclass(frozen=True)
class DataConfig:
    name: str = "mnist-5k"
    data_dir: str | None = None
    partition: str = "iid"  # iid | natural | dirichlet
    num_clients: int | None = 20
    dirichlet_alpha: float = 0.5
    test_fraction: float = 0.2  # mnist-5k's stratified split
    options: dict[str, Any] = field(default_factory=dict)  # loader options, e.g. {categorical: ordinal} for LOAN


@dataclass(frozen=True)
class ModelConfig:
    name: str = "logistic"  # logistic (the paper's) | mlp
    hidden: int = 64
    init: str = "default"  # default (nn.Linear's uniform) | zeros
    # B_0: every input is clamped to the data's box and projected onto ||x|| <= B_0 by the model itself, in
    # training, evaluation and certification; the certificate then uses B_0 (None: no projection)
    input_norm_bound: float | None = None


@dataclass(frozen=True)
class ClientsConfig:
    lr: float = 0.001
    batch_size: int = 100
    local_iters: int | None = None  # tau; None: local_epochs * ceil(n_i / n_B)
    local_epochs: int = 1
    weighting: str = "uniform"  # p_i: uniform | samples


@dataclass(frozen=True)
class AttackConfig:
    num_attackers: int = 1  # R
    attackers: list[int] | None = None  # explicit client ids; default 0..R-1
    rounds: list[int] | None = field(default_factory=lambda: [10])  # t_adv
    every: int | None = None
    start: int | None = None
    poison_per_batch: int = 5  # q_B
    target: int | str = "auto"  # dataset default (0 for images, 7 for LOAN)
    gamma: float = 10.0
    trigger: str = "auto"  # pixel | loan | dba (auto: pixel for images, loan for tables)
    magnitude: float = 0.1  # ||delta||
    pixels: list[list[int]] = field(default_factory=lambda: [list(p) for p in PAPER_PIXELS])
    features: list[str] | None = None
    dba_parts: int | None = None
    kind: str = "backdoor"  # backdoor (the paper's) | label-flip | sign-flip | gaussian | adaptive | a registered name
    options: dict[str, Any] = field(default_factory=dict)  # the kind's options, e.g. {scale: 10} (crfl.attacks)


@dataclass(frozen=True)
class AggregationConfig:
    name: str = "fedavg"  # fedavg | rfa | median | trimmed-mean | krum
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class EnsembleConfig:
    """G group models and the client-level certificate (crfl.ensemble; Cao, Jia and Gong 2021; FLCert)."""

    kind: str = "none"  # none | partition (disjoint groups, FLCert-D) | sampled (k clients per model, FLCert-P)
    groups: int = 10  # G
    clients_per_model: int | None = None  # k (sampled)
    server_step: bool = False  # CRFL's clip to rho_t + noise sigma_t on every group model
    sample_seed: int | None = None  # sampled: None draws a secret seed from the OS when training starts (recorded)
    alpha: float = 0.001  # sampled: the vote shares' simultaneous confidence level


@dataclass(frozen=True)
class ServerConfig:
    rounds: int = 100  # T
    rho: Any = field(default_factory=lambda: {"kind": "linear", "a": 0.1, "b": 2.0, "cap": 15.0})
    sigma: Any = 0.01  # sigma_t, t <= T-1: a number or a list of T-1 values


@dataclass(frozen=True)
class RunConfig:
    device: str = "cpu"
    dtype: str = "float32"
    eval_every: int = 1
    eval_points: int | None = None  # None: rounds.csv's accuracies on the whole test set; k: on k of its points (the last round: all)
    checkpoint_every: int = 1
    checkpoint_seconds: float = 2.0  # and >= this many seconds of training since the last checkpoint (0: no wait)
    threads: int | None = None


@dataclass(frozen=True)
class CertifyConfig:
    reading: str = "coupled"  # coupled (per-run twin) | mixture (over training noise) | paper (Corollary 1 as printed)
    method: str = "auto"  # auto (exact for linear models) | exact | monte-carlo | margin (linear base model, coupled)
    bound_form: str = "neyman-pearson"  # neyman-pearson (Gaussian mechanism) | kl (Theorem 3's KL budget)
    training_samples: int = 100  # K continuations of the mixture reading
    M: int = 1000
    alpha: float = 0.001
    bound: str = "clopper-pearson"  # hoeffding | clopper-pearson
    coverage: str = "simultaneous"  # simultaneous | paper
    selection: int = 0  # size of a separate selection sample (Cohen et al.); 0: none
    sigma_T: float = 0.01
    lipschitz: str = "sound"  # sound | paper
    radii: list[float] | None = None  # grid for the certified-accuracy tables (None: automatic)
    num_test: int | None = None  # certify the first n test points (None: all)
    twin: bool = False
    input_norm_bound: float | None = None  # B >= ||x|| for every client input (None: max over the training data)
    # which triggers the sound certificates cover: anywhere | attack (the run's trigger's support) | input indices
    trigger_support: str | list[int] = "anywhere"


@dataclass(frozen=True)
class Config:
    seed: int = 1
    preset: str | None = None
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    clients: ClientsConfig = field(default_factory=ClientsConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    aggregation: AggregationConfig = field(default_factory=AggregationConfig)
    ensemble: EnsembleConfig = field(default_factory=EnsembleConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    run: RunConfig = field(default_factory=RunConfig)
    certify: CertifyConfig = field(default_factory=CertifyConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **overrides: Any) -> "Config":
        """A new config with dotted-key overrides, e.g. ``replace(**{"attack.gamma": 100})``."""
        d = self.to_dict()
        for k, v in overrides.items():
            set_dotted(d, k, v)
        return from_dict(d)


#: The allowed values of every parameter that takes a name. Names of pluggable parts come from
#: the module that implements them (triggers: :mod:`crfl.attacks`; bounds and coverage:
#: :mod:`crfl.bounds`; partitions: :mod:`crfl.data.partition`); the rest are defined here: the
#: readings (:data:`crfl.readings.READINGS`) and the bound forms (:data:`crfl.readings.coupled.BUDGETS`)
#: live in modules that build on this one (tests/test_cli.py checks that the names agree).
#: :func:`validate` and the command line (``crfl.cli``) read this table.
CHOICES: dict[str, tuple[str, ...]] = {
    "data.partition": SCHEMES,
    "model.init": ("default", "zeros"),
    "clients.weighting": ("uniform", "samples"),
    "attack.trigger": ("auto", *TRIGGERS),
    "run.dtype": ("float32", "float64"),
    "certify.reading": ("coupled", "mixture", "paper"),
    "certify.method": ("auto", "exact", "monte-carlo", "margin"),
    "certify.bound_form": ("neyman-pearson", "kl"),
    "certify.bound": BOUNDS,
    "certify.coverage": COVERAGES,
    "certify.lipschitz": ("sound", "paper"),
    "ensemble.kind": ("none", "partition", "sampled"),
}

#: The ``run.*`` keys that decide the trained model: see :func:`training_part`.
TRAINING_RUN_KEYS = ("dtype",)
#: The top-level keys that never decide the trained model: see :func:`training_part`.
NOT_TRAINING = ("preset", "certify", "provenance")


def training_part(d: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a config (``Config.to_dict()`` or config.yaml as read) that decides training.

    Two configs with the same training part train the same model (the same ``w_T``, round by
    round, and the same rounds.csv up to the evaluation cadence) from the same data; this is the
    one definition behind the run directory's :func:`crfl.rundir.config_hash` (which certify and
    resume check) and so the sweep's run directory names (:func:`crfl.sweep.expand`).

    In: ``seed`` and the sections ``data``, ``model``, ``clients``, ``attack``, ``aggregation``,
    ``server``, and from ``run`` only ``run.dtype``: the precision of ``w_0``, of every client
    update and of the server's clip-and-noise step, so a float32 and a float64 run are different
    models (and a float32 model certified as float64 would be certified for the wrong model).

    Out (they change how a run is executed or observed, not what it computes):

    - ``preset``: a label; the values it selected are in the other sections.
    - ``certify``: certification settings; a run is certified under many.
    - ``provenance``: written by training (versions, platform, dataset description).
    - ``run.device``: where the arithmetic runs (every tensor is on the CPU today);
      ``run.threads``: how many CPU threads do it. Both may change the last bits of a float
      reduction order, not the algorithm or its randomness (every random draw comes from
      :mod:`crfl.rng` streams of ``seed``).
    - ``run.eval_every``: which rounds evaluate the model for rounds.csv; evaluation draws no
      randomness and does not touch the parameters. ``run.eval_points``: on how many test points
      (a fixed, evenly spaced subset; the last round always on all of them).
    - ``run.checkpoint_every``: how often the state is saved; a resumed run repeats the
      uninterrupted one exactly. ``run.checkpoint_seconds``: a checkpoint also waits until that
      much training time has passed since the last one (a fast round is not slowed by a file
      written and synced every round; an interruption repeats at most that much work).
    """
    out = {k: v for k, v in d.items() if k not in NOT_TRAINING and k != "run"}
    run = d.get("run")
    if isinstance(run, Mapping):
        out["run"] = {k: run[k] for k in TRAINING_RUN_KEYS if k in run}
    elif run is not None:  # not a mapping (a damaged file): keep it, so it cannot hash like a good one
        out["run"] = run
    return out


# ---------------------------------------------------------------------------------------------
# building and validating


def _union_members(tp: Any) -> list[Any]:
    """The members of a Union / X | Y type, or [tp] for any other type."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return list(typing.get_args(tp))
    return [tp]


def _is_optional(tp: Any) -> bool:
    return type(None) in _union_members(tp)


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise fail(prefix or "config", "a mapping", data)
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        where = f"section '{prefix}'" if prefix else "the configuration"
        hint = "".join(did_you_mean(u, names) for u in unknown[:1])
        raise ConfigError(f"Unknown parameter(s) {unknown} in {where}; valid: {', '.join(names)}.{hint}")
    kwargs = {}
    for name in names:
        if name not in data:
            continue
        tp = hints[name]
        key = f"{prefix}.{name}" if prefix else name
        val = data[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, val, key)
        else:
            kwargs[name] = _coerce(key, tp, val)
    return cls(**kwargs)


def _coerce(key: str, tp: Any, val: Any) -> Any:
    if val is None:
        if _is_optional(tp) or tp is Any:
            return None
        raise fail(key, f"a value of type {getattr(tp, '__name__', tp)}", val)
    base = [a for a in _union_members(tp) if a is not type(None)]
    if int in base and float not in base and isinstance(val, int) and not isinstance(val, bool):
        return val
    if float in base and isinstance(val, (int, float)) and not isinstance(val, bool):
        return float(val)
    if str in base and isinstance(val, str):
        return val
    if bool in base and isinstance(val, bool):
        return val
    for b in base:
        origin = typing.get_origin(b)
        if origin is list and isinstance(val, (list, tuple)):
            return list(val)
        if origin is dict and isinstance(val, dict):
            return dict(val)
    if tp is Any:
        return val
    names = " or ".join(getattr(b, "__name__", str(b)) for b in base)
    raise fail(key, f"of type {names}", val)


def from_dict(data: dict[str, Any]) -> Config:
    cfg = _build(Config, data, "")
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Check every parameter that can be checked without the data; errors name parameter and value."""
    check_int("seed", cfg.seed, low=0)
    d = cfg.data
    check_choice("data.partition", d.partition, CHOICES["data.partition"])
    if d.num_clients is not None:
        check_int("data.num_clients", d.num_clients, low=1)
    check_real("data.dirichlet_alpha", d.dirichlet_alpha, low=0.0, low_open=True)
    check_real("data.test_fraction", d.test_fraction, low=0.0, high=1.0, low_open=True, high_open=True)
    check_choice("model.init", cfg.model.init, CHOICES["model.init"])
    if cfg.model.input_norm_bound is not None:
        check_real("model.input_norm_bound", cfg.model.input_norm_bound, low=0.0, low_open=True)
    c = cfg.clients
    check_real("clients.lr", c.lr, low=0.0, low_open=True)
    check_int("clients.batch_size", c.batch_size, low=1)
    if c.local_iters is not None:
        check_int("clients.local_iters", c.local_iters, low=1)
    check_int("clients.local_epochs", c.local_epochs, low=1)
    check_choice("clients.weighting", c.weighting, CHOICES["clients.weighting"])
    a = cfg.attack
    check_int("attack.num_attackers", a.num_attackers, low=0)
    if a.attackers is not None and len(a.attackers) != a.num_attackers:
        raise fail(
            "attack.attackers", f"a list of attack.num_attackers = {a.num_attackers} client ids", a.attackers
        )
    check_int("attack.poison_per_batch", a.poison_per_batch, low=0, high=c.batch_size)
    if a.target != "auto":
        check_int("attack.target", a.target, low=0)
    check_real("attack.gamma", a.gamma, low=0.0)
    check_choice("attack.trigger", a.trigger, CHOICES["attack.trigger"])
    check_real("attack.magnitude", a.magnitude, low=0.0)
    s = cfg.server
    check_int("server.rounds", s.rounds, low=1)
    if a.num_attackers > 0 and a.every is None and a.rounds:
        for r in a.rounds:
            check_int("attack.rounds", r, low=1, high=s.rounds)
    from crfl.schedule import RhoSchedule, SigmaSchedule

    rho = RhoSchedule.from_config(s.rho)
    for t in (1, s.rounds):
        rho(t)
    SigmaSchedule.from_config(s.sigma, s.rounds)
    r = cfg.run
    check_choice("run.dtype", r.dtype, CHOICES["run.dtype"])
    check_int("run.eval_every", r.eval_every, low=1)
    if r.eval_points is not None:
        check_int("run.eval_points", r.eval_points, low=1)
    check_int("run.checkpoint_every", r.checkpoint_every, low=1)
    check_real("run.checkpoint_seconds", r.checkpoint_seconds, low=0.0)
    if r.threads is not None:
        check_int("run.threads", r.threads, low=1)
    e = cfg.ensemble
    check_choice("ensemble.kind", e.kind, CHOICES["ensemble.kind"])
    check_int("ensemble.groups", e.groups, low=1)
    if e.kind == "sampled" and e.clients_per_model is None:
        raise fail("ensemble.clients_per_model", "an integer k >= 1 for the sampled kind", None)
    if e.clients_per_model is not None:
        check_int("ensemble.clients_per_model", e.clients_per_model, low=1)
    if e.sample_seed is not None:
        check_int("ensemble.sample_seed", e.sample_seed, low=0)
    check_real("ensemble.alpha", e.alpha, low=0.0, high=1.0, low_open=True, high_open=True)
    z = cfg.certify
    check_choice("certify.reading", z.reading, CHOICES["certify.reading"])
    check_choice("certify.method", z.method, CHOICES["certify.method"])
    check_choice("certify.bound_form", z.bound_form, CHOICES["certify.bound_form"])
    check_int("certify.training_samples", z.training_samples, low=1)
    check_int("certify.M", z.M, low=1)
    check_real("certify.alpha", z.alpha, low=0.0, high=1.0, low_open=True, high_open=True)
    check_choice("certify.bound", z.bound, CHOICES["certify.bound"])
    check_choice("certify.coverage", z.coverage, CHOICES["certify.coverage"])
    check_int("certify.selection", z.selection, low=0)
    check_real("certify.sigma_T", z.sigma_T, low=0.0, low_open=True)
    check_choice("certify.lipschitz", z.lipschitz, CHOICES["certify.lipschitz"])
    if z.num_test is not None:
        check_int("certify.num_test", z.num_test, low=1)
    if z.input_norm_bound is not None:
        check_real("certify.input_norm_bound", z.input_norm_bound, low=0.0, low_open=True)
        if cfg.model.input_norm_bound is not None:
            raise ConfigError(
                f"The 'certify.input_norm_bound' parameter must be null when 'model.input_norm_bound' is set (the model "
                f"enforces B_0 = {cfg.model.input_norm_bound:g}, which the certificate uses). Got {z.input_norm_bound!r} instead."
            )
    if z.radii is not None:
        for i, v in enumerate(z.radii):
            check_real(f"certify.radii[{i}]", v, low=0.0)
    parse_trigger_support(z.trigger_support)


TRIGGER_SUPPORTS = ("anywhere", "attack")


def parse_trigger_support(value: Any, num_features: int | None = None) -> str | tuple[int, ...]:
    """``certify.trigger_support``: 'anywhere', 'attack', or a non-empty set of input indices in [0, d)
    (a list, or a string '3,5,7' as the command line gives it); returns the name or the sorted indices.
    ``num_features`` (d) is checked where the data is known."""
    allowed = "'anywhere', 'attack' or a non-empty list of input indices (ints in [0, d))"
    if isinstance(value, str):
        if value in TRIGGER_SUPPORTS:
            return value
        parts = [p.strip() for p in value.strip().strip("[]").split(",") if p.strip()]
        try:
            value = [int(p) for p in parts]
        except ValueError:
            raise ConfigError(f"The 'certify.trigger_support' parameter must be {allowed}. Got {value!r} instead.") from None
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ConfigError(f"The 'certify.trigger_support' parameter must be {allowed}. Got {value!r} instead.")
    high = num_features if num_features is not None else math.inf
    bad = [v for v in value if v < 0 or v >= high]
    if bad:
        where = f" (d = {num_features} features)" if num_features is not None else ""
        raise ConfigError(f"The 'certify.trigger_support' parameter must list input indices in [0, d){where}. "
                          f"Got {bad[:5]} instead.")
    return tuple(sorted(set(value)))


# ---------------------------------------------------------------------------------------------
# presets, files and overrides


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("crfl.presets").iterdir() if p.name.endswith(".yaml"))


def load_preset(name: str) -> dict[str, Any]:
    check_choice("preset", name, preset_names())
    text = resources.files("crfl.presets").joinpath(f"{name}.yaml").read_text()
    data = load_yaml(text) or {}
    data["preset"] = name
    return data


def load_config_file(path: str | Path) -> dict[str, Any]:
    return read_yaml_mapping(path, "config", "sections")


def read_yaml_mapping(path: str | Path, param: str, what: str) -> dict[str, Any]:
    """A YAML file holding a mapping; a missing, non-UTF-8 or malformed file names the parameter and the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"The '{param}' parameter must name a YAML file. Got {str(p)!r} instead (no such file).")
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"The {param} file {str(p)!r} is not UTF-8 text (byte {raw[e.start]:#04x} at offset {e.start}); save it as UTF-8."
        ) from None
    try:
        data = load_yaml(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"The {param} file {str(p)!r} is not valid YAML ({yaml_problem(e)}); fix it.") from None
    if not isinstance(data, dict):
        raise ConfigError(f"The {param} file {str(p)!r} must hold a mapping of {what}. Got {type(data).__name__} instead.")
    return data


def set_dotted(d: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    cur = d
    for p in parts[:-1]:
        if p not in cur or not isinstance(cur[p], dict):
            cur[p] = {}
        cur = cur[p]
    cur[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``key=value`` with a YAML value: ``attack.gamma=100``, ``server.sigma=[0.01, 0.02]``."""
    if "=" not in text:
        raise ConfigError(f"The '--set' parameter must look like key=value. Got {text!r} instead.")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = load_yaml(raw) if raw.strip() != "" else None
    except yaml.YAMLError:
        value = raw
    return key, value


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k not in ("options", "rho"):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def resolve(
    preset: str | None = None,
    config_file: str | Path | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
) -> Config:
    """defaults < preset < config file < overrides."""
    data: dict[str, Any] = Config().to_dict()
    if preset is not None:
        data = deep_merge(data, load_preset(preset))
    if config_file is not None:
        data = deep_merge(data, load_config_file(config_file))
    items = overrides.items() if isinstance(overrides, dict) else (parse_override(o) for o in overrides or [])
    for k, v in items:
        set_dotted(data, k, v)
    return from_dict(data)
