"""The project's error type: problems a user can fix are one line and exit status 2; bugs keep their
traceback (c2seg.errors, c2seg.cli)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from c2seg import cli, demo
from c2seg.errors import C2SegError
from c2seg.spec import load_spec, spec_compatible

ROOT = Path(__file__).resolve().parent.parent


def test_a_users_problem_is_one_line_and_exit_status_2(tmp_path, capsys):
    spec = tmp_path / "spec.yaml"
    spec.write_text((ROOT / "configs/datasets/demo_tiny.yaml").read_text())  # without the spec it extends
    assert cli.main(["data", "inspect", "--spec", str(spec), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"c2seg data: error: {spec}: extends 'c2seg_ab.yaml': {tmp_path / 'c2seg_ab.yaml'}: file not found"]


def test_an_unknown_city_is_a_users_problem():
    spec = load_spec(ROOT / "configs/datasets/demo_tiny.yaml")
    with pytest.raises(C2SegError) as err:
        spec.city("berlin")
    assert str(err.value) == "dataset 'demo_tiny' has no city 'berlin' (has ['synth_source', 'synth_target'])"


def test_a_bug_keeps_its_traceback(monkeypatch, tmp_path):
    def broken(args):
        raise ValueError("an internal invariant broke")

    monkeypatch.setattr(demo, "run_demo", broken)
    with pytest.raises(ValueError, match="an internal invariant broke"):
        cli.main(["demo", "--config", str(tmp_path / "demo.yaml")])


def test_spec_mismatches_are_structured():
    tiny = load_spec(ROOT / "configs/datasets/demo_tiny.yaml")
    optical = replace(tiny, modalities=tuple(m for m in tiny.modalities if m.name != "sar"))
    assert [(p.kind, str(p)) for p in spec_compatible(tiny, optical)] == [("missing_modality",
                                                                           "modality 'sar' is missing")]
