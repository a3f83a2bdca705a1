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


@pytest.mark.parametrize("override, message", [
    ({"data.batch_size": 0}, "data.batch_size must be >= 1, got 0"),
    ({"data.batch_size": -2}, "data.batch_size must be >= 1, got -2"),
    ({"optim.lr": -1}, "optim.lr must be >= 0, got -1.0"),
    ({"optim.warmup_steps": -1}, "optim.warmup_steps must be >= 0, got -1"),
    ({"optim.betas": [0.9, 1.0]}, "optim.betas[1] must be in [0, 1), got 1.0"),
    ({"steps": 0}, "steps must be >= 1, got 0"),
    ({"checkpoint_every": 0}, "checkpoint_every must be >= 1, got 0"),
    ({"deepspeed.gradient_accumulation_steps": 0}, "deepspeed.gradient_accumulation_steps must be >= 1, got 0"),
    ({"finetune.ema_decay": 1.0}, "finetune.ema_decay must be in [0, 1), got 1.0"),
    ({"finetune.pseudo_class_keep": 0}, "finetune.pseudo_class_keep must be in (0, 1], got 0.0"),
    ({"finetune.target_class_min_share": 1.5}, "finetune.target_class_min_share must be in [0, 1), got 1.5"),
])
def test_train_config_numbers_out_of_bounds_name_the_file_key_and_value(override, message):
    from c2seg.train.config import load_train_config

    path = "configs/train/finetune_tiny.yaml"
    with pytest.raises(ConfigError) as err:
        load_train_config(path, override)
    assert str(err.value) == f"{path}: {message}"


def test_model_config_numbers_out_of_bounds_name_the_file_key_and_value(tmp_path):
    from c2seg.train.config import load_model_config

    path = tmp_path / "m.yaml"
    path.write_text("name: m\nembed_dim: 64\ndepth: 2\nnum_heads: 0\n")  # 0 heads: a division by zero before
    with pytest.raises(ConfigError) as err:
        load_model_config(path)
    assert str(err.value) == f"{path}: num_heads must be >= 1, got 0"


@pytest.mark.parametrize("item, problem", [
    ("steps=[1, 2", "expected ',' or ']', but got '<stream end>' (line 1, column 6)"),
    ("steps=!!python/object/apply:os.system ['touch x']",
     "could not determine a constructor for the tag 'tag:yaml.org,2002:python/object/apply:os.system' "
     "(line 1, column 1)"),
])
def test_set_value_that_is_not_safe_yaml_is_one_line_naming_the_item(item, problem):
    with pytest.raises(ConfigError) as err:
        parse_override(item)
    assert str(err.value) == f"--set {item}: the value is not valid (safe) YAML: {problem}"
