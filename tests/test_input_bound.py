"""The input bound the model enforces (``model.input_norm_bound``): the map, training, the certificate.

P(x) = clamp(x, 0, 1) * min(1, B_0 / ||clamp(x, 0, 1)||) is part of the model: training, evaluation,
smoothing and the twin all see P(x), and the certificate takes B_0 as its input bound for clean and
triggered inputs alike, so the radius is budget / c(B_0) (docs/theory.md (g)).
"""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from crfl.certify import Certifier, certify_run
from crfl.readings.coupled import ENFORCED_SOURCE
from crfl.closeness import AttackTerm, deviation_coefficient, solve_radius
from crfl.clients import ClientData, local_updates, round_batches
from crfl.config import resolve
from crfl.model import InputBound, LinearModel
from crfl.rundir import load_run
from crfl.setup import prepare
from crfl.train import train
from crfl.validation import ConfigError
from tests.conftest import synthetic_images
from tests.test_break import _cfg as break_cfg, _search_inputs, _violations, small_images  # noqa: F401 (a fixture)

# ---------------------------------------------------------------------------------------------
# the map


rows = st.lists(st.floats(-3.0, 3.0, allow_nan=False, width=64), min_size=5, max_size=5)


@settings(max_examples=300, deadline=None)
@given(x=rows, y=rows, radius=st.floats(0.05, 4.0))
def test_projection_is_1_lipschitz_and_bounds_norms(x, y, radius):
    P = InputBound(radius)
    X, Y = torch.tensor([x], dtype=torch.float64), torch.tensor([y], dtype=torch.float64)
    PX, PY = P.apply(X), P.apply(Y)
    assert float(torch.linalg.vector_norm(PX - PY)) <= float(torch.linalg.vector_norm(X - Y)) * (1 + 1e-12) + 1e-15
    for Z in (PX, PY):
        assert float(torch.linalg.vector_norm(Z)) <= radius * (1 + 1e-12)
        assert float(Z.min()) >= 0.0 and float(Z.max()) <= 1.0  # still in the box
    assert torch.allclose(P.apply(PX), PX, rtol=1e-12, atol=0)  # idempotent
    # in storage units (pixels 0..255) the map is the same map
    assert torch.allclose(P.apply(255.0 * X, 1 / 255.0) / 255.0, PX, rtol=1e-12, atol=1e-15)


def test_projection_by_hand():
    P = InputBound(1.0)
    X = torch.tensor([[0.6, 0.8, 0.0], [3.0, 4.0, -1.0], [0.3, 0.4, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    # row 2: clamp -> (1, 1, 0), norm sqrt(2) -> (1, 1, 0)/sqrt(2); the others are inside the ball (or 0)
    expect = torch.tensor([[0.6, 0.8, 0.0], [2**-0.5, 2**-0.5, 0.0], [0.3, 0.4, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    assert torch.allclose(P.apply(X), expect, rtol=1e-15, atol=1e-15)


def test_trigger_moves_projected_inputs_by_at_most_its_norm():
    """||P(clamp(x + delta)) - P(x)|| <= ||delta|| for any x, also outside the box (the model clamps first)."""
    rng = np.random.default_rng(3)
    P = InputBound(2.0)
    X = torch.tensor(rng.uniform(-1.0, 2.0, (2000, 16)))
    delta = torch.tensor(rng.normal(size=16))
    delta *= 0.3 / torch.linalg.vector_norm(delta)
    moved = torch.linalg.vector_norm(P.apply(torch.clamp(X + delta, 0.0, 1.0)) - P.apply(X), dim=1)
    assert float(moved.max()) <= 0.3 * (1 + 1e-12)
    assert float(torch.linalg.vector_norm(torch.clamp(X + delta, 0, 1) - X, dim=1).max()) > 0.3  # without the clamp: more


def test_input_bound_errors_name_parameter_and_value():
    with pytest.raises(ConfigError, match=r"'model.input_norm_bound' parameter must be a float in \(0, inf\). Got -1.0"):
        resolve("demo", None, {"model.input_norm_bound": -1.0})
    with pytest.raises(ConfigError, match=r"'model.input_norm_bound'.*Got 'ten'"):
        resolve("demo", None, {"model.input_norm_bound": "ten"})
    with pytest.raises(ConfigError, match=r"'certify.input_norm_bound' parameter must be null when 'model.input_norm_bound'"
                                          r" is set .*B_0 = 12.*Got 5.0 instead"):
        resolve("demo", None, {"certify.input_norm_bound": 5.0})
    with pytest.raises(ConfigError, match=r"'input box'.*Got \[0.5, 1.0\]"):
        InputBound(1.0, 0.5, 1.0)
    assert resolve("demo", None, {"model.input_norm_bound": None}).model.input_norm_bound is None


# ---------------------------------------------------------------------------------------------
# training


def test_loss_grad_is_autograd_of_the_projected_model():
    torch.manual_seed(0)
    m = LinearModel(6, 3, input_bound=InputBound(1.2))
    w = torch.randn(1, m.num_params, dtype=torch.float64)
    X = torch.rand(1, 8, 6, dtype=torch.float64) * 255.0
    Y = torch.randint(0, 3, (1, 8))
    wt = torch.full((1, 8), 1 / 8, dtype=torch.float64)
    got = m.loss_grad(w, X, Y, wt, 1 / 255.0)

    def loss(v):
        Wm, b = v[: 18].view(3, 6), v[18:]
        x = X[0] / 255.0
        x = x * torch.clamp(1.2 / torch.linalg.vector_norm(x, dim=1, keepdim=True), max=1.0)
        return F.cross_entropy(x @ Wm.T + b, Y[0])

    ref = torch.func.grad(loss)(w[0])
    assert torch.allclose(got[0], ref, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("scale", [255.0, 1.0])
def test_training_with_the_bound_equals_training_on_projected_inputs(scale):
    """Every client's local SGD with P inside the model = plain SGD on inputs projected beforehand."""
    ds = synthetic_images(n_train=240, n_test=20, side=6, classes=3, seed=5)
    B = 2.0
    x = torch.from_numpy(ds.x_train.astype(np.float64))
    x_model = x / 255.0
    assert float((torch.linalg.vector_norm(x_model, dim=1) > B).double().mean()) > 0.5  # the projection is active
    indices = tuple(np.arange(i * 40, (i + 1) * 40) for i in range(6))
    y = torch.from_numpy(ds.y_train)
    stored = x if scale == 255.0 else x_model
    data = ClientData(x=stored, y=y, input_scale=scale, indices=indices)
    pre = ClientData(x=InputBound(B).apply(x_model), y=y, input_scale=1.0, indices=indices)
    tau = np.full(6, 4)
    idx = round_batches(data, 10, tau, seed=7, t=1)
    params = LinearModel(36, 3).init(torch.Generator().manual_seed(1), torch.float64)
    with_bound, _ = local_updates(LinearModel(36, 3, input_bound=InputBound(B)), params, data, idx, 0.2, dtype=torch.float64)
    projected, _ = local_updates(LinearModel(36, 3), params, pre, idx, 0.2, dtype=torch.float64)
    without, _ = local_updates(LinearModel(36, 3), params, data, idx, 0.2, dtype=torch.float64)
    assert torch.allclose(with_bound, projected, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(with_bound, without, rtol=1e-3)  # the bound changes training


# ---------------------------------------------------------------------------------------------
# the certificate


def test_enforced_radius_is_budget_over_c_at_B0_by_hand():
    term = AttackTerm(round=3, p=(0.1,), gamma=(10.0,), eta=(0.016,), tau=(8,), poison_ratio=(0.2,), start_opnorm=1.0)
    # L_Z(12) = 1/2 (1 + 8 * 0.016 * sqrt(2) * 12) sqrt(145) + sqrt(2); c = p gamma eta Q L_Z with Q = 8 * 0.2
    lz = 0.5 * (1.0 + 8 * 0.016 * math.sqrt(2.0) * 12.0) * math.sqrt(145.0) + math.sqrt(2.0)
    assert lz == pytest.approx(20.5136, abs=1e-4)
    c = 0.1 * 10.0 * 0.016 * 1.6 * lz
    r = solve_radius(np.array([0.1, 0.0, -1.0, math.inf]), [term], 12.0, enforced=True)
    assert r[0] == pytest.approx(0.1 / c, rel=1e-15) and r[0] == pytest.approx(0.19042, abs=1e-5)
    assert list(r[1:]) == [0.0, 0.0, math.inf]
    # not enforced: r c(12 + r) = budget has a smaller root
    free = solve_radius(np.array([0.1]), [term], 12.0)[0]
    assert free < r[0]


def _cfg(**over):
    """test_break's small setting, with a step size that the enforced bound's eta <= 2/beta allows."""
    return break_cfg(**{"clients.lr": 0.3, **over})


def test_certificate_uses_the_enforced_bound(tmp_path, small_images):
    """eta = 0.6 fails eta <= 2/beta = 0.471 at the data's max ||x|| = 2.74 and passes at the enforced B_0 = 1.5
    (2/beta = 4 / 3.25 = 1.231)."""
    free, bound = tmp_path / "free", tmp_path / "bound"
    train(_cfg(**{"clients.lr": 0.6}), free, dataset=small_images)
    train(_cfg(**{"clients.lr": 0.6, "model.input_norm_bound": 1.5}), bound, dataset=small_images)
    s0 = certify_run(free, dataset=small_images)
    chk0 = s0["assumptions"]["checks"]["eta_le_2_over_beta"]
    assert chk0["holds"] is False and chk0["detail"].startswith("eta = 0.6 > 2/beta = 0.4708") and "fails" in chk0["detail"]
    assert s0["certificate"]["input_norm_enforced"] is False and s0["certificate"]["radius_certified"] is False

    s = certify_run(bound, dataset=small_images)
    cert, checks = s["certificate"], s["assumptions"]["checks"]
    assert cert["input_norm_bound"] == 1.5 and cert["input_norm_source"] == ENFORCED_SOURCE
    assert cert["input_norm_enforced"] is True
    assert checks["eta_le_2_over_beta"]["holds"] is True and "2/beta = 1.231 " in checks["eta_le_2_over_beta"]["detail"]
    assert checks["input_norm_bound"]["holds"] is True and "enforced by the model" in checks["input_norm_bound"]["detail"]
    assert cert["radius_certified"] is True and s["assumptions"]["radius_certified"] is True
    c = cert["deviation_coefficient_at_B0"]
    with open(bound / "certificates_clean.csv") as f:
        rows = list(csv.DictReader(f))
    # linear in the budget: RAD^ = (budget - E) / c'(B^), RAD = (RAD^ - iota_0) / (1 + iota_1) (docs/theory.md (g) step 7)
    rb = cert["rounding"]
    slack = rb["opnorm_slack"]
    terms = [AttackTerm.from_record({**r, "start_centred_opnorm": r["start_centred_opnorm"] + slack.get(str(r["round"]), 0.0)})
             for r in json.loads((bound / "attack.json").read_text())["rounds"]]
    c_rounded = deviation_coefficient(terms, rb["realised_input_bound"])
    assert c <= c_rounded <= c * (1 + 1e-4)
    scale, offset = rb["trigger_rounding"]
    for row in rows:
        expect = max(((float(row["budget"]) - rb["rounding_error"]) / c_rounded - offset) / (1 + scale), 0.0)
        assert float(row["radius"]) == pytest.approx(expect, rel=1e-12, abs=1e-300)
    assert s["results"]["clean"]["certified_at_attack"] > 0.3
    with pytest.raises(ConfigError, match="'certify.input_norm_bound' parameter must be null"):
        certify_run(bound, overrides={"certify.input_norm_bound": 3.0}, dataset=small_images)
    # the other readings and methods see the same model and the same B_0
    mix = certify_run(bound, overrides={"certify.reading": "mixture", "certify.training_samples": 4},
                      dataset=small_images, out_dir=tmp_path / "mix")
    assert mix["certificate"]["input_norm_source"] == ENFORCED_SOURCE and mix["assumptions"]["checks"]["input_norm_bound"]["holds"]
    mar = certify_run(bound, overrides={"certify.method": "margin"}, dataset=small_images, out_dir=tmp_path / "margin")
    assert mar["certificate"]["radius_certified"] is True and mar["twin"]["clean"]["violations"] == 0
    pap = certify_run(bound, overrides={"certify.reading": "paper"}, dataset=small_images, out_dir=tmp_path / "paper")
    assert 1.4 < pap["certificate"]["input_norm_bound"] <= 1.5 * (1 + 1e-6)  # max ||P(x)|| over clean and triggered inputs


def test_twin_never_violates_the_enforced_certificate(tmp_path, small_images):
    """Break test: with B_0 enforced (well below the data's norms) the twin agrees wherever RAD > ||delta||."""
    rng = np.random.default_rng(515)
    covered_total = differ_total = 0
    for n in range(6):
        over = {
            "model.input_norm_bound": float(rng.choice([1.0, 2.0, 3.0])),
            "certify.sigma_T": float(rng.choice([1e-9, 1e-5, 1e-3, 0.03, 0.3])),
            "server.sigma": float(rng.choice([0.0, 0.002, 0.05])),
            "attack.rounds": [[3], [2, 4], [6]][int(rng.integers(3))],
            "attack.gamma": float(rng.choice([1.0, 3.0, 10.0])),
            "attack.magnitude": float(rng.choice([0.02, 0.1, 0.5])),
            "attack.poison_per_batch": int(rng.choice([2, 5, 10])),
            "seed": int(rng.integers(1, 10_000)),
        }
        run = tmp_path / f"r{n}"
        train(_cfg(**over), run, dataset=small_images)
        for method in ("exact", "margin"):
            cfg, final, log = load_run(run, {"certify.method": method})
            setup = prepare(cfg, small_images)
            cert = Certifier(setup, final, log, run)
            assert cert.report["radius_certified"], (over, cert.report["checks"])
            assert cert.ing.input_norm_enforced
            X = _search_inputs(setup, final["params"], seed=n, outside_box=True)
            bad, covered, differ = _violations(cert, X)
            assert bad == 0, f"violated ({method}) in setting {over}"
            covered_total += covered
            differ_total += differ
    print(f"covered {covered_total}, twin differs {differ_total}")
    assert covered_total > 1000 and differ_total > 20  # the search is not vacuous


def test_flower_run_gives_the_simulators_certificate(tmp_path):
    """Same config, same model (P included), same certificate: the in-process Flower federation and the simulator."""
    pytest.importorskip("flwr")
    from tests.test_flower import flower_run, small_config

    ds = synthetic_images()
    cfg = small_config(**{"model.input_norm_bound": 2.5, "certify.method": "exact"})
    _, _, run = flower_run(cfg, ds, tmp_path / "flower", certify=True)
    fl = json.loads((run.out_dir / "summary.json").read_text())
    sim_dir = tmp_path / "sim"
    train(cfg, sim_dir, dataset=ds)
    sim = certify_run(sim_dir, dataset=ds)
    for s in (fl, sim):
        assert s["certificate"]["input_norm_bound"] == 2.5 and s["certificate"]["input_norm_source"] == ENFORCED_SOURCE
        assert s["certificate"]["radius_certified"] is True
    assert {k: v["holds"] for k, v in fl["assumptions"]["checks"].items()} == \
        {k: v["holds"] for k, v in sim["assumptions"]["checks"].items()}
    assert fl["certificate"]["deviation_coefficient_at_B0"] == pytest.approx(sim["certificate"]["deviation_coefficient_at_B0"],
                                                                              rel=1e-4)
    for k in ("clean", "backdoor"):
        a, b = fl["results"][k], sim["results"][k]
        assert a["base_accuracy"] == b["base_accuracy"]
        assert a["certified_at_attack"] == pytest.approx(b["certified_at_attack"], abs=0.02)
        assert a["median_radius_certified"] == pytest.approx(b["median_radius_certified"], rel=1e-2)


def test_mlp_sees_the_projected_inputs():
    from crfl.model import build_model

    torch.manual_seed(1)
    m = build_model("mlp", 5, 3, hidden=4, input_bound=InputBound(0.5))
    w = m.init(torch.Generator().manual_seed(2), torch.float32)
    X = torch.rand(7, 5) * 2.0
    want = torch.func.functional_call(m.module, m.unflatten(w), (InputBound(0.5).apply(X),)).argmax(dim=1)
    assert torch.equal(m.predict(w, X), want)
    assert torch.allclose(m.logits(w.unsqueeze(0), X.unsqueeze(0)), m.logits(w.unsqueeze(0), InputBound(0.5).apply(X).unsqueeze(0)))


def test_flower_server_refuses_a_second_bound():
    pytest.importorskip("flwr")
    from crfl.flower.server_app import with_input_norm_bound

    ds = synthetic_images(n_train=80, n_test=10, side=4, classes=2)
    base = {"data.num_clients": 2, "attack.pixels": [[1, 1]], "attack.target": 0}
    setup = prepare(resolve(None, None, {**base, "model.input_norm_bound": 1.5}), ds)
    assert with_input_norm_bound(setup) is setup  # the model's bound is the certificate's; nothing is added
    assert setup.cfg.certify.input_norm_bound is None
    with pytest.raises(ConfigError, match=r"'input-norm-bound' run-config parameter must be -1 when 'model.input_norm_bound' "
                                          r"is set .*B_0 = 1.5.*Got 3.0 instead"):
        with_input_norm_bound(setup, 3.0)
    free = prepare(resolve(None, None, base), ds)
    assert with_input_norm_bound(free).cfg.certify.input_norm_bound == 4.0  # sqrt(16): the unenforced fallback
