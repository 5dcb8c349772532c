"""An independent, deliberately plain implementation of CRFL training (Algorithm 1), for validation.

It shares no training code with crfl: its own IDX reader, ``torch.nn.Linear`` with
``torch.optim.SGD``, a Python loop over clients and batches, its own random
generators. It implements the paper's MNIST setting (Table 1) so that crfl's
vectorized trainer can be compared with it on the same data (the accuracy curves
must agree within 2 points; the random streams differ, so they are not equal).

    python -m benchmarks.reference_fedavg --data-dir /usr/share/datasets/fashion-mnist --rounds 100
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import struct
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    _, _, dtype, ndim = struct.unpack(">BBBB", data[:4])
    dims = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load(data_dir: Path) -> tuple[np.ndarray, ...]:
    def pick(stem: str) -> Path:
        for p in (data_dir / f"{stem}.gz", data_dir / stem):
            if p.exists():
                return p
        raise FileNotFoundError(data_dir / stem)

    xtr = read_idx(pick("train-images-idx3-ubyte")).reshape(-1, 784)
    ytr = read_idx(pick("train-labels-idx1-ubyte")).astype(np.int64)
    xte = read_idx(pick("t10k-images-idx3-ubyte")).reshape(-1, 784)
    yte = read_idx(pick("t10k-labels-idx1-ubyte")).astype(np.int64)
    return xtr, ytr, xte, yte


PIXELS = [(23, 25), (24, 24), (25, 23), (25, 25)]


def add_trigger(x: torch.Tensor, magnitude: float) -> torch.Tensor:
    x = x.clone()
    for r, c in PIXELS:
        x[:, r * 28 + c] = torch.clamp(x[:, r * 28 + c] + magnitude / 2, max=1.0)
    return x


def run(data_dir: Path, rounds: int, seed: int = 0, clients: int = 20, batch: int = 100, lr: float = 0.001,
        attackers: tuple[int, ...] = (0,), t_adv: int = 10, q_b: int = 5, gamma: float = 10.0,
        sigma: float = 0.01, magnitude: float = 0.1) -> list[dict]:
    xtr, ytr, xte, yte = load(data_dir)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(ytr))
    shard = len(ytr) // clients
    shards = [perm[i * shard : (i + 1) * shard] for i in range(clients)]
    Xte = torch.from_numpy(xte).float() / 255
    Yte = torch.from_numpy(yte)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    global_model = nn.Linear(784, 10)
    records = []
    for t in range(1, rounds + 1):
        g_vec = torch.nn.utils.parameters_to_vector(global_model.parameters()).detach().clone()
        updates = []
        for i in range(clients):
            local = nn.Linear(784, 10)
            torch.nn.utils.vector_to_parameters(g_vec.clone(), local.parameters())
            opt = torch.optim.SGD(local.parameters(), lr=lr)
            order = shards[i][rng.permutation(shard)]
            for s in range(math.ceil(shard / batch)):
                rows = order[s * batch : (s + 1) * batch]
                x = torch.from_numpy(xtr[rows]).float() / 255
                y = torch.from_numpy(ytr[rows]).clone()
                if i in attackers and t == t_adv:
                    x[:q_b] = add_trigger(x[:q_b], magnitude)
                    y[:q_b] = 0
                opt.zero_grad()
                F.cross_entropy(local(x), y).backward()
                opt.step()
            u = torch.nn.utils.parameters_to_vector(local.parameters()).detach() - g_vec
            if i in attackers and t == t_adv:
                u = gamma * u
            updates.append(u)
        w = g_vec + torch.stack(updates).mean(0)
        rho = min(0.1 * t + 2, 15.0)
        norm = float(w.norm())
        if norm > rho:
            w = w * (rho / norm)
        if t < rounds:
            w = w + sigma * torch.randn(w.shape, generator=gen)
        torch.nn.utils.vector_to_parameters(w, global_model.parameters())
        with torch.no_grad():
            acc = float((global_model(Xte).argmax(1) == Yte).float().mean())
            mask = Yte != 0
            bd = float((global_model(add_trigger(Xte[mask], magnitude)).argmax(1) == 0).float().mean())
        records.append({"round": t, "clean_acc": acc, "backdoor_acc": bd})
    return records


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir", default="/usr/share/datasets/fashion-mnist")
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    t0 = time.perf_counter()
    recs = run(Path(a.data_dir), a.rounds, a.seed)
    el = time.perf_counter() - t0
    print(f"reference: {a.rounds} rounds in {el:.1f} s ({el / a.rounds:.2f} s/round); final acc {recs[-1]['clean_acc']:.4f}")
    if a.out:
        Path(a.out).write_text(json.dumps({"seconds": el, "records": recs}))


if __name__ == "__main__":
    main()
