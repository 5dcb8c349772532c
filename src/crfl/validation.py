"""One format for bad-parameter errors, used at every public boundary.

Every message names the parameter, what is allowed and the value received:
``The 'sigma' parameter must be a float in [0, inf). Got -1.0 instead.``
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable
from typing import Any


class ConfigError(ValueError):
    """A parameter has a value that is not allowed."""


def fail(name: str, allowed: str, value: Any) -> ConfigError:
    return ConfigError(f"The '{name}' parameter must be {allowed}. Got {value!r} instead.")


def check_real(
    name: str,
    value: Any,
    *,
    low: float = -math.inf,
    high: float = math.inf,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """Return ``value`` as a float if it lies in the interval, else raise ConfigError.

    An infinite bound is always open: ``.inf`` is not in ``[0, inf)``.
    """
    lo = "(" if low_open or low == -math.inf else "["
    hi = ")" if high_open or high == math.inf else "]"
    allowed = f"a float in {lo}{_fmt(low)}, {_fmt(high)}{hi}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise fail(name, allowed, value)
    v = float(value)
    if math.isnan(v) or math.isinf(v):
        raise fail(name, allowed, value)
    if v < low or (low_open and v == low) or v > high or (high_open and v == high):
        raise fail(name, allowed, value)
    return v


def check_int(name: str, value: Any, *, low: int | None = None, high: int | None = None) -> int:
    """Return ``value`` as an int in [low, high], else raise ConfigError."""
    lo = "-inf" if low is None else str(low)
    hi = "inf" if high is None else str(high)
    allowed = f"an integer in [{lo}, {hi}]"
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise fail(name, allowed, value)
    if (low is not None and value < low) or (high is not None and value > high):
        raise fail(name, allowed, value)
    return int(value)


def check_choice(name: str, value: Any, choices: Iterable[str]) -> str:
    """Return ``value`` if it is one of ``choices``, else raise ConfigError listing them."""
    choices = list(choices)
    if value not in choices:
        e = fail(name, "one of " + ", ".join(repr(c) for c in choices), value)
        raise ConfigError(f"{e}{did_you_mean(value, choices)}")
    return value


def did_you_mean(value: Any, choices: Iterable[str]) -> str:
    """`` Did you mean 'x'?`` for the closest of ``choices`` to a mistyped name (difflib), else ``""``."""
    if not isinstance(value, str):
        return ""
    close = difflib.get_close_matches(value, [str(c) for c in choices], n=1, cutoff=0.6)
    return f" Did you mean {close[0]!r}?" if close else ""


def _fmt(x: float) -> str:
    if x == math.inf:
        return "inf"
    if x == -math.inf:
        return "-inf"
    return repr(x) if not float(x).is_integer() else str(int(x)) if abs(x) < 1e15 else repr(x)


def machine_memory() -> int | None:
    """This machine's physical memory in bytes (None where the OS does not say)."""
    import os

    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(name: str, value: Any, need: float, what: str) -> None:
    """Refuse ``value`` of parameter ``name`` when ``what`` needs more than 80% of this machine's memory
    (``need`` bytes; a lower bound of what the work will allocate), before anything is allocated."""
    total = machine_memory()
    if total is not None and need > 0.8 * total:
        raise ConfigError(f"The '{name}' parameter must fit in memory: {what} need(s) about {need / 2**30:.1f} GiB, and "
                          f"this machine has {total / 2**30:.1f} GiB (80% usable). Got {value!r} instead.")
