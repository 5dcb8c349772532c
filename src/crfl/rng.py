"""Explicit random streams derived from one seed.

No function in crfl touches a global RNG. Every random draw comes from a
generator built from ``(seed, stream, *indices)`` — for example the server noise
of round t is ``torch_generator(seed, "server-noise", t)`` and the batch order
of client i in round t is ``numpy_generator(seed, "batches", t, i)``. A resumed
run, a clean twin run and a batched-versus-loop comparison therefore draw
exactly the same numbers (the fedjax convention of per-(round, client) keys).

Training randomness comes from the config's ``seed``. The randomness a *statistical certificate*
rests on (Monte Carlo noisy models, the selection sample, the mixture reading's continuations, the
twin check's draws) must not: an input built by someone who knows the config could be chosen
against it. It comes from a :class:`CertificationSeed`, drawn from the operating system's entropy
(:func:`draw_certification_seed`, ``secrets``) when a certification runs, after its inputs are fixed,
or given back to replay a recorded certification (:func:`replay_certification_seed`); its streams
are :data:`CERTIFICATION_STREAMS` (docs/theory.md (j)).
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import numpy as np
import torch

from crfl.noise import NoiseStream
from crfl.validation import check_int

_STREAMS = {
    "batches": 1,
    "server-noise": 2,
    "partition": 3,
    "split": 4,
    "init": 5,
    "smoothing": 6,
    "selection": 7,
    "attack": 8,
    "misc": 9,
    "client-sampling": 10,
    "mixture-noise": 11,
    "ensemble-groups": 12,
    "ensemble-sample": 13,
    "check": 14,
}
#: The streams of a certification seed: the Monte Carlo noisy models ("smoothing", 0), the selection
#: sample ("selection", 0), the mixture continuations' noise ("mixture-noise", t, k) and the seed of the
#: self-checks (twin check) ("check", 0). They never derive from the config's seed.
CERTIFICATION_STREAMS = ("smoothing", "selection", "mixture-noise", "check")
#: Where a certification seed came from.
SEED_SOURCES = ("os-entropy", "replay")
#: The largest certification seed (63 bits, as every derived seed).
MAX_CERTIFICATION_SEED = (1 << 63) - 1


def derive_seed(seed: int, stream: str, *indices: int) -> int:
    """A 63-bit seed for ``stream`` at ``indices``, a pure function of its arguments."""
    if stream not in _STREAMS:
        raise ValueError(f"The 'stream' parameter must be one of {sorted(_STREAMS)}. Got {stream!r} instead.")
    h = hashlib.blake2b(digest_size=8)
    h.update(int(seed).to_bytes(16, "little", signed=True))
    h.update(_STREAMS[stream].to_bytes(2, "little"))
    for i in indices:
        h.update(int(i).to_bytes(16, "little", signed=True))
    return int.from_bytes(h.digest(), "little") & ((1 << 63) - 1)


def numpy_generator(seed: int, stream: str, *indices: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(derive_seed(seed, stream, *indices)))


def torch_generator(seed: int, stream: str, *indices: int, device: str | torch.device = "cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(derive_seed(seed, stream, *indices))
    return g


# ---------------------------------------------------------------------------------------------
# certification randomness: from the OS's entropy, never from the config


@dataclass(frozen=True)
class CertificationSeed:
    """The root of one certification's randomness, drawn after the inputs it certifies were fixed.

    ``seed``: 63 bits; ``source``: ``os-entropy`` (drawn now with :mod:`secrets`) or ``replay`` (given
    back by the user to reproduce a recorded certification: its statements then hold only for inputs
    fixed before the seed was first drawn); ``drawn_at``: when it was drawn from the OS (ISO 8601, UTC;
    None for a replayed seed, whose first draw is recorded with the certification it replays);
    ``derived_from``: for a child seed (:meth:`child`), the stream of the parent it comes from.
    """

    seed: int
    source: str
    drawn_at: str | None
    derived_from: str | None = None

    def torch_generator(self, stream: str, *indices: int, device: str | torch.device = "cpu") -> torch.Generator:
        """The generator of a certification stream (one of :data:`CERTIFICATION_STREAMS`) at ``indices``."""
        if stream not in CERTIFICATION_STREAMS:
            raise ValueError(f"The 'stream' parameter must be one of {list(CERTIFICATION_STREAMS)}. Got {stream!r} instead.")
        return torch_generator(self.seed, stream, *indices, device=device)

    def noise_stream(self, stream: str, *indices: int) -> NoiseStream:
        """The counter-based N(0, 1) noise (:mod:`crfl.noise`) of a certification stream at ``indices``: the
        Monte Carlo noisy models are ``noise_stream("smoothing", 0)``, the selection sample's
        ``noise_stream("selection", 0)``; the key is :func:`derive_seed` of this seed, the stream and the indices."""
        if stream not in CERTIFICATION_STREAMS:
            raise ValueError(f"The 'stream' parameter must be one of {list(CERTIFICATION_STREAMS)}. Got {stream!r} instead.")
        return NoiseStream(derive_seed(self.seed, stream, *indices))

    def child(self, stream: str = "check") -> "CertificationSeed":
        """An independent seed for a self-check (the twin check): the parent's stream ``stream``, so one recorded
        seed replays the whole certification, while the check's draws are independent of the certificate's."""
        if stream not in CERTIFICATION_STREAMS:
            raise ValueError(f"The 'stream' parameter must be one of {list(CERTIFICATION_STREAMS)}. Got {stream!r} instead.")
        return CertificationSeed(derive_seed(self.seed, stream, 0), self.source, self.drawn_at, f"{stream} of {self.seed}")

    def to_dict(self) -> dict[str, Any]:
        """What summary.json records: the seed, its source, when it was drawn (and its parent stream for a child)."""
        out: dict[str, Any] = {"seed": self.seed, "seed_source": self.source, "seed_drawn_at": self.drawn_at}
        if self.derived_from is not None:
            out["seed_derived_from"] = self.derived_from
        return out


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def os_entropy_seed() -> int:
    """63 bits from the operating system's entropy (:func:`secrets.randbits`)."""
    return secrets.randbits(63)


def draw_certification_seed() -> CertificationSeed:
    """A fresh certification seed from the OS's entropy; call it after the inputs to certify are fixed."""
    return CertificationSeed(os_entropy_seed(), "os-entropy", _now())


def replay_certification_seed(seed: int) -> CertificationSeed:
    """A recorded certification seed given back (``--replay-seed``): reproduces that certification bit for bit."""
    return CertificationSeed(check_int("replay_seed", seed, low=0, high=MAX_CERTIFICATION_SEED), "replay", None)


def certification_seed(replay_seed: int | None = None) -> CertificationSeed:
    """``replay_seed`` given back, or else a fresh draw from the OS's entropy."""
    return draw_certification_seed() if replay_seed is None else replay_certification_seed(replay_seed)
