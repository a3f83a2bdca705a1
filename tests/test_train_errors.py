"""Clear errors: a bad config key, a missing checkpoint, a dataset spec that does not match the
checkpoint, a checkpoint of another world size, ZeRO stage or parameter grouping."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from c2seg.spec import load_spec
from tests.fixtures_prep import TINY_PREP
from tests.fixtures_train import FINETUNE_TINY, ROOT, refresh_saved_hash, run_train, tiny_args
from c2seg.train.checkpoint import CheckpointError, load_weights


def test_unknown_config_key_names_the_file_and_key(tiny_prepared, tmp_path):
    proc = run_train([*tiny_args("finetune", tiny_prepared, tmp_path / "r"), "--set", "optim.learning_rate=0.1"],
                     check=False)
    assert proc.returncode == 2
    assert f"{FINETUNE_TINY}: unknown key 'optim.learning_rate'" in proc.stderr


def test_missing_checkpoint_and_init_weights_are_clear_errors(tiny_prepared, tmp_path):
    missing = tmp_path / "nowhere"
    proc = run_train([*tiny_args("finetune", tiny_prepared, tmp_path / "r"), "--resume", str(missing)], check=False)
    assert proc.returncode == 2 and f"--resume {missing}: not a complete checkpoint folder" in proc.stderr
    proc = run_train(tiny_args("finetune", tiny_prepared, tmp_path / "r2", f"init_from={missing}"), check=False)
    assert proc.returncode == 2 and f"{missing}: weights file not found" in proc.stderr
    proc = run_train(["train", "export", "--run-dir", str(tmp_path), "--out", str(tmp_path / "m.pt")], check=False)
    assert proc.returncode == 2 and "no complete checkpoint with weights.pt" in proc.stderr


def test_spec_that_does_not_match_the_checkpoint(pretrained_tiny):
    ab = load_spec(ROOT / "configs/datasets/c2seg_ab.yaml")  # 242-band HSI, the checkpoint has 32
    with pytest.raises(CheckpointError, match="modality 'hsi' has 242 bands, the model expects 32"):
        load_weights(pretrained_tiny, ab)


def test_resume_at_another_world_size_says_how_to_continue(tiny_prepared, pretrained_tiny, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(pretrained_tiny, run)
    proc = run_train([*tiny_args("pretrain", tiny_prepared, run, "steps=8"), "--resume", "auto"], check=False)
    assert proc.returncode == 2
    assert "was written by 2 ranks, this job has 1" in proc.stderr and "init_from=" in proc.stderr
    # the same world size under another ZeRO stage (the checkpoint is ZeRO-2)
    proc = run_train([*tiny_args("pretrain", tiny_prepared, run, "steps=8", "deepspeed.zero_stage=1"), "--resume",
                      "auto"], nproc=2, check=False)
    assert proc.returncode != 0, proc.stderr[-2000:]  # torchrun reports a failed rank as 1
    assert "written under ZeRO-2, this job runs ZeRO-1" in proc.stderr and "deepspeed.zero_stage=2" in proc.stderr


def test_exported_file_of_another_kind_is_refused(tmp_path):
    from c2seg.train.export import load_exported

    bad = tmp_path / "x.pt"
    torch.save({"format": "other"}, bad)
    with pytest.raises(CheckpointError, match="not a c2seg weights file"):
        load_exported(bad)


def test_a_labelled_target_without_val_tiles_warns_and_trains_on(tiny_spec, tmp_path):
    """Held-out blocks are optional (``val_fraction: 0``): validation says there is nothing to score
    and fine-tuning still finishes."""
    from c2seg.data_prep.manifest import finalize
    from c2seg.data_prep.prep import run_prep

    prep = tmp_path / "prep"
    run_prep(tiny_spec, dataclasses.replace(TINY_PREP, val_fraction=0.0), prep)
    finalize(prep)
    run = tmp_path / "run"
    proc = run_train(tiny_args("finetune", prep, run, "steps=2", "finetune.eval_every=1"))
    assert "no labelled val tiles in ['synth_target']" in proc.stderr
    assert (run / "COMPLETED").is_file() and not (run / "val_metrics.jsonl").exists()


def test_checkpoint_with_other_parameter_groups_says_how_to_continue(tiny_prepared, tmp_path):
    """A checkpoint whose optimizer groups differ from this run's (written by a version that grouped the weights
    for weight decay otherwise) is refused with a message naming the checkpoint and how to continue, unless the
    run is finished and asked for no more steps."""
    run = tmp_path / "run"
    run_train(tiny_args("pretrain", tiny_prepared, run, "steps=2", "checkpoint_every=2", "deepspeed.zero_stage=0"))
    states = run / "checkpoints" / "step_00000002" / "mp_rank_00_model_states.pt"
    saved = torch.load(states, weights_only=True)
    groups = saved["optimizer"]["param_groups"]
    groups[0]["params"].append(groups[1]["params"].pop())
    torch.save(saved, states)
    refresh_saved_hash(states.parent, states.name)  # as the other version would have listed it
    # the finished run resumed for no more steps has nothing to train: it starts no engine and loads no state
    done = run_train([*tiny_args("pretrain", tiny_prepared, run, "steps=2", "deepspeed.zero_stage=0"), "--resume",
                      "auto"])
    assert "already finished at step 2 (steps: 2); nothing to train" in done.stderr
    assert "DeepSpeed engine" not in done.stderr
    proc = run_train([*tiny_args("pretrain", tiny_prepared, run, "steps=4", "deepspeed.zero_stage=0"), "--resume",
                      "auto"], check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "step_00000002: its optimizer state does not fit this run's parameter groups" in proc.stderr
    assert "init_from=" in proc.stderr


def test_bad_set_values_and_bounds_are_one_line_errors(tmp_path):
    """``--set`` values that are not safe YAML, and numbers out of bounds, end the CLI with status 2 and one line
    (no traceback, no DeepSpeed assertion)."""
    marker = tmp_path / "pwned"
    unsafe = f"steps=!!python/object/apply:os.system ['touch {marker}']"
    proc = run_train([*tiny_args("finetune", tmp_path, tmp_path / "r"), "--set", unsafe], check=False)
    assert proc.returncode == 2 and not marker.exists()
    assert proc.stderr.strip().splitlines() == [
        f"c2seg train: error: --set {unsafe}: the value is not valid (safe) YAML: could not determine a constructor "
        "for the tag 'tag:yaml.org,2002:python/object/apply:os.system' (line 1, column 1)"]
    proc = run_train(tiny_args("finetune", tmp_path, tmp_path / "r", "data.batch_size=0"), check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"c2seg train: error: {FINETUNE_TINY}: data.batch_size must be >= 1, got 0"]
