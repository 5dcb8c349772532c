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

Attack kinds (``attack.kind``, a registry like the aggregators'): what the
attackers do in the attack rounds. ``backdoor`` (the default) is the paper's
threat model above; the others break the protocol and are outside the paper's
certificate (:func:`crfl.certify.radius_blockers` says so):

- ``label-flip`` (data level): the attacker trains honestly on its shard with the
  labels flipped, y -> C-1-y (``mode: reverse``) or y -> the target
  (``mode: target``);
- ``sign-flip`` (update level): it sends -s u_i, u_i its honest update
  (``scale`` s, default 1);
- ``gaussian`` (update level): it sends N(0, s^2 I) (``scale`` s, default 1),
  drawn from ``torch_generator(seed, "attack", t, client)``;
- ``adaptive`` (update level): it knows its group (the model its group starts
  from, the members and their weights in the group's aggregate) and moves the
  group's aggregate by ``scale`` (parameter distance) along the gradient of the
  margin logit[target_class] - max other logit, summed over chosen test
  ``points``, sending that move divided by its own weight in the group's
  weighted mean (so its contribution alone moves the aggregate that far);
- any name registered with :func:`register_attack` (e.g. an arbitrary update
  ``fn(ctx, **options) -> (D,) tensor``).

A data-level attack relabels the attacker's shard before local SGD; an
update-level attack replaces the attacker's row of the round's updates after
local SGD (the honest update is in its context). Both run in
:func:`crfl.local.local_round`, so they act alike in the simulator and over
Flower. The backdoor's ``trigger``, ``poison_per_batch`` and ``gamma`` belong
to the ``backdoor`` kind: for every other kind the plan holds q_B = 0 and
gamma = 1 (no trigger is trained, no replacement scaling), so attack.json
records what was done. ``attack.every: 1`` makes every round an attack round.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from crfl import registry
from crfl.rng import torch_generator
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
        attack: the attack kind (``backdoor``: the paper's; see :func:`attack_names`).
        attack_options: the kind's options, resolved and validated (:func:`resolve_attack`).
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
    attack: str = "backdoor"
    attack_options: dict = field(default_factory=dict)

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
    attack: str = "backdoor",
    attack_options: Mapping[str, Any] | None = None,
    env: "AttackEnv | None" = None,
) -> AttackPlan:
    """Validate the attack parameters against the data and build the plan.

    ``attack`` names the attack kind and ``attack_options`` its options (validated here, against
    ``env`` where they refer to the data); a kind other than ``backdoor`` runs with q_B = 0 and
    gamma = 1 (the trigger is still built: the backdoor test set measures it).
    """
    check_choice("attack.trigger", kind, TRIGGERS)
    env = env if env is not None else AttackEnv(num_classes=num_classes, num_features=num_features, target=target)
    options = resolve_attack(attack, attack_options or {}, env)
    if attack != BACKDOOR:
        poison_per_batch, gamma = 0, 1.0
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
        attack=attack,
        attack_options=options,
    )


def backdoor_test_mask(y: torch.Tensor, target: int) -> torch.Tensor:
    """Test points used for the attack success rate: those whose true label is not the target."""
    return y != target


# ---------------------------------------------------------------------------------------------
# attack kinds: what the malicious clients do in the attack rounds (a registry)

BACKDOOR = "backdoor"
#: where a kind acts: the paper's poisoning + scaling, the attacker's labels, or its sent update
LEVELS = ("backdoor", "data", "update")


@dataclass(frozen=True)
class AttackEnv:
    """What options of an attack may refer to, known when the plan is built (the data, not the run).

    ``test_inputs(indices)`` gives test points in model-input units (float64), so an option can
    name test points by index; ``num_test`` is their number.
    """

    num_classes: int
    num_features: int
    target: int
    num_test: int = 0
    test_inputs: Callable[[Sequence[int]], torch.Tensor] | None = None


@dataclass(frozen=True)
class GroupInfo:
    """An attacker's knowledge of its group in an ensemble of G group models.

    Attributes:
        start: (D,) the model the group starts the round from (``group_start``).
        members: client ids of the group's members.
        weights: (len(members),) each member's weight in the group's aggregate (normalized on use).
        group: the group's index.
    """

    start: torch.Tensor
    members: tuple[int, ...]
    weights: torch.Tensor
    group: int = 0

    def weight_of(self, client: int) -> float:
        """p_i / sum_j p_j over the group: the client's weight in the group's weighted mean."""
        if client not in self.members:
            raise ConfigError(f"Client {client} is not a member of group {self.group} (members {list(self.members)}).")
        w = torch.as_tensor(self.weights, dtype=torch.float64)
        return float(w[self.members.index(client)] / w.sum())


@dataclass(frozen=True)
class AttackContext:
    """What an update-level attacker knows when it chooses the update it sends in round t.

    ``start`` is the model the client's row started from (w~_{t-1}, or its group's model),
    ``honest`` the update its honest local SGD gave (no trigger, clean labels), ``generator`` its
    own random stream ``torch_generator(seed, "attack", t, client)``, ``group`` its group when the
    caller passes one (an ensemble); without one the whole federation is its group.
    """

    setup: Any  # crfl.setup.Setup
    t: int
    client: int
    start: torch.Tensor
    honest: torch.Tensor
    generator: torch.Generator
    group: GroupInfo | None = None

    @property
    def model(self) -> Any:
        return self.setup.model

    @property
    def group_start(self) -> torch.Tensor:
        return self.group.start.to(self.start.dtype) if self.group is not None else self.start

    @property
    def group_members(self) -> tuple[int, ...]:
        return self.group.members if self.group is not None else tuple(range(self.setup.data.num_clients))

    @property
    def group_weights(self) -> torch.Tensor:
        """The members' weights in the group's aggregate, normalized to sum 1 (float64)."""
        w = torch.as_tensor(self.group.weights if self.group is not None else self.setup.weights, dtype=torch.float64)
        return w / w.sum()

    @property
    def weight(self) -> float:
        """The attacker's own weight in its group's weighted mean."""
        return float(self.group_weights[self.group_members.index(self.client)])


@dataclass(frozen=True)
class DataContext:
    """What a data-level attacker sees: its shard's true labels (shard order) in round t."""

    setup: Any  # crfl.setup.Setup
    t: int
    client: int
    labels: torch.Tensor  # (n_i,) int64
    generator: torch.Generator

    @property
    def num_classes(self) -> int:
        return self.setup.dataset.num_classes

    @property
    def target(self) -> int:
        return self.setup.plan.target


@dataclass(frozen=True)
class AttackKind:
    """A registered attack: ``fn`` (None for the backdoor), where it acts, and an option resolver.

    ``fn(ctx, **options)``: an update-level attack gets an :class:`AttackContext` and returns the
    (D,) update to send; a data-level attack gets a :class:`DataContext` and returns the (n_i,)
    labels to train on. Options are the keyword-only parameters of ``fn`` (their defaults are the
    options' defaults); ``resolve(options, env)`` checks their values and may convert them.
    """

    fn: Callable[..., torch.Tensor] | None
    level: str
    resolve: Callable[[dict[str, Any], AttackEnv], dict[str, Any]] | None = None

    def defaults(self) -> dict[str, Any]:
        if self.fn is None:
            return {}
        params = inspect.signature(self.fn).parameters.values()
        return {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}


_REGISTRY: registry.Entries[AttackKind] = {}


def register_attack(
    name: str,
    fn: Callable[..., torch.Tensor] | None = None,
    *,
    level: str = "update",
    description: str = "",
    resolve: Callable[[dict[str, Any], AttackEnv], dict[str, Any]] | None = None,
) -> Any:
    """Register attack ``name``: ``register_attack(name, fn)`` or as a decorator ``@register_attack(name)``.

    ``level`` is ``update`` (``fn(ctx: AttackContext, **options) -> (D,) update``, the default) or
    ``data`` (``fn(ctx: DataContext, **options) -> (n_i,) labels``). Options are ``fn``'s
    keyword-only parameters; ``resolve(options, env)`` may check and convert their values.
    Registering an existing name replaces it. Returns ``fn`` (or the decorator).
    """
    check_choice("attack level", level, [lv for lv in LEVELS if lv != BACKDOOR])

    def deco(f: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        if not callable(f):
            raise ConfigError(f"The attack {name!r} must be a callable fn(ctx, **options). Got {f!r} instead.")
        registry.register(_REGISTRY, name, description or (f.__doc__ or "").strip().split("\n")[0])(
            AttackKind(f, level, resolve)
        )
        return f

    return deco(fn) if fn is not None else deco


def attack_names() -> list[str]:
    """The registered attack kinds, sorted."""
    return registry.names(_REGISTRY)


def describe_attacks() -> dict[str, str]:
    return registry.describe(_REGISTRY)


def lookup_attack(name: str) -> AttackKind:
    """The registered kind ``name``; an unknown name is a ConfigError listing the valid ones."""
    return registry.lookup(_REGISTRY, "attack.kind", name)


def resolve_attack(name: str, options: Mapping[str, Any], env: AttackEnv) -> dict[str, Any]:
    """``name``'s options with defaults filled in, checked (and converted) by the kind's resolver.

    An option the kind does not take, or a required one left out, is a ConfigError naming it
    and the kind's options.
    """
    kind = lookup_attack(name)
    if not isinstance(options, Mapping):
        raise ConfigError(f"The 'attack.options' parameter must be a mapping. Got {options!r} instead.")
    defaults = kind.defaults()
    allowed = ", ".join(defaults) or "none"
    for k in options:
        if k not in defaults:
            raise ConfigError(
                f"The 'attack.options' parameter of attack {name!r} must name its options ({allowed}). Got {k!r} instead."
            )
    out = {**defaults, **dict(options)}
    for k, v in out.items():
        if v is inspect.Parameter.empty:
            raise ConfigError(f"The attack {name!r} needs the option 'attack.options.{k}' (its options: {allowed}).")
    return kind.resolve(out, env) if kind.resolve is not None else out


# --- the hooks local_round calls ---------------------------------------------------------------


def relabel_shards(setup: Any, t: int, rows: Sequence[int], bad: Sequence[bool], idx: np.ndarray) -> Any:
    """The round's ClientData with the attacking rows' shards relabelled by the plan's data-level attack.

    Only the labels of the attackers' own samples change; a benign row of this round that would
    draw one of them (overlapping shards) is an error, so benign rows train exactly as without
    the attack.
    """
    plan, data = setup.plan, setup.data
    kind = lookup_attack(plan.attack)
    y = data.y.clone()
    mine = []
    for r, c in enumerate(rows):
        if not bad[r]:
            continue
        shard = torch.from_numpy(np.asarray(data.indices[c], dtype=np.int64))
        ctx = DataContext(setup, t, c, data.y[shard].clone(), torch_generator_for(setup, t, c))
        new = torch.as_tensor(kind.fn(ctx, **plan.attack_options))
        C = setup.dataset.num_classes
        if new.shape != shard.shape or new.dtype.is_floating_point or bool(((new < 0) | (new >= C)).any()):
            raise ConfigError(
                f"The attack {plan.attack!r} must return {len(shard)} integer labels in [0, {C - 1}] for client {c}. "
                f"Got a {new.dtype} tensor of shape {tuple(new.shape)} instead."
            )
        y[shard] = new.long()
        mine.append(shard.numpy())
    others = idx[[r for r in range(len(rows)) if not bad[r]]]
    if mine and others.size and bool(np.isin(others[others >= 0], np.concatenate(mine)).any()):
        raise ConfigError(f"The attack {plan.attack!r} relabels the attackers' shards, but a benign client shares samples with them.")
    return dataclasses.replace(data, y=y)


def torch_generator_for(setup: Any, t: int, client: int) -> torch.Generator:
    """The attacker's own random stream in round t: ``torch_generator(seed, "attack", t, client)``."""
    return torch_generator(setup.cfg.seed, "attack", t, client)


def attack_update(
    setup: Any, t: int, client: int, start: torch.Tensor, honest: torch.Tensor, group: GroupInfo | None = None
) -> torch.Tensor:
    """The (D,) update an attacker sends in round t under the plan's update-level attack."""
    plan = setup.plan
    kind = lookup_attack(plan.attack)
    ctx = AttackContext(setup, t, client, start, honest.clone(), torch_generator_for(setup, t, client), group)
    u = torch.as_tensor(kind.fn(ctx, **plan.attack_options))
    if u.shape != honest.shape or not u.dtype.is_floating_point:
        raise ConfigError(
            f"The attack {plan.attack!r} must return a float update of shape {tuple(honest.shape)} for client {client}. "
            f"Got a {u.dtype} tensor of shape {tuple(u.shape)} instead."
        )
    return u.to(honest.dtype)


# --- the built-in kinds ------------------------------------------------------------------------

registry.register(_REGISTRY, BACKDOOR, "the paper's: trigger + label swap on q_B of n_B samples, update scaled by gamma")(
    AttackKind(None, BACKDOOR)
)


def _scale_option(name: str) -> Callable[[dict[str, Any], AttackEnv], dict[str, Any]]:
    def resolve(o: dict[str, Any], env: AttackEnv) -> dict[str, Any]:
        return {**o, "scale": check_real(f"attack.options.scale ({name})", o["scale"], low=0.0)}

    return resolve


def _label_flip_options(o: dict[str, Any], env: AttackEnv) -> dict[str, Any]:
    check_choice("attack.options.mode (label-flip)", o["mode"], ["reverse", "target"])
    return o


@register_attack("label-flip", level="data", resolve=_label_flip_options)
def label_flip(ctx: DataContext, *, mode: str = "reverse") -> torch.Tensor:
    """train on flipped labels: y -> C-1-y (mode reverse) or y -> the target (mode target)"""
    if mode == "reverse":
        return ctx.num_classes - 1 - ctx.labels
    return torch.full_like(ctx.labels, ctx.target)


@register_attack("sign-flip", resolve=_scale_option("sign-flip"))
def sign_flip(ctx: AttackContext, *, scale: float = 1.0) -> torch.Tensor:
    """send -s times the honest update (option scale = s)"""
    return ctx.honest * -scale


@register_attack("gaussian", resolve=_scale_option("gaussian"))
def gaussian(ctx: AttackContext, *, scale: float = 1.0) -> torch.Tensor:
    """send N(0, s^2 I) from the attacker's own stream (option scale = s)"""
    z = torch.randn(ctx.honest.numel(), generator=ctx.generator, dtype=torch.float64)
    return z.mul_(scale).to(ctx.honest.dtype)


def target_margin(model: Any, params: torch.Tensor, X: torch.Tensor, target: int) -> torch.Tensor:
    """logit[target] - max_{c != target} logit[c] of the model ``params`` (D,) at inputs X (m, d): (m,)."""
    z = model.logits(params.unsqueeze(0), X.to(params.dtype).unsqueeze(0))[0]
    others = z.masked_fill(torch.arange(z.shape[1]) == target, -math.inf)
    return z[:, target] - others.amax(dim=1)


def margin_ascent(model: Any, start: torch.Tensor, X: torch.Tensor, target: int, scale: float, steps: int = 1) -> torch.Tensor:
    """The move (D,) of ``steps`` normalized gradient steps of total length ``scale`` up sum_j margin(x_j).

    The gradient is taken with autograd through ``model.logits``, so any model (linear or a
    ModuleModel) works; a zero gradient ends the ascent early.
    """
    w = start.detach().clone()
    with torch.enable_grad():
        for _ in range(steps):
            v = w.clone().requires_grad_(True)
            (g,) = torch.autograd.grad(target_margin(model, v, X, target).sum(), v)
            n = torch.linalg.vector_norm(g)
            if float(n) == 0.0:
                break
            w = w + g.detach() * (scale / steps / n)
    return w - start


def _adaptive_options(o: dict[str, Any], env: AttackEnv) -> dict[str, Any]:
    tc = env.target if o["target_class"] == "auto" else check_int(
        "attack.options.target_class (adaptive)", o["target_class"], low=0, high=env.num_classes - 1)
    pts = o["points"]
    if pts is None:
        pts = list(range(min(10, env.num_test)))
    if not isinstance(pts, (list, tuple)) or len(pts) == 0:
        raise ConfigError(
            "The 'attack.options.points' parameter (adaptive) must be a non-empty list of test indices or input vectors. "
            f"Got {pts!r} instead."
        )
    rows = []
    for i, p in enumerate(pts):
        if isinstance(p, (list, tuple)):
            v = torch.tensor([check_real(f"attack.options.points[{i}][{j}]", x) for j, x in enumerate(p)], dtype=torch.float64)
            if v.numel() != env.num_features:
                raise ConfigError(f"The 'attack.options.points[{i}]' parameter must have {env.num_features} features. "
                                  f"Got {v.numel()} instead.")
            rows.append(v)
        else:
            k = check_int(f"attack.options.points[{i}] (a test index)", p, low=0, high=env.num_test - 1)
            if env.test_inputs is None:
                raise ConfigError("The 'attack.options.points' parameter names test indices but no test data is at hand.")
            rows.append(env.test_inputs([k])[0].double())
    return {
        "target_class": tc,
        "points": torch.stack(rows),
        "scale": check_real("attack.options.scale (adaptive)", o["scale"], low=0.0),
        "steps": check_int("attack.options.steps (adaptive)", o["steps"], low=1),
    }


@register_attack("adaptive", resolve=_adaptive_options)
def adaptive(
    ctx: AttackContext, *, target_class: int | str = "auto", points: Any = None, scale: float = 1.0, steps: int = 1
) -> torch.Tensor:
    """push the group's aggregate by `scale` up the target-class margin at chosen points (divided by the own weight)"""
    move = margin_ascent(ctx.model, ctx.group_start, points, int(target_class), scale, steps)
    p = ctx.weight
    return move / p if p > 0 else move
