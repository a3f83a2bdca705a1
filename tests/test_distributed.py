"""The job layout seen by every stage: SLURM array tasks and ranks."""

import subprocess
import sys

import pytest

from c2seg.distributed import array_task, detect_env, slurm_master


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
    assert os.environ["MASTER_PORT"] == "28638"  # slurm_master: 20000 + (1234 * 7 + 0) % 40000


@pytest.mark.parametrize("job_id, restarts, port", [
    ("1234", None, 28638),  # no SLURM_RESTART_COUNT: a job that was never requeued
    ("1234", "1", 28639),  # requeued: a fresh port, the old store's may linger in TIME_WAIT
    ("123456", "2", 44194),  # 20000 + (864192 + 2) % 40000
    ("5714", "2", 20000),  # the formula wraps at 40000 ports
])
def test_slurm_master_port_comes_from_job_id_and_requeue_count(job_id, restarts, port):
    env = {"SLURM_JOB_ID": job_id, "SLURM_JOB_NODELIST": "node7"}
    if restarts is not None:
        env["SLURM_RESTART_COUNT"] = restarts
    assert slurm_master(env) == ("node7", port)


def test_exit_without_teardown_keeps_the_code_and_the_buffered_output(tmp_path):
    """A finished multi-rank run ends through it: its exit status and its last log lines (still buffered in
    the file handler and stdout) must survive skipping the interpreter's teardown; atexit handlers must not run."""
    script = ("import atexit, logging, sys\n"
              "from c2seg.distributed import exit_without_teardown\n"
              f"logging.basicConfig(filename={str(tmp_path / 'log')!r}, level=logging.INFO)\n"
              "atexit.register(print, 'atexit ran')\n"
              "logging.getLogger('run').info('finished: 7 steps')\n"
              "sys.stdout.write('last line')\n"
              "exit_without_teardown(3)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stdout) == (3, "last line")
    assert (tmp_path / "log").read_text() == "INFO:run:finished: 7 steps\n"
