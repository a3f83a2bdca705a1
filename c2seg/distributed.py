"""Small distributed helper: map torchrun / deepspeed / SLURM variables onto one view of the job.

Mirrors what open_clip does: under ``srun`` each task sees SLURM_PROCID / SLURM_NTASKS /
SLURM_LOCALID, which are exported as RANK / WORLD_SIZE / LOCAL_RANK so that torch.distributed and
DeepSpeed initialise the same way whatever launched the job.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass


@dataclass(frozen=True)
class DistEnv:
    """Rank layout of the current process."""

    rank: int
    world_size: int
    local_rank: int
    launcher: str  # "torchrun", "slurm" or "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _first_host(nodelist: str) -> str:
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             check=True, timeout=30).stdout.split()
        return out[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return nodelist.split(",")[0].split("[")[0] or "127.0.0.1"


def detect_env(default_port: int = 29500) -> DistEnv:
    """Work out the rank layout and export RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        launcher = "torchrun"
        rank, world, local = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    elif "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        launcher = "slurm"
        rank, world = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
        local = int(env.get("SLURM_LOCALID", 0))
        if "MASTER_ADDR" not in env:
            env["MASTER_ADDR"] = _first_host(env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "")))
        if "MASTER_PORT" not in env:
            # a port derived from the job id so that two jobs on one node do not collide
            env["MASTER_PORT"] = str(default_port + int(env.get("SLURM_JOB_ID", "0")) % 10000)
    else:
        return DistEnv(0, 1, 0, "single")
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    env.setdefault("MASTER_PORT", str(default_port))
    env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"] = str(rank), str(world), str(local)
    return DistEnv(rank, world, local, launcher)


def array_task(task_index: int | None = None, num_tasks: int | None = None) -> tuple[int, int]:
    """(task index, task count) of this SLURM array task: given values win, else SLURM_ARRAY_TASK_ID
    (relative to SLURM_ARRAY_TASK_MIN) / SLURM_ARRAY_TASK_COUNT, else (0, 1)."""
    env = os.environ
    if num_tasks is None:
        num_tasks = int(env.get("SLURM_ARRAY_TASK_COUNT", 1))
    if task_index is None:
        task_index = int(env.get("SLURM_ARRAY_TASK_ID", 0)) - int(env.get("SLURM_ARRAY_TASK_MIN", 0))
    if not 0 <= task_index < num_tasks:
        raise ValueError(f"task index {task_index} is outside 0..{num_tasks - 1}")
    return task_index, num_tasks
