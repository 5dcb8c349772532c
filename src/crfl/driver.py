"""One driver for Algorithm 1: a typed run state, a ``Round`` interface and the one loop over rounds.

Every engine that trains a CRFL model -- the batched simulator (:class:`crfl.train.SimulatorRound`),
the Flower server (:class:`crfl.flower.server_app.FlowerRound`), and any later one -- implements
one round of Algorithm 1 as a :class:`Round`: from the global model w~_{t-1} it returns w~_t
(Clip_{rho_T}(w_T) when t = T) with the round's record. Everything around the rounds is
written once, here, in :func:`drive` (the shape of fedjax's ``federated_experiment`` over a
``ServerState``):

- the run directory's config (with the engine marker ``provenance.engine``), resume from its
  checkpoint (refused across engines, configurations or round identities), and the claim;
- the evaluation cadence (``run.eval_every`` and the last round), the clean twin of the
  coupled certificate (same randomness, no trigger) for engines that can train it;
- the first attack round's pre-noise aggregate Clip_{rho_t}(w_t) (the mixture reading's start);
- checkpoints through :meth:`crfl.rundir.RunDir.write_checkpoint` (read back with
  ``weights_only=True``), and the final result set (``model_final.pt``, ``rounds.csv``,
  ``attack.json``, summary.json's ``training`` block and the engine's own files) as one unit.

The round's randomness is the engine's business; the driver adds none, so a resumed run
repeats an uninterrupted one exactly (:func:`drive` with ``stop_after`` stops early for tests).
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from crfl import lipschitz, rundir
from crfl import progress as progress_mod
from crfl.lipschitz import centred_operator_norm
from crfl.clients import nominal_poison_ratio
from crfl.setup import Setup, evaluate, resolved_config
from crfl.validation import ConfigError

SIMULATOR = rundir.SIMULATOR
FLOWER = rundir.FLOWER


# ---------------------------------------------------------------------------------------------
# what a round returns, and the state passed from round to round


@dataclass
class RoundOutput:
    """One round of Algorithm 1, as an engine ran it.

    ``row``: the rounds.csv fields the engine measured (norm before clip, rho_t, sigma_t, clipped,
    attack, aggregation_fixed_weights, attacker weights); the driver adds the round, the
    evaluation and the twin distance. ``attack``: attack.json's entry (:func:`attack_record`) in
    attack rounds. ``pre_noise``: Clip_{rho_t}(w_t) before eps_t in attack rounds. ``log``: the
    engine's own record of the round (Flower's ``flower.json`` row), kept in the state.
    """

    params: torch.Tensor
    row: dict[str, Any]
    attack: dict[str, Any] | None = None
    pre_noise: torch.Tensor | None = None
    log: dict[str, Any] | None = None


class Round(Protocol):
    """One round of Algorithm 1 in some engine. ``engine`` names it in the run directory."""

    engine: str
    #: whether ``__call__(..., trigger=False)`` trains the clean twin (same randomness, no trigger)
    trains_twin: bool

    def __call__(self, params: torch.Tensor, t: int, *, trigger: bool = True) -> RoundOutput:
        """w~_t from w~_{t-1} = ``params``; ``trigger=False``: the twin's round."""
        ...

    def identity(self) -> dict[str, Any]:
        """What a resumed run must share with the interrupted one beyond the configuration (e.g. the
        noise seed's digest and the sampling of a Flower server): compared on resume."""
        ...

    def provenance(self) -> dict[str, Any]:
        """Blocks added to config.yaml's ``provenance`` (besides ``engine``)."""
        ...

    def finish(self, state: "RunState") -> "Finish":
        """The engine's additions to the final result set, from the finished state."""
        ...

    def evaluate(self, params: torch.Tensor) -> tuple[float, float]:
        """(clean accuracy, backdoor accuracy) of the global state ``params`` on the test sets."""
        ...

    def init_params(self) -> torch.Tensor:
        """The state before round 1 (Algorithm 1's w_0; an ensemble's G copies of it)."""
        ...


class BaseRound:
    """Defaults of :class:`Round` for an engine that trains one global model: no identity beyond the
    configuration, no provenance or files of its own, :func:`crfl.setup.evaluate` as the evaluation."""

    setup: Setup

    def identity(self) -> dict[str, Any]:
        return {}

    def provenance(self) -> dict[str, Any]:
        return {}

    def finish(self, state: "RunState") -> "Finish":
        return Finish()

    def evaluate(self, params: torch.Tensor, points: int | None = None) -> tuple[float, float]:
        return evaluate(self.setup, params, points)

    def init_params(self) -> torch.Tensor:
        return self.setup.w0.clone()


@dataclass
class Finish:
    """An engine's part of the final result set: summary ``training`` keys, its own JSON files and
    entries of ``model_final.pt`` (e.g. an ensemble's groups)."""

    extra: dict[str, Any] = field(default_factory=dict)
    files: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunState:
    """The state of a run after round ``round`` (0: before the first): what a checkpoint holds.

    ``attack_state``: the first attack round's ``round``, its pre-noise aggregate ``pre_noise`` and,
    with a twin, ``twin_pre_noise``. ``logs``: the engine's per-round records. ``engine``: the
    engine that wrote it; ``identity``: :meth:`Round.identity` of that engine.
    """

    engine: str
    params: torch.Tensor
    round: int = 0
    rows: list[rundir.RoundRow] = field(default_factory=list)
    attacks: list[rundir.AttackRecord] = field(default_factory=list)
    attack_state: dict[str, Any] = field(default_factory=dict)
    twin_params: torch.Tensor | None = None
    logs: list[dict[str, Any]] = field(default_factory=list)
    identity: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def to_checkpoint(self) -> dict[str, Any]:
        """Plain tensors, lists and dicts only (read back with ``weights_only=True``)."""
        return {
            "engine": self.engine,
            "round": self.round,
            "params": self.params,
            "records": [dataclasses.asdict(r) for r in self.rows],
            "attack_log": [a.to_dict() for a in self.attacks],
            "attack_state": dict(self.attack_state),
            "twin_params": self.twin_params,
            "engine_log": list(self.logs),
            "identity": dict(self.identity),
            "seconds": self.seconds,
        }

    @staticmethod
    def from_checkpoint(ck: dict[str, Any], where: str) -> "RunState":
        """The state a checkpoint holds (validated by :meth:`crfl.rundir.RunDir.read_checkpoint`)."""
        try:
            rows = [rundir.RoundRow(**r) for r in ck["records"]]
        except TypeError as e:
            raise rundir.RunDirError(f"{where} holds round rows crfl cannot read ({e}); delete it to restart the run.") from None
        attacks = [rundir.AttackRecord.from_dict(a, f"{where} attack record {i}") for i, a in enumerate(ck["attack_log"])]
        return RunState(
            engine=str(ck.get("engine", SIMULATOR)),
            params=ck["params"],
            round=int(ck["round"]),
            rows=rows,
            attacks=attacks,
            attack_state=dict(ck.get("attack_state") or {}),
            twin_params=ck.get("twin_params"),
            logs=list(ck.get("engine_log") or []),
            identity=dict(ck.get("identity") or {}),
            seconds=float(ck.get("seconds", 0.0)),
        )


@dataclass
class TrainResult:
    """What a run of Algorithm 1 returns (the run directory holds the same, on disk)."""

    out_dir: Path
    setup: Setup
    final_params: torch.Tensor
    records: list[dict[str, Any]]
    attack_log: list[dict[str, Any]]
    twin_final: torch.Tensor | None = None
    seconds: float = 0.0
    finished: bool = True
    state: RunState | None = None
    finish: Finish | None = None  # the engine's part of the final result set (None until the run finished)


# ---------------------------------------------------------------------------------------------
# attack.json's entry (server-owned quantities; both engines)


def attack_record(
    setup: Setup,
    t: int,
    start_params: torch.Tensor,
    p: list[float] | None,
    *,
    aggregation_info: dict[str, Any] | None = None,
    measured: dict[str, Any] | None = None,
    p_total: float | None = None,
) -> dict[str, Any]:
    """attack.json's entry for attack round t, from server-owned quantities only.

    The certificate's ingredients come from the server's configuration and what it sent: the
    attackers and gamma of the threat model it certifies against, tau_i and eta of the local
    training it prescribes, q_B/n_B per local step from the batch sizes of the shard it assigned
    (:func:`crfl.clients.nominal_poison_ratio`), the aggregation weight p_i it applied, and the
    broadcast model w~_{t-1} it sent (its norm and the class-centred operator norm of its weight
    matrix, which L_Z needs). ``measured`` holds what the engine observed (bookkeeping only).
    """
    cfg, plan = setup.cfg, setup.plan
    attackers = list(plan.attackers)
    sizes = setup.data.sizes
    tau = [int(setup.tau[a]) for a in attackers]
    rec: dict[str, Any] = {
        "round": int(t),
        "attackers": attackers,
        "p": None if p is None else [float(v) for v in p],
        "configured_p": [float(setup.weights[a]) for a in attackers],
        "tau": tau,
        "gamma": [float(plan.gamma)] * len(attackers),
        "eta": [float(cfg.clients.lr)] * len(attackers),
        # the mean over local steps of q_s / n_s (> q_B/n_B when a last batch is short)
        "poison_ratio": [
            nominal_poison_ratio(int(sizes[a]), cfg.clients.batch_size, plan.poison_per_batch, tau[i])
            for i, a in enumerate(attackers)
        ],
        "nominal_poison_ratio": [plan.poison_per_batch / cfg.clients.batch_size] * len(attackers),
        "delta_norm": [float(plan.local_triggers[a].norm) for a in attackers],
        "start_norm": float(torch.linalg.vector_norm(start_params.double())),
        "start_centred_opnorm": centred_opnorm(setup, start_params),
        # ||(I - 11^T/C) w_j|| per input column j: bounds ||(I - 11^T/C) W~_S||_2 for a trigger support S (lipschitz.lz_support)
        "start_centred_column_norms": centred_column_norms(setup, start_params),
        # the sum of every client's weight in this round (P of docs/theory.md (g)): the round's Lipschitz constant needs it
        "p_total": float(setup.weights.sum()) if p_total is None else float(p_total),
    }
    if aggregation_info:
        rec["aggregation"] = {k: v for k, v in aggregation_info.items() if isinstance(v, (int, float, str, list))}
    if measured:
        rec["measured"] = measured
    return rec


def centred_opnorm(setup: Setup, params: torch.Tensor) -> float | None:
    """||(I - 11^T/C) W||_2 of a linear model's weight matrix (None for other models); see lipschitz.lz_centred."""
    if not setup.model.is_linear:
        return None
    W, _ = setup.model.split(params.double())
    return centred_operator_norm(W)


def centred_column_norms(setup: Setup, params: torch.Tensor) -> list[float] | None:
    """||(I - 11^T/C) w_j|| per column j of a linear model's weight matrix (None for other models); see lipschitz.lz_support."""
    if not setup.model.is_linear:
        return None
    W, _ = setup.model.split(params.double())
    return [float(v) for v in lipschitz.centred_column_norms(W)]


# ---------------------------------------------------------------------------------------------
# progress and divergence


def _progress_bar(total: int, start: int, progress: bool) -> progress_mod.Bar:
    """The rounds' bar: forced on with ``progress`` (a terminal redraws it, a pipe gets a line every
    ~10%), else as the caller's :func:`crfl.progress.showing` says (the ``crfl`` command)."""
    mode = progress_mod.mode_for(sys.stderr, force=True) if progress else None
    return progress_mod.Bar(total, "training", unit="rounds", start=start, mode=mode)


def _round_detail(row: rundir.RoundRow) -> str:
    out = []
    if isinstance(row.clean_acc, float):
        out.append(f"acc {row.clean_acc:.3f}")
    if isinstance(row.backdoor_acc, float) and not math.isnan(row.backdoor_acc):
        out.append(f"backdoor {row.backdoor_acc:.3f}")
    return "  ".join(out)


def diverged(setup: Setup, t: int, what: str) -> ConfigError:
    """The error for a round whose models or updates stopped being finite: the round and the settings."""
    cfg = setup.cfg
    return ConfigError(
        f"Training diverged in round {t} of {setup.rounds}: {what} holds NaN or inf. The step size "
        f"'clients.lr' = {cfg.clients.lr!r} (with 'attack.gamma' = {cfg.attack.gamma!r}) is too large "
        "for this data; lower 'clients.lr' or 'attack.gamma'."
    )


# ---------------------------------------------------------------------------------------------
# the loop


def _row(t: int, measured: dict[str, Any], **more: Any) -> rundir.RoundRow:
    names = {f.name for f in dataclasses.fields(rundir.RoundRow)}
    unknown = sorted(set(measured) - names)
    if unknown:
        raise ValueError(f"round row fields {unknown} are not rounds.csv columns")
    return rundir.RoundRow(round=t, **{**measured, **more})


def _step(setup: Setup, step: Round, params: torch.Tensor, t: int, trigger: bool = True) -> RoundOutput:
    out = step(params, t, trigger=trigger)
    if not bool(torch.isfinite(out.params).all()):
        raise diverged(setup, t, "the global model")
    return out


def resolved_for(setup: Setup, step: Round) -> dict[str, Any]:
    """config.yaml of a run of ``step``'s engine: the resolved configuration, its provenance and engine."""
    resolved = resolved_config(setup)
    resolved["provenance"]["engine"] = step.engine
    resolved["provenance"].update(step.provenance())
    return resolved


def drive(
    setup: Setup,
    step: Round,
    run: rundir.RunDir,
    *,
    resume: bool = False,
    twin: bool = False,
    progress: bool = False,
    checkpoint_every: int | None = None,
    stop_after: int | None = None,
    on_round: Callable[[RunState], None] | None = None,
) -> TrainResult:
    """Run (or resume) Algorithm 1 with ``step`` as its round, into the claimed run directory ``run``.

    ``checkpoint_every``: rounds between checkpoints (default ``run.checkpoint_every``, and then
    at least ``run.checkpoint_seconds`` of training between two; given here, every such round writes
    one; the last round and ``stop_after`` always write one). A fresh run that fails before its first
    checkpoint leaves nothing behind. ``twin`` trains the coupled certificate's clean twin
    beside the run (engines with ``trains_twin``).

    rounds.csv grows as rounds finish (:func:`crfl.rundir.append_rounds`: one whole row per
    round, flushed); the final result set replaces it with the same rows at the end. A resume
    first rewrites it with the checkpoint's rows. ``on_round(state)`` is called after each
    round's row is on disk (progress displays, tests).
    """
    if twin and not step.trains_twin:
        raise ConfigError(f"This run's rounds ({type(step).__name__}, engine {step.engine!r}) cannot train the clean twin "
                          "(certify.twin); set certify.twin to false, or train a single global model with the simulator.")
    resolved = resolved_for(setup, step)
    chash = rundir.config_hash(resolved)
    state = RunState(engine=step.engine, params=step.init_params(), identity=step.identity(),
                     twin_params=step.init_params() if twin else None)
    if resume:
        saved = run.read_config()
        run.refuse_engine(step.engine, saved)
        if rundir.config_hash(saved) != chash:
            raise rundir.RunDirError(
                f"{run.path / rundir.CONFIG} does not resolve to itself against its data (config hash "
                f"{rundir.config_hash(saved)} != {chash}): the dataset or the configuration changed; restore it or retrain."
            )
        ck = run.read_checkpoint(saved)
        if ck is not None:
            where = str(run.path / ck.get("file", rundir.CHECKPOINT))
            state = RunState.from_checkpoint(ck, where)
            if state.engine != step.engine or state.identity != step.identity():
                raise ConfigError(
                    f"The checkpoint in {str(run.path)!r} was written with a different configuration, sampling or noise "
                    f"seed (engine {state.engine!r}, {state.identity}); refusing to resume."
                )
            if twin and state.twin_params is None:
                raise ConfigError(f"The checkpoint in {str(run.path)!r} has no twin; resume without certify.twin.")
            if not twin:
                state.twin_params = None
    try:
        if not resume:
            run.write_config(resolved)
        return _loop(setup, step, run, state, chash, progress, checkpoint_every, stop_after, on_round)
    except (ConfigError, OSError):
        if not resume:
            run.discard_unstarted()  # a fresh run that failed before its first checkpoint leaves nothing
        raise


def _loop(
    setup: Setup, step: Round, run: rundir.RunDir, state: RunState, chash: str, progress: bool,
    checkpoint_every: int | None, stop_after: int | None, on_round: Callable[[RunState], None] | None = None,
) -> TrainResult:
    T = setup.rounds
    every = checkpoint_every or setup.cfg.run.checkpoint_every
    wait = 0.0 if checkpoint_every else setup.cfg.run.checkpoint_seconds  # seconds of training between checkpoints
    bar = _progress_bar(T, state.round, progress)
    rundir.append_rounds(run.path, [dataclasses.asdict(r) for r in state.rows], restart=True)
    t0, seconds0 = time.perf_counter(), state.seconds
    last_checkpoint = t0
    for t in range(state.round + 1, T + 1):
        out = _step(setup, step, state.params, t)
        state.params, state.round = out.params, t
        more: dict[str, Any] = {}
        if out.attack is not None:
            state.attacks.append(rundir.AttackRecord.from_dict(out.attack, f"round {t}'s attack record"))
            if not state.attack_state and out.pre_noise is not None:
                state.attack_state = {"round": t, "pre_noise": out.pre_noise}
        if state.twin_params is not None:
            tw = _step(setup, step, state.twin_params, t, trigger=False)
            state.twin_params = tw.params
            if state.attack_state.get("round") == t:
                state.attack_state["twin_pre_noise"] = tw.pre_noise
            more["twin_distance"] = float(torch.linalg.vector_norm((state.params - state.twin_params).double()))
        if t % setup.cfg.run.eval_every == 0 or t == T:
            more["clean_acc"], more["backdoor_acc"] = _evaluate(setup, step, state.params, t)
        row = _row(t, out.row, **more)
        state.rows.append(row)
        if out.log is not None:
            state.logs.append(out.log)
        state.seconds = seconds0 + time.perf_counter() - t0
        rundir.append_rounds(run.path, [dataclasses.asdict(row)])
        bar.update(t, _round_detail(row))
        if on_round is not None:
            on_round(state)
        stopping = stop_after is not None and t >= stop_after and t < T
        if t == T or stopping or (t % every == 0 and time.perf_counter() - last_checkpoint >= wait):
            run.write_checkpoint(state.to_checkpoint(), chash)
            last_checkpoint = time.perf_counter()
        if stopping:
            bar.close()
            return _result(run.path, setup, state, finished=False)
    bar.close()
    fin = step.finish(state)
    write_final(run, setup, state, fin, chash)
    return _result(run.path, setup, state, finished=True, finish=fin)


def _evaluate(setup: Setup, step: Round, params: torch.Tensor, t: int) -> tuple[float, float]:
    """rounds.csv's accuracies after round t: on ``run.eval_points`` test points (a fixed subset,
    :func:`crfl.setup.eval_subset`) when set, on all of them after round T (the summary's final
    accuracies) and for an engine with an evaluation of its own."""
    points = setup.cfg.run.eval_points
    if points is None or t == setup.rounds or type(step).evaluate is not BaseRound.evaluate:
        return step.evaluate(params)
    return step.evaluate(params, points)


def _result(out: Path, setup: Setup, state: RunState, finished: bool, finish: Finish | None = None) -> TrainResult:
    return TrainResult(
        out, setup, state.params, [dataclasses.asdict(r) for r in state.rows], [a.to_dict() for a in state.attacks],
        state.twin_params, state.seconds, finished=finished, state=state, finish=finish,
    )


def write_final(run: rundir.RunDir, setup: Setup, state: RunState, finish: Finish, chash: str) -> None:
    """The end-of-run result set (model_final.pt, rounds.csv, attack.json, summary's ``training``,
    the engine's files), staged and switched in as one unit."""
    T = setup.rounds
    final: dict[str, Any] = {
        "params": state.params,
        "model": setup.model.name,
        "num_features": setup.dataset.num_features,
        "num_classes": setup.dataset.num_classes,
        "linear": setup.model.is_linear,
        "engine": state.engine,
        "config_hash": chash,
        **finish.model,
    }
    if state.twin_params is not None:
        final["twin_params"] = state.twin_params
    if state.attack_state:
        # the first attack round's Clip(w_{t_adv}) before eps_{t_adv}: the mixture certificate's start
        final["attack_state"] = state.attack_state
    last = state.rows[-1] if state.rows else None
    block = rundir.TrainingBlock(
        rounds=T,
        final_clean_acc=last.clean_acc if last else None,
        final_backdoor_acc=last.backdoor_acc if last else None,
        final_norm=float(torch.linalg.vector_norm(state.params.double())),
        attack_rounds=list(setup.plan.rounds),
        seconds=state.seconds,
        seconds_per_round=state.seconds / max(1, T),
        extra={"engine": state.engine, **finish.extra},
    )
    log = rundir.AttackLog(setup.plan.trigger.norm, state.attacks)
    with run.results() as rs:
        rs.write_dict_csv(rundir.ROUNDS, rundir.ROUND_COLUMNS, [dataclasses.asdict(r) for r in state.rows])
        rs.torch_save(rundir.MODEL, final)
        rs.write_json(rundir.ATTACKS, log.to_dict())
        for name, obj in finish.files.items():
            rs.write_json(name, obj)
        rs.update_summary({"training": block.to_dict()})
