"""Statistical certificates against an adaptive adversary (issue 17, part 1).

The adversary knows everything an input may depend on before certification: the config, its
seed and the trained model. Before crfl drew its certification randomness from the operating
system's entropy, the Monte Carlo noisy models were the stream ("smoothing", 0) of the config's
seed and the mixture continuations the streams ("mixture-noise", t, k) of it; replaying the config's
seed as the certification seed (``replay_seed=cfg.seed``) reproduces exactly those draws. Against
them a linear program over x in the data's box finds inputs on which the known noisy models (or
continuations) vote for A while the true smoothed classifier (or mixture) prefers another class:
the attack has teeth. The same inputs certified with fresh randomness give false statements at a
rate within alpha and its tolerance.

A statement is false when c_A is certified (no abstain) and the exact smoothed probability of c_A
is below p_A_lower, some other class's is above p_B_upper, or c_A is not the top class
(:func:`crfl.smoothing.exact_class_probabilities`). For the mixture the exact law is not
available: it is estimated from an independent reference set of R continuations, and a statement
counts as false only where it is false by more than the reference's Hoeffding error (a sound,
conservative count).

Tolerances. Calls of ``Certifier`` each draw their own seed, so their statements are independent
and their false count is dominated by Binomial(n, alpha): the test allows its 1 - 1e-4 quantile.
The statements of one ``certify_run`` share one seed and may be correlated; their false share F
has E F <= alpha and Var F <= E F^2 <= E F <= alpha, so over R independent certifications
Cantelli's inequality allows alpha + sqrt(alpha (1 - delta) / (R delta)) at level delta = 0.01.

The OS's entropy is replaced by a fixed-seed stream in these tests (so that they are reproducible);
the attack never sees it, as it never sees the real one.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from scipy import stats
from scipy.optimize import linprog

from crfl import mixture, noise, rng, smoothing
from crfl.certify import Certifier, certify_run
from crfl.config import resolve
from crfl.data import Dataset
from crfl.readings.base import smooth
from crfl.rundir import load_run
from crfl.setup import model_inputs, prepare
from crfl.train import train
from tests.conftest import synthetic_images

N_ATTACK = 30


def _float_images() -> Dataset:
    """synthetic 10x10 images stored as float32 in [0, 1] (input_scale 1), so that the attack's real-valued
    inputs can be a test set that certify_run reads."""
    ds = synthetic_images(n_train=300, n_test=40, side=10, classes=3, seed=5)
    return dataclasses.replace(ds, x_train=(ds.x_train / 255.0).astype(np.float32),
                               x_test=(ds.x_test / 255.0).astype(np.float32), input_scale=1.0)


@pytest.fixture(scope="module")
def data() -> Dataset:
    return _float_images()


@pytest.fixture(scope="module")
def run(tmp_path_factory, data):
    d = tmp_path_factory.mktemp("adaptive") / "run"
    cfg = resolve(None, None, {
        "seed": 3, "data.num_clients": 4, "clients.batch_size": 20, "clients.lr": 0.05, "server.rounds": 4,
        "attack.rounds": [2], "attack.poison_per_batch": 5, "attack.gamma": 3.0, "attack.pixels": [[8, 8], [9, 9]],
        "attack.magnitude": 0.1, "attack.target": 0, "server.rho": {"kind": "linear", "a": 0.5, "b": 2.0, "cap": 6.0},
        "server.sigma": 0.2, "certify.twin": True, "run.eval_every": 100,
    })
    train(cfg, d, dataset=data)
    return d


@pytest.fixture
def entropy(monkeypatch):
    """The OS's entropy replaced by a fixed-seed stream the attack does not know (reproducible tests)."""
    g = np.random.default_rng(20261206)
    monkeypatch.setattr(rng, "os_entropy_seed", lambda: int(g.integers(0, 2**63 - 1)))


MC = {"certify.method": "monte-carlo", "certify.M": 50, "certify.alpha": 0.001, "certify.sigma_T": 0.05}
NOISY = MC | {"certify.sigma_T": 0.5}  # votes spread over classes: fresh draws differ visibly
MIX = {"certify.reading": "mixture", "certify.training_samples": 40, "certify.alpha": 0.001, "certify.sigma_T": 0.01}


def _setup(run, data, over):
    cfg, final, log = load_run(run, over)
    return prepare(cfg, data), final, log


def _split(setup, params):
    return setup.model.split(params.double())


# ---------------------------------------------------------------------------------------------
# the attack: a linear program over x in the box around a test point


def _lp_attack(data, vote_for_a, prefer_b, C: int, n: int, seed: int) -> torch.Tensor:
    """Inputs x in [0, 1]^d on which the known models ``vote_for_a`` = (W (m, C, d), b (m, C)) give class A a logit
    margin >= tau over every other class (as many as the L1 relaxation can: min sum of slacks), while the models
    ``prefer_b`` = (W (r, C, d), b (r, C)) give class B the top logit (hard constraints when r = 1, else slacks too)."""
    Wa, ba = (t.numpy() for t in vote_for_a)
    Wb, bb = (t.numpy() for t in prefer_b)
    m, r, d = Wa.shape[0], Wb.shape[0], Wa.shape[2]
    hard = r == 1
    g = np.random.default_rng(seed)
    X0 = model_inputs(data, data.x_test, torch.float64).numpy()
    out = []
    for i in range(n):
        A, B = (int(v) for v in g.choice(C, 2, replace=False))
        nv = d + m + (0 if hard else r)
        rows, rhs = [], []
        for c in range(C):  # tau <= (W_A - W_c) x + (b_A - b_c) + s_k  <=>  -(W_A - W_c) x - s_k <= (b_A - b_c) - tau
            if c != A:
                row = np.zeros((m, nv))
                row[:, :d], row[:, d : d + m] = -(Wa[:, A] - Wa[:, c]), -np.eye(m)
                rows.append(row)
                rhs.append(ba[:, A] - ba[:, c] - 0.2)
            if c != B:
                row = np.zeros((r, nv))
                row[:, :d] = -(Wb[:, B] - Wb[:, c])
                if not hard:
                    row[:, d + m :] = -np.eye(r)
                rows.append(row)
                rhs.append(bb[:, B] - bb[:, c] - (1e-4 if hard else 0.2))
        cost = np.concatenate([np.zeros(d), np.ones(m), np.full(nv - d - m, m / max(r, 1))])
        box = [(max(0.0, v - 0.5), min(1.0, v + 0.5)) for v in X0[i]] + [(0.0, None)] * (nv - d)
        res = linprog(cost, A_ub=np.vstack(rows), b_ub=np.concatenate(rhs), bounds=box, method="highs")
        if res.status == 0:
            out.append(res.x[:d])
    return torch.tensor(np.array(out)).float().double()  # float32-representable: what a test set stores


def _known_noisy_models(setup, params, seed: int, M: int, sigma: float, stream: str = "smoothing"):
    """The M noisy models (W (M, C, d), b (M, C)) of crfl.smoothing's GetCounts under the stream (``stream``, 0) of
    ``seed`` (crfl.noise's stream, rounded to the dtype the counts pick, smoothing.monte_carlo_dtype): what an
    adversary who knows the seed computes."""
    W, b = _split(setup, params)
    C, d = W.shape
    dtype = smoothing.monte_carlo_dtype(float(torch.linalg.vector_norm(params.double())), sigma, M, d, C)
    E = noise.normal(rng.CertificationSeed(seed, "replay", None).noise_stream(stream, 0), 0, M, C * d + C)
    E = E.to(dtype).double()  # the float64 stream rounded to the counts' dtype (crfl.smoothing._noise)
    return W.unsqueeze(0) + sigma * E[:, : C * d].view(M, C, d), b.unsqueeze(0) + sigma * E[:, C * d :]


def _exact_p(setup, params, X, sigma):
    W, b = _split(setup, params)
    return np.exp(smoothing.exact_class_probabilities(W, b, setup.model.input_map(X.double()), sigma).numpy())


def _false(p, c_a, p_a_lower, p_b_upper, abstain, eps: float = 0.0) -> np.ndarray:
    """Per point: a certified statement (c_A, p_A_lower, p_B_upper) that the class probabilities refute by more than
    ``eps``: c_A not the top class, p(c_A) < p_A_lower, or another class above p_B_upper. ``p``: (n, C)
    probabilities, or a pair (lower, upper) of (n, C) bounds on them (a statement counts as false only if every
    p between them refutes it)."""
    lo, up = p if isinstance(p, tuple) else (p, p)
    rows = np.arange(len(lo))
    c_a = np.asarray(c_a, dtype=np.int64)
    pa = up[rows, c_a]
    other = lo.copy()
    other[rows, c_a] = -np.inf
    top = other.max(axis=1)
    bad = (np.asarray(p_a_lower) > pa + eps) | (top - eps > np.asarray(p_b_upper)) | (top - pa > 2 * eps + 1e-12)
    return bad & ~np.asarray(abstain, dtype=bool)


def _twin_check_sees_it(cert: Certifier, X: torch.Tensor, old) -> None:
    """The twin check on the attack's inputs: smoothed with the certificate's own (known) noise, as before, the twin
    (a model close to the run's) votes like the run everywhere, so the check cannot see the attack; with the
    check's own stream of the seed (what certify_run uses) it disagrees on many of the falsely certified inputs."""
    ok = ~old.abstain
    shared = cert.impl.bounds(X, twin=True, seed=old.seed)
    own = cert.impl.bounds(X, twin=True, seed=old.seed.child("check"))
    assert np.mean(shared.c_a[ok] == old.c_a[ok]) == 1.0
    assert np.mean(own.c_a[ok] == old.c_a[ok]) <= 0.75


def _binomial_allowance(n: int, alpha: float) -> int:
    return int(stats.binom.ppf(1 - 1e-4, n, alpha))


def _cantelli_share(alpha: float, R: int, delta: float = 0.01) -> float:
    return alpha + math.sqrt(alpha * (1 - delta) / (R * delta))


def _attack_dataset(data: Dataset, X: torch.Tensor) -> Dataset:
    """The data with the attack's inputs first in the test set, then the real test points."""
    x = np.concatenate([X.numpy().astype(np.float32), data.x_test])
    y = np.concatenate([np.zeros(len(X), dtype=np.int64), data.y_test])
    return dataclasses.replace(data, x_test=x, y_test=y)


def _written(out) -> tuple[dict, dict[str, dict[str, np.ndarray]]]:
    """summary.json and the columns of certificates_{clean,backdoor}.csv of a certification directory."""
    summary = json.loads((out / "summary.json").read_text())
    cols = {}
    for k in ("clean", "backdoor"):
        with open(out / f"certificates_{k}.csv") as f:
            rows = list(csv.DictReader(f))
        cols[k] = {c: np.array([float(r[c]) for r in rows]) for c in ("prediction", "p_a_lower", "p_b_upper")}
    return summary, cols


def _false_in_files(out, p_sets: dict[str, np.ndarray], eps: float = 0.0) -> tuple[int, int]:
    """(false statements, certified statements) in a written result set, against the class probabilities."""
    _, cols = _written(out)
    bad = certified = 0
    for k, p in p_sets.items():
        c = cols[k]
        abstain = c["prediction"] < 0
        pred = np.where(abstain, 0, c["prediction"]).astype(np.int64)
        bad += int(_false(p, pred, c["p_a_lower"], c["p_b_upper"], abstain, eps).sum())
        certified += int((~abstain).sum())
    return bad, certified


# ---------------------------------------------------------------------------------------------
# Monte Carlo


@pytest.mark.parametrize("variant", [{}, {"certify.bound": "hoeffding"}, {"certify.selection": 20}],
                         ids=["clopper-pearson", "hoeffding", "selection"])
def test_monte_carlo_adaptive_inputs_break_a_known_seed_not_fresh_randomness(run, data, entropy, tmp_path, variant):
    MC = globals()["MC"] | variant
    setup, final, log = _setup(run, data, MC)
    cz, params = setup.cfg.certify, final["params"]
    W, b = _split(setup, params)
    known = _known_noisy_models(setup, params, setup.cfg.seed, cz.M, cz.sigma_T)
    if cz.selection:  # the selection sample's models too: they pick c_A
        sel = _known_noisy_models(setup, params, setup.cfg.seed, cz.selection, cz.sigma_T, "selection")
        known = tuple(torch.cat(v) for v in zip(known, sel))
    X = _lp_attack(data, known, (W.unsqueeze(0), b.unsqueeze(0)), W.shape[0], N_ATTACK, seed=0)
    assert len(X) >= 0.8 * N_ATTACK
    p = _exact_p(setup, params, X, cz.sigma_T)
    cert = Certifier(setup, final, log, run)

    # the attack has teeth: against the config seed's noise (replayed) nearly every input gets a false certificate
    old = cert.bounds(X, replay_seed=setup.cfg.seed)
    assert old.seed.source == "replay" and old.seed.seed == setup.cfg.seed
    teeth = _false(p, old.c_a, old.p_a_lower, old.p_b_upper, old.abstain).mean()
    assert teeth >= 0.5
    _twin_check_sees_it(cert, X, old)

    # Certifier: a fresh seed per call; one call per input, so the statements are independent
    seeds, bad_calls = set(), 0
    for i in range(len(X)):
        sm = cert.certify(X[i : i + 1])[0]
        seeds.add(sm.seed.seed)
        assert sm.seed.source == "os-entropy"
        bad_calls += int(_false(p[i : i + 1], sm.c_a, sm.p_a_lower, sm.p_b_upper, sm.abstain).sum())
    assert len(seeds) == len(X)
    assert bad_calls <= _binomial_allowance(len(X), cz.alpha)

    # certify_run (what `crfl certify` runs) on a test set holding the attack's inputs, R fresh certifications
    ds = _attack_dataset(data, X)
    Xt = model_inputs(ds, ds.x_test, torch.float32)
    p_sets = {"clean": _exact_p(setup, params, Xt, cz.sigma_T),
              "backdoor": _exact_p(setup, params, setup.plan.trigger.apply(Xt), cz.sigma_T)}
    out = tmp_path / "old"
    certify_run(run, overrides=MC, dataset=ds, out_dir=out, replay_seed=setup.cfg.seed)
    bad_old, _ = _false_in_files(out, p_sets)
    assert bad_old >= 0.5 * len(X)  # the attack's inputs, certified falsely under the known seed
    R, shares, total_certified = 3, [], 0
    for j in range(R):
        out = tmp_path / f"fresh{j}"
        s = certify_run(run, overrides=MC, dataset=ds, out_dir=out)
        assert s["smoothing"]["seed_source"] == "os-entropy"
        bad, certified = _false_in_files(out, p_sets)
        shares.append(bad / (2 * len(Xt)))
        total_certified += certified
    print(f"Monte Carlo {variant}: known seed false {teeth:.2f} (Certifier), {bad_old} (certify_run); fresh: "
          f"Certifier {bad_calls}/{len(X)}, certify_run shares {shares}, certified {total_certified}")
    assert np.mean(shares) <= _cantelli_share(cz.alpha, R)
    assert total_certified >= R * len(data.y_test)  # not vacuous: the real test points are certified


# ---------------------------------------------------------------------------------------------
# the mixture reading


def _reference_law(setup, pre, t_adv, R: int = 200):
    """Bounds (lower, upper) on the mixture's class probabilities as a function of the inputs, from R independent
    continuations (per run exact bounds, :func:`crfl.mixture.mixture_class_bounds`), and the Hoeffding error of
    their mean at level 1e-6 per (point, class)."""
    ref = mixture.continuations(setup, pre, t_adv, R, seed=rng.replay_certification_seed(987654321))
    law = lambda X: mixture.mixture_class_bounds(setup, ref, X.double(), setup.cfg.certify.sigma_T)  # noqa: E731
    return law, math.sqrt(math.log(2 / 1e-6) / (2 * R))


def test_mixture_adaptive_inputs_break_known_continuations_not_fresh_ones(run, data, entropy, tmp_path):
    setup, final, log = _setup(run, data, MIX)
    cz, st = setup.cfg.certify, final["attack_state"]
    pre, t_adv, K = st["pre_noise"], st["round"], cz.training_samples
    stack = lambda F: tuple(torch.stack(v) for v in zip(*(_split(setup, w) for w in F)))  # noqa: E731
    # what the adversary knows: the continuations of the config's seed, and its own estimate of the law
    known = mixture.continuations(setup, pre, t_adv, K, seed=rng.replay_certification_seed(setup.cfg.seed))
    own = mixture.continuations(setup, pre, t_adv, 100, seed=rng.replay_certification_seed(12345))
    X = _lp_attack(data, stack(known), stack(own), data.num_classes, N_ATTACK, seed=1)
    assert len(X) >= 0.8 * N_ATTACK
    law, eps = _reference_law(setup, pre, t_adv)
    p = law(X)
    cert = Certifier(setup, final, log, run)

    old = cert.bounds(X, replay_seed=setup.cfg.seed)
    teeth = _false(p, old.c_a, old.p_a_lower, old.p_b_upper, old.abstain, eps).mean()
    assert teeth >= 0.5
    _twin_check_sees_it(cert, X, old)

    bad_calls, seeds = 0, set()
    n = 8
    for i in range(n):  # fresh continuations per call (K trained per call): independent statements
        sm = cert.certify(X[i : i + 1])[0]
        seeds.add(sm.seed.seed)
        bad_calls += int(_false((p[0][i : i + 1], p[1][i : i + 1]), sm.c_a, sm.p_a_lower, sm.p_b_upper, sm.abstain, eps).sum())
    assert len(seeds) == n
    assert bad_calls <= _binomial_allowance(n, cz.alpha)

    ds = _attack_dataset(data, X[:10])
    Xt = model_inputs(ds, ds.x_test, torch.float32)
    p_sets = {"clean": law(Xt), "backdoor": law(setup.plan.trigger.apply(Xt))}
    out = tmp_path / "old"
    certify_run(run, overrides=MIX, dataset=ds, out_dir=out, replay_seed=setup.cfg.seed)
    bad_old = _false_in_files(out, p_sets, eps)[0]
    assert bad_old >= 5
    R, shares, total_certified = 2, [], 0
    for j in range(R):
        out = tmp_path / f"fresh{j}"
        s = certify_run(run, overrides=MIX, dataset=ds, out_dir=out)
        assert s["smoothing"]["seed_source"] == "os-entropy" and s["twin"]["seed"] != s["smoothing"]["seed"]
        bad, certified = _false_in_files(out, p_sets, eps)
        shares.append(bad / (2 * len(Xt)))
        total_certified += certified
    print(f"mixture: known seed false {teeth:.2f} (Certifier), {bad_old} (certify_run); fresh: Certifier {bad_calls}/{n}, "
          f"certify_run shares {shares}, certified {total_certified}")
    assert np.mean(shares) <= _cantelli_share(cz.alpha, R)
    assert total_certified >= R * len(data.y_test)


# ---------------------------------------------------------------------------------------------
# recording and replay


def test_replay_reproduces_the_result_files_and_fresh_certifications_differ(run, data, tmp_path):
    outs = {}
    for name, seed in (("a", None), ("b", None)):
        outs[name] = tmp_path / name
        certify_run(run, overrides=NOISY, dataset=data, out_dir=outs[name], replay_seed=seed)
    sa, _ = _written(outs["a"])
    sb, _ = _written(outs["b"])
    assert sa["smoothing"]["seed_source"] == sb["smoothing"]["seed_source"] == "os-entropy"
    assert sa["smoothing"]["seed"] != sb["smoothing"]["seed"]
    assert str(sa["smoothing"]["seed"]) in sa["certificate"]["guarantee"]
    assert sa["smoothing"]["noise_generator"] == noise.GENERATOR  # the counter-based stream (crfl.noise)
    # the twin check draws from the seed's own stream, recorded
    assert sa["twin"]["seed"] == rng.replay_certification_seed(sa["smoothing"]["seed"]).child("check").seed

    replay = tmp_path / "replay"
    sr = certify_run(run, overrides=NOISY, dataset=data, out_dir=replay, replay_seed=sa["smoothing"]["seed"])
    assert sr["smoothing"]["seed_source"] == "replay" and sr["smoothing"]["seed"] == sa["smoothing"]["seed"]
    assert "only for inputs fixed before that seed was first drawn" in sr["certificate"]["guarantee"]
    for f in ("certificates_clean.csv", "certificates_backdoor.csv"):
        assert (replay / f).read_bytes() == (outs["a"] / f).read_bytes()
    assert sr["results"] == sa["results"]
    assert {k: v for k, v in sr["twin"].items() if not k.startswith("seed_")} == \
        {k: v for k, v in sa["twin"].items() if not k.startswith("seed_")}
    # fresh certifications draw different votes (n_a) somewhere
    na = lambda d: (d / "certificates_clean.csv").read_text()  # noqa: E731
    assert na(outs["a"]) != na(outs["b"])


def test_exact_certificates_draw_and_record_nothing(run, data, tmp_path):
    s = certify_run(run, dataset=data, out_dir=tmp_path / "x", replay_seed=5)  # a replay seed is unused
    assert s["smoothing"]["method"] == "exact"
    assert s["smoothing"]["seed"] is None and s["smoothing"]["seed_source"] is None and s["twin"]["seed"] is None
    assert s["smoothing"]["noise_generator"] is None
    assert "seed" not in s["certificate"]["guarantee"]


def test_the_seed_never_comes_from_the_config(run, data):
    """The noise depends on the certification seed only: the config's seed neither fixes nor changes it."""
    setup, final, _ = _setup(run, data, NOISY)
    other = prepare(setup.cfg.replace(seed=setup.cfg.seed + 1), data)
    X = model_inputs(data, data.x_test, torch.float32)
    params = final["params"]
    # near the decision boundary the votes move with the noise: points where p_A is not ~1
    S = rng.replay_certification_seed(11)
    a, b = smooth(setup, params, X, "monte-carlo", S), smooth(other, params, X, "monte-carlo", S)
    assert np.array_equal(a.n_a, b.n_a) and np.array_equal(a.p_a_lower, b.p_a_lower)
    fresh = [smooth(setup, params, X, "monte-carlo") for _ in range(2)]
    assert fresh[0].seed.seed != fresh[1].seed.seed and fresh[0].seed.seed != setup.cfg.seed
    assert not all(np.array_equal(f.n_a, a.n_a) for f in fresh) and not np.array_equal(fresh[0].n_a, fresh[1].n_a)
    # the check's stream is independent of the certificate's: other votes from the same seed
    assert not np.array_equal(smooth(setup, params, X, "monte-carlo", S.child("check")).n_a, a.n_a)


def test_replay_seed_is_checked_and_reaches_certification_from_the_cli(run, monkeypatch, capsys):
    from crfl import certify
    from crfl.cli import main
    from crfl.validation import ConfigError

    assert main(["certify", str(run), "--replay-seed", "-1"]) == 2
    assert "crfl: error: The 'replay_seed' parameter must be an integer in [0, 9223372036854775807]. Got -1" \
        in capsys.readouterr().err
    seen = {}

    def fake(run_dir, **kw):
        seen.update(kw)
        raise ConfigError("stop")

    monkeypatch.setattr(certify, "certify_run", fake)
    assert main(["certify", str(run), "--replay-seed", "42", "--method", "monte-carlo", "--M", "10"]) == 2  # --M is used by it
    assert seen["replay_seed"] == 42 and "replay_seed" not in str(seen["overrides"])


def test_certifier_draws_fresh_randomness_per_call_and_replays_a_call(run, data):
    setup, final, log = _setup(run, data, NOISY)
    cert = Certifier(setup, final, log, run)
    X = model_inputs(data, data.x_test, torch.float32)
    (a, _, ra), (b, _, _) = cert.certify(X), cert.certify(X)
    assert a.seed.source == b.seed.source == "os-entropy" and a.seed.seed != b.seed.seed
    assert not np.array_equal(a.n_a, b.n_a)
    r, _, rr = cert.certify(X, replay_seed=a.seed.seed)
    assert r.seed.source == "replay" and np.array_equal(r.n_a, a.n_a) and np.array_equal(r.p_a_lower, a.p_a_lower)
    assert np.array_equal(rr, ra)
    exact = Certifier(*_setup(run, data, None), run)
    assert exact.certify(X)[0].seed is None and exact.bounds(X, twin=True).seed is None


def test_crfl_certify_prints_records_and_replays_the_seed(tmp_path, capsys):
    from crfl.cli import main

    out = tmp_path / "demo"
    assert main(["train", "--preset", "demo", "--set", "server.rounds=3", "--set", "attack.rounds=[2]", "--out", str(out),
                 "--quiet"]) == 0
    flags = ["--method", "monte-carlo", "--M", "100", "--num-test", "100", "--sigma-T", "0.5"]
    files = ("certificates_clean.csv", "certificates_backdoor.csv")
    assert main(["certify", str(out), *flags]) == 0
    s = json.loads((out / "summary.json").read_text())
    seed = s["smoothing"]["seed"]
    assert s["smoothing"]["seed_source"] == "os-entropy" and s["smoothing"]["seed_drawn_at"]
    assert f"--replay-seed {seed}" in capsys.readouterr().out
    first = [(out / f).read_bytes() for f in files]
    assert main(["certify", str(out), *flags]) == 0  # fresh: another seed, other votes
    assert json.loads((out / "summary.json").read_text())["smoothing"]["seed"] != seed
    assert [(out / f).read_bytes() for f in files] != first
    assert main(["certify", str(out), *flags, "--replay-seed", str(seed)]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["smoothing"]["seed"] == seed and s["smoothing"]["seed_source"] == "replay"
    assert "only for inputs fixed before that seed was first drawn" in s["certificate"]["guarantee"]
    assert [(out / f).read_bytes() for f in files] == first
