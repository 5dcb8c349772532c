"""Atomic file writes and tolerant YAML: a crash or Ctrl-C never leaves a half-written result.

Each writer writes to a temporary file ``.NAME.XXXXXXXX.tmp`` in the same directory
(:data:`TEMP_PATTERN`; :mod:`crfl.rundir` sweeps those a killed process left behind),
flushes and fsyncs it, then ``os.replace``s it over the target (atomic on POSIX).
Files get the mode the umask gives (0666 & ~umask), as ``open`` would, not mkstemp's 0600.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml


TEMP_PATTERN = re.compile(r"^\..+\.[A-Za-z0-9_]{6,}\.tmp$")  # what atomic_write_bytes leaves when killed


def _file_mode() -> int:
    """0666 & ~umask: the mode ``open`` gives a new file (read without changing the umask where possible)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, _file_mode())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _fsync_dir(d: Path) -> None:
    """Make the rename itself durable (POSIX); ignored where directories cannot be opened."""
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Standard JSON: an infinite float (an infinite radius) is written as the string "inf", NaN as null."""
    atomic_write_text(path, json.dumps(_finite(obj), indent=2, sort_keys=False, default=_json_default, allow_nan=False) + "\n")


def _finite(o: Any) -> Any:
    if isinstance(o, float):
        if o != o:
            return None
        if o in (float("inf"), float("-inf")):
            return "inf" if o > 0 else "-inf"
        return o
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    return o


class _Loader(yaml.SafeLoader):
    """YAML 1.1's safe loader that also reads ``1e-3`` (no dot) as a float, as YAML 1.2 and users do."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def yaml_problem(e: yaml.YAMLError) -> str:
    """A YAML error in one line: the problem and where."""
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{getattr(e, 'problem', None) or str(e).splitlines()[0]}{where}"


def load_yaml(text: str) -> Any:
    """Parse YAML text (safe); numbers are read as users write them (``1e-3`` is 0.001)."""
    return yaml.load(text, Loader=_Loader)


def write_yaml(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, yaml.safe_dump(obj, sort_keys=False, default_flow_style=None))


def write_csv(path: str | os.PathLike, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for row in rows:
        w.writerow(["" if v is None else _csv_cell(v) for v in row])
    atomic_write_text(path, buf.getvalue())


def write_dict_csv(path: str | os.PathLike, header: Sequence[str], rows: Iterable[Mapping[str, Any]]) -> None:
    write_csv(path, header, ([r.get(k) for k in header] for r in rows))


def torch_save(path: str | os.PathLike, obj: Any) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def read_csv(path: str | os.PathLike) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _csv_cell(v: Any) -> Any:
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return ";".join(str(_csv_cell(x)) for x in v)
    return v


def _json_default(o: Any) -> Any:
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"Object of type {type(o).__name__} is not JSON serializable")
