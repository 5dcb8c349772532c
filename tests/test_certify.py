"""Certification of a run under each reading: every written radius re-derived row by row, independently
(mpmath, from the files alone), the summary's statement, the twin, the scope checks and the edge cases."""

from __future__ import annotations

import json
import math

import mpmath as mp
import numpy as np
import pytest
import torch

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


@pytest.fixture(scope="module")
def trained(tmp_path_factory, images28):
    d = tmp_path_factory.mktemp("cert") / "r"
    train(cfg28(**{"certify.twin": True}), d, dataset=images28)
    return d


def _ppf(log_p: float, upper_tail: bool) -> mp.mpf:
    """Phi^-1(p) for p = exp(log_p) (or Phi^-1(1 - exp(log_p)) with upper_tail), in mpmath."""
    q = mp.e ** mp.mpf(log_p)
    z = -mp.sqrt(2) * mp.erfinv(1 - 2 * q)  # Phi^-1(q)
    return -z if upper_tail else z


def _c(cert: dict, B: mp.mpf) -> mp.mpf:
    """c(B) of docs/theory.md (g), written out plainly from the summary's attack rounds."""
    c = mp.mpf(0)
    for k in cert["attack_rounds"]:
        lip = abs(1 - k["p_total"] - sum(p * (g - 1) for p, g in zip(k["p"], k["gamma"]))) \
            + (k["p_total"] - sum(k["p"])) + sum(p * g for p, g in zip(k["p"], k["gamma"]))
        a = mp.mpf(0)
        for p, g, e, t, Q in zip(k["p"], k["gamma"], k["eta"], k["tau"], k["Q"]):
            slack = mp.mpf(cert.get("rounding", {}).get("opnorm_slack", {}).get(str(k["round"]), 0.0))  # (g) step 7
            lz = (mp.mpf(k["start_centred_opnorm"]) + slack + t * mp.mpf(e) * mp.sqrt(2) * B) / 2 * mp.sqrt(B * B + 1) + mp.sqrt(2)
            a += mp.mpf(p) * g * mp.mpf(e) * mp.mpf(Q) * lz
        c = lip * c + a
    return c


U = 2.0**-53  # unit roundoff of float64


def _budget(log1m_a: mp.mpf, log_b: mp.mpf, cert: dict) -> mp.mpf:
    """The distance budget from log(1 - p_A_lower) and log p_B_upper (Neyman-Pearson or KL form)."""
    if cert["bound_form"] == "kl":
        pa, pb = 1 - mp.e ** log1m_a, mp.e ** log_b
        eps = -mp.log(1 - (mp.sqrt(pa) - mp.sqrt(pb)) ** 2)
        return mp.mpf(cert["sigma"]) * mp.sqrt(2 * eps)
    margin = _ppf(log1m_a, True) - _ppf(log_b, False)
    return mp.mpf(cert["sigma"]) * margin / 2


def budget_condition(row: dict, cert: dict) -> float:
    """kappa: the relative change of the budget per relative change of p_A, 1 - p_A or p_B (summed).

    The code holds p_A_lower, 1 - p_A_lower (or its log) and p_B_upper in float64, each good to an
    ulp or so, so its budget cannot be closer to the exact one than about kappa * U; neither can
    the radius, whose relative sensitivity to the budget is at most 1 (r c(B_0 + r) grows at least
    linearly in r). kappa is large where p_A_lower is close to p_B_upper (about p / (p_A - p_B)).
    """
    if int(row["prediction"]) < 0 or cert["method"] == "margin":
        return 0.0
    with mp.workdps(60 + int(-float(row["log1m_p_a_lower"]) / 2.3 if row["log1m_p_a_lower"] not in ("-inf",) else 60)):
        la, lb = mp.mpf(row["log1m_p_a_lower"]), mp.mpf(row["log_p_b_upper"])
        b0, h = _budget(la, lb, cert), mp.mpf(10) ** -20
        if b0 <= 0:
            return 0.0
        qa = mp.e ** la
        la_pa = mp.log(1 - (1 - qa) * (1 + h))  # p_A -> p_A (1 + h)
        d = [mp.log(_budget(la + h, lb, cert) / b0), mp.log(_budget(la_pa, lb, cert) / b0), mp.log(_budget(la, lb + h, cert) / b0)]
        return float(sum(abs(x) for x in d) / h)


def rederive_sound(row: dict, cert: dict) -> float:
    """budget from the row's logs (Neyman-Pearson or KL form), then the fixed point r c(B_0 + r) = budget."""
    if int(row["prediction"]) < 0:
        return 0.0
    with mp.workdps(60 + int(-float(row["log1m_p_a_lower"]) / 2.3 if row["log1m_p_a_lower"] not in ("-inf",) else 60)):
        if cert["method"] == "margin":
            budget = mp.mpf(row["budget"])
        else:
            budget = _budget(mp.mpf(row["log1m_p_a_lower"]), mp.mpf(row["log_p_b_upper"]), cert)
        rounding = cert.get("rounding")  # (g) step 7: r^ c'(B^ + r^) + E <= budget, r^ = (1 + iota_1) r + iota_0
        if rounding is not None:
            budget -= mp.mpf(rounding["rounding_error"])
        if budget <= 0:
            return 0.0
        B0 = mp.mpf(rounding["realised_input_bound"] if rounding else cert["input_norm_bound"])
        lo, hi = mp.mpf(0), budget / _c(cert, B0)
        for _ in range(200):
            mid = (lo + hi) / 2
            if mid * _c(cert, B0 + mid) > budget:
                hi = mid
            else:
                lo = mid
        if rounding is not None:
            scale, offset = rounding["trigger_rounding"]
            lo = max(mp.mpf(0), (lo - mp.mpf(offset)) / (1 + mp.mpf(scale)))
        return float(lo)


def rederive_paper(row: dict, c: dict) -> float:
    """Corollary 1 (Eq. 2), written again plainly from the summary's ingredients (mpmath)."""
    pa, pb = mp.mpf(row["p_a_lower"]), mp.mpf(row["p_b_upper"])
    if pa <= pb:
        return 0.0
    with mp.workdps(60):
        eps = -mp.log(1 - (mp.sqrt(pa) - mp.sqrt(pb)) ** 2)
        s = sum((mp.mpf(p) * g * t * mp.mpf(e) * mp.mpf(q)) ** 2 for p, g, t, e, q in zip(c["p"], c["gamma"], c["tau"], c["eta"], c["poison_ratio"]))
        prod = mp.mpf(1)
        for r, sg in zip(c["rho"], c["sigma"]):
            prod *= 2 * mp.ncdf(mp.mpf(r) / sg) - 1
        return float(mp.sqrt(eps * mp.mpf(c["sigma_t_adv"]) ** 2 / (2 * c["R"] * mp.mpf(c["L_Z"]) ** 2 * s * prod)))


CASES = {
    "coupled-exact": {},
    "coupled-kl": {"certify.bound_form": "kl"},
    "coupled-mc": {"certify.method": "monte-carlo", "certify.M": 400, "certify.alpha": 0.01},
    "coupled-margin": {"certify.method": "margin"},
    "mixture": {"certify.reading": "mixture", "certify.training_samples": 8, "certify.alpha": 0.05},
    "paper-exact": {"certify.reading": "paper"},
    "paper-mc": {"certify.reading": "paper", "certify.method": "monte-carlo", "certify.M": 400, "certify.alpha": 0.01,
                 "certify.bound": "hoeffding", "certify.coverage": "paper"},
}


@pytest.mark.parametrize("case", list(CASES))
def test_radius_rows_match_independent_rederivation(tmp_path, trained, images28, case):
    over = CASES[case]
    summary = certify_run(trained, overrides=over, dataset=images28, out_dir=tmp_path / "c")
    c = summary["certificate"]
    reading = over.get("certify.reading", "coupled")
    assert c["reading"] == reading and c["guarantee"]
    assert c["radius_certified"] is (reading != "paper")
    if reading != "paper":
        k = c["attack_rounds"][0]
        assert k["round"] == 4 and k["tau"] == [5] and k["poison_ratio"] == [0.2] and k["gamma"] == [5.0] and k["p"] == [0.125]
        assert c["sigma"] == 0.05  # sigma_T (coupled) = sigma_t_adv (mixture) here
        assert c["training_samples"] == (8 if reading == "mixture" else None)
    else:
        assert "not a certified radius" in c["guarantee"]
    for which in ("clean", "backdoor"):
        rows = read_csv(tmp_path / "c" / f"certificates_{which}.csv")
        assert list(rows[0]) == CERT_COLUMNS and len(rows) == 300
        n_abstain = covered = 0
        for row in rows:
            pa, pb = float(row["p_a_lower"]), float(row["p_b_upper"])
            if pa <= pb:
                n_abstain += 1
                assert row["prediction"] == "-1" and float(row["radius"]) == 0.0 and row["correct"] == "0"
            expect = rederive_paper(row, c) if reading == "paper" else rederive_sound(row, c)
            # the code's float64 result is within a few ulp times the problem's conditioning of the exact one
            kappa = 0.0 if reading == "paper" else budget_condition(row, c)
            assert float(row["radius"]) == pytest.approx(expect, rel=1e-12 + 8 * U * kappa, abs=1e-300)
            assert row["correct"] == str(int(row["prediction"] == row["label"]))
            if float(row["log1m_p_a_lower"]) > -700:
                assert math.exp(float(row["log1m_p_a_lower"])) == pytest.approx(1 - pa, rel=1e-6, abs=1e-15)
            covered += float(row["radius"]) > c["delta_norm"] and int(row["prediction"]) >= 0
            if case.endswith("mc"):
                assert int(row["n_a"]) >= int(row["n_b"])
                if case == "paper-mc":  # the paper's bound, each at level alpha
                    assert pa == pytest.approx(max(0.0, int(row["n_a"]) / 400 - math.sqrt(math.log(1 / 0.01) / 800)), abs=1e-12)
            else:
                assert row["n_a"] == "" and row["n_b"] == ""
        res = summary["results"][which]
        assert res["abstain_rate"] == pytest.approx(n_abstain / 300)
        at_attack = res["certified_at_attack"] if reading != "paper" else res["uncertified_at_attack"]  # not a certificate
        assert at_attack == pytest.approx(covered / 300) and res["radius_certified"] is (reading != "paper")


def test_coupled_twin_is_the_counterfactual_and_never_disagrees_where_certified(tmp_path, trained, images28):
    rows = read_csv(trained / "rounds.csv")
    dist = [float(r["twin_distance"]) for r in rows]
    assert dist[:3] == [0.0, 0.0, 0.0] and dist[3] > 0  # same batches and noise until t_adv, then the trigger
    s = certify_run(trained, dataset=images28, out_dir=tmp_path / "c")
    tw = s["twin"]
    # the final models are within the certified deviation c(B_0 + ||delta||) ||delta||
    c = s["certificate"]
    from crfl.closeness import AttackTerm, deviation_coefficient

    terms = [AttackTerm.from_record(r) for r in json.loads((trained / "attack.json").read_text())["rounds"]]
    dev = deviation_coefficient(terms, c["input_norm_bound"] + c["delta_norm"]) * c["delta_norm"]
    final = torch.load(trained / "model_final.pt", weights_only=False)
    assert float((final["params"] - final["twin_params"]).double().norm()) <= dev
    assert tw["exact"] is True
    for k in ("clean", "backdoor"):
        assert tw[k]["violations"] == 0
        assert tw[k]["covered_points"] == 0 or tw[k]["agreement"] == 1.0


def test_margin_method_is_the_limit_of_exact_smoothing(tmp_path, trained, images28):
    margin = certify_run(trained, overrides={"certify.method": "margin"}, dataset=images28, out_dir=tmp_path / "m")
    # the budgets (the radius is the same function of them; float32 training's rounding term zeroes small ones)
    rm = np.array([float(r["budget"]) for r in read_csv(tmp_path / "m" / "certificates_clean.csv")])
    gaps = []
    for s in (1e-2, 1e-4, 1e-7):
        certify_run(trained, overrides={"certify.sigma_T": s}, dataset=images28, out_dir=tmp_path / f"e{s}")
        re = np.array([float(r["budget"]) for r in read_csv(tmp_path / f"e{s}" / "certificates_clean.csv")])
        gaps.append(float(np.median(np.abs(re - rm) / rm)))
    # as sigma_T -> 0 the smoothed radius is the base model's; where the pairwise bounds decide p_A_lower and
    # p_B_upper the two coincide exactly: sigma (Phi^-1(p_A) - Phi^-1(p_B)) / 2 = (z_A - z_B) / (sqrt 2 ||x~||)
    assert gaps[1] < 1e-6 and gaps[2] < 1e-6
    assert margin["smoothing"]["sigma_T"] is None and "no smoothing" in margin["certificate"]["guarantee"]


def test_attack_in_the_last_round(tmp_path, images28):
    """T = t_adv: no training round after the attack; coupled and mixture (which then uses sigma_T) both certify."""
    train(cfg28(**{"attack.rounds": [8]}), tmp_path / "r", dataset=images28)
    s = certify_run(tmp_path / "r", dataset=images28, out_dir=tmp_path / "c")
    assert s["certificate"]["radius_certified"] and s["certificate"]["attack_rounds"][0]["round"] == 8
    m = certify_run(tmp_path / "r", overrides={"certify.reading": "mixture", "certify.training_samples": 4},
                    dataset=images28, out_dir=tmp_path / "m")
    assert m["certificate"]["sigma"] == 0.05 and m["certificate"]["radius_certified"]


def test_summary_blocks_and_curves(tmp_path, trained, images28):
    s = certify_run(trained, dataset=images28, out_dir=tmp_path / "c")
    for block in ("training", "certificate", "smoothing", "results", "assumptions"):
        assert block in s
    assert s["smoothing"]["method"] == "exact" and s["smoothing"]["alpha"] is None
    assert s["certificate"]["bound_form"] == "neyman-pearson"
    curve = s["results"]["clean"]["curve"]
    rows = read_csv(tmp_path / "c" / "certificates_clean.csv")
    rad = np.array([float(r["radius"]) for r in rows])
    ok = np.array([r["correct"] == "1" for r in rows])
    for pt in curve:
        assert pt["certified_accuracy"] == pytest.approx(np.mean(ok & (rad > pt["radius"])))
        assert pt["certified_accuracy"] <= pt["certified_rate"] + 1e-12
    assert not (tmp_path / "c" / "inverse_clean.csv").exists()  # Section 5.1's inverse questions: paper reading
    p = certify_run(trained, overrides={"certify.reading": "paper"}, dataset=images28, out_dir=tmp_path / "p")
    inv = read_csv(tmp_path / "p" / "inverse_clean.csv")
    assert len(inv) == 300 and float(inv[0]["delta_norm"]) == pytest.approx(0.1)
    assert p["assumptions"]["radius_certified"] is False and p["certificate"]["radius_certified"] is False


def test_radius_equal_to_the_trigger_norm_is_not_covered_anywhere(tmp_path, trained, images28, monkeypatch):
    """RAD = ||delta|| exactly: not covered (the certificate is for ||delta|| < RAD), by every consumer."""
    from types import SimpleNamespace

    from crfl import closeness, metrics, rundir, sweep

    delta = certify_run(trained, dataset=images28, out_dir=tmp_path / "first")["certificate"]["delta_norm"]
    assert metrics.covered(delta, delta) == False and metrics.covered(math.nextafter(delta, 1), delta) == True  # noqa: E712
    monkeypatch.setattr(closeness, "solve_radius", lambda budget, terms, b0, **kw: np.where(np.asarray(budget) > 0, delta, 0.0))
    monkeypatch.setattr(closeness, "solve_radius_rounded", lambda budget, terms, rb, **kw: np.where(np.asarray(budget) > 0, delta, 0.0))
    out = tmp_path / "runs" / "T" / "cert-C"
    s = certify_run(trained, overrides={"certify.radii": [delta]}, dataset=images28, out_dir=out)
    for k in ("clean", "backdoor"):
        rows = read_csv(out / f"certificates_{k}.csv")
        rad = np.array([float(r["radius"]) for r in rows])
        assert (rad == delta).sum() > 100 and set(rad) <= {0.0, delta}  # many ties, the rest abstain
        res = s["results"][k]
        assert res["certified_at_attack"] == 0.0 and res["certified_correct_at_attack"] == 0.0
        at = {pt["radius"]: pt for pt in res["curve"]}
        assert at[delta]["certified_rate"] == 0.0 and at[delta]["certified_accuracy"] == 0.0
        assert at[0.0]["certified_rate"] == pytest.approx(1 - res["abstain_rate"])  # below the radius: covered
        assert s["twin"][k]["covered_points"] == 0
        c = rundir.RunDir(out).read_certificates(k)
        assert metrics.certified_rate(c.radius, c.prediction, [delta])[0] == 0.0
    row = sweep.result_row(SimpleNamespace(radii=[0.0, delta]), {"status": "ok", "cert_point": {}, "train_hash": "T",
                                                                 "cert_hash": "C", "summary": s}, tmp_path / "runs")
    assert row[f"clean_cert_rate@{delta:g}"] == 0.0 and row[f"backdoor_cert_acc@{delta:g}"] == 0.0
    assert row["clean_cert_rate@0"] == pytest.approx(1 - s["results"]["clean"]["abstain_rate"])


def test_nonlinear_model_reports_margins_but_no_radius(tmp_path, images28):
    train(cfg28(**{"model.name": "mlp", "model.hidden": 16, "certify.M": 100}), tmp_path / "r", dataset=images28)
    s = certify_run(tmp_path / "r", dataset=images28)
    assert s["smoothing"]["method"] == "monte-carlo"
    assert s["certificate"]["radius_certified"] is False
    assert "no radius is certified" in s["assumptions"]["note"]
    rows = read_csv(tmp_path / "r" / "certificates_clean.csv")
    assert all(r["radius"] == "" for r in rows) and all(r["n_a"] != "" for r in rows)


def test_paper_lipschitz_flagged_unsound_for_image_norms(tmp_path, trained, images28):
    s = certify_run(trained, overrides={"certify.reading": "paper", "certify.lipschitz": "paper"}, dataset=images28,
                    out_dir=tmp_path / "c")
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
    assert log["measured"]["poison_ratio_per_step"] == pytest.approx([expected])
    assert log["nominal_poison_ratio"] == [0.2]
    assert nominal_poison_ratio(106, 20, 4, 6) == pytest.approx(expected)
    s = certify_run(tmp_path / "r", dataset=ds)
    k = s["certificate"]["attack_rounds"][0]
    assert k["poison_ratio"] == pytest.approx([expected]) and k["Q"] == pytest.approx([6 * expected])


def test_start_norm_bound_for_the_paper_reading(tmp_path, trained, images28):
    """sqrt(rho_{t-1}^2 + sigma_{t-1}^2 D) for t_adv > 1; the initial model's norm for t_adv = 1."""
    from crfl.readings.paper import start_norm_bound
    from crfl.setup import prepare

    setup = prepare(cfg28(), images28)
    D = setup.model.num_params
    assert start_norm_bound(setup, 4) == pytest.approx(math.sqrt(3.5**2 + 0.05**2 * D))
    assert start_norm_bound(setup, 1) == pytest.approx(float(setup.w0.double().norm()))
    c = certify_run(trained, overrides={"certify.reading": "paper"}, dataset=images28, out_dir=tmp_path / "c")["certificate"]
    B = c["input_norm_bound"]
    assert c["rho_for_L_Z"] == pytest.approx(start_norm_bound(setup, 4) + 5 * 0.002 * math.sqrt(2) * math.sqrt(B * B + 1))
    assert c["L_Z"] == pytest.approx(c["rho_for_L_Z"] / 2 * math.sqrt(B * B + 1) + math.sqrt(2))


def test_coupled_lipschitz_uses_the_broadcast_models_centred_operator_norm(tmp_path, trained, images28):
    from crfl.lipschitz import centred_operator_norm
    from crfl.setup import prepare
    from crfl.train import run_round

    setup = prepare(cfg28(), images28)
    w = setup.w0.clone()
    for t in range(1, 4):
        w = run_round(setup, w, t).params
    W, _ = setup.model.split(w.double())
    s = certify_run(trained, dataset=images28, out_dir=tmp_path / "c")
    k = s["certificate"]["attack_rounds"][0]
    assert k["start_centred_opnorm"] == pytest.approx(centred_operator_norm(W), rel=1e-6)
    B = s["certificate"]["input_norm_bound"]
    assert k["L_Z_at_B0"][0] == pytest.approx(
        0.5 * (k["start_centred_opnorm"] + 5 * 0.002 * math.sqrt(2) * B) * math.sqrt(B * B + 1) + math.sqrt(2))
    X = torch.from_numpy(images28.x_train).double() / 255
    assert B == pytest.approx(float(X.norm(dim=1).max()))  # clean inputs; triggered ones enter as B_0 + radius


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
    assert s["certificate"]["radius_certified"] is False
    assert "no per-client weight" in s["assumptions"]["note"]
    rows = read_csv(tmp_path / "r" / "certificates_clean.csv")
    assert all(r["radius"] == "" for r in rows) and all(r["p_a_lower"] != "" for r in rows)


def test_scope_checks_that_can_fail(tmp_path, trained, images28):
    """A server-owned B_0 below the data's norms, Monte Carlo bounds without joint coverage, and inputs outside
    the trigger's box each make the run uncertified."""
    s = certify_run(trained, overrides={"certify.input_norm_bound": 1.0}, dataset=images28, out_dir=tmp_path / "b")
    assert s["assumptions"]["checks"]["input_norm_bound"]["holds"] is False and not s["certificate"]["radius_certified"]
    s = certify_run(trained, overrides={"certify.input_norm_bound": 40.0}, dataset=images28, out_dir=tmp_path / "B")
    assert s["assumptions"]["checks"]["input_norm_bound"]["holds"] is True and s["certificate"]["radius_certified"]
    s = certify_run(trained, overrides={"certify.method": "monte-carlo", "certify.M": 100, "certify.coverage": "paper"},
                    dataset=images28, out_dir=tmp_path / "p")
    assert s["assumptions"]["checks"]["confidence"]["holds"] is False and not s["certificate"]["radius_certified"]
    s = certify_run(trained, overrides={"certify.method": "monte-carlo", "certify.M": 100}, dataset=images28,
                    out_dir=tmp_path / "s")
    assert s["assumptions"]["checks"]["confidence"]["holds"] is True and s["certificate"]["radius_certified"]
    # features outside [0, 1]: clamping x + delta can move an input by more than ||delta||
    import dataclasses

    wide = dataclasses.replace(images28, input_scale=100.0)  # pixels up to 2.55 in model units
    train(cfg28(), tmp_path / "w", dataset=wide)
    s = certify_run(tmp_path / "w", dataset=wide)
    assert s["assumptions"]["checks"]["inputs_in_trigger_box"]["holds"] is False and not s["certificate"]["radius_certified"]


def test_attack_records_the_rounds_total_weight(trained):
    rec = json.loads((trained / "attack.json").read_text())["rounds"][0]
    assert rec["p_total"] == pytest.approx(1.0)


def test_each_reading_is_one_registered_object(trained, images28):
    """crfl.readings: every name maps to the reading object of that name; the facade delegates to it."""
    from crfl.certify import Certifier
    from crfl.readings import READINGS, reading_class
    from crfl.rundir import load_run
    from crfl.setup import prepare
    from crfl.validation import ConfigError

    with pytest.raises(ConfigError, match=r"'certify.reading' parameter must be one of 'coupled', 'mixture', 'paper'"):
        reading_class("twin")
    for name in READINGS:
        assert reading_class(name).name == name
    for name in ("coupled", "paper"):
        cfg, final, log = load_run(trained, {"certify.reading": name})
        cert = Certifier(prepare(cfg, images28), final, log, trained)
        assert type(cert.impl) is reading_class(name) and cert.reading == name
        assert cert.block()["guarantee"].startswith(cert.impl.GUARANTEE) and cert.ing is cert.impl.ing
        assert (name == "paper") == hasattr(cert, "paper")
