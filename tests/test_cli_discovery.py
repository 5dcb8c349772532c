"""A CLI that can be discovered and watched: --version, python -m crfl, crfl list, help with examples,
"Did you mean ...?", the train default, a quiet end on a closed pipe, logging levels, progress with
an ETA (crfl.progress), rounds.csv growing during a run, and Flower's per-round lines thinned."""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import yaml

from crfl import __version__, plugins, progress, rundir
from crfl.cli import COMMANDS, LIST_KINDS, listings, main
from crfl.config import preset_names, resolve
from crfl.driver import drive
from crfl.setup import prepare
from crfl.sweep import spec_names
from crfl.train import SimulatorRound, train
from crfl.validation import ConfigError
from tests.conftest import synthetic_images

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _own_plugin_record(monkeypatch):
    """A plugin a test loads stays out of the runs of later tests (crfl.plugins records per process)."""
    monkeypatch.setattr(plugins, "_LOADED", {})


TINY = ["--set", "server.rounds=3", "--set", "attack.rounds=[2]", "--set", "data.num_clients=4"]


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"crfl {__version__} (torch 2.13") and "Python 3." in out


@pytest.mark.slow
def test_python_dash_m_crfl_is_the_command(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    p = subprocess.run([sys.executable, "-m", "crfl", "--version"], env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout.startswith(f"crfl {__version__}")
    p = subprocess.run([sys.executable, "-m", "crfl", "trian"], env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "Did you mean 'train'?" in p.stderr


@pytest.mark.slow
def test_a_closed_pipe_ends_quietly(tmp_path):
    """`crfl list | head -1`: the reader leaves; crfl stops without 'Broken pipe' or a traceback."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    p = subprocess.Popen(f"{sys.executable} -m crfl list | head -1", shell=True, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    out, err = p.communicate(timeout=60)
    assert out.strip() == "datasets:" and err == "", err
    # a reader that closes at once, and output larger than the pipe's buffer
    p = subprocess.Popen([sys.executable, "-c", "import sys; from crfl.cli import main; "
                          "import crfl.cli as c; c.listings = lambda: {k: {f'n{i}': 'x' * 200 for i in range(2000)} "
                          "for k in c.LIST_KINDS}; sys.exit(main(['list']))"],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()
    rc = p.wait(timeout=60)
    err = p.stderr.read().decode()
    assert "Broken pipe" not in err and "Traceback" not in err and err == "", err
    assert rc == 141


def test_list_every_kind_with_descriptions(capsys):
    table = listings()
    assert set(table) == set(LIST_KINDS)
    assert "mnist-5k" in table["datasets"] and "fedavg" in table["aggregators"] and "backdoor" in table["attacks"]
    assert set(table["models"]) >= {"logistic", "mlp", "cnn"} and set(table["readings"]) == {"coupled", "mixture", "paper"}
    assert list(table["specs"]) == spec_names() and list(table["presets"]) == preset_names()
    for kind, entries in table.items():
        for name, desc in entries.items():
            assert desc.strip(), f"{kind} {name} has no description"
    assert table["specs"]["fig5-attackers-mnist"].startswith("Fig. 5")
    assert main(["list", "aggregators"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == len(table["aggregators"])
    assert out[0].split()[0] == sorted(table["aggregators"])[0]
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for kind in LIST_KINDS:
        assert f"{kind}:" in out


def test_every_command_has_a_description_and_examples(capsys):
    from crfl.cli import INTERRUPTED

    assert set(INTERRUPTED) == set(COMMANDS)  # and what Ctrl-C leaves behind
    for name, (_short, desc, examples) in COMMANDS.items():
        with pytest.raises(SystemExit):
            main([name, "--help"])
        out = capsys.readouterr().out
        assert desc.split()[0] in out and "examples:" in out
        for line in examples.splitlines():
            assert line.strip().startswith("crfl ") and line.strip() in out
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out


@pytest.mark.parametrize("argv, hint", [
    (["trian"], "Did you mean 'train'?"),
    (["certify", "x", "--reading", "coupeld"], "Did you mean 'coupled'?"),
    (["list", "datsets"], "Did you mean 'datasets'?"),
])
def test_did_you_mean_in_argparse(argv, hint, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert hint in capsys.readouterr().err


@pytest.mark.parametrize("argv, hint", [
    (["train", "--set", "attack.gama=3", "--out", "X"], "Did you mean 'gamma'?"),
    (["train", "--set", "atack.gamma=3", "--out", "X"], "Did you mean 'attack'?"),
    (["train", "--dataset", "mnist5k", "--out", "X"], "Did you mean 'mnist-5k'?"),
    (["train", "--preset", "dmeo", "--out", "X"], "Did you mean 'demo'?"),
    (["train", "--set", "aggregation.name=krun", "--out", "X"], "Did you mean 'krum'?"),
    (["train", "--set", "model.name=cnm", "--out", "X"], "Did you mean 'cnn'?"),
    (["train", "--set", "attack.kind=lable-flip", "--out", "X"], "Did you mean 'label-flip'?"),
    (["sweep", "fig5-atackers-mnist", "--out", "X"], "Did you mean 'fig5-attackers-mnist'?"),
])
def test_did_you_mean_on_names(argv, hint, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main([*argv, "-q"]) == 2
    err = capsys.readouterr().err
    assert hint in err and err.startswith("crfl: error:") and "Traceback" not in err, err
    assert not (tmp_path / "X").exists()


def test_no_suggestion_when_nothing_is_close(capsys):
    assert main(["train", "--dataset", "cifar", "--out", "X", "-q"]) == 2
    assert "Did you mean" not in capsys.readouterr().err


def test_train_without_a_preset_trains_the_demo_and_says_so(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "crfl: note: no --preset or --config given: trained the demo preset" in captured.err
    assert captured.out.splitlines()[1].split() == ["preset", "demo"]
    assert yaml.safe_load((out / "config.yaml").read_text())["preset"] == "demo"
    # a preset given: no note
    assert main(["train", "--preset", "demo", *TINY, "--out", str(tmp_path / "run2")]) == 0
    assert "note:" not in capsys.readouterr().err


def test_verbose_and_quiet_logging(tmp_path, capsys):
    plugin = tmp_path / "user_parts_log.py"
    plugin.write_text("X = 1\n")
    assert main(["list", "presets", "-v", "--plugin", str(plugin)]) == 0
    assert f"crfl: plugin user_parts_log ({plugin.resolve()})" in capsys.readouterr().err
    assert main(["list", "presets", "--plugin", str(plugin)]) == 0
    assert capsys.readouterr().err == ""
    # -q keeps warnings (the train default is loud) and drops the progress bars
    assert main(["train", *TINY, "--out", str(tmp_path / "r"), "-q", "--progress"]) == 0
    err = capsys.readouterr().err
    assert "note:" in err and "training [" not in err
    sys.modules.pop("user_parts_log", None)


def test_progress_lines_when_asked_and_none_in_a_pipe_by_default(tmp_path, capsys):
    assert main(["train", "--preset", "demo", *TINY, "--out", str(tmp_path / "a")]) == 0
    assert "training [" not in capsys.readouterr().err  # stderr is not a terminal here
    assert main(["train", "--preset", "demo", *TINY, "--out", str(tmp_path / "b"), "--progress"]) == 0
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("training [")]
    assert len(lines) == 3 and lines[-1].startswith("training [########################] 3/3 rounds")
    assert "ETA" in lines[0] and "ETA" not in lines[-1]


# ---------------------------------------------------------------------------------------------
# crfl.progress


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_eta_is_the_remaining_work_at_the_rate_so_far():
    assert progress.eta(10.0, 2, 10) == pytest.approx(40.0)
    assert progress.eta(0.0, 0, 10) == float("inf")
    assert [progress.fmt_seconds(s) for s in (0, 59.4, 61, 3599, 7260, float("inf"))] == ["0s", "59s", "1m01s", "59m59s", "2h01m", "?"]


def test_bar_on_a_terminal_redraws_in_place_with_an_eta():
    clock, out = Clock(), Tty()
    b = progress.Bar(100, "training", unit="rounds", mode=progress.mode_for(out), stream=out, clock=clock)
    assert b.mode == "tty"
    for t in range(1, 101):
        clock.t += 0.5  # 0.5 s per round
        b.update(t)
    text = out.getvalue()
    frames = text.split("\r\x1b[K")[1:]
    assert len(frames) == 100  # 0.5 s apart: every round redrawn (more than REDRAW)
    assert "25/100 rounds" in frames[24] and "ETA 38s" in frames[24]  # 75 rounds left at 0.5 s
    assert text.endswith("100/100 rounds  50s\n")


def test_bar_throttles_redraws_and_resumes_count_only_new_work():
    clock, out = Clock(), Tty()
    b = progress.Bar(1000, "Monte Carlo", start=500, mode="tty", stream=out, clock=clock)
    for m in range(501, 1001):
        clock.t += 0.001
        b.update(m)
    frames = out.getvalue().split("\r\x1b[K")[1:]
    assert 4 <= len(frames) <= 7  # 0.5 s of work, at most one redraw per 0.1 s, plus the last
    b2 = progress.Bar(10, "x", start=5, mode="lines", stream=io.StringIO(), clock=clock)
    clock.t += 4
    b2.update(6)
    assert "ETA 16s" in b2.stream.getvalue()  # 4 s for 1 of the 5 rounds left: 4 more at 4 s each


def test_bar_modes():
    assert progress.mode_for(io.StringIO()) is None
    assert progress.mode_for(io.StringIO(), force=True) == "lines"
    assert progress.mode_for(Tty()) == "tty" and progress.mode_for(Tty(), quiet=True) is None
    out = io.StringIO()
    b = progress.Bar(1000, "x", mode="lines", stream=out)
    for i in range(1, 1001):
        b.update(i)
    assert len(out.getvalue().splitlines()) == 11  # the start, then every 10%
    assert progress.bar(5, "off").mode is None  # nothing shown unless a caller says so
    with progress.showing("lines"), progress.stage("sweep 2/3"):
        assert progress.bar(5, "on").mode == "lines" and progress.bar(5, "on").message().startswith("sweep 2/3: on [")


def test_sweep_watch_counts_rounds_from_growing_files(tmp_path):
    files = [tmp_path / f"{i}.csv" for i in range(3)]
    files[0].write_text("round\n1\n2\n3\n4\n")  # finished (4 of 4)
    files[1].write_text("round\n1\n2\n3")  # 2 complete rows, the third being written
    w = progress.Watch([(str(f), 4) for f in files], "sweep", already=set())
    done, detail = w.rounds_done()
    assert done == 6 and "running 2/4" in detail and detail.startswith("runs 0/3")
    w.finished(0)
    assert w.rounds_done()[1].startswith("runs 1/3")
    files[1].write_text("round\n1\n2\n3\n4\n")
    files[2].write_text("round\n1\n2\n3\n4\n")  # trained, being certified: the bar stays short of its end
    assert w.rounds_done() == (11, "runs 1/3; certifying 2")
    w.finished(1)
    w.finished(2)
    assert w.rounds_done() == (12, "runs 3/3")


# ---------------------------------------------------------------------------------------------
# rounds.csv grows during a run


def _rows(path: Path) -> list[dict[str, str]]:
    text = path.read_text()
    assert text.endswith("\n")
    return list(csv.DictReader(io.StringIO(text)))


def test_rounds_csv_grows_during_a_run_and_ends_whole(tmp_path):
    ds = synthetic_images()
    cfg = resolve("demo", overrides={"server.rounds": 5, "attack.rounds": [3], "data.num_clients": 4,
                                     "attack.pixels": [[0, 0], [0, 1]]})
    seen: list[list[dict[str, str]]] = []
    texts: list[str] = []
    out = tmp_path / "run"
    setup = prepare(cfg, ds)
    run = rundir.create_run(out)

    def look(state) -> None:
        texts.append((out / rundir.ROUNDS).read_text())
        seen.append(_rows(out / rundir.ROUNDS))

    with run:
        res = drive(setup, SimulatorRound(setup), run, on_round=look)
    assert [len(s) for s in seen] == [1, 2, 3, 4, 5]
    for s, text in zip(seen, texts):  # every row, once written, stays as it is
        assert s == seen[-1][: len(s)] and texts[-1].startswith(text)
    final = _rows(out / rundir.ROUNDS)
    assert final == seen[-1] and [r["round"] for r in final] == ["1", "2", "3", "4", "5"]
    assert (out / rundir.ROUNDS).read_text() == texts[-1]  # the final result set wrote the same bytes
    assert len(res.records) == 5


def test_an_interrupted_run_keeps_its_rounds_and_a_resume_continues_them(tmp_path):
    ds = synthetic_images()
    cfg = resolve("demo", overrides={"server.rounds": 6, "attack.rounds": [3], "data.num_clients": 4,
                                     "attack.pixels": [[0, 0], [0, 1]], "run.checkpoint_every": 2})
    out = tmp_path / "run"
    train(cfg, out, dataset=ds, stop_after=3)  # an interruption after round 3 (checkpoint at 3)
    assert [r["round"] for r in _rows(out / rundir.ROUNDS)] == ["1", "2", "3"]
    assert not (out / rundir.MODEL).exists()
    (out / rundir.ROUNDS).write_text((out / rundir.ROUNDS).read_text() + "4,0.5")  # a row cut by a kill
    train(None, out, resume=True, dataset=ds)  # type: ignore[arg-type]
    resumed = _rows(out / rundir.ROUNDS)
    full = tmp_path / "full"
    train(cfg, full, dataset=ds)
    assert resumed == _rows(full / rundir.ROUNDS) and len(resumed) == 6


def test_a_fresh_run_failing_before_its_first_checkpoint_leaves_nothing(tmp_path):
    ds = synthetic_images()
    cfg = resolve("demo", overrides={"server.rounds": 3, "attack.rounds": [1], "data.num_clients": 4,
                                     "attack.pixels": [[0, 0]], "clients.lr": 1e38, "run.checkpoint_every": 5,
                                     "run.dtype": "float32"})  # the demo trains in float64, where 1e38 does not overflow
    with pytest.raises(ConfigError, match="diverged in round 3"):
        train(cfg, tmp_path / "run", dataset=ds)
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------
# Flower's per-round lines


def test_flower_per_round_lines_are_thinned():
    from crfl.flower.strategy import CRFL

    def loud_rounds(T: int, every: int = 0) -> list[int]:
        s = types.SimpleNamespace(rounds=T, log_every=every)
        return [t for t in range(1, T + 1) if CRFL.loud(s, t)]  # type: ignore[arg-type]

    assert len(loud_rounds(100)) == 11 and loud_rounds(100)[:3] == [1, 10, 20]
    assert loud_rounds(5) == [1, 2, 3, 4, 5]
    assert loud_rounds(100, every=1) == list(range(1, 101))
    assert loud_rounds(100, every=50) == [1, 50, 100]
