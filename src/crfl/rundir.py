"""The run directory: the one writer and reader of a run's files.

A run directory is one unit. Training (:mod:`crfl.train`, the Flower server), certification
(:mod:`crfl.certify`), sweeps and plots reach its files only through this module.

Files (written by whom)::

    config.yaml      the resolved configuration                       train (once, at the claim)
    checkpoint.pt    state after the last finished round + config hash  train (every checkpoint)
    rounds.csv       one :class:`RoundRow` per round                    train (final result set)
    attack.json      one :class:`AttackRecord` per attack round         train (final result set)
    model_final.pt   Clip_{rho_T}(w_T) + config hash                    train (final result set)
    summary.json     blocks: ``training`` (:class:`TrainingBlock`), then certification's
                     ``certificate``, ``smoothing``, ``results`` (:class:`ResultBlock`), ...
    certificates_{clean,backdoor}.csv, inverse_*.csv                    certify (its result set)
    integrity.json   sha256 of every file of every result set (:data:`RECORD`)  each result set's commit
    *.png, *.pdf     figures (derived from the files above; :mod:`crfl.plots`)

Rules:

- **Exclusive.** A process that writes a run holds its claim: an ``flock`` on ``.crfl.lock``
  (released by the kernel when the process dies, so a killed run never blocks its resume). A
  second writer gets :class:`RunDirError` naming the directory and the holder's pid. A fresh run
  is only created in a new or empty directory: a directory that is not a run is never written
  into, and nothing of the user's is overwritten.
- **One configuration.** ``model_final.pt`` and ``checkpoint.pt`` carry :func:`config_hash` of
  the training part of the resolved config (:func:`crfl.config.training_part`); readers refuse a
  ``config.yaml`` that does not hash to it (an edited ``server.sigma`` or ``run.dtype`` would
  change the certificate silently). Files of crfl 0.1.0 carry :func:`legacy_config_hash`
  (without ``run.dtype``): accepted, with a note, where the stored parameters have config.yaml's dtype.
- **All or nothing.** A result set (training's final files, certification's files) is staged in
  ``.crfl-stage/`` and switched in by :meth:`ResultSet.commit`: a ``COMMIT`` list is written
  atomically, then every file is renamed into place. A claim (or a reader finding a committed
  stage) rolls a committed stage forward and drops an uncommitted one, so every reader sees the
  old set or the new one, never a mix. Stale temporary files of killed writes are swept.
- **Validated reads.** A corrupt, truncated, foreign or non-UTF-8 file gives :class:`RunDirError`
  naming the file, the problem and what to do; never a traceback. Torch files are read only by
  :func:`load_torch` (``weights_only=True``): a pickle payload is refused, never run.
- **One integrity record.** :meth:`ResultSet.commit` writes ``integrity.json`` into the set it
  switches in: the sha256 and size of each of its files (entries of earlier sets kept), the config
  hash and, for results written outside their run, the digest of the certified model. Every typed
  reader checks the bytes it parsed against it (:meth:`RunDir.verify`): an edited, truncated,
  deleted, unlisted or other run's file is refused naming it. ``checkpoint.pt`` carries its own
  :func:`state_digest`, and its round must match its rows. Directories written before records are
  read with a note (summary.json's ``integrity`` key tells a deleted record from an old directory).
  Not a signature: a consistent rewrite of a whole directory is not detected.

Use::

    run = create_run(out)                 # or resume_run(out); a claim, released by run.release()
    run.write_config(resolved)
    run.write_checkpoint({...}, config_hash=h)
    with run.results() as rs:             # training's final set
        rs.write_dict_csv(ROUNDS, ROUND_COLUMNS, rows); rs.torch_save(MODEL, final)
        rs.write_json(ATTACKS, {...}); rs.update_summary({"training": block.to_dict()})

    # certification, in certify_run (compute first, then one staged write):
    cfg, final, attack_log = load_run(src, overrides)      # validated, hash-checked
    with results_for(out_dir or src, base=src) as rs:      # claims out_dir for the write
        rs.write_csv("certificates_clean.csv", CERT_COLUMNS, rows) ...
        rs.update_summary({"certificate": ..., "smoothing": ..., "results": ...})
    # after the with block the whole set is in place; the CLI then prints and plots.
"""

from __future__ import annotations

import csv
import dataclasses
import errno
import fcntl
import hashlib
import io as _io
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crfl import io
from crfl.validation import ConfigError

CONFIG = "config.yaml"
CHECKPOINT = "checkpoint.pt"
ROUNDS = "rounds.csv"
ATTACKS = "attack.json"
MODEL = "model_final.pt"
SUMMARY = "summary.json"
LOCK = ".crfl.lock"
STAGE = ".crfl-stage"
COMMIT = "COMMIT"
#: The integrity record: sha256 of every file a result set switched in (:class:`ResultSet`), bound to
#: the run's configuration hash and (for a certification written elsewhere) to the model it certifies.
RECORD = "integrity.json"
RECORD_FORMAT = "crfl-integrity/1"
#: Files a reader takes without the record: config.yaml (bound by its hash to the model and the
#: checkpoint), the checkpoints (each carries its own state digest) and the record itself.
UNRECORDED = ("config.yaml", "checkpoint.pt", "flower_checkpoint.pt", RECORD)
CERT_KINDS = ("clean", "backdoor")
#: The engines that write run directories (config.yaml's ``provenance.engine``; :mod:`crfl.driver`).
SIMULATOR = "simulator"
FLOWER = "flower"
ENGINES = (SIMULATOR, FLOWER)
#: The Flower server's checkpoint before the one driver (read-only: a resume converts it to CHECKPOINT).
LEGACY_FLOWER_CHECKPOINT = "flower_checkpoint.pt"
#: How each engine's run is resumed (for the refusal when another engine tries).
RESUME_HOW = {
    SIMULATOR: "resume it with the simulator: `crfl train --resume DIR`",
    FLOWER: "resume it over Flower instead: `flwr run . --run-config \"out-dir='DIR' resume=true\"` (docs/flower.md)",
}


#: Directories the note on a missing integrity record was printed for (once per process).
_NOTED: set[str] = set()


class RunDirError(ValueError):
    """A run directory or one of its files cannot be used; the message names it and what to do."""


# ---------------------------------------------------------------------------------------------
# typed records


@dataclass(frozen=True)
class RoundRow:
    """One row of rounds.csv (None: not measured in that round)."""

    round: int
    clean_acc: float | None = None
    backdoor_acc: float | None = None
    norm_before_clip: float | None = None
    rho: float | None = None
    sigma: float | None = None
    clipped: int | None = None
    attack: int | None = None
    attacker_weights: list[float] | None = None
    aggregation_fixed_weights: int | None = None
    twin_distance: float | None = None


ROUND_COLUMNS = [f.name for f in dataclasses.fields(RoundRow)]


@dataclass(frozen=True)
class AttackRecord:
    """attack.json's entry for one attack round (built by :func:`crfl.train.attack_record`).

    One entry per attacker in the lists: p_i (None where the rule has no per-client weight),
    the configured p_i, tau_i, gamma, eta, the per-step poison ratio q_s/n_s and nominal q_B/n_B,
    ||delta||; the norm and class-centred operator norm of the broadcast model w~_{t-1}.
    """

    round: int
    attackers: list[int]
    p: list[float] | None
    configured_p: list[float]
    tau: list[int]
    gamma: list[float]
    eta: list[float]
    poison_ratio: list[float]
    nominal_poison_ratio: list[float]
    delta_norm: list[float]
    start_norm: float
    start_centred_opnorm: float | None
    p_total: float | None = None  # the sum of all clients' weights in the round
    aggregation: dict[str, Any] | None = None
    measured: dict[str, Any] | None = None
    start_centred_column_norms: list[float] | None = None  # per input column, for a trigger-support certificate

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k in ("p_total", "aggregation", "measured", "start_centred_column_norms"):
            if d[k] is None:
                del d[k]
        return d

    @staticmethod
    def from_dict(d: Any, where: str) -> "AttackRecord":
        if not isinstance(d, Mapping):
            raise RunDirError(f"{where} must be a mapping; found {type(d).__name__}.")
        names = [f.name for f in dataclasses.fields(AttackRecord)]
        missing = [k for k in names[:12] if k not in d]
        unknown = sorted(set(d) - set(names))
        if missing or unknown:
            raise RunDirError(f"{where} lacks {missing} or has unknown keys {unknown}.")
        n = len(d["attackers"]) if isinstance(d["attackers"], list) else -1
        lists = ("attackers", "configured_p", "tau", "gamma", "eta", "poison_ratio", "nominal_poison_ratio", "delta_norm")
        for k in lists + (("p",) if d["p"] is not None else ()):
            v = d[k]
            if not isinstance(v, list) or len(v) != n or not all(_is_number(x) for x in v):
                raise RunDirError(f"{where}: '{k}' must be a list of {max(n, 0)} numbers; found {v!r}.")
        if not isinstance(d["round"], int) or d["round"] < 1:
            raise RunDirError(f"{where}: 'round' must be a positive integer; found {d['round']!r}.")
        for k in ("start_norm", "start_centred_opnorm"):
            if not (_is_number(d[k]) or (k == "start_centred_opnorm" and d[k] is None)):
                raise RunDirError(f"{where}: '{k}' must be a number; found {d[k]!r}.")
        cn = d.get("start_centred_column_norms")
        if cn is not None and not (isinstance(cn, list) and all(_is_number(x) and x >= 0 for x in cn)):
            raise RunDirError(f"{where}: 'start_centred_column_norms' must be a list of numbers >= 0; found {str(cn)[:80]}.")
        return AttackRecord(**{k: d.get(k) for k in names})


@dataclass(frozen=True)
class AttackLog:
    """attack.json: the trigger's norm and one record per attack round."""

    trigger_norm: float
    rounds: list[AttackRecord]

    def to_dict(self) -> dict[str, Any]:
        return {"trigger_norm": self.trigger_norm, "rounds": [r.to_dict() for r in self.rounds]}


@dataclass(frozen=True)
class TrainingBlock:
    """summary.json's ``training`` block (``extra``: keys a server adds, e.g. Flower's)."""

    rounds: int
    final_clean_acc: float | None
    final_backdoor_acc: float | None
    final_norm: float
    attack_rounds: list[int]
    seconds: float
    seconds_per_round: float
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {**{k: v for k, v in d.items() if k != "extra"}, **self.extra}

    @staticmethod
    def from_dict(d: Any, where: str) -> "TrainingBlock":
        names = [f.name for f in dataclasses.fields(TrainingBlock) if f.name != "extra"]
        if not isinstance(d, Mapping) or any(k not in d for k in names):
            raise RunDirError(f"{where} must hold {names}; found {sorted(d) if isinstance(d, Mapping) else d!r}.")
        return TrainingBlock(**{k: d[k] for k in names}, extra={k: v for k, v in d.items() if k not in names})


RESULT_KEYS = ("points", "base_accuracy", "smoothed_accuracy", "abstain_rate", "max_radius")


@dataclass(frozen=True)
class ResultBlock:
    """summary.json's ``results.clean`` / ``results.backdoor``: accuracies and radius on ``points`` test points."""

    points: int
    base_accuracy: float
    smoothed_accuracy: float
    abstain_rate: float
    max_radius: float | str | None
    median_radius_certified: float | None = None
    curve: list[dict[str, float]] = field(default_factory=list)


@dataclass(frozen=True)
class CertificateTable:
    """certificates_{clean,backdoor}.csv as arrays (radius 0 where not certified)."""

    index: Any
    label: Any
    prediction: Any
    radius: Any
    p_a_lower: Any
    p_b_upper: Any

    def __len__(self) -> int:
        return len(self.index)


CERT_COLUMNS = ["index", "label", "prediction", "p_a_lower", "p_b_upper", "radius"]  # at least these (certify may add)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


# ---------------------------------------------------------------------------------------------
# the configuration hash


def config_hash(d: Mapping[str, Any]) -> str:
    """sha256 (16 hex digits) of :func:`crfl.config.training_part` of a config as config.yaml holds it."""
    from crfl.config import training_part

    return _hash(training_part(d))


def legacy_config_hash(d: Mapping[str, Any]) -> str:
    """The hash crfl <= 0.1.0 wrote: without ``run`` (so without ``run.dtype``), with ``preset``.

    Only for reading run directories written before :func:`crfl.config.training_part`; the
    reader that accepts it also checks the stored parameters' dtype against ``run.dtype``.
    """
    return _hash({k: v for k, v in d.items() if k not in ("provenance", "certify", "run")})


def _hash(part: Mapping[str, Any]) -> str:
    canon = io.load_yaml(io.yaml.safe_dump(dict(part), sort_keys=True))
    return hashlib.sha256(json.dumps(canon, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# digests: the integrity record and the checkpoint's state


def sha256(data: bytes) -> str:
    """The sha256 of a file's bytes (hex), as the integrity record lists it."""
    return hashlib.sha256(data).hexdigest()


def state_digest(state: Mapping[str, Any]) -> str:
    """sha256 of a checkpoint's state as loaded (tensors by dtype, shape and bytes; containers in order).

    Written into checkpoint.pt beside the state (key ``state_digest``) and recomputed by
    :meth:`RunDir.read_checkpoint`: an edited round, parameter or record is refused.
    """
    import torch

    h = hashlib.sha256()

    def feed(o: Any) -> None:
        if isinstance(o, torch.Tensor):
            t = o.detach().cpu().contiguous().reshape(-1)
            h.update(f"T{o.dtype}{tuple(o.shape)}|".encode())
            h.update(t.view(torch.uint8).numpy().tobytes())
        elif isinstance(o, Mapping):
            h.update(f"D{len(o)}|".encode())
            for k in sorted(o, key=lambda k: (type(k).__name__, str(k))):
                feed(k)
                feed(o[k])
        elif isinstance(o, (list, tuple)):
            h.update(f"L{len(o)}|".encode())
            for v in o:
                feed(v)
        elif isinstance(o, float):
            h.update(f"F{o.hex()}|".encode())
        elif o is None or isinstance(o, (bool, int, str)):
            h.update(f"{type(o).__name__}:{len(str(o))}:{o}|".encode())
        else:
            h.update(f"?{type(o).__name__}:{o!r}|".encode())

    feed({k: v for k, v in state.items() if k != "state_digest"})
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# the claim


class Claim:
    """An exclusive ``flock`` on DIR/.crfl.lock; the kernel drops it when the process dies."""

    def __init__(self, directory: Path, fd: int) -> None:
        self.directory, self._fd = directory, fd

    @staticmethod
    def acquire(directory: Path, what: str = "run") -> "Claim":
        lock = directory / LOCK
        for _ in range(100):
            try:
                fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as e:
                raise _os_error(e, directory, f"choose a writable directory for the {what}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = _read_pid(fd)
                os.close(fd)
                raise RunDirError(
                    f"The {what} directory {str(directory)!r} is in use by another crfl process"
                    f"{f' (pid {pid})' if pid else ''}; wait for it to finish or choose another directory."
                ) from None
            try:  # the holder may have released and unlinked the file between our open and flock
                same = os.fstat(fd).st_ino == os.stat(lock).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                return Claim(directory, fd)
            os.close(fd)
        raise RunDirError(f"Could not claim {str(directory)!r}: its lock file keeps changing; retry.")  # pragma: no cover

    def release(self) -> None:
        if self._fd < 0:
            return
        try:
            os.unlink(self.directory / LOCK)
        except OSError:
            pass
        os.close(self._fd)
        self._fd = -1

    @property
    def held(self) -> bool:
        return self._fd >= 0


def _read_pid(fd: int) -> str:
    try:
        return os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return ""


def _is_ours(name: str) -> bool:
    """Files crfl itself may leave in a directory it has not finished: the lock, stage, temporaries."""
    return name in (LOCK, STAGE) or bool(io.TEMP_PATTERN.match(name))


def sweep_stale(directory: Path) -> list[str]:
    """Under a claim: finish or drop a staged result set, delete temporaries of killed writes."""
    removed = []
    stage = directory / STAGE
    if stage.is_dir():
        _recover(directory)
        removed.append(STAGE)
    for p in directory.iterdir():
        if p.name != LOCK and p.name != STAGE and io.TEMP_PATTERN.match(p.name) and p.is_file():
            p.unlink()
            removed.append(p.name)
    return removed


def _recover(directory: Path) -> None:
    stage = directory / STAGE
    commit = stage / COMMIT
    if commit.is_file():
        names = commit.read_text().split("\n")
        for n in names:
            if n and (stage / n).is_file():
                os.replace(stage / n, directory / n)
        io._fsync_dir(directory)
    shutil.rmtree(stage, ignore_errors=True)


def _os_error(e: OSError, path: Path, todo: str) -> RunDirError:
    if e.errno == errno.ENOSPC:
        return RunDirError(f"No space left on the device of {str(path)!r} (disk full); free space and rerun.")
    return RunDirError(f"Cannot use {str(path)!r}: {e.strerror or e}; {todo}.")


# ---------------------------------------------------------------------------------------------
# the run directory


class RunDir:
    """A run directory, read or claimed. Writers need the claim (:func:`create_run`, :func:`resume_run`)."""

    def __init__(self, path: str | Path, claim: Claim | None = None, created: bool = False) -> None:
        self.path = Path(path)
        self.claim = claim
        self.created = created  # the claim created the directory
        self._record: dict[str, Any] | None = None  # integrity.json, read once (:meth:`record`)
        self._source_ok = False  # the certified model's digest was checked (:meth:`_verify_source`)

    # -- lifetime
    def release(self) -> None:
        if self.claim is not None:
            self.claim.release()

    def __enter__(self) -> "RunDir":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def discard_unstarted(self) -> None:
        """Remove a fresh run that never reached a checkpoint (its config.yaml, and the directory if the claim made it)."""
        self._need_claim()
        if self.exists(CHECKPOINT) or self.exists(LEGACY_FLOWER_CHECKPOINT):
            return
        (self.path / CONFIG).unlink(missing_ok=True)
        (self.path / ROUNDS).unlink(missing_ok=True)  # the rows appended so far (append_rounds)
        sweep_stale(self.path)
        if self.created and not [n for n in os.listdir(self.path) if n != LOCK]:
            self.release()
            shutil.rmtree(self.path, ignore_errors=True)

    def _need_claim(self) -> None:
        if self.claim is None or not self.claim.held:
            raise RuntimeError(f"writing {self.path} needs its claim (create_run / resume_run)")

    # -- writers
    def write_config(self, resolved: Mapping[str, Any]) -> None:
        self._need_claim()
        io.write_yaml(self.path / CONFIG, dict(resolved))

    def write_checkpoint(self, state: dict[str, Any], config_hash: str) -> None:
        """checkpoint.pt, atomically; a legacy ``flower_checkpoint.pt`` it supersedes is removed after."""
        self._need_claim()
        full = {**state, "config_hash": config_hash}
        io.torch_save(self.path / CHECKPOINT, {**full, "state_digest": state_digest(full)})
        (self.path / LEGACY_FLOWER_CHECKPOINT).unlink(missing_ok=True)

    def results(self, base: str | Path | None = None) -> "ResultSet":
        """A staged result set for this (claimed) directory; see :class:`ResultSet`."""
        self._need_claim()
        return ResultSet(self.path, base=Path(base) if base is not None else None)

    # -- readers
    def exists(self, name: str) -> bool:
        return (self.path / name).is_file()

    def read_text(self, name: str, todo: str = "restore it or rerun the command that wrote it") -> str:
        """A UTF-8 file of the run, checked against the integrity record (see :meth:`verify`)."""
        text, data = self._text(name, todo)
        self.verify(name, data)
        return text

    def _text(self, name: str, todo: str) -> tuple[str, bytes]:
        data = self._bytes(name, todo)
        return _decode(self.path / name, data, todo), data

    def _bytes(self, name: str, todo: str) -> bytes:
        path = self.path / name
        try:
            return path.read_bytes()
        except FileNotFoundError:
            if name in self.record()["files"]:
                raise RunDirError(f"{path} is missing, but the run's integrity record {self.path / RECORD} lists it: "
                                  "it was deleted; restore it or rerun the command that wrote it.") from None
            raise RunDirError(f"The run directory {str(self.path)!r} has no {name}: {todo}.") from None
        except IsADirectoryError:
            raise RunDirError(f"{path} is a directory, not a file; {todo}.") from None

    # -- the integrity record
    def record(self) -> dict[str, Any]:
        """integrity.json, validated ({"files": {}} for a directory without one; see :data:`RECORD`).

        A directory whose summary.json says it was written with a record, but that has none, is refused;
        one written before records (no marker) is accepted with a note, once.
        """
        if self._record is not None:
            return self._record
        path = self.path / RECORD
        if not path.is_file():
            rec: dict[str, Any] = {"files": {}, "absent": True}
            marked = False
            try:
                marked = RECORD in json.loads((self.path / SUMMARY).read_bytes()).get("integrity", {}).get("record", "")
            except (OSError, ValueError, AttributeError, TypeError):
                pass
            if marked:
                raise RunDirError(
                    f"The run directory {str(self.path)!r} has no {RECORD}, but its summary.json was written with one: "
                    "the integrity record was deleted; restore it, or rerun the command that wrote the results."
                )
            if ((self.path / MODEL).is_file() or (self.path / SUMMARY).is_file()) and str(self.path) not in _NOTED:
                _NOTED.add(str(self.path))
                logging.getLogger("crfl.rundir").warning(
                    "note: %s has no integrity record (%s; written by crfl before it); its files are read without "
                    "digests.", self.path, RECORD)
            self._record = rec
            return rec
        data = _json(path, _decode(path, self._bytes(RECORD, "rerun the command that wrote the results"),
                                   "rerun the command that wrote the results"))
        files = data.get("files") if isinstance(data, dict) else None
        if (not isinstance(data, dict) or data.get("format") != RECORD_FORMAT or not isinstance(files, dict)
                or not all(isinstance(v, dict) and isinstance(v.get("sha256"), str) and isinstance(v.get("bytes"), int)
                           for v in files.values())):
            raise RunDirError(f"{path} is not a crfl integrity record ({RECORD_FORMAT}); restore it, or rerun the "
                              "command that wrote the results.")
        self._record = data
        return data

    def verify(self, name: str, data: bytes) -> None:
        """Refuse ``data`` (the bytes just read of ``name``) unless the integrity record lists exactly them.

        Files of :data:`UNRECORDED` are bound otherwise; a directory without a record (before crfl
        wrote records) is read as it is. A file the record does not list is refused too: it was not
        switched in with this run's results (copied in, or left by something else).
        """
        if name in UNRECORDED:
            return
        rec = self.record()
        if rec.get("absent"):
            return
        path = self.path / name
        entry = rec["files"].get(name)
        if entry is None:
            raise RunDirError(f"{path} is not in the run's integrity record {self.path / RECORD}: it was not written "
                              "with this run's results (copied in from elsewhere?); remove it or rerun the command that writes it.")
        got = sha256(data)
        if entry["sha256"] != got or entry["bytes"] != len(data):
            if (self.path / STAGE / COMMIT).is_file():  # a live writer is switching its set in (open_run leaves it alone)
                raise RunDirError(f"{path} is being replaced: a crfl process is switching in a new result set in "
                                  f"{str(self.path)!r} right now; rerun when it has finished.")
            raise RunDirError(
                f"{path} does not match the run's integrity record (sha256 {got[:16]}, {len(data)} bytes; recorded "
                f"{entry['sha256'][:16]}, {entry['bytes']} bytes): it was edited, truncated or copied from another run. "
                "Restore the original file or rerun the command that wrote it."
            )
        self._verify_source(rec)

    def _verify_source(self, rec: Mapping[str, Any]) -> None:
        """A result set written outside its run (a sweep's cert-* folder) is bound to the model it certified."""
        src = rec.get("source")
        if not isinstance(src, dict) or self._source_ok:
            return
        base = (self.path / str(src.get("dir", ""))).resolve()
        model = base / MODEL
        if model.is_file() and src.get("model_sha256") and sha256(model.read_bytes()) != src["model_sha256"]:
            raise RunDirError(
                f"The results in {str(self.path)!r} were computed from another model than {model} (its sha256 differs from "
                f"the one {self.path / RECORD} records): the run was retrained or replaced; rerun the certification."
            )
        self._source_ok = True

    def verify_files(self, role: str | None = None, contents: bool = True) -> None:
        """Check every file the integrity record lists (``role``: only those of that result set kind;
        ``contents=False``: only that each is there, for readers whose typed reads check the bytes)."""
        rec = self.record()
        for name, entry in rec["files"].items():
            if role is None or entry.get("role") == role:
                data = self._bytes(name, "restore it or rerun the command that wrote it")
                if contents:
                    self.verify(name, data)

    def read_config(self) -> dict[str, Any]:
        """config.yaml as a mapping (provenance included)."""
        path = self.path / CONFIG
        text = self.read_text(CONFIG, "restore it from a copy or retrain")
        try:
            data = io.load_yaml(text)
        except io.yaml.YAMLError as e:
            raise RunDirError(f"{path} is not valid YAML ({io.yaml_problem(e)}); restore it from a copy or retrain.") from None
        if not isinstance(data, dict) or "server" not in data:
            raise RunDirError(f"{path} is not a crfl config.yaml (no 'server' section); restore it or retrain.")
        return data

    def load_config(self, overrides: Mapping[str, Any] | None = None):
        """config.yaml as a validated :class:`~crfl.config.Config` (``overrides``: dotted keys, e.g. certify.*)."""
        from crfl.config import from_dict, set_dotted

        raw = self.read_config()
        from crfl.plugins import import_recorded  # the user's parts the run was trained with (rules, datasets, ...)

        import_recorded((raw.get("provenance") or {}).get("plugins"), f"The run {str(self.path)!r}")
        d = {k: v for k, v in raw.items() if k != "provenance"}
        for k, v in (overrides or {}).items():
            set_dotted(d, k, v)
        try:
            return from_dict(d)
        except ConfigError as e:
            if overrides and any(k in str(e) for k in overrides):
                raise
            raise RunDirError(f"{self.path / CONFIG}: {e} Restore the file or retrain.") from None

    def read_torch(self, name: str, required: Sequence[str], todo: str,
                   check: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """A torch file of the run, loaded with ``weights_only=True`` from the bytes checked against the
        integrity record (``check``: validation that speaks first, e.g. the configuration hash)."""
        path = self.path / name
        if not path.is_file() and name not in self.record()["files"]:
            raise RunDirError(f"The run directory {str(self.path)!r} has no {name}: {todo}.")
        data = self._bytes(name, todo)
        obj = load_torch(path, data, todo)
        if not isinstance(obj, dict) or any(k not in obj for k in required):
            raise RunDirError(f"{path} is not a crfl {name} (it lacks {list(required)}); {todo}.")
        import torch

        p = obj.get("params")
        if not isinstance(p, torch.Tensor) or p.ndim not in (1, 2) or not bool(torch.isfinite(p).all()):
            raise RunDirError(f"{path} holds no finite parameter vector; {todo}.")
        if check is not None:
            check(obj)
        self.verify(name, data)
        return obj

    def read_model(self, cfg_dict: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """model_final.pt, checked against config.yaml's hash (``cfg_dict``: config.yaml, read if None)."""
        todo = "train it to the end first (crfl train --resume DIR)"
        return self.read_torch(MODEL, ("params", "config_hash"), todo,
                               check=lambda o: self._check_hash(MODEL, o["config_hash"], cfg_dict, o["params"]))

    def read_checkpoint(self, cfg_dict: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
        """checkpoint.pt (None if the run stopped before its first checkpoint), hash-checked.

        A Flower run written before the one driver kept its state in ``flower_checkpoint.pt``
        (keys ``flower_rounds`` and ``state_tag``); it is read, with ``weights_only=True`` like every
        torch file, and returned in the driver's keys (``engine_log``, ``identity``).
        """
        todo = "delete it to restart the run from round 1, or train into a new directory"
        required = ("round", "params", "records", "attack_log", "config_hash")
        for name in (CHECKPOINT, LEGACY_FLOWER_CHECKPOINT):
            if (self.path / name).exists() and not (self.path / name).is_file():
                raise RunDirError(f"{self.path / name} is a directory, not a file; move it away to restart the run from "
                                  "round 1, or train into a new directory.")
        if self.exists(CHECKPOINT):
            ck = self.read_torch(CHECKPOINT, required, todo)
            self._check_hash(CHECKPOINT, ck["config_hash"], cfg_dict, ck["params"])
            self._check_state(CHECKPOINT, ck, todo)
            return ck
        if not self.exists(LEGACY_FLOWER_CHECKPOINT):
            return None
        old = self.read_torch(LEGACY_FLOWER_CHECKPOINT, required + ("flower_rounds", "state_tag"), todo)
        self._check_hash(LEGACY_FLOWER_CHECKPOINT, old["config_hash"], cfg_dict, old["params"])
        self._check_state(LEGACY_FLOWER_CHECKPOINT, old, todo)
        ck = {k: v for k, v in old.items() if k not in ("flower_rounds", "state_tag")}
        ck.update(engine=FLOWER, engine_log=old["flower_rounds"], identity=old["state_tag"], file=LEGACY_FLOWER_CHECKPOINT)
        return ck

    def _check_state(self, name: str, ck: Mapping[str, Any], todo: str) -> None:
        """A checkpoint's own binding: its state digest (written since crfl wrote integrity records) and
        its round, which must be the number of round rows it holds (rows 1..round in order)."""
        path = self.path / name
        stored = ck.get("state_digest")
        if stored is not None and stored != state_digest(ck):
            raise RunDirError(f"{path} does not match its own state digest: it was edited or damaged after it was "
                              f"written; {todo}.")
        rnd, recs = ck.get("round"), ck.get("records")
        rounds = [r.get("round") if isinstance(r, Mapping) else None for r in recs] if isinstance(recs, list) else None
        if not isinstance(rnd, int) or isinstance(rnd, bool) or rounds != list(range(1, rnd + 1)):
            raise RunDirError(f"{path} says round {rnd!r} but holds the rows of rounds "
                              f"{rounds if rounds is None or len(rounds) < 8 else rounds[:3] + ['...'] + rounds[-2:]}: "
                              f"its round was edited or the file is damaged; {todo}.")
        if stored is None and name == CHECKPOINT:
            logging.getLogger("crfl.rundir").warning(
                "note: %s carries no state digest (written by crfl before integrity records); its round and rows "
                "are consistent, so it is used.", path)

    def engine(self, cfg_dict: Mapping[str, Any] | None = None) -> str:
        """The engine that wrote the run: config.yaml's ``provenance.engine`` (runs written before the
        marker: ``flower`` where a Flower block or checkpoint is there, else ``simulator``)."""
        saved = cfg_dict if cfg_dict is not None else self.read_config()
        prov = saved.get("provenance") or {}
        engine = prov.get("engine")
        if engine is None:
            engine = FLOWER if ("flower" in prov or self.exists(LEGACY_FLOWER_CHECKPOINT)) else SIMULATOR
        if engine not in ENGINES:
            raise RunDirError(f"{self.path / CONFIG} names the engine {engine!r}; crfl knows {list(ENGINES)}. Restore the file.")
        return str(engine)

    def refuse_engine(self, engine: str, cfg_dict: Mapping[str, Any] | None = None) -> None:
        """Raise ConfigError unless the run was written by ``engine`` (no engine resumes another's run)."""
        have = self.engine(cfg_dict)
        if have != engine:
            raise ConfigError(
                f"The directory {str(self.path)!r} holds a run of the {have} engine (provenance.engine: {have}); "
                f"the {engine} engine cannot resume it. " + RESUME_HOW[have].replace("DIR", str(self.path)) + "."
            )

    def _check_hash(self, name: str, stored: Any, cfg_dict: Mapping[str, Any] | None, params: Any) -> None:
        d = cfg_dict if cfg_dict is not None else self.read_config()
        have = config_hash(d)
        if stored == have:
            return
        run = d.get("run")
        dtype = run.get("dtype") if isinstance(run, Mapping) else None
        if stored == legacy_config_hash(d) and str(params.dtype) == f"torch.{dtype}":
            # written before run.dtype was hashed: the parameters' own dtype stands in for it
            logging.getLogger("crfl.rundir").warning(
                "note: %s carries the configuration hash of crfl 0.1.0 (without run.dtype); accepted, since its "
                "parameters are %s as config.yaml says.", self.path / name, dtype)
            return
        raise RunDirError(
            f"{self.path / name} was written by the configuration with hash {stored}, but "
            f"{self.path / CONFIG} hashes to {have}: the config was edited or belongs to another run. "
            "Restore the original config.yaml (certification settings go on the command line) or retrain."
        )

    def read_json(self, name: str, todo: str = "rerun the command that wrote it") -> Any:
        text, data = self._text(name, todo)
        obj = _json(self.path / name, text)
        self.verify(name, data)
        return obj

    def read_rows(self, name: str, columns: Sequence[str], todo: str = "rerun crfl certify") -> list[dict[str, str]]:
        """A CSV result file of the run whose header includes ``columns``, checked against the integrity record."""
        text, data = self._text(name, todo)
        rows = _csv_rows(self.path / name, text, columns, exact=False)
        self.verify(name, data)
        return rows

    def read_attacks(self) -> AttackLog:
        path = self.path / ATTACKS
        text, data = self._text(ATTACKS, "train the run to the end first (crfl train --resume DIR)")
        d = _json(path, text)
        if not isinstance(d, dict) or not isinstance(d.get("rounds"), list) or not _is_number(d.get("trigger_norm")):
            raise RunDirError(f"{path} is not a crfl attack log (needs 'trigger_norm' and a list 'rounds'); retrain.")
        recs = [AttackRecord.from_dict(r, f"{path} entry {i}") for i, r in enumerate(d["rounds"])]
        self.verify(ATTACKS, data)
        return AttackLog(float(d["trigger_norm"]), recs)

    def read_rounds(self) -> list[RoundRow]:
        path = self.path / ROUNDS
        text, data = self._text(ROUNDS, "train the run first")
        rows = _csv_rows(path, text, ROUND_COLUMNS)
        out = []
        for i, r in enumerate(rows, start=2):
            try:
                out.append(RoundRow(
                    round=int(r["round"]),
                    **{k: _opt(float, r[k]) for k in ("clean_acc", "backdoor_acc", "norm_before_clip", "rho", "sigma",
                                                       "twin_distance")},
                    **{k: _opt(int, r[k]) for k in ("clipped", "attack", "aggregation_fixed_weights")},
                    attacker_weights=[float(v) for v in r["attacker_weights"].split(";")] if r["attacker_weights"] else None,
                ))
            except (TypeError, ValueError) as e:
                raise RunDirError(f"{path} line {i} is corrupt ({e}); retrain or restore the file.") from None
        self.verify(ROUNDS, data)
        return out

    def read_summary(self, required: bool = False) -> dict[str, Any]:
        """summary.json ({} if absent and not ``required``); its ``training`` block is checked."""
        path = self.path / SUMMARY
        if not path.is_file() and not required and SUMMARY not in self.record()["files"]:
            return {}
        text, data = self._text(SUMMARY, "rerun the command that wrote it")
        d = _json(path, text)
        if not isinstance(d, dict):
            raise RunDirError(f"{path} is not a crfl summary (not a mapping); rerun the command that wrote it.")
        if "training" in d:
            TrainingBlock.from_dict(d["training"], f"{path} block 'training'")
        for k in CERT_KINDS:
            r = (d.get("results") or {}).get(k) if isinstance(d.get("results"), dict) else None
            if r is not None and (not isinstance(r, dict) or any(x not in r for x in RESULT_KEYS)):
                raise RunDirError(f"{path} block 'results.{k}' must hold {list(RESULT_KEYS)}; rerun crfl certify.")
        self.verify(SUMMARY, data)
        return d

    def read_certificates(self, kind: str) -> CertificateTable:
        """certificates_<kind>.csv, complete: every row parsed, as many as summary.json's results count."""
        import numpy as np

        name = f"certificates_{kind}.csv"
        path = self.path / name
        text, data = self._text(name, "rerun crfl certify")
        rows = _csv_rows(path, text, CERT_COLUMNS, exact=False)
        try:
            cols = {
                "index": np.array([int(r["index"]) for r in rows], dtype=np.int64),
                "label": np.array([int(r["label"]) for r in rows], dtype=np.int64),
                "prediction": np.array([int(r["prediction"]) for r in rows], dtype=np.int64),
                "radius": np.array([float(r["radius"]) if r["radius"] else 0.0 for r in rows]),
                "p_a_lower": np.array([float(r["p_a_lower"]) for r in rows]),
                "p_b_upper": np.array([float(r["p_b_upper"]) for r in rows]),
            }
        except (TypeError, ValueError) as e:
            raise RunDirError(f"{path} is corrupt or truncated ({e}); rerun crfl certify.") from None
        if len(rows) == 0 or not np.array_equal(cols["index"], np.arange(len(rows))):
            raise RunDirError(f"{path} does not list the test points 0..n-1 in order; rerun crfl certify.")
        res = (self.read_summary().get("results") or {}).get(kind) or {}
        if "points" in res and res["points"] != len(rows):
            raise RunDirError(
                f"{path} holds {len(rows)} rows but {self.path / SUMMARY} counts {res['points']} points: "
                "the result set is incomplete; rerun crfl certify."
            )
        self.verify(name, data)
        return CertificateTable(**cols)


def _first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return s[0][:200] if s else type(e).__name__


def read_text(path: Path, todo: str) -> str:
    """A UTF-8 text file; a missing or undecodable one gives RunDirError naming it."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise RunDirError(f"The run directory {str(path.parent)!r} has no {path.name}: {todo}.") from None
    except IsADirectoryError:
        raise RunDirError(f"{path} is a directory, not a file; {todo}.") from None
    return _decode(path, data, todo)


def load_torch(path: Path, data: bytes, todo: str) -> Any:
    """The one way crfl reads a torch file: ``weights_only=True`` (tensors, numbers, strings and containers
    only, so a pickle payload is refused, never run), from bytes already read; any failure names the file."""
    import torch

    try:
        return torch.load(_io.BytesIO(data), weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a corrupt, foreign or unsafe file
        raise RunDirError(f"{path} is not a crfl file (corrupt or truncated: {_first_line(e)}); {todo}.") from None


def _decode(path: Path, data: bytes, todo: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RunDirError(f"{path} is not UTF-8 text (byte {data[e.start]:#04x} at offset {e.start}); {todo}.") from None


def _json(path: Path, text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise RunDirError(f"{path} is not valid JSON ({e}); rerun the command that wrote it.") from None


def _csv_rows(path: Path, text: str, columns: Sequence[str], exact: bool = True) -> list[dict[str, str]]:
    """Rows of a CSV file whose header is ``columns`` (or, ``exact=False``, includes them)."""
    reader = csv.reader(_io.StringIO(text))
    header = next(reader, None) or []
    if (header != list(columns)) if exact else (set(columns) - set(header) or len(set(header)) != len(header)):
        raise RunDirError(f"{path} is not a crfl {path.name} (header {header!r}, expected {list(columns)!r}).")
    rows = []
    for i, r in enumerate(reader, start=2):
        if len(r) != len(header):
            raise RunDirError(f"{path} line {i} has {len(r)} fields, expected {len(header)}: truncated or corrupt.")
        rows.append(dict(zip(header, r)))
    if text and not text.endswith("\n"):
        raise RunDirError(f"{path} ends in the middle of a line: truncated.")
    return rows


def _opt(kind: type, s: str) -> Any:
    return None if s == "" else kind(s)


# ---------------------------------------------------------------------------------------------
# opening, creating, resuming


def _plain_dir(path: Path, param: str) -> Path:
    if path.exists() and not path.is_dir():
        raise ConfigError(f"The '{param}' parameter must name a directory. Got {str(path)!r} instead (a file).")
    return path


def create_run(path: str | Path, param: str = "--out") -> RunDir:
    """Claim a new run directory: it must be new or empty (crfl's own leftovers aside)."""
    p = _plain_dir(Path(path), param)
    created = not p.exists()
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _os_error(e, p, f"choose a writable '{param}' directory") from None
    claim = Claim.acquire(p)
    try:
        names = sorted(os.listdir(p))
        if CONFIG in names:
            raise ConfigError(
                f"The '{param}' directory {str(p)!r} already holds a run; use --resume to continue it or choose another directory."
            )
        foreign = [n for n in names if not _is_ours(n)]
        if foreign:
            shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
            raise ConfigError(
                f"The '{param}' parameter must name a new or empty directory. Got {str(p)!r} instead "
                f"(it holds {shown}, and no run); crfl never writes into a directory that is not a run."
            )
        sweep_stale(p)
    except BaseException:
        claim.release()
        if created:
            shutil.rmtree(p, ignore_errors=True)
        raise
    return RunDir(p, claim, created)


def resume_run(path: str | Path, param: str = "--resume") -> RunDir:
    """Claim an existing run to continue it: a committed stage is finished, temporaries swept."""
    p = _plain_dir(Path(path), param)
    if not p.is_dir():
        raise ConfigError(f"The '{param}' parameter must name a run directory. Got {str(p)!r} instead (no such directory).")
    if not (p / CONFIG).is_file():
        raise ConfigError(f"The '{param}' directory {str(p)!r} holds no config.yaml: nothing to resume.")
    claim = Claim.acquire(p)
    try:
        sweep_stale(p)
    except BaseException:
        claim.release()
        raise
    return RunDir(p, claim)


def open_run(path: str | Path, param: str = "RUN_DIR") -> RunDir:
    """A run directory to read. Leftovers of a killed writer (a committed stage, temporaries) are
    settled first when no other process holds the directory; a live writer's files are left alone."""
    p = Path(path)
    if not p.is_dir():
        what = "a file" if p.exists() else "no such directory"
        raise ConfigError(f"The '{param}' parameter must be a training run directory. Got {str(p)!r} instead ({what}).")
    if any(n == STAGE or io.TEMP_PATTERN.match(n) for n in os.listdir(p)):
        try:
            claim = Claim.acquire(p)
        except RunDirError:
            return RunDir(p)
        try:
            sweep_stale(p)
        finally:
            claim.release()
    return RunDir(p)


def load_run(run_dir: str | Path, overrides: Mapping[str, Any] | None = None):
    """(config with ``overrides``, model_final.pt's dict, attack records as dicts) of a finished run.

    Every file is validated and the model's config hash must match config.yaml.
    """
    run = open_run(run_dir)
    for f in (CONFIG, MODEL, ATTACKS):
        if not run.exists(f):
            raise ConfigError(f"The run directory {str(run.path)!r} has no {f}: train it to the end first (crfl train --resume DIR).")
    saved = run.read_config()
    final = run.read_model(saved)
    cfg = run.load_config(overrides)
    attack_log = [r.to_dict() for r in run.read_attacks().rounds]
    run.read_summary()  # validated now: certification must not fail on it after computing
    run.verify_files(role="training")  # every file of the training result set, as recorded (rounds.csv, flower.json, ...)
    rec = run.record()
    if rec.get("config_hash") not in (None, config_hash(saved)):
        raise RunDirError(f"{run.path / RECORD} was written for the configuration with hash {rec['config_hash']}, but "
                          f"{run.path / CONFIG} hashes to {config_hash(saved)}: the files belong to different runs; "
                          "restore them or retrain.")
    return cfg, final, attack_log


def append_rounds(directory: str | Path, rows: Sequence[Mapping[str, Any]], *, restart: bool = False) -> None:
    """rounds.csv while a run trains: ``rows`` appended as whole lines and flushed, one call per round.

    ``restart`` rewrites the file (atomically) with the header and ``rows`` (a run starting, or
    resuming from its checkpoint's rows). What a reader may rely on mid-run: the header, then one
    complete row per finished round in order, each ending in a newline (ignore a last line
    without one: it is being written); rows past the last checkpoint are written again, with the
    same values, by a resume. The final result set replaces the file whole with the same rows.
    """
    path = Path(directory) / ROUNDS
    buf = _io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    if restart:
        w.writerow(ROUND_COLUMNS)
    for r in rows:
        w.writerow(["" if r.get(k) is None else io._csv_cell(r.get(k)) for k in ROUND_COLUMNS])
    if restart:
        io.atomic_write_text(path, buf.getvalue())
        return
    with open(path, "a", encoding="utf-8") as f:
        f.write(buf.getvalue())
        f.flush()


# ---------------------------------------------------------------------------------------------
# staged result sets


class ResultSet:
    """Files written together: staged in DIR/.crfl-stage, switched in by :meth:`commit` (or dropped).

    Use as a context manager: a normal exit commits, an exception (or Ctrl-C) drops the stage and
    leaves the previous result set untouched. ``update_summary`` merges blocks into the summary
    that is current when it is called (this directory's, else ``base``'s), so training blocks
    and certification blocks live side by side in one summary.json.
    """

    def __init__(self, directory: Path, base: Path | None = None) -> None:
        self.directory, self.base = directory, base
        self.stage = directory / STAGE
        shutil.rmtree(self.stage, ignore_errors=True)
        self.stage.mkdir(parents=True)
        self.names: list[str] = []
        self._summary: dict[str, Any] | None = None

    def _add(self, name: str) -> Path:
        if "/" in name or name in (STAGE, LOCK, COMMIT):
            raise ValueError(f"not a result file name: {name!r}")
        if name not in self.names:
            self.names.append(name)
        return self.stage / name

    def write_bytes(self, name: str, data: bytes) -> None:
        io.atomic_write_bytes(self._add(name), data)

    def write_text(self, name: str, text: str) -> None:
        io.atomic_write_text(self._add(name), text)

    def write_json(self, name: str, obj: Any) -> None:
        io.write_json(self._add(name), obj)

    def write_csv(self, name: str, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
        io.write_csv(self._add(name), header, rows)

    def write_dict_csv(self, name: str, header: Sequence[str], rows: Iterable[Mapping[str, Any]]) -> None:
        io.write_dict_csv(self._add(name), header, rows)

    def torch_save(self, name: str, obj: Any) -> None:
        io.torch_save(self._add(name), obj)

    def update_summary(self, blocks: Mapping[str, Any]) -> dict[str, Any]:
        """Merge top-level blocks into summary.json (staged); returns the whole summary."""
        if self._summary is None:
            src = self.directory if (self.directory / SUMMARY).is_file() else self.base
            self._summary = RunDir(src).read_summary() if src is not None else {}
        self._summary.update(blocks)
        self._summary["integrity"] = {"record": RECORD, "format": RECORD_FORMAT}  # a deleted record is noticed
        self.write_json(SUMMARY, self._summary)
        return self._summary

    def commit(self) -> None:
        try:  # before the COMMIT list: a failure drops the stage and leaves the previous set in place
            for n in self.names:
                if (self.directory / n).exists() and not (self.directory / n).is_file():
                    raise RunDirError(f"{self.directory / n} is a directory, not a file, so crfl cannot put its {n} there; "
                                      "move it away and rerun. Nothing was changed.")
            if self.names:
                self.write_json(RECORD, self._record())
        except BaseException:
            self.abort()
            raise
        io.atomic_write_text(self.stage / COMMIT, "\n".join(self.names) + "\n")
        _recover(self.directory)

    def _record(self) -> dict[str, Any]:
        """The directory's integrity record with this set's files: the previous entries of files this set
        does not rewrite are kept (a certification joins its run's training files), bound to the
        configuration hash and, for results written outside their run, to the certified model's digest."""
        old: dict[str, Any] = {}
        try:
            if (self.directory / RECORD).is_file():
                old = dict(RunDir(self.directory).record()["files"])
            else:  # a directory written before records: its result files are adopted as they are now
                for p in sorted(self.directory.iterdir()):
                    if (p.is_file() and p.name not in UNRECORDED and not _is_ours(p.name) and not p.name.startswith(".")
                            and p.suffix not in (".png", ".pdf")):
                        data = p.read_bytes()
                        old[p.name] = {"sha256": sha256(data), "bytes": len(data), "role": "adopted"}
        except RunDirError:
            old = {}  # a damaged record: the new one lists only this set's files (the others are refused until rewritten)
        role = "training" if MODEL in self.names else "results"
        files = {**old}
        for n in self.names:
            if n == RECORD:
                continue
            data = (self.stage / n).read_bytes()
            files[n] = {"sha256": sha256(data), "bytes": len(data), "role": role}
        rec: dict[str, Any] = {"format": RECORD_FORMAT, "config_hash": None, "files": dict(sorted(files.items()))}
        for d in (self.directory, self.base):
            if d is not None and (d / CONFIG).is_file():
                try:
                    rec["config_hash"] = config_hash(RunDir(d).read_config())
                except RunDirError:
                    pass
                break
        if self.base is not None and self.base.resolve() != self.directory.resolve() and (self.base / MODEL).is_file():
            rec["source"] = {"dir": os.path.relpath(self.base.resolve(), self.directory.resolve()),
                             "model_sha256": sha256((self.base / MODEL).read_bytes())}
        return rec

    def abort(self) -> None:
        shutil.rmtree(self.stage, ignore_errors=True)

    def __enter__(self) -> "ResultSet":
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


class _ClaimedResults(ResultSet):
    """A ResultSet that claims its directory for the write and releases it after."""

    def __init__(self, directory: Path, base: Path | None, claim: Claim) -> None:
        self.claim = claim
        try:
            super().__init__(directory, base)
        except BaseException:
            claim.release()
            raise

    def __exit__(self, exc_type: Any, *rest: Any) -> None:
        try:
            super().__exit__(exc_type, *rest)
        finally:
            self.claim.release()


def results_for(directory: str | Path, base: str | Path | None = None) -> ResultSet:
    """Claim ``directory`` (created if needed) and stage a result set in it; commit on exit.

    For certification: ``directory`` is the run (or a sweep's cert-<hash> folder), ``base`` the
    run whose summary.json the new blocks join when ``directory`` has none yet.
    """
    d = _plain_dir(Path(directory), "out_dir")
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _os_error(e, d, "choose a writable directory") from None
    claim = Claim.acquire(d)
    try:
        sweep_stale(d)
    except BaseException:
        claim.release()
        raise
    return _ClaimedResults(d, Path(base) if base is not None else None, claim)
