"""The one weights format (train/weights.py): the layout written, the one reader, kinds, versions."""

from __future__ import annotations

import pytest
import torch

from c2seg.train.weights import FORMAT, CheckpointError, Weights, read_weights, save_weights, tensors_sha256

STATE = {"head.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3), "head.bias": torch.tensor([0.5, -1.0])}
META = {"model_config": {"name": "m"}, "spec": {"name": "s"}, "normalization": {"msi": {"mean": [1.0], "std": [2.0]}},
        "modalities": ["msi"], "tile_size": 32}


def _weights(**changes) -> Weights:
    return Weights(**{"kind": "checkpoint", "task": "finetune", "step": 7, "state_dict": STATE,
                      "extra": {"ema": {"head.bias": torch.tensor([1.0, 2.0])}, "target_classes": [1, 3]},
                      **META, **changes})


def test_written_layout_and_round_trip(tmp_path):
    path = save_weights(tmp_path / "w.pt", _weights())
    raw = torch.load(path, weights_only=True)
    assert sorted(raw) == sorted(["format", "version", "kind", "task", "step", "state_dict", "model_config", "spec",
                                  "normalization", "modalities", "tile_size", "normalization_mode",
                                  "city_normalization", "extra", "tensor_sha256"])
    assert (raw["format"], raw["version"], raw["kind"], raw["normalization_mode"]) == (FORMAT, 2, "checkpoint", "pooled")
    assert raw["tensor_sha256"] == tensors_sha256({k: v for k, v in raw.items() if k != "tensor_sha256"})
    back = read_weights(path)
    assert (back.kind, back.task, back.step, back.tile_size, back.extra["target_classes"]) == ("checkpoint",
                                                                                             "finetune", 7, 32, [1, 3])
    assert all(torch.equal(back.state_dict[k], STATE[k]) for k in STATE)
    assert torch.equal(back.extra["ema"]["head.bias"], torch.tensor([1.0, 2.0]))


def test_a_kind_is_asked_for_by_name(tmp_path):
    path = save_weights(tmp_path / "w.pt", _weights())
    with pytest.raises(CheckpointError) as err:
        read_weights(path, kind="model")
    assert str(err.value) == (f"{path}: a checkpoint file, a model file is needed here; export a finetune run "
                              "with `c2seg train export`")


@pytest.mark.parametrize("old, kind, extra", [
    ({"format": "c2seg-weights/1", "model": STATE, "task": "pretrain", "step": 3,
      "ema": {"head.bias": torch.zeros(2)}, "target_classes": [2]}, "checkpoint", ["ema", "target_classes"]),
    ({"format": "c2seg-model/1", "state_dict": STATE, "step": 3, "normalization_mode": "pooled",
      "city_normalization": {}}, "model", []),
])
def test_version_1_files_are_read_upgraded(tmp_path, old, kind, extra):
    path = tmp_path / "old.pt"
    data = {**old, **META}
    torch.save({**data, "tensor_sha256": tensors_sha256(data)}, path)
    back = read_weights(path)
    assert (back.kind, back.step, sorted(back.extra)) == (kind, 3, extra)
    assert back.task == ("finetune" if kind == "model" else "pretrain")
    assert all(torch.equal(back.state_dict[k], STATE[k]) for k in STATE)


@pytest.mark.parametrize("data, says", [
    ({"format": FORMAT, "version": 3}, "weights format version 3, this c2seg reads up to 2; use a newer c2seg"),
    ({"format": FORMAT, "version": 2, "kind": "model", "task": "finetune", "step": 0, "state_dict": STATE},
     "not a complete c2seg weights file (no model_config, spec, normalization, modalities, tile_size)"),
    ({"format": "other"}, "not a c2seg weights file (no format c2seg-weights)"),
    ([1, 2], "not a c2seg weights file (no format c2seg-weights)"),
])
def test_files_that_are_not_version_2_weights_are_refused_in_one_line(tmp_path, data, says):
    path = tmp_path / "bad.pt"
    torch.save(data, path)
    with pytest.raises(CheckpointError) as err:
        read_weights(path)
    assert str(err.value) == f"{path}: {says}"


class _ShellPayload:
    """Unpickling it would run ``touch MARKER``: what a hostile model or checkpoint file would do."""

    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_a_weights_file_that_would_run_code_is_refused_and_never_runs_it(tmp_path):
    marker, path = tmp_path / "pwned", tmp_path / "model.pt"
    torch.save({"format": FORMAT, "version": 2, "kind": "model", "state_dict": STATE, "x": _ShellPayload(marker)},
               path)
    with pytest.raises(CheckpointError) as err:
        read_weights(path, kind="model")
    assert str(err.value).startswith(f"{path}: not a readable c2seg weights file (Trying to load unsupported GLOBAL")
    assert not marker.exists()
