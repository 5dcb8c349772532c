"""Trying to break the client-level certificate with real malicious clients (crfl.ensemble).

For the certified points of a partition ensemble, the ensemble is trained again with m <= m*(x)
real malicious clients running every registered attack in every round -- the paper's backdoor,
label flipping, sign flipping, Gaussian updates, and the adaptive attacker that knows its group
and pushes it toward the runner-up at the attacked points -- placed in groups that voted for the
prediction (the worst place): no certified prediction changes. At m*(x) + 1 the adaptive attack
flips points (the certificate is tight).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from crfl import ensemble
from crfl.train import train
from tests.conftest import synthetic_images
from tests.test_ensemble import ens_config

pytestmark = pytest.mark.slow  # about a minute: one training run per attack and per m

G, N = 10, 20
ATTACKS = {
    "backdoor": {"attack.gamma": 50.0, "attack.poison_per_batch": 5},
    "label-flip": {"attack.options": {"mode": "reverse"}},
    "sign-flip": {"attack.options": {"scale": 100.0}},
    "gaussian": {"attack.options": {"scale": 30.0}},
}


def _predictions(res, X):
    return ensemble.ensemble_predictions(res.setup, res.final_params, X)


def _retrain(tmp_path, name, ds, **over):
    cfg = ens_config(**{"ensemble.groups": G, "data.num_clients": N, "server.rounds": 3, "clients.lr": 0.05,
                        "run.eval_every": 3, **over})
    return train(cfg, tmp_path / name, dataset=ds)


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    ds = synthetic_images(n_test=150)
    d = tmp_path_factory.mktemp("clean")
    res = _retrain(d, "run", ds)
    X = torch.from_numpy(ds.x_test).to(res.setup.dtype) / ds.input_scale
    preds = _predictions(res, X)
    groups = ensemble.build_groups(res.setup.cfg, N)
    cert = ensemble.certify_votes(groups, ensemble.vote_counts(preds, ds.num_classes), 0.01)
    return ds, res, X, preds, groups, cert


def _worst_clients(groups, preds, i, A, m):
    """m malicious clients, one in each of m groups that voted c_A at point i (the first member of each)."""
    voters = [g for g in range(G) if preds[g, i] == A]
    return sorted(groups.members[g][0] for g in voters[:m])


def _attack(kind, clients, **extra):
    base = {"attack.num_attackers": len(clients), "attack.attackers": clients, "attack.every": 1, "attack.rounds": None,
            "attack.kind": kind, "attack.poison_per_batch": 0, "attack.gamma": 1.0, "attack.magnitude": 0.5}
    base.update(ATTACKS.get(kind, {}))
    base.update(extra)
    return base


@pytest.mark.parametrize("m", [1, 2])
def test_m_malicious_clients_never_flip_a_point_certified_for_m(tmp_path, clean, m):
    ds, res, X, preds, groups, cert = clean
    certified = np.flatnonzero(cert.m_star >= m)
    assert len(certified) > 20
    i0 = int(certified[0])
    A = int(cert.prediction[i0])
    clients = _worst_clients(groups, preds, i0, A, m)
    counts = cert.counts[i0].copy()
    counts[A] = -1
    runner_up = int(np.argmax(counts))
    kinds = dict(ATTACKS)
    kinds["adaptive"] = {"attack.options": {"target_class": runner_up, "points": [int(i) for i in certified[:10]],
                                            "scale": 50.0, "steps": 3}}
    for kind in kinds:
        got = _retrain(tmp_path, kind, ds, **_attack(kind, clients, **kinds[kind]))
        after = ensemble.plurality(ensemble.vote_counts(_predictions(got, X), ds.num_classes))
        changed_groups = {g for g in range(G) if not torch.equal(got.final_params[g], res.final_params[g])}
        assert changed_groups <= {groups.group_of(c)[0] for c in clients}, kind  # locality: the other groups are untouched
        assert changed_groups, kind  # the attack did something
        flips = [int(i) for i in certified if after[i] != cert.prediction[i]]
        assert flips == [], (kind, flips)


def _binding_class(counts: np.ndarray, A: int) -> int:
    """The competitor c whose m_c is m*(x) (the first to win when m*(x) + 1 votes move to it)."""
    n_a = counts[A]
    m_c = [((n_a - counts[c]) // 2 if c > A else -((counts[c] - n_a) // 2) - 1) if c != A else 10**9 for c in range(len(counts))]
    return int(np.argmin(m_c))


def test_m_star_plus_one_adaptive_clients_flip_points(tmp_path, clean):
    ds, res, X, preds, groups, cert = clean
    flipped = tried = 0
    for i in [int(j) for j in np.flatnonzero(cert.m_star >= 0)][:4]:
        A, m = int(cert.prediction[i]), int(cert.m_star[i]) + 1
        B = _binding_class(cert.counts[i], A)
        clients = _worst_clients(groups, preds, i, A, m)
        if len(clients) < m:
            continue
        got = _retrain(tmp_path, f"tight-{i}", ds, **_attack(
            "adaptive", clients, **{"attack.options": {"target_class": B, "points": [i], "scale": 200.0, "steps": 5}}))
        after = ensemble.plurality(ensemble.vote_counts(_predictions(got, X[i : i + 1]), ds.num_classes))[0]
        tried += 1
        flipped += int(after != A)
    assert tried >= 3 and flipped == tried
