"""Certification of a run (Algorithm 2, Corollary 1): outputs checked against an independent re-derivation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy.stats import norm

from crfl.certify import CERT_COLUMNS, certify_run
from crfl.config import resolve
from crfl.io import read_csv
from crfl.train import train
from tests.conftest import synthetic_images


@pytest.fixture(scope="module")
def images28():
    return synthetic_images(n_train=800, n_test=300, side=28, classes=4, seed=3)


def cfg28(**over):
    base = {
        "data.num_clients": 8, "clients.batch_size": 20, "clients.lr": 0.002, "server.rounds": 8,
        "attack.rounds": [4], "attack.poison_per_batch": 4, "attack.gamma": 5.0,
        "server.rho": {"kind": "linear", "a": 0.5, "b": 2.0, "cap": 6.0}, "server.sigma": 0.05,
        "certify.sigma_T": 0.05,
    }
    base.update(over)
    return resolve(None, None, base)


def rederive(row: dict, c: dict) -> float:
    """Corollary 1 (Eq. 2), written again plainly from the summary's ingredients."""
    pa, pb = float(row["p_a_lower"]), float(row["p_b_upper"])
    if pa <= pb:
        return 0.0
    eps = -math.log(1 - (math.sqrt(pa) - math.sqrt(pb)) ** 2)
    s = sum((p * g * t * e * q) ** 2 for p, g, t, e, q in zip(c["p"], c["gamma"], c["tau"], c["eta"], c["poison_ratio"]))
    prod = 1.0
    for r, sg in zip(c["rho"], c["sigma"]):
        prod *= 2 * norm.cdf(r / sg) - 1
    return math.sqrt(eps * c["sigma_t_adv"] ** 2 / (2 * c["R"] * c["L_Z"] ** 2 * s * prod))


@pytest.mark.parametrize("method, bound, coverage", [("monte-carlo", "hoeffding", "paper"),
                                                     ("monte-carlo", "clopper-pearson", "simultaneous"),
                                                     ("exact", None, None)])
def test_radius_rows_match_independent_rederivation(tmp_path, images28, method, bound, coverage):
    over = {"certify.method": method, "certify.M": 400, "certify.alpha": 0.01}
    if bound:
        over.update({"certify.bound": bound, "certify.coverage": coverage})
    train(cfg28(**over), tmp_path / "r", dataset=images28)
    summary = certify_run(tmp_path / "r", dataset=images28)
    c = summary["certificate"]
    assert c["R"] == 1 and c["tau"] == [5] and c["poison_ratio"] == [0.2] and c["gamma"] == [5.0]
    assert c["p"] == [0.125] and len(c["rho"]) == 4 and c["sigma"][-1] == 0.05
    for which in ("clean", "backdoor"):
        rows = read_csv(tmp_path / "r" / f"certificates_{which}.csv")
        assert list(rows[0]) == CERT_COLUMNS and len(rows) == 300
        n_abstain = 0
        for row in rows:
            pa, pb = float(row["p_a_lower"]), float(row["p_b_upper"])
            if pa <= pb:
                n_abstain += 1
                assert row["prediction"] == "-1" and float(row["radius"]) == 0.0 and row["correct"] == "0"
            else:
                assert int(row["prediction"]) >= 0
            assert float(row["radius"]) == pytest.approx(rederive(row, c), rel=1e-9, abs=1e-300)
            assert row["correct"] == str(int(row["prediction"] == row["label"]))
            if method == "monte-carlo":
                na, nb = int(row["n_a"]), int(row["n_b"])
                assert na >= nb
                if bound == "hoeffding":  # the paper's bound, each at level alpha
                    assert pa == pytest.approx(max(0.0, na / 400 - math.sqrt(math.log(1 / 0.01) / 800)), abs=1e-12)
            else:
                assert row["n_a"] == "" and row["n_b"] == ""
        assert summary["results"][which]["abstain_rate"] == pytest.approx(n_abstain / 300)


def test_summary_blocks_and_curves(tmp_path, images28):
    train(cfg28(), tmp_path / "r", dataset=images28)
    s = certify_run(tmp_path / "r", dataset=images28)
    for block in ("training", "certificate", "smoothing", "results", "assumptions"):
        assert block in s
    assert s["smoothing"]["method"] == "exact" and s["smoothing"]["alpha"] is None
    curve = s["results"]["clean"]["curve"]
    rad = np.array([float(r["radius"]) for r in read_csv(tmp_path / "r" / "certificates_clean.csv")])
    ok = np.array([r["correct"] == "1" for r in read_csv(tmp_path / "r" / "certificates_clean.csv")])
    for pt in curve:
        assert pt["certified_accuracy"] == pytest.approx(np.mean(ok & (rad >= pt["radius"])))
        assert pt["certified_accuracy"] <= pt["certified_rate"] + 1e-12
    assert (tmp_path / "r" / "certified.png").is_file() and (tmp_path / "r" / "certified.pdf").is_file()
    inv = read_csv(tmp_path / "r" / "inverse_clean.csv")
    assert len(inv) == 300 and float(inv[0]["delta_norm"]) == pytest.approx(0.1)


def test_twin_is_identical_before_attack_and_check_reported(tmp_path, images28):
    train(cfg28(**{"certify.twin": True}), tmp_path / "r", dataset=images28)
    rows = read_csv(tmp_path / "r" / "rounds.csv")
    dist = [float(r["twin_distance"]) for r in rows]
    assert dist[:3] == [0.0, 0.0, 0.0]  # same batches and noise: the twin equals the run until t_adv
    assert dist[3] > 0
    s = certify_run(tmp_path / "r", dataset=images28)
    tw = s["twin"]
    assert tw["delta_norm"] == pytest.approx(0.1)
    for k in ("clean", "backdoor"):
        assert 0 <= tw[k]["covered_points"] <= 300
        assert tw[k]["agreement"] is None or 0.0 <= tw[k]["agreement"] <= 1.0


def test_rfa_certificate_uses_attackers_weiszfeld_weight(tmp_path, images28):
    train(cfg28(**{"aggregation.name": "rfa", "attack.gamma": 50.0}), tmp_path / "r", dataset=images28)
    log = json.loads((tmp_path / "r" / "attack.json").read_text())["rounds"][0]
    s = certify_run(tmp_path / "r", dataset=images28)
    assert s["certificate"]["p"] == log["p"]
    assert log["p"][0] < 0.125 * 0.5  # RFA down-weights the scaled attacker


def test_nonlinear_model_reports_margins_but_no_radius(tmp_path, images28):
    train(cfg28(**{"model.name": "mlp", "model.hidden": 16, "certify.M": 100}), tmp_path / "r", dataset=images28)
    s = certify_run(tmp_path / "r", dataset=images28)
    assert s["smoothing"]["method"] == "monte-carlo"
    assert s["certificate"]["radius_certified"] is False
    assert "no radius is certified" in s["assumptions"]["note"]
    rows = read_csv(tmp_path / "r" / "certificates_clean.csv")
    assert all(r["radius"] == "" for r in rows) and all(r["n_a"] != "" for r in rows)


def test_paper_lipschitz_flagged_unsound_for_image_norms(tmp_path, images28):
    train(cfg28(**{"certify.lipschitz": "paper"}), tmp_path / "r", dataset=images28)
    s = certify_run(tmp_path / "r", dataset=images28)
    assert s["certificate"]["L_Z"] == pytest.approx(math.sqrt(2 + 2 * 4.0 + 16.0))  # rho_{t_adv} = 0.5*4 + 2
    assert s["assumptions"]["checks"]["lipschitz"]["holds"] is False
    assert s["assumptions"]["radius_certified"] is False


def test_short_last_batch_raises_the_effective_poison_ratio(tmp_path, images28):
    """106 samples per client, n_B = 20, q_B = 4: five batches at 4/20 and a last one of 6 with 4/6."""
    from crfl.clients import nominal_poison_ratio

    ds = synthetic_images(n_train=848, n_test=100, side=28, classes=4, seed=5)
    train(cfg28(), tmp_path / "r", dataset=ds)
    log = json.loads((tmp_path / "r" / "attack.json").read_text())["rounds"][0]
    expected = (5 * 4 / 20 + 4 / 6) / 6
    assert log["tau"] == [6] and log["poison_ratio"] == pytest.approx([expected])
    assert log["nominal_poison_ratio"] == [0.2]
    assert nominal_poison_ratio(106, 20, 4, 6) == pytest.approx(expected)
    s = certify_run(tmp_path / "r", dataset=ds)
    assert s["certificate"]["poison_ratio"] == pytest.approx([expected])


def test_start_norm_bound_for_L_Z(tmp_path, images28):
    """sqrt(rho_{t-1}^2 + sigma_{t-1}^2 D) for t_adv > 1; the initial model's norm for t_adv = 1."""
    from crfl.certify import start_norm_bound
    from crfl.setup import prepare

    setup = prepare(cfg28(), images28)
    D = setup.model.num_params
    assert start_norm_bound(setup, 4) == pytest.approx(math.sqrt(3.5**2 + 0.05**2 * D))
    from crfl.rng import torch_generator

    w0 = setup.model.init(torch_generator(setup.cfg.seed, "init"))
    assert start_norm_bound(setup, 1) == pytest.approx(float(w0.double().norm()))
    train(cfg28(), tmp_path / "r", dataset=images28)
    c = certify_run(tmp_path / "r", dataset=images28)["certificate"]
    B = c["input_norm_bound"]
    assert c["rho_for_L_Z"] == pytest.approx(start_norm_bound(setup, 4) + 5 * 0.002 * math.sqrt(2) * math.sqrt(B * B + 1))
    assert c["L_Z"] == pytest.approx(c["rho_for_L_Z"] / 2 * math.sqrt(B * B + 1) + math.sqrt(2))


@pytest.mark.parametrize("rule", ["rfa", "krum"])
def test_update_dependent_weights_are_not_certified(tmp_path, images28, rule):
    over = {"aggregation.name": rule}
    if rule == "krum":
        over["aggregation.options"] = {"f": 1}
    train(cfg28(**over), tmp_path / "r", dataset=images28)
    s = certify_run(tmp_path / "r", dataset=images28)
    check = s["assumptions"]["checks"]["fixed_aggregation_weights"]
    assert check["holds"] is False and rule in check["detail"]
    assert s["certificate"]["radius_certified"] is False
    assert "label swap" in s["assumptions"]["scope"][0]


def test_rule_without_client_weights_reports_margins(tmp_path, images28):
    train(cfg28(**{"aggregation.name": "median"}), tmp_path / "r", dataset=images28)
    s = certify_run(tmp_path / "r", dataset=images28)
    assert s["certificate"]["p"] is None and s["certificate"]["radius_certified"] is False
    assert "no per-client weight" in s["assumptions"]["note"]
    rows = read_csv(tmp_path / "r" / "certificates_clean.csv")
    assert all(r["radius"] == "" for r in rows) and all(r["p_a_lower"] != "" for r in rows)
