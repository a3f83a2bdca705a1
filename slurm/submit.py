"""Submit a chain of stage jobs: render the scripts, sbatch each with ``--dependency=afterok`` on the jobs of
the stages it needs, record the job ids in ``RUN_DIR/chain.json`` and tie the stages together in one MLflow
parent run."""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict
from pathlib import Path

from c2seg.slurm import tracking
from c2seg.slurm.cluster import SlurmError, check_partitions, run_slurm, sbatch
from c2seg.slurm.config import SubmitConfig
from c2seg.slurm.render import REPO_ROOT, Job, render_chain
from c2seg.slurm.status import CHAIN_FORMAT

log = logging.getLogger("c2seg.slurm")


def run_dir_of(cfg: SubmitConfig) -> Path:
    """The chain's run directory (relative paths are taken from the jobs' working directory)."""
    return (Path(cfg.workdir or REPO_ROOT) / cfg.run_dir).resolve()


def submit_chain(cfg: SubmitConfig, dry_run: bool = False, config_path: str = "") -> list[Job]:
    """Render and (unless ``dry_run``) submit the chain; returns the jobs with their ids."""
    run_dir = run_dir_of(cfg)
    if dry_run:
        jobs = render_chain(cfg, run_dir)
        log.info("dry run: %d scripts rendered in %s, nothing submitted", len(jobs), run_dir / "scripts")
        return jobs
    run_slurm(["sbatch", "--version"])  # clear error when SLURM is not installed
    check_partitions({cfg.resources_for(stage).partition for stage in cfg.stages})
    if (run_dir / "status").exists():
        shutil.rmtree(run_dir / "status")  # outcomes of an earlier submission into this run dir
    exports, runs, uri = {}, None, None
    if cfg.mlflow.enabled:
        uri = tracking.default_tracking_uri(Path(cfg.workdir or REPO_ROOT)) if not cfg.mlflow.tracking_uri \
            else cfg.mlflow.tracking_uri
        runs = tracking.start_chain(uri, cfg.mlflow.experiment, run_dir.name, list(cfg.stages),
                                    {"c2seg.run_dir": str(run_dir), "c2seg.config": config_path})
        exports["MLFLOW_TRACKING_URI"] = uri
        if runs:
            exports["C2SEG_MLFLOW_PARENT_RUN_ID"] = runs["parent"]
    jobs = render_chain(cfg, run_dir, exports)
    job_ids: dict[str, str] = {}  # job name -> id
    for job in jobs:
        extra = {"C2SEG_MLFLOW_RUN_ID": runs[job.stage]} if runs else None
        dependency = "afterok:" + ":".join(job_ids[name] for name in job.after) if job.after else None
        try:
            job.job_id = job_ids[job.name] = sbatch(job.script, dependency, extra)
        except SlurmError as exc:
            cancelled = [j.job_id for j in jobs if j.job_id]
            _withdraw(cancelled, uri, runs)
            raise SlurmError(f"stage {job.stage} was not submitted: {exc}; the chain was withdrawn (cancelled the "
                             f"jobs already submitted: {', '.join(cancelled) or 'none'}); fix the cause and submit "
                             "again") from exc
        log.info("submitted %-14s job %s%s", job.name, job.job_id,
                 f" (array of {job.array_tasks})" if job.array_tasks else "")
    record = {
        "format": CHAIN_FORMAT,
        "submitted": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "config": config_path,
        "run_dir": str(run_dir),
        "tracking_uri": uri,
        "mlflow_runs": runs,
        "jobs": [{**asdict(j), "script": str(j.script)} for j in jobs],
    }
    (run_dir / "chain.json").write_text(json.dumps(record, indent=2))
    if runs:
        tracking.tag_jobs(uri, runs, record["jobs"])
    return jobs


def _withdraw(job_ids: list[str], uri: str | None, runs: dict[str, str] | None) -> None:
    """Cancel the jobs of a chain whose submission failed midway and end its MLflow runs as KILLED, so a
    half-submitted chain leaves nothing behind."""
    if job_ids:
        run_slurm(["scancel", *job_ids])
    if runs and uri:
        tracking.end_runs(uri, runs, "KILLED")
