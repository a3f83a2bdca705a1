"""slurm package without a cluster: config checks, rendered job scripts, --dry-run, missing sbatch."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from c2seg.cli import main
from c2seg.config import ConfigError
from slurm.config import load_submit_config

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
    assert local.resources_for("finetune").tasks_per_node == 2


@pytest.mark.parametrize("override, message", [
    ({"resources.gpu": 1}, "unknown key 'resources.gpu'"),
    ({"stages": ["infer", "prep"]}, "pipeline order"),
    ({"stages": ["bogus"]}, "is not one of"),
    ({"pretrain.config": None}, "pretrain.config"),
    ({"resources.extra_sbatch": ["exclusive"]}, "must be an sbatch option"),
    ({"infer.set": ["window=64"]}, "infer.set is not supported"),  # would be dropped silently otherwise
    ({"evaluate.config": "configs/infer/default.yaml"}, "evaluate.config is not supported"),
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
                                         "03-finetune.sbatch", "04-infer.sbatch", "05-evaluate.sbatch"]
    for script in scripts:
        text = script.read_text()
        assert "{{" not in text, script
        subprocess.run(["bash", "-n", str(script)], check=True)  # shell syntax
        assert "#SBATCH --partition=" in text and "#SBATCH --account=my_project" in text
    prep, _, pretrain, finetune, infer, evaluate = (p.read_text() for p in scripts)
    assert "#SBATCH --array=0-15" in prep and "#SBATCH --partition=cpu" in prep
    for line in ("--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--signal=B:USR1@600", "--requeue",
                 "--exclusive", "--constraint=a100", "--time=24:00:00"):
        assert f"#SBATCH {line}\n" in pretrain, line
    assert "srun --ntasks=8 --ntasks-per-node=4" in pretrain
    assert "export NCCL_SOCKET_IFNAME=ib0" in pretrain and "MASTER_ADDR=$(scontrol show hostnames" in pretrain
    assert f"--set output_dir={run / 'train' / 'pretrain'}" in pretrain
    assert f"--set init_from={run / 'train' / 'pretrain'}" in finetune
    assert f"train export --run-dir {run / 'train' / 'finetune'} --out {run / 'models' / 'model.pt'}" in finetune
    assert "--city berlin" in infer and "#SBATCH --array=0-3" in infer and "--tta flips" in infer
    assert "slurm.tracking close" in evaluate


def test_missing_sbatch_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # no SLURM commands here
    assert main(["slurm", "submit", "--config", str(LOCAL), "--set", f"run_dir={tmp_path / 'run'}"]) == 1
    err = capsys.readouterr().err
    assert "'sbatch' not found on PATH" in err and "local_cluster.sh up" in err
