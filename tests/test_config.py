"""Typed configs: unknown keys, wrong types and bad choices are refused with the file and key path."""

from dataclasses import dataclass, field
from typing import Literal

import pytest

from c2seg.config import ConfigError, from_dict, load_config, parse_override, to_dict


@dataclass
class Optim:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)


@dataclass
class Run:
    name: str
    precision: Literal["fp32", "bf16"] = "fp32"
    steps: int = 10
    optim: Optim = field(default_factory=Optim)
    weights: dict[str, float] | None = None


def test_builds_nested_and_coerces():
    run = from_dict(Run, {"name": "a", "optim": {"lr": 1, "betas": [0.8, 0.9]}, "weights": {"x": 2}})
    assert run.optim.lr == 1.0 and isinstance(run.optim.lr, float)
    assert run.optim.betas == (0.8, 0.9)
    assert to_dict(run)["optim"]["betas"] == [0.8, 0.9]


@pytest.mark.parametrize("data, message", [
    ({"name": "a", "stpes": 3}, "unknown key 'stpes'"),
    ({"name": "a", "optim": {"lr": 1, "momentum": 0.9}}, "unknown key 'optim.momentum'"),
    ({"name": "a", "precision": "fp8"}, "precision: 'fp8' is not one of"),
    ({"name": "a", "steps": "ten"}, "steps: expected an integer"),
    ({"name": "a", "steps": True}, "steps: expected an integer"),
    ({"name": "a", "optim": {"betas": [0.9]}}, "optim.betas: expected 2 items"),
    ({"steps": 3}, "missing required key 'name'"),
])
def test_refuses_bad_values(data, message):
    with pytest.raises(ConfigError, match="run.yaml") as err:
        from_dict(Run, data, source="run.yaml")
    assert message in str(err.value)


def test_load_config_with_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("name: a\noptim: {lr: 0.1}\n")
    key, value = parse_override("optim.lr=0.5")
    run = load_config(Run, path, {key: value})
    assert run.optim.lr == 0.5
    key, value = parse_override("optim.lr=3e-4")  # YAML 1.1 reads an exponent without a dot as a string
    assert load_config(Run, path, {key: value}).optim.lr == 3e-4
    path.write_text("name: a\noptim: {lr: 1e-3}\n")
    assert load_config(Run, path).optim.lr == 1e-3
    path.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Run, path)
    with pytest.raises(ConfigError, match="not found"):
        load_config(Run, tmp_path / "missing.yaml")


def test_yaml_is_loaded_safely(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("name: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Run, path)
