"""Atomic writes: an exception or Ctrl-C in the middle of a write never leaves a half-written file."""

from __future__ import annotations

import os

import pytest

from crfl import io


def test_interrupted_write_keeps_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "rounds.csv"
    io.write_csv(target, ["a", "b"], [[1, 2.5]])
    before = target.read_text()

    def boom(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(KeyboardInterrupt):
        io.write_csv(target, ["a", "b"], [[3, 4.0]] * 1000)
    assert target.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["rounds.csv"]


def test_writers_round_trip(tmp_path):
    io.write_json(tmp_path / "s.json", {"x": float("inf"), "y": [1, 2.5], "z": float("nan")})
    import json

    assert json.loads((tmp_path / "s.json").read_text(), parse_constant=lambda c: 1 / 0) == {"x": "inf", "y": [1, 2.5], "z": None}
    io.write_csv(tmp_path / "c.csv", ["k", "v"], [["a", 0.1], ["b", None], ["c", [1, 2]]])
    rows = io.read_csv(tmp_path / "c.csv")
    assert rows == [{"k": "a", "v": "0.1"}, {"k": "b", "v": ""}, {"k": "c", "v": "1;2"}]
