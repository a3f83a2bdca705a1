"""The job layout seen by every stage: SLURM array tasks and ranks."""

import pytest

from c2seg.distributed import array_task, detect_env


@pytest.mark.parametrize("env, given, expected", [
    ({}, (None, None), (0, 1)),
    ({"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "3", "SLURM_ARRAY_TASK_COUNT": "4"}, (None, None), (2, 4)),
    ({"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "2"}, (0, 3), (0, 3)),  # flags win
])
def test_array_task(monkeypatch, env, given, expected):
    for key in ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_COUNT"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert array_task(*given) == expected


def test_array_task_out_of_range():
    with pytest.raises(ValueError, match="outside 0..1"):
        array_task(2, 2)


def test_srun_variables_become_torch_ones(monkeypatch):
    import os

    # detect_env exports RANK etc.: give it a private copy of the environment
    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items()
                                        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")})
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_JOB_ID", "1234")
    monkeypatch.setenv("MASTER_ADDR", "node7")
    env = detect_env()
    assert (env.rank, env.world_size, env.local_rank, env.launcher) == (3, 4, 1, "slurm")

    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("3", "4", "1")
    assert os.environ["MASTER_PORT"] == str(29500 + 1234)
