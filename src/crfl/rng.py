"""Explicit random streams derived from one seed.

No function in crfl touches a global RNG. Every random draw comes from a
generator built from ``(seed, stream, *indices)`` — for example the server noise
of round t is ``torch_generator(seed, "server-noise", t)`` and the batch order
of client i in round t is ``numpy_generator(seed, "batches", t, i)``. A resumed
run, a clean twin run and a batched-versus-loop comparison therefore draw
exactly the same numbers (the fedjax convention of per-(round, client) keys).
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

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
}


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
