"""Trust nothing on disk (issue 18): checkpoint files that unpickle code, damaged newest checkpoints,
damaged or non-finite weights, a run dir of another model, and an MLflow server that is down. The
hostile files are made here from the session's real 2-rank ZeRO-2 pretraining (``pretrained_tiny``)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.fixtures_train import ROOT, free_port, refresh_saved_hash, run_train, tiny_args, train_env
from c2seg.train.checkpoint import (CheckpointError, checkpoint_problem, latest_checkpoint, load_weights, resolve_resume,
                              unpickling_problem)

STEP3, STEP6 = "checkpoints/step_00000003", "checkpoints/step_00000006"
STATES = "mp_rank_00_model_states.pt"
RANK1_OPTIM = "zero_pp_rank_1_mp_rank_00_optim_states.pt"


class ShellPayload:
    """Unpickling it runs ``touch MARKER`` (what a hostile checkpoint file would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


@pytest.fixture
def run_copy(pretrained_tiny, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(pretrained_tiny, run)
    return run


def test_every_file_of_a_real_zero2_checkpoint_passes_the_weights_only_check(pretrained_tiny):
    files = sorted((pretrained_tiny / STEP6).glob("*.pt"))
    assert len(files) == 4  # model states, 2 optimizer partitions, weights.pt
    assert [unpickling_problem(f) for f in files] == [None] * 4


def test_resume_refuses_a_checkpoint_file_that_would_run_code(tiny_prepared, run_copy, tmp_path):
    marker = tmp_path / "pwned"
    ckpt = run_copy / STEP6
    torch.save({"module": ShellPayload(marker)}, ckpt / STATES)
    refresh_saved_hash(ckpt, STATES)
    proc = run_train([*tiny_args("pretrain", tiny_prepared, run_copy, "steps=8"), "--resume", "auto"], nproc=2,
                     check=False)
    assert not marker.exists()
    assert proc.returncode == 1, proc.stderr[-3000:]  # torchrun's status when its ranks fail
    assert (f"checkpoint {ckpt}: {ckpt / STATES}: holds objects that are not plain tensors/containers (Trying to "
            "load unsupported GLOBAL posix.system whose module posix is blocked.); refused") in proc.stderr
    assert "resumed from" not in proc.stderr


def test_a_plain_pickle_with_a_payload_is_refused_without_running_it(tmp_path):
    import pickle

    marker, file = tmp_path / "pwned", tmp_path / "mp_rank_00_model_states.pt"
    file.write_bytes(pickle.dumps({"module": ShellPayload(marker)}))
    assert unpickling_problem(file) == (f"{file}: holds objects that are not plain tensors/containers "
                                        "(Unsupported operand 149); refused")
    assert not marker.exists()


def test_auto_resume_skips_a_truncated_newest_checkpoint_and_continues_from_the_older(tiny_prepared, run_copy):
    damaged = run_copy / STEP6 / RANK1_OPTIM
    saved = damaged.stat().st_size
    truncate(damaged)
    proc = run_train([*tiny_args("pretrain", tiny_prepared, run_copy, "steps=7"), "--resume", "auto"], nproc=2)
    assert (f"skipping checkpoint {run_copy / STEP6}: {damaged}: {saved // 2} bytes, {saved} when saved "
            "(truncated or overwritten)") in proc.stderr
    assert f"resumed from {run_copy / STEP3} at step 3" in proc.stderr
    assert (run_copy / "COMPLETED").read_text() == "7\n"
    assert latest_checkpoint(run_copy) == run_copy / "checkpoints/step_00000007"
    assert checkpoint_problem(run_copy / STEP6) is None  # step 6 was saved again, whole


def test_auto_resume_skips_a_newest_train_state_that_is_not_json(run_copy, caplog):
    state_file = run_copy / STEP6 / "train_state.json"
    state_file.write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="c2seg.train"):
        assert resolve_resume("auto", run_copy) == run_copy / STEP3
    assert caplog.messages == [f"skipping checkpoint {run_copy / STEP6}: {state_file}: not valid JSON (Expecting "
                               "property name enclosed in double quotes: line 1 column 2 (char 1))"]
    truncate(run_copy / STEP3 / "weights.pt")
    with pytest.raises(CheckpointError, match=f"--resume auto: no checkpoint in {run_copy / 'checkpoints'} is "
                                              "intact"):
        resolve_resume("auto", run_copy)


def test_explicit_resume_of_a_damaged_checkpoint_is_one_line_naming_the_file(tiny_prepared, run_copy):
    ckpt = run_copy / STEP6
    saved = (ckpt / STATES).stat().st_size
    truncate(ckpt / STATES)
    proc = run_train([*tiny_args("pretrain", tiny_prepared, run_copy, "steps=8"), "--resume", str(ckpt)],
                     check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"c2seg train: error: --resume {ckpt}: not a complete checkpoint folder: {ckpt / STATES}: {saved // 2} "
        f"bytes, {saved} when saved (truncated or overwritten); checkpoints are OUTPUT/checkpoints/step_N")


def test_resume_with_another_model_names_both_and_how_to_go_on(tiny_prepared, run_copy):
    proc = run_train([*tiny_args("pretrain", tiny_prepared, run_copy, "steps=8", "model=configs/models/demo.yaml"),
                      "--resume", "auto"], check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "DeepSpeed engine" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"c2seg train: error: {run_copy / STEP6} holds another model: 'tiny', this run's configs/models/demo.yaml "
        "is 'demo' (checkpoint vs this run: embed_dim 64 vs 128, depth 2 vs 4, max_bands_per_token 16 vs 64, "
        "wavelength_hidden 16 vs 32, decoder_dim 32 vs 48). Continue that run with --set "
        "model=configs/models/tiny.yaml, or train this model in a new output_dir (--set output_dir=...)")


def _exported_tiny(pretrained_tiny, out: Path, **tensors: torch.Tensor) -> Path:
    """An exported model file of the tiny segmenter (fresh weights, ``tensors`` replaced)."""
    from c2seg.spec import spec_from_dict
    from c2seg.train.config import model_config_from_dict
    from c2seg.train.export import save_exported
    from c2seg.train.models import FusionSegmenter

    data = load_weights(pretrained_tiny)
    model = FusionSegmenter(spec_from_dict(data.spec), model_config_from_dict(data.model_config))
    save_exported(out, data.model_config, data.spec, {**model.state_dict(), **tensors}, data.normalization,
                  data.modalities, data.tile_size)
    return out


def _overwrite_inside(file: Path, tensor: torch.Tensor) -> None:
    """Overwrite 64 bytes in the middle of ``tensor``'s data in ``file`` with finite floats (0.5)."""
    raw = bytearray(file.read_bytes())
    at = raw.find(tensor.numpy().tobytes())
    assert at > 0
    middle = at + tensor.numel() * tensor.element_size() // 2
    raw[middle:middle + 64] = np.full(16, 0.5, np.float32).tobytes()
    file.write_bytes(bytes(raw))


def test_exported_model_with_overwritten_tensor_bytes_is_refused(pretrained_tiny, tmp_path):
    from c2seg.train.export import load_exported

    model = _exported_tiny(pretrained_tiny, tmp_path / "model.pt")
    state = torch.load(model, weights_only=True)["state_dict"]
    name = max(state, key=lambda k: state[k].numel())
    _overwrite_inside(model, state[name])
    with pytest.raises(CheckpointError) as err:
        load_exported(model)
    assert str(err.value) == (f"{model}: its tensors do not match the checksum stored when it was saved (the file "
                              "is damaged); use another checkpoint or export it again")


def test_checkpoint_weights_with_overwritten_bytes_are_refused(run_copy):
    weights = run_copy / STEP6 / "weights.pt"
    state = torch.load(weights, weights_only=True)["state_dict"]
    _overwrite_inside(weights, state["backbone.embeds.msi.weight_generator.0.weight"])
    with pytest.raises(CheckpointError) as err:
        load_weights(run_copy)
    assert str(err.value).startswith(f"{weights}: its tensors do not match the checksum")


def test_non_finite_weights_are_refused_naming_the_tensor(pretrained_tiny, tmp_path):
    from c2seg.train.export import load_exported

    nan = torch.zeros(64, 64)
    nan[3, 5] = float("nan")
    model = _exported_tiny(pretrained_tiny, tmp_path / "model.pt", **{"backbone.blocks.0.attn.qkv.weight": nan})
    with pytest.raises(CheckpointError) as err:
        load_exported(model)
    assert str(err.value) == (f"{model}: tensor state_dict.backbone.blocks.0.attn.qkv.weight holds NaN or inf "
                              "values; these weights cannot be used")


def test_exported_model_without_checksum_loads_with_a_warning(pretrained_tiny, tmp_path, caplog):
    from c2seg.train.export import load_exported

    model = _exported_tiny(pretrained_tiny, tmp_path / "model.pt")
    data = torch.load(model, weights_only=True)
    del data["tensor_sha256"]
    torch.save(data, model)  # as c2seg wrote them before the checksum
    with caplog.at_level(logging.WARNING, logger="c2seg.train"):
        assert load_exported(model).tile_size == 32
    assert caplog.messages == [f"{model}: no tensor checksum (written by an older c2seg version); loaded without "
                               "verifying it"]


def test_evaluate_against_a_closed_tracking_port_warns_fast_and_exits_0(tiny_spec, tmp_path):
    from tests.test_evaluate import write

    (tmp_path / "truth").mkdir()
    (tmp_path / "pred").mkdir()
    write(tmp_path / "truth" / "7.tif", np.full((9, 11), 2, np.uint8))
    write(tmp_path / "pred" / "7.tif", np.full((9, 11), 2, np.uint8))
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    cmd = [sys.executable, "-m", "c2seg.cli", "infer", "evaluate", "--pred", str(tmp_path / "pred"), "--truth",
           str(tmp_path / "truth"), "--spec", tiny_spec.source_file, "--mlflow-run", "abc", "--tracking-uri", uri]
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, env=train_env(), capture_output=True, text=True, timeout=300)
    took = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert took < 15, took
    assert json.loads((tmp_path / "pred" / "metrics.json").read_text())["oa"] == 1.0
    warnings = [line for line in proc.stderr.splitlines() if "WARNING c2seg.infer: MLflow" in line]
    assert len(warnings) == 1 and "MLflow scores not logged to run abc: " in warnings[0]
    assert "Traceback" not in proc.stderr


def test_slurm_chain_tracking_against_a_closed_port_returns_fast(tmp_path, caplog, monkeypatch):
    from c2seg.slurm.tracking import start_chain

    bounds = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
    for name in bounds:  # unset by the user; restored (unset) after the test
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="c2seg.slurm"):
        assert start_chain(f"http://127.0.0.1:{free_port()}", "e", "chain", ["train"], {}) is None
    assert time.monotonic() - start < 15
    assert {name: os.environ[name] for name in bounds} == bounds
    assert [m.split(": ")[0] for m in caplog.messages] == ["MLflow tracking of the chain disabled"]
