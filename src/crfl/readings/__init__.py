"""The readings of CRFL's certificate (Algorithm 2), one object each; ``certify.reading`` picks one.

A certificate is a promise about a counterfactual. Each reading says which one and owns its
guarantee text, its ingredients, its bounds at an input, its radius, its assumption checks and
its summary blocks (the interface: :class:`crfl.readings.base.Reading`):

- ``coupled`` (default, :mod:`crfl.readings.coupled`): this run against the run on the same training
  randomness whose attackers' poisoned samples carry no trigger; parameter smoothing with sigma_T
  and the Neyman-Pearson budget, or (``method: margin``) the linear base model's logit margin.
- ``mixture`` (:mod:`crfl.readings.mixture`): the law of the trained model over the server noise
  from the attack round on (Theorems 2-3 read as written), bounded from K continuations.
- ``paper`` (:mod:`crfl.readings.paper`): Corollary 1 (Eq. 2, :mod:`crfl.radius`) as printed, for
  reproduction only; written with ``radius_certified: false``.

:mod:`crfl.certify` looks the reading up here (:func:`reading_class`) and writes the result set.
"""

from __future__ import annotations

from crfl import registry
from crfl.readings.base import Reading
from crfl.readings.coupled import CoupledReading
from crfl.readings.mixture import MixtureReading
from crfl.readings.paper import PaperReading

#: ``certify.reading`` -> (the reading's class, one line); the names are ``crfl.config.CHOICES["certify.reading"]``.
READINGS: registry.Entries[type[Reading]] = {
    "coupled": (CoupledReading, "this run against its trigger-free twin on the same randomness (sound; default)"),
    "mixture": (MixtureReading, "the law over the server noise from the attack round, from K continuations (sound)"),
    "paper": (PaperReading, "Corollary 1 (Eq. 2) as printed, for reproduction only (not a certified radius)"),
}

__all__ = ["READINGS", "CoupledReading", "MixtureReading", "PaperReading", "Reading", "reading_class"]


def reading_class(name: str) -> type[Reading]:
    """The reading registered as ``name``; an unknown name is a ConfigError listing the valid ones."""
    return registry.lookup(READINGS, "certify.reading", name)
