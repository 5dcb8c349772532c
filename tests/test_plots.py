"""Certified means certified: every table, printout, figure and Python result that shows a radius says whether
it is certified; readings side by side; figures with a reader's labels and the dataset actually used."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

from crfl import aggregation, plots
from crfl.cli import main
from crfl.io import read_csv
from crfl.sweep import sweep

TINY = {"server.rounds": 4, "attack.rounds": [2], "data.num_clients": 4, "certify.num_test": 100}


def _captured(monkeypatch) -> list[dict]:
    """Record what every figure saved by crfl.plots shows: title, legend entries, notes, axis labels."""
    seen: list[dict] = []
    save = plots._save

    def spy(fig, base):
        texts = []
        for ax in fig.axes:
            leg = ax.get_legend()
            texts.append({"title": ax.get_title(), "ylabel": ax.get_ylabel(), "xlabel": ax.get_xlabel(),
                          "legend": [t.get_text() for t in leg.get_texts()] if leg else [],
                          "legend_title": leg.get_title().get_text() if leg else ""})
        seen.append({"name": base.name, "axes": texts, "notes": [t.get_text() for t in fig.texts],
                     "suptitle": fig._suptitle.get_text() if fig._suptitle else ""})
        return save(fig, base)

    monkeypatch.setattr(plots, "_save", spy)
    return seen


@pytest.fixture(scope="module")
def rules_sweep(tmp_path_factory):
    """FedAvg (certified), RFA and Krum (their weights depend on the updates: not certified), one tiny run each."""
    d = tmp_path_factory.mktemp("rules")
    spec = {"name": "rules", "title": "Aggregation rules (MNIST)", "base": {"preset": "demo", "set": {**TINY, "data.num_clients": 6}},  # Krum: K > 2f + 2
            "grid": {"aggregation.name": ["fedavg", "rfa", "krum"]}, "radii": [0.0, 0.1]}
    (d / "s.yaml").write_text(yaml.safe_dump(spec))
    rows = sweep(d / "s.yaml", d / "out", progress=False)
    return d / "out", rows


def test_sweep_results_say_which_radii_are_certified(rules_sweep):
    out, rows = rules_sweep
    csv = {r["aggregation.name"]: r for r in read_csv(out / "results.csv")}
    assert csv["fedavg"]["radius_certified"] == "True" and csv["fedavg"]["not_certified_because"] == ""
    for rule in ("rfa", "krum"):
        assert csv[rule]["radius_certified"] == "False", rule
        assert "fixed_aggregation_weights" in csv[rule]["not_certified_because"]
    # an infinite radius (Krum dropping the attacker) is never in a row that says certified
    for r in csv.values():
        if r["clean_max_radius"] == "inf":
            assert r["radius_certified"] == "False"
    assert {r["reading"] for r in rows} == {"coupled"}


def test_sweep_figures_draw_uncertified_curves_as_such(rules_sweep, monkeypatch):
    out, _ = rules_sweep
    curves = plots.sweep_curves(out)["all"]["clean"]
    assert [(c.label, c.certified) for c in curves] == [("rule = fedavg", True), ("rule = rfa", False), ("rule = krum", False)]
    seen = _captured(monkeypatch)
    plots.plot_sweep(out)
    fig = next(f for f in seen if f["name"] == "rules-certified-clean")
    ax = fig["axes"][0]
    assert "rule = fedavg" in ax["legend"]
    assert "rule = rfa (NOT certified)" in ax["legend"] and "rule = krum (NOT certified)" in ax["legend"]
    assert ax["legend_title"] == "aggregation rule"
    assert any(t.startswith("the attack's ‖δ‖ = 0.1") for t in ax["legend"])
    assert any(t.startswith("base model accuracy") for t in ax["legend"])
    note = " ".join(fig["notes"])
    assert "NOT certified (rule = rfa, rule = krum)" in note and "fixed_aggregation_weights" in note
    assert "MNIST setting, on mnist-5k" in ax["title"]  # the data actually used, not the spec's "(MNIST)"
    rounds = next(f for f in seen if f["name"] == "rules-rounds")
    assert any(t.startswith("attack round t_adv = 2") for t in rounds["axes"][0]["legend"]) and "mnist-5k" in rounds["suptitle"]


def test_sweep_of_uncertified_runs_only_says_so_in_the_title(rules_sweep, monkeypatch, tmp_path):
    out, _ = rules_sweep
    original = (out / "sweep.json").read_text()
    meta = json.loads(original)
    meta["jobs"] = [j for j in meta["jobs"] if j["point"]["aggregation.name"] != "fedavg"]
    (out / "sweep.json").write_text(json.dumps(meta))
    try:
        seen = _captured(monkeypatch)
        plots.plot_sweep(out)
        ax = next(f for f in seen if f["name"] == "rules-certified-backdoor")["axes"][0]
        assert "NOT CERTIFIED" in ax["title"] and ax["ylabel"] == "fraction correct with radius > r (NOT certified)"
    finally:
        (out / "sweep.json").write_text(original)


def test_printout_of_an_uncertified_run_prints_no_certified_fraction(rules_sweep, capsys):
    out, rows = rules_sweep
    rfa = next(r for r in rows if r["aggregation.name"] == "rfa")
    run = out / rfa["run"].split("/cert-")[0]
    assert main(["certify", str(run), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "radius certified: False" in printed and "not certified: assumption(s) fixed_aggregation_weights fail" in printed
    assert "certified at the attack's" not in printed.replace("not certified at the attack's", "")
    assert "not certified at the attack's ||delta|| = 0.1" in printed and "unc. acc" in printed and "cert acc" not in printed
    assert "(not certified)" in printed.split("max radius")[1].splitlines()[0]
    s = json.loads((run / "summary.json").read_text())["results"]["clean"]
    assert s["radius_certified"] is False and s["certified_at_attack"] is None and s["uncertified_at_attack"] is not None


def test_python_example_with_an_uncertified_custom_rule(tmp_path, monkeypatch):
    """The README's Python example, with a rule of the user's whose weights are not declared fixed."""
    from crfl.aggregation import AggregateResult
    from crfl.certify import certify_run
    from crfl.config import resolve
    from crfl.train import train

    monkeypatch.setattr(aggregation, "_REGISTRY", dict(aggregation._REGISTRY))

    @aggregation.register_aggregator("my-mean", "a user's weighted mean (weights not declared fixed)")
    def my_mean(updates: torch.Tensor, client_weights: torch.Tensor) -> AggregateResult:
        return AggregateResult(client_weights @ updates, client_weights)

    for rule, certified in (("my-mean", False), ("fedavg", True)):
        cfg = resolve("demo", overrides={**TINY, "attack.num_attackers": 2, "aggregation.name": rule})
        run = train(cfg, tmp_path / rule, progress=False)
        summary = certify_run(run.out_dir)
        r = summary["results"]["clean"]
        assert summary["certificate"]["radius_certified"] is certified and r["radius_certified"] is certified
        if certified:
            assert r["certified_at_attack"] is not None and r["uncertified_at_attack"] is None
        else:  # the number that used to print as certified_at_attack is there, under its own name
            assert r["certified_at_attack"] is None and r["certified_correct_at_attack"] is None
            assert 0.0 <= r["uncertified_at_attack"] <= 1.0 and r["median_radius_certified"] is None


def test_readings_live_side_by_side(tmp_path, capsys, monkeypatch):
    """Certifying under a second reading writes readings/<reading>/ and leaves the run's own certificate alone."""
    monkeypatch.chdir(tmp_path)
    sets = [x for k, v in TINY.items() for x in ("--set", f"{k}={json.dumps(v)}")]
    assert main(["run", "--out", "r", "--quiet", *sets]) == 0
    run = tmp_path / "r"
    before = {f: (run / f).read_bytes() for f in ("certificates_clean.csv", "certificates_backdoor.csv", "summary.json")}
    capsys.readouterr()
    assert main(["certify", "r", "--reading", "paper", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert f"result set: {run / 'readings' / 'paper'}" in printed.replace("r/readings", str(run / "readings"))
    assert {f: (run / f).read_bytes() for f in before} == before  # the coupled certificate is untouched
    paper = run / "readings" / "paper"
    s = json.loads((paper / "summary.json").read_text())
    assert s["certificate"]["reading"] == "paper" and s["training"] == json.loads(before["summary.json"])["training"]
    assert (paper / "inverse_clean.csv").is_file() and (paper / "certified.png").is_file()
    assert not (run / "inverse_clean.csv").exists()
    # plotting the run draws every reading; the run's own (coupled) stays in the run directory
    paths = plots.plot_run(run)
    assert run / "certified.png" in paths and paper / "certified.png" in paths
    # certifying the run's own reading again writes the run directory, as before
    assert main(["certify", "r", "--quiet"]) == 0
    assert "result set:" not in capsys.readouterr().out


@pytest.mark.parametrize("title, datasets, expect", [
    ("Fig. 5: number of attackers R (MNIST)", ["fashion-mnist"], "Fig. 5: number of attackers R (MNIST setting, on Fashion-MNIST)"),
    ("Fig. 5: number of attackers R (MNIST)", ["mnist"], "Fig. 5: number of attackers R (MNIST)"),
    ("Fig. 11 (right): attack round t_adv (MNIST, gamma = 100, R = 2)", ["mnist-5k"],
     "Fig. 11 (right): attack round t_adv (MNIST setting, on mnist-5k, gamma = 100, R = 2)"),
    ("Fig. 2: training noise sigma (LOAN)", ["loan-openintro"], "Fig. 2: training noise sigma (LOAN setting, on loan-openintro)"),
    ("Client-level certificate (fashion-mnist, cnn)", ["fashion-mnist"], "Client-level certificate (fashion-mnist, cnn)"),
    ("my sweep", ["fashion-mnist"], "my sweep (data: Fashion-MNIST)"),
])
def test_titles_name_the_dataset_used(title, datasets, expect):
    assert plots.dataset_title(title, datasets) == expect


def test_legends_use_a_readers_names():
    assert plots.point_label({"attack.num_attackers": 2}, ["attack.num_attackers"]) == "R = 2"
    assert plots.point_label({"attack.rounds": [20]}, ["attack.rounds"]) == "t_adv = 20"
    assert plots.point_label({"server.sigma": 0.01, "certify.M": 1000}, ["server.sigma", "certify.M"]) == "σ = 0.01, M = 1000"
    assert plots.point_label({"clients.weird_knob": 3}, ["clients.weird_knob"]) == "weird knob = 3"
    assert plots.param_words("attack.num_attackers") == "number of attackers R"
    for spec_key in ("attack.gamma", "attack.poison_per_batch", "data.num_clients", "server.rounds", "ensemble.groups",
                     "certify.alpha"):
        assert "_" not in plots.param_words(spec_key).replace("q_B", "").replace("t_adv", "")


def test_identical_curves_are_noted():
    import numpy as np

    a, b = np.array([1.0, 0.5]), np.array([1.0, 0.4])
    assert plots._identical(["x", "y", "z"], [a, b, a.copy()]) == [["x", "z"]]
    assert plots._identical(["x", "y"], [a, b]) == []
    assert not math.isnan(0.0)
