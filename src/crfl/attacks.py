"""The backdoor threat model (Section 3.2, Appendix A.1).

R attackers poison q_B of every n_B samples of each batch in the attack rounds
(the first q_B positions of each shuffled batch, so random samples, a short
last batch included): they add a trigger to the input and swap the label to the
target. They then scale their update by gamma (model replacement,
Bagdasaryan et al. 2020): new = global + gamma (local - global).

Triggers are additive patterns delta in model-input units, applied as
clamp(x + delta, 0, 1) (pixels and min-max-scaled features live in [0, 1]):
- ``pixel``: the paper's pattern (Fig. 10): k pixels each raised by
  ||delta|| / sqrt(k), so the pattern's norm is ||delta|| (four pixels near the
  bottom-right corner, ||delta|| = 0.1, each +0.05);
- ``loan``: raise the named features (``num_tl_120dpd_2m``,
  ``num_tl_90g_dpd_24m``) each by ||delta|| / sqrt(2);
- ``dba``: the distributed backdoor (Xie et al., 2019): the pattern's elements
  are dealt round-robin into one part per attacker; attacker j trains with part
  j only, and the backdoor is tested with the full pattern.
Clamping can shrink a trigger on a given sample (a pixel already near 1), so the
actual ||x' - x|| of every poisoned sample is measured and recorded: the
certificate is about ||delta||.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from crfl.validation import ConfigError, check_choice, check_int, check_real

#: The authors' pixel pattern, (row, column) in a 28 x 28 image.
PAPER_PIXELS: tuple[tuple[int, int], ...] = ((23, 25), (24, 24), (25, 23), (25, 25))
#: The LOAN backdoor features (Appendix A.1).
LOAN_FEATURES: tuple[str, ...] = ("num_tl_120dpd_2m", "num_tl_90g_dpd_24m")
TRIGGERS = ("pixel", "loan", "dba")


@dataclass(frozen=True)
class Trigger:
    """An additive pattern: x' = clamp(x + delta, low, high)."""

    delta: torch.Tensor
    low: float = 0.0
    high: float = 1.0

    @property
    def norm(self) -> float:
        return float(torch.linalg.vector_norm(self.delta.double()))

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(x + self.delta.to(x.dtype), self.low, self.high)


def pixel_delta(image_shape: tuple[int, int], pixels: Sequence[Sequence[int]], magnitude: float) -> torch.Tensor:
    """Each of the k pixels raised by magnitude / sqrt(k): ||delta|| = magnitude."""
    h, w = image_shape
    if len(pixels) == 0:
        raise ConfigError("The 'attack.pixels' parameter must list at least one (row, column) pixel. Got [] instead.")
    delta = torch.zeros(h * w, dtype=torch.float64)
    for i, px in enumerate(pixels):
        if len(px) != 2:
            raise ConfigError(f"The 'attack.pixels[{i}]' parameter must be a (row, column) pair. Got {list(px)!r} instead.")
        r = check_int(f"attack.pixels[{i}] row", px[0], low=0, high=h - 1)
        c = check_int(f"attack.pixels[{i}] column", px[1], low=0, high=w - 1)
        delta[r * w + c] = magnitude / math.sqrt(len(pixels))
    return delta


def feature_delta(feature_names: Sequence[str], features: Sequence[str], magnitude: float) -> torch.Tensor:
    """Each named feature raised by magnitude / sqrt(k): ||delta|| = magnitude."""
    delta = torch.zeros(len(feature_names), dtype=torch.float64)
    for f in features:
        if f not in feature_names:
            raise ConfigError(
                f"The 'attack.features' parameter must name columns of the dataset. Got {f!r} instead "
                f"(the dataset has {len(feature_names)} features, e.g. {list(feature_names)[:5]})."
            )
        delta[list(feature_names).index(f)] = magnitude / math.sqrt(len(features))
    return delta


def dba_parts(delta: torch.Tensor, parts: int) -> list[torch.Tensor]:
    """Deal the nonzero elements of ``delta`` round-robin into ``parts`` local patterns."""
    nz = torch.nonzero(delta).flatten().tolist()
    parts = check_int("attack.dba_parts", parts, low=1, high=max(1, len(nz)))
    out = [torch.zeros_like(delta) for _ in range(parts)]
    for j, idx in enumerate(nz):
        out[j % parts][idx] = delta[idx]
    return out


@dataclass(frozen=True)
class AttackPlan:
    """Who attacks, when, and how (resolved from the config and the dataset).

    Attributes:
        attackers: client ids of the R attackers.
        rounds: attack rounds t_adv (sorted).
        poison_per_batch: q_B.
        target: the backdoor label.
        gamma: the model-replacement scale factor.
        local_triggers: the trigger each attacker trains with (DBA: its part).
        trigger: the full trigger, used for the backdoor test set and the attack success rate.
    """

    attackers: tuple[int, ...]
    rounds: tuple[int, ...]
    poison_per_batch: int
    target: int
    gamma: float
    local_triggers: dict[int, Trigger]
    trigger: Trigger
    kind: str = "pixel"
    magnitude: float = 0.1
    info: dict = field(default_factory=dict)

    def active(self, t: int) -> bool:
        return t in self.rounds and len(self.attackers) > 0

    def is_attacker(self, client: int) -> bool:
        return client in self.local_triggers


def attack_rounds(rounds: Sequence[int] | int | None, every: int | None, start: int | None, total_rounds: int) -> tuple[int, ...]:
    """One t_adv (the paper), a list, or every k rounds from ``start``."""
    if every is not None:
        every = check_int("attack.every", every, low=1)
        first = check_int("attack.start", start if start is not None else every, low=1, high=total_rounds)
        return tuple(range(first, total_rounds + 1, every))
    if rounds is None:
        return ()
    if isinstance(rounds, int):
        rounds = [rounds]
    out = sorted({check_int("attack.rounds", r, low=1, high=total_rounds) for r in rounds})
    return tuple(out)


def build_plan(
    *,
    num_clients: int,
    attackers: Sequence[int],
    rounds: tuple[int, ...],
    poison_per_batch: int,
    batch_size: int,
    target: int,
    num_classes: int,
    gamma: float,
    kind: str,
    magnitude: float,
    image_shape: tuple[int, int] | None,
    feature_names: Sequence[str] | None,
    pixels: Sequence[Sequence[int]] = PAPER_PIXELS,
    features: Sequence[str] | None = None,
    dba_num_parts: int | None = None,
    num_features: int,
) -> AttackPlan:
    """Validate the attack parameters against the data and build the plan."""
    check_choice("attack.trigger", kind, TRIGGERS)
    attackers = tuple(int(a) for a in attackers)
    for a in attackers:
        check_int("attack.attackers", a, low=0, high=num_clients - 1)
    if len(set(attackers)) != len(attackers):
        raise ConfigError(f"The 'attack.attackers' parameter must list distinct client ids. Got {list(attackers)!r} instead.")
    check_int("attack.poison_per_batch", poison_per_batch, low=0, high=batch_size)
    check_int("attack.target", target, low=0, high=num_classes - 1)
    check_real("attack.gamma", gamma, low=0.0)
    check_real("attack.magnitude", magnitude, low=0.0)
    if kind in ("pixel", "dba"):
        if image_shape is None:
            raise ConfigError(
                f"The 'attack.trigger' parameter must be 'loan' for tabular data. Got {kind!r} instead (the dataset has no image shape)."
            )
        delta = pixel_delta(image_shape, pixels, magnitude)
    else:
        if feature_names is None:
            raise ConfigError(f"The 'attack.trigger' parameter must be 'pixel' or 'dba' for images. Got {kind!r} instead.")
        delta = feature_delta(feature_names, tuple(features or LOAN_FEATURES), magnitude)
    if delta.numel() != num_features:
        raise ConfigError(f"The trigger has {delta.numel()} elements but the data has {num_features} features.")
    full = Trigger(delta)
    if kind == "dba" and attackers:
        parts = dba_parts(delta, dba_num_parts or len(attackers))
        local = {a: Trigger(parts[j % len(parts)]) for j, a in enumerate(attackers)}
    else:
        local = {a: full for a in attackers}
    return AttackPlan(
        attackers=attackers,
        rounds=rounds if attackers else (),
        poison_per_batch=poison_per_batch,
        target=target,
        gamma=float(gamma),
        local_triggers=local,
        trigger=full,
        kind=kind,
        magnitude=float(magnitude),
    )


def backdoor_test_mask(y: torch.Tensor, target: int) -> torch.Tensor:
    """Test points used for the attack success rate: those whose true label is not the target."""
    return y != target
