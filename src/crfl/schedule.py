"""The server's clipping threshold rho_t and noise level sigma_t (Algorithm 1).

One definition serves training (Algorithm 1) and certification (the contraction
product of Theorem 1 over rounds t_adv+1..T), so the two can never disagree.

rho_t schedules (Appendix A.1, Table 1): ``constant``; ``linear`` a*t + b
(MNIST 0.1t+2, LOAN 0.025t+2, EMNIST 0.25t+4), optionally capped at ``cap``
(the authors' configs cap at 15 / 5 / 100). sigma_t for t <= T-1: a constant or
one value per round; no noise is added in round T (the output is Clip(w_T)),
and certification smooths with its own sigma_T.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from crfl.validation import ConfigError, check_choice, check_int, check_real, fail


@dataclass(frozen=True)
class RhoSchedule:
    """rho_t = min(a * t + b, cap) for ``linear``; rho_t = b for ``constant``."""

    kind: str = "linear"
    a: float = 0.0
    b: float = 1.0
    cap: float = math.inf

    def __post_init__(self) -> None:
        check_choice("server.rho.kind", self.kind, ["constant", "linear"])
        check_real("server.rho.a", self.a)
        if self.cap != math.inf:  # no cap (None in the config)
            check_real("server.rho.cap", self.cap, low=0.0, low_open=True)
        if self.kind == "constant":
            check_real("server.rho.b", self.b, low=0.0, low_open=True)

    def __call__(self, t: int) -> float:
        if self.kind == "constant":
            return float(self.b)
        rho = min(self.a * t + self.b, self.cap)
        if not rho > 0:
            raise ConfigError(
                f"The clipping schedule gives rho_{t} = {rho!r}; the 'server.rho' schedule must be positive in every round."
            )
        return float(rho)

    def to_config(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind}
        if self.kind == "linear":
            out["a"] = self.a
        out["b"] = self.b
        if self.cap != math.inf:
            out["cap"] = self.cap
        return out

    @staticmethod
    def from_config(value: Any) -> "RhoSchedule":
        """Accept a number (constant) or a mapping {kind, a, b, cap}."""
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return RhoSchedule(kind="constant", b=check_real("server.rho", value, low=0.0, low_open=True))
        if not isinstance(value, Mapping):
            raise fail("server.rho", "a positive number or a mapping {kind, a, b, cap}", value)
        unknown = set(value) - {"kind", "a", "b", "cap"}
        if unknown:
            raise ConfigError(f"Unknown key(s) {sorted(unknown)} in 'server.rho'; allowed: kind, a, b, cap.")
        kind = value.get("kind", "linear")
        cap = value.get("cap", math.inf)
        return RhoSchedule(
            kind=kind,
            a=float(value.get("a", 0.0)),
            b=float(value.get("b", 1.0)),
            cap=math.inf if cap is None else float(cap),
        )


@dataclass(frozen=True)
class SigmaSchedule:
    """sigma_t for rounds t = 1..T-1: a constant, or one value per round; sigma_T = 0 in training.

    Algorithm 1 adds no noise in the last round (its output is Clip_{rho_T}(w_T)); this is the
    one place that rule lives. ``rounds`` = T (None: no last round is known, every t is noisy).
    """

    values: tuple[float, ...] | float = 0.01
    rounds: int | None = None

    def __call__(self, t: int) -> float:
        if self.rounds is not None and t >= self.rounds:
            return 0.0
        if isinstance(self.values, tuple):
            return self.values[t - 1]
        return float(self.values)

    def to_config(self) -> float | list[float]:
        return list(self.values) if isinstance(self.values, tuple) else self.values

    @staticmethod
    def from_config(value: Any, rounds: int) -> "SigmaSchedule":
        if isinstance(value, (list, tuple)):
            if len(value) != rounds - 1:
                raise fail(
                    "server.sigma",
                    f"a number or a list of T-1 = {rounds - 1} values (sigma_1..sigma_(T-1))",
                    f"a list of {len(value)} values",
                )
            vals = tuple(check_real(f"server.sigma[{i}]", v, low=0.0) for i, v in enumerate(value))
            return SigmaSchedule(vals, rounds)
        return SigmaSchedule(check_real("server.sigma", value, low=0.0), rounds)


def contraction_schedule(
    rho: RhoSchedule, sigma: SigmaSchedule, t_adv: int, rounds: int, sigma_T: float
) -> tuple[list[float], list[float]]:
    """(rho_t, sigma_t) for t = t_adv+1..T, with sigma_T the smoothing noise (Theorem 1)."""
    check_int("t_adv", t_adv, low=1, high=rounds)
    rhos = [rho(t) for t in range(t_adv + 1, rounds + 1)]
    sigmas = [sigma(t) if t < rounds else float(sigma_T) for t in range(t_adv + 1, rounds + 1)]
    return rhos, sigmas


def noise_after_round(sigma: SigmaSchedule, t: int, rounds: int, sigma_T: float) -> float:
    """The Gaussian noise put on the model right after round t: sigma_t for t <= T-1, and for t = T
    the smoothing noise sigma_T of certification (Algorithm 2). Theorem 1's sigma_{t_adv}, and the
    Gaussian mechanism of the mixture certificate, are this value at t = t_adv."""
    check_int("t", t, low=1, high=rounds)
    return float(sigma(t)) if t < rounds else float(sigma_T)
