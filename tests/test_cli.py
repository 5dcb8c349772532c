"""The command line: train, resume, certify, run; every bad value gives one clear error and exit code 2."""

from __future__ import annotations

import json

import pytest

from crfl.cli import main


def test_train_then_resume_then_certify(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["train", "--preset", "demo", "--set", "server.rounds=4", "--set", "attack.rounds=[2]", "--out", str(out), "--quiet"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "final clean accuracy" in printed and str(out) in printed
    for f in ("config.yaml", "rounds.csv", "model_final.pt", "attack.json", "summary.json"):
        assert (out / f).is_file()
    assert main(["train", "--resume", str(out), "--quiet"]) == 0  # finished: resuming changes nothing
    rc = main(["certify", str(out), "--quiet", "--num-test", "200"])
    assert rc == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["smoothing"]["method"] == "exact" and "clean" in s["results"]
    assert (out / "certificates_clean.csv").is_file() and (out / "certified.png").is_file()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--preset", "nope", "--out", "X"], "The 'preset' parameter must be one of 'demo', 'emnist', 'flcert', 'loan', 'mnist'. Got 'nope'"),
        (["train", "--dataset", "cifar", "--out", "X"], "The 'data.name' parameter must be one of"),
        (["train", "--set", "server.sigma=-1", "--out", "X"], "The 'server.sigma' parameter must be a float in [0, inf). Got -1"),
        (["train", "--set", "attack.poison_per_batch=500", "--out", "X"], "'attack.poison_per_batch' parameter must be an integer in [0, 50]"),  # the demo's n_B: train defaults to it
        (["train", "--set", "gamma", "--out", "X"], "The '--set' parameter must look like key=value. Got 'gamma'"),
        (["train", "--dataset", "mnist", "--data-dir", "/nonexistent", "--out", "X"], "/nonexistent"),
        (["train", "--set", "data.options={colour: red}", "--out", "X"], "The 'data.options' parameter must hold options of the 'mnist-5k' loader (test_fraction). Got 'colour'"),
        (["certify", "/nonexistent-run"], "must be a training run directory. Got '/nonexistent-run' instead (no such directory)"),
        (["certify", "."], "has no config.yaml"),
    ],
)
def test_bad_input_one_clear_error(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("crfl: error:")
    assert "Traceback" not in err


@pytest.mark.slow
def test_run_without_arguments_is_the_demo(tmp_path, capsys, monkeypatch):
    """The README's main job: train the demo preset on the built-in data and certify it."""
    monkeypatch.chdir(tmp_path)
    assert main(["run", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "final clean accuracy" in out and "cert acc" in out
    assert "certified at the attack's ||delta|| = 0.1" in out
    s = json.loads((tmp_path / "runs" / "demo" / "summary.json").read_text())
    assert s["training"]["final_clean_acc"] >= 0.83
    assert s["certificate"]["radius_certified"] is True and s["certificate"]["reading"] == "coupled"
    # the demo certifies its own attack for most test points (the coupled certificate)
    assert s["results"]["clean"]["certified_at_attack"] > 0.5 and s["results"]["backdoor"]["certified_at_attack"] > 0.5
    assert s["results"]["clean"]["points"] == 1000


def _certify_parser():
    import argparse

    from crfl.cli import _add_certify_args

    p = argparse.ArgumentParser(exit_on_error=False)
    _add_certify_args(p)  # what `crfl certify` and `crfl run` get
    return p


def test_every_certify_parameter_has_one_flag_with_the_configs_type_and_choices():
    import dataclasses
    import typing

    from crfl.cli import CERTIFY_FLAGS, CERTIFY_NOT_FLAGS
    from crfl.config import CHOICES, CertifyConfig

    fields = {f.name: f for f in dataclasses.fields(CertifyConfig)}
    assert not set(CERTIFY_FLAGS) & set(CERTIFY_NOT_FLAGS)
    assert set(CERTIFY_FLAGS) | set(CERTIFY_NOT_FLAGS) == set(fields), "a certify.* field without a flag or reason"
    hints = typing.get_type_hints(CertifyConfig)
    actions = {a.dest: a for a in _certify_parser()._actions if a.dest != "help"}
    assert set(actions) == set(CERTIFY_FLAGS)
    for name, a in actions.items():
        assert a.option_strings == ["--" + name.replace("_", "-")]
        assert a.type in typing.get_args(hints[name]) + (hints[name],), (name, a.type)
        want = CHOICES.get(f"certify.{name}")
        assert (list(a.choices) if a.choices else None) == (list(want) if want else None), name
        if want:
            assert fields[name].default in want  # the default is a valid choice
    # every certify choice list belongs to a field
    assert {k.split(".", 1)[1] for k in CHOICES if k.startswith("certify.")} <= set(fields)


def test_choice_lists_come_from_the_modules_that_own_them():
    from crfl import attacks, bounds
    from crfl.config import CHOICES
    from crfl.readings import READINGS, coupled
    from crfl.data.partition import SCHEMES

    assert CHOICES["certify.bound"] is bounds.BOUNDS and set(bounds._LOWER) == set(bounds._UPPER) == set(bounds.BOUNDS)
    assert CHOICES["certify.coverage"] is bounds.COVERAGES
    # the readings and their budgets build on the config, so the config names them; the owners must agree
    assert CHOICES["certify.bound_form"] == tuple(coupled.BUDGETS)
    assert CHOICES["certify.reading"] == tuple(READINGS)
    assert CHOICES["attack.trigger"] == ("auto", *attacks.TRIGGERS)
    assert CHOICES["data.partition"] is SCHEMES


def test_certify_flags_become_overrides():
    from crfl.cli import _certify_overrides

    args = _certify_parser().parse_args(["--selection", "50", "--sigma-T", "0.2", "--bound", "hoeffding", "--training-samples", "4"])
    assert _certify_overrides(args) == {"certify.selection": 50, "certify.sigma_T": 0.2, "certify.bound": "hoeffding",
                                        "certify.training_samples": 4, "certify.reading": "mixture"}
    with pytest.raises(Exception, match="invalid choice: 'wilson'"):
        _certify_parser().parse_args(["--bound", "wilson"])
