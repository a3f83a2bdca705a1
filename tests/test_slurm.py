"""slurm package without a cluster: config checks, rendered job scripts, --dry-run, missing sbatch."""

from __future__ import annotations

import subprocess
from dataclasses import fields
from pathlib import Path
from typing import get_args

import pytest

from c2seg.cli import main
from c2seg.config import ConfigError
from c2seg.pipeline import STAGE_NAMES, StageName
from c2seg.slurm import submit
from c2seg.slurm.config import SubmitConfig, load_submit_config

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "configs" / "slurm" / "cluster_example.yaml"
LOCAL = ROOT / "configs" / "slurm" / "local.yaml"


def test_configs_load_and_stage_overrides_merge():
    cfg = load_submit_config(EXAMPLE)
    pre = cfg.resources_for("pretrain")
    assert (pre.nodes, pre.gpus_per_node, pre.partition, pre.account, pre.signal_seconds) == (2, 4, "gpu",
                                                                                              "my_project", 600)
    prep = cfg.resources_for("prep")
    assert (prep.partition, prep.gpus_per_node, prep.mem) == ("cpu", 0, "64G")
    local = load_submit_config(LOCAL)
    assert local.resources_for("adapted").tasks_per_node == 2


def test_stages_are_the_pipeline_ones():
    """One definition (c2seg.pipeline) for the demo and the chain: the stage names, the order, a section each."""
    assert STAGE_NAMES == ("prep", "pretrain", "source_only", "adapted", "export", "infer", "evaluate")
    assert get_args(StageName) == STAGE_NAMES
    assert SubmitConfig.__dataclass_fields__["stages"].default == STAGE_NAMES
    assert set(STAGE_NAMES) <= {f.name for f in fields(SubmitConfig)}


@pytest.mark.parametrize("override, message", [
    ({"resources.gpu": 1}, "unknown key 'resources.gpu'"),
    ({"stages": ["infer", "prep"]}, "pipeline order"),
    ({"stages": ["bogus"]}, "is not one of"),
    ({"pretrain.config": None}, "pretrain.config"),
    ({"resources.extra_sbatch": ["exclusive"]}, "must be an sbatch option"),
    ({"infer.set": ["window=64"]}, "infer.set is not supported"),  # would be dropped silently otherwise
    ({"evaluate.config": "configs/infer/default.yaml"}, "evaluate.config is not supported"),
    ({"export.set": ["steps=1"]}, r"export.set is not supported .* put the settings in export.args"),
    ({"source_only.config": None}, "source_only.config"),
    # a config of the old chain: its finetune stage names the stages that replace it
    ({"stages": ["prep", "pretrain", "finetune"]}, "'finetune' was split in two: source_only .* and adapted"),
    ({"finetune.config": "configs/train/finetune_tiny.yaml"}, "Move the `finetune:` section to `adapted:`"),
])
def test_config_errors_name_the_problem(override, message):
    with pytest.raises(ConfigError, match=message):
        load_submit_config(LOCAL, override)


def test_dry_run_renders_valid_chained_scripts(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["slurm", "submit", "--config", str(EXAMPLE), "--dry-run", "--set", f"run_dir={run}"]) == 0
    out = capsys.readouterr().out
    assert "nothing submitted" in out
    scripts = sorted((run / "scripts").glob("*.sbatch"))
    assert [p.name for p in scripts] == ["00-prep.sbatch", "01-prep_finalize.sbatch", "02-pretrain.sbatch",
                                         "03-source_only.sbatch", "04-adapted.sbatch", "05-export.sbatch",
                                         "06-infer.sbatch", "07-evaluate.sbatch"]
    for script in scripts:
        text = script.read_text()
        assert "{{" not in text, script
        subprocess.run(["bash", "-n", str(script)], check=True)  # shell syntax
        assert "#SBATCH --partition=" in text and "#SBATCH --account=my_project" in text
    prep, _, pretrain, source_only, adapted, export, infer, evaluate = (p.read_text() for p in scripts)
    assert "#SBATCH --array=0-15" in prep and "#SBATCH --partition=cpu" in prep
    for line in ("--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--signal=B:USR1@600", "--requeue",
                 "--exclusive", "--constraint=a100", "--time=24:00:00"):
        assert f"#SBATCH {line}\n" in pretrain, line
    assert "srun --ntasks=8 --ntasks-per-node=4" in pretrain
    assert "export NCCL_SOCKET_IFNAME=ib0" in pretrain
    assert "export MASTER_" not in pretrain  # c2seg.distributed.slurm_master derives them in every task
    assert f"--set output_dir={run / 'train' / 'pretrain'}" in pretrain and "init_from" not in pretrain
    for stage, script, init_from in (("source_only", source_only, "pretrain"), ("adapted", adapted, "source_only")):
        assert f"train finetune --config {ROOT / f'configs/train/{stage}_c2seg_ab.yaml'} --resume auto" in script
        assert f"--set output_dir={run / 'train' / stage}" in script
        assert f"--set init_from={run / 'train' / init_from}" in script
    assert "--set steps=500" in source_only and "--set steps=2500" in adapted
    model = run / "models" / "adapted.pt"
    assert f"train export --run-dir {run / 'train' / 'adapted'} --out {model}" in export
    assert "#SBATCH --partition=cpu" in export and "srun" not in export
    assert f"infer run --model {model}" in infer and f"--out {run / 'predictions' / 'adapted'}" in infer
    assert "--city berlin" in infer and "#SBATCH --array=0-3" in infer and "--tta flips" in infer
    assert f"--pred {run / 'predictions' / 'adapted' / 'berlin'}" in evaluate
    assert "slurm.tracking close" in evaluate


def test_jobs_wait_for_the_stages_they_need(tmp_path, monkeypatch):
    """afterok on the last job of every stage a job needs: prep's finalize job for the training stages, the run a
    training stage starts from, the run export exports, then export -> infer -> evaluate."""
    submitted: dict[str, str | None] = {}

    def fake_sbatch(script, dependency=None, extra_env=None):
        submitted[script.stem.split("-", 1)[1]] = dependency
        return str(len(submitted))

    monkeypatch.setattr(submit, "run_slurm", lambda args, **kw: "")
    monkeypatch.setattr(submit, "check_partitions", lambda partitions: None)
    monkeypatch.setattr(submit, "sbatch", fake_sbatch)
    cfg = load_submit_config(LOCAL, {"run_dir": str(tmp_path / "run"), "mlflow.enabled": False})
    jobs = submit.submit_chain(cfg)
    assert [j.job_id for j in jobs] == [str(i) for i in range(1, 9)]
    assert submitted == {"prep": None, "prep_finalize": "afterok:1", "pretrain": "afterok:2",
                         "source_only": "afterok:2:3", "adapted": "afterok:2:4", "export": "afterok:5",
                         "infer": "afterok:6", "evaluate": "afterok:7"}


def test_a_sub_chain_waits_only_for_its_own_stages(tmp_path):
    cfg = load_submit_config(LOCAL, {"run_dir": str(tmp_path), "stages": ["prep", "adapted", "export"],
                                     "mlflow.enabled": False})
    jobs = submit.submit_chain(cfg, dry_run=True)
    assert [(j.name, j.after) for j in jobs] == [("prep", ()), ("prep_finalize", ("prep",)),
                                                 ("adapted", ("prep_finalize",)), ("export", ("adapted",))]
    adapted = jobs[2].script.read_text()
    assert f"--set data.prep_dir={tmp_path / 'prep'}" in adapted and "init_from" not in adapted


def test_missing_sbatch_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # no SLURM commands here
    assert main(["slurm", "submit", "--config", str(LOCAL), "--set", f"run_dir={tmp_path / 'run'}"]) == 1
    err = capsys.readouterr().err
    assert "'sbatch' not found on PATH" in err and "local_cluster.sh up" in err


@pytest.mark.parametrize("path", sorted((ROOT / "configs/slurm").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_slurm_configs_render_the_whole_chain(path, tmp_path):
    from c2seg.slurm.config import load_submit_config

    cfg = load_submit_config(path, {"run_dir": str(tmp_path / "run")})
    jobs = submit.submit_chain(cfg, dry_run=True, config_path=str(path))
    assert [j.name for j in jobs] == ["prep", "prep_finalize", "pretrain", "source_only", "adapted", "export",
                                      "infer", "evaluate"]
    for stage in ("pretrain", "source_only", "adapted"):
        script = (tmp_path / "run" / "scripts").glob(f"*-{stage}.sbatch")
        assert f"--config {ROOT / getattr(cfg, stage).config}" in next(script).read_text()
