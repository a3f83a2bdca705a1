"""Thin wrappers around the SLURM client commands (sbatch, squeue, sinfo, scontrol) with clear errors.

When ``SLURM_CONF`` is not set and the local cluster of ``slurm/local_cluster.sh`` is up, its config is
used, so the tool works on a workstation without further setup.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path

from c2seg.errors import C2SegError

LOCAL_CLUSTER_SCRIPT = Path(__file__).resolve().parent / "local_cluster.sh"
MULTINODE_CLUSTER_SCRIPT = Path(__file__).resolve().parent / "multinode_cluster.sh"


class SlurmError(C2SegError):
    """A SLURM command is missing, refused a request or a job of the chain failed."""


def local_conf() -> Path:
    """slurm.conf of the local cluster (``$C2SEG_SLURM_DIR``, default /tmp/c2seg-slurm)."""
    return Path(os.environ.get("C2SEG_SLURM_DIR", "/tmp/c2seg-slurm")) / "etc" / "slurm.conf"


def slurm_env() -> dict[str, str]:
    """The environment for SLURM commands: ours, plus SLURM_CONF of the local cluster when unset."""
    env = os.environ.copy()
    if "SLURM_CONF" not in env and not Path("/etc/slurm/slurm.conf").exists() and local_conf().is_file():
        env["SLURM_CONF"] = str(local_conf())
    return env


def run_slurm(args: list[str], timeout: float = 60) -> str:
    """Run a SLURM client command and return its stdout; SlurmError naming the command on failure."""
    if shutil.which(args[0]) is None:
        raise SlurmError(f"'{args[0]}' not found on PATH: run this on a SLURM login node, or start the local "
                         f"cluster with `{LOCAL_CLUSTER_SCRIPT} up` (installs slurm-wlm when run as root)")
    try:
        res = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=slurm_env())
    except subprocess.TimeoutExpired as exc:
        raise SlurmError(f"`{' '.join(args)}` did not answer within {timeout:.0f} s (is slurmctld up?)") from exc
    if res.returncode != 0:
        msg = (res.stderr or res.stdout).strip() or f"exit status {res.returncode}"
        raise SlurmError(f"`{' '.join(args)}` failed: {msg}")
    return res.stdout


def partitions() -> list[str]:
    """Partitions the controller knows (the default one carries no '*' here)."""
    return sorted({p.strip().rstrip("*") for p in run_slurm(["sinfo", "-h", "-o", "%P"]).split() if p.strip()})


def check_partitions(names: Iterable[str | None]) -> None:
    """Fail clearly when a partition of ``names`` does not exist (None: the cluster's default partition);
    asks the controller once."""
    known = partitions()
    if not known:
        raise SlurmError("the SLURM controller reports no partitions")
    for name in names:
        if name is not None and name not in known:
            raise SlurmError(f"partition '{name}' does not exist on this cluster (partitions: {', '.join(known)}); "
                             "set resources.partition in the slurm config")


def sbatch(script: Path, dependency: str | None = None, extra_env: dict[str, str] | None = None) -> str:
    """Submit ``script``; returns the job id. ``dependency`` like ``afterok:123``; its job being gone or
    failed cancels this one (--kill-on-invalid-dep)."""
    args = ["sbatch", "--parsable"]
    if dependency:
        args += [f"--dependency={dependency}", "--kill-on-invalid-dep=yes"]
    if extra_env:
        args.append("--export=ALL," + ",".join(f"{k}={v}" for k, v in extra_env.items()))
    args.append(str(script))
    out = run_slurm(args).strip()
    job_id = out.split(";")[0]
    if not job_id.isdigit():
        raise SlurmError(f"sbatch {script}: unexpected answer '{out}'")
    return job_id


def queue_states(job_id: str) -> list[str]:
    """States (PENDING, RUNNING, ...) of the job's array tasks or of the job while it is in the queue."""
    out = run_slurm(["squeue", "-h", "-r", "-j", job_id, "-o", "%T"], timeout=30)
    return [s for s in out.split() if s]


def job_info(job_id: str) -> dict[str, str]:
    """``scontrol show job`` as key=value pairs of the job (first array task); {} once SLURM forgot it."""
    try:
        out = run_slurm(["scontrol", "show", "job", "-o", job_id], timeout=30)
    except SlurmError:
        return {}
    line = out.splitlines()[0] if out.strip() else ""
    return dict(item.split("=", 1) for item in line.split() if "=" in item)
