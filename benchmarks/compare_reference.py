"""Compare crfl's vectorized trainer with the independent plain implementation (reference_fedavg).

Both run the paper's MNIST setting (Table 1, T = 100) on full-size Fashion-MNIST for several
seeds; their random streams differ, so single runs differ by run-to-run noise (sigma_t = 0.01
on every parameter). We compare the seed-averaged clean-accuracy curves round by round.

    python -m benchmarks.compare_reference [--seeds 3] [--rounds 100]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks import reference_fedavg
from crfl.config import resolve
from crfl.train import train

DATA = Path("/usr/share/datasets/fashion-mnist")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    ours, ref, t_ours, t_ref = [], [], 0.0, 0.0
    for s in range(a.seeds):
        with tempfile.TemporaryDirectory() as d:
            cfg = resolve("mnist", None, {"data.name": "fashion-mnist", "seed": s + 1, "server.rounds": a.rounds})
            t0 = time.perf_counter()
            res = train(cfg, Path(d) / "run")
            t_ours += time.perf_counter() - t0
            ours.append([r["clean_acc"] for r in res.records])
        t0 = time.perf_counter()
        ref.append([r["clean_acc"] for r in reference_fedavg.run(DATA, a.rounds, seed=s)])
        t_ref += time.perf_counter() - t0
    A, B = np.array(ours), np.array(ref)
    diff = A.mean(0) - B.mean(0)
    spread = np.concatenate([A, B]).std(0)
    out = {
        "seeds": a.seeds,
        "rounds": a.rounds,
        "crfl_seconds_per_round": t_ours / (a.seeds * a.rounds),
        "reference_seconds_per_round": t_ref / (a.seeds * a.rounds),
        "final_acc_crfl": float(A[:, -1].mean()),
        "final_acc_reference": float(B[:, -1].mean()),
        "mean_abs_diff": float(np.abs(diff).mean()),
        "max_abs_diff": float(np.abs(diff).max()),
        "max_abs_diff_after_round_10": float(np.abs(diff[10:]).max()),
        "mean_single_run_std": float(spread.mean()),
    }
    print(json.dumps(out, indent=2))
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
