"""MLflow runs of a submitted chain: one parent run per submission and one child run per stage.

At submit time the parent run and a child run per stage are created; every job gets
``C2SEG_MLFLOW_PARENT_RUN_ID`` (the parent) and ``C2SEG_MLFLOW_RUN_ID`` (its stage's child run) in its
environment, and ``MLFLOW_TRACKING_URI``. ``infer evaluate`` logs its scores into the evaluate child run.
:func:`close_chain` (run by the last job and by ``c2seg slurm status``) ends the child runs with their
jobs' outcome, tags them with the nodes each job ran on (``slurm.<job>.nodes``), and nests the training
stages' own MLflow runs (``<output_dir>/mlflow_run_id``) under the
parent. Tracking problems only warn: they never stop a submission.

    python -m c2seg.slurm.tracking close RUN_DIR
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

from c2seg.train.tracking import TrackingCall

log = logging.getLogger("c2seg.slurm")
PARENT_TAG = "mlflow.parentRunId"


def default_tracking_uri(workdir: Path) -> str:
    """MLFLOW_TRACKING_URI, else the sqlite store the stages use by default, made absolute."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(workdir / 'mlflow.db').resolve()}"


def _client(uri: str):
    """An MLflow client; call it inside a TrackingCall (which bounds its requests)."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def start_chain(uri: str, experiment: str, run_name: str, stages: list[str],
                tags: dict[str, str]) -> dict[str, str] | None:
    """Create the parent run and one child run per stage; ``{"parent": id, stage: id, ...}`` or None
    when MLflow cannot be reached (a warning says why)."""
    with TrackingCall("tracking of the chain disabled", log):
        client = _client(uri)
        exp = client.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
        parent = client.create_run(exp_id, run_name=run_name, tags={**tags, "c2seg.kind": "slurm-chain"})
        ids = {"parent": parent.info.run_id}
        for stage in stages:
            child = client.create_run(exp_id, run_name=f"{run_name}/{stage}",
                                      tags={**tags, PARENT_TAG: parent.info.run_id, "c2seg.stage": stage})
            ids[stage] = child.info.run_id
        log.info("MLflow parent run %s in %s (experiment %s)", ids["parent"], uri, experiment)
        return ids
    return None


def tag_jobs(uri: str, runs: dict[str, str], jobs: list[dict]) -> None:
    """Tag each stage's child run with its job ids, scripts and log patterns."""
    with TrackingCall("tags not set", log):
        client = _client(uri)
        for job in jobs:
            run_id = runs.get(job["stage"])
            if run_id:
                client.set_tag(run_id, f"slurm.{job['name']}.job_id", job["job_id"])
                client.set_tag(run_id, f"slurm.{job['name']}.script", job["script"])


def end_runs(uri: str, runs: dict[str, str], status: str) -> None:
    """End every run of a chain (parent and stages) with ``status``."""
    with TrackingCall("runs not ended", log):
        client = _client(uri)
        for run_id in runs.values():
            client.set_terminated(run_id, status)


def close_chain(run_dir: Path) -> None:
    """End the chain's MLflow runs with the jobs' outcome (idempotent; runs already ended are kept)."""
    from c2seg.slurm.status import FAILED_STATES, chain_status, first_failure, job_nodes, load_chain

    run_dir = Path(run_dir)
    chain = load_chain(run_dir)
    runs, uri = chain.get("mlflow_runs"), chain.get("tracking_uri")
    if not runs or not uri:
        return
    with TrackingCall(f"runs of {run_dir} not closed", log):
        client = _client(uri)
        states = chain_status(run_dir, query_slurm=False)
        chain_failed = first_failure(states) is not None
        by_stage: dict[str, list[str]] = {}
        for st in states:
            by_stage.setdefault(st.job.stage, []).append(st.state)
        for st in states:  # where each job ran: slurm.<job>.nodes, one node list per array task
            nodes = job_nodes(run_dir, st.job)
            if nodes and runs.get(st.job.stage):
                client.set_tag(runs[st.job.stage], f"slurm.{st.job.name}.nodes", " ".join(nodes))
        for stage, job_states in by_stage.items():
            run_id = runs.get(stage)
            id_file = run_dir / "train" / stage / "mlflow_run_id"
            if id_file.is_file():  # the training stage's own run, nested under the chain
                train_run = id_file.read_text().strip()
                client.set_tag(train_run, PARENT_TAG, runs["parent"])
                client.set_tag(run_id, "c2seg.train_run_id", train_run)
            if not run_id or client.get_run(run_id).info.status != "RUNNING":
                continue
            if any(s in FAILED_STATES for s in job_states):
                client.set_terminated(run_id, "FAILED")
            elif all(s == "COMPLETED" for s in job_states):
                client.set_terminated(run_id, "FINISHED")
            elif chain_failed:  # never ran: an earlier stage failed
                client.set_terminated(run_id, "KILLED")
        parent = runs["parent"]
        if client.get_run(parent).info.status == "RUNNING":
            if chain_failed:
                client.set_terminated(parent, "FAILED")
            elif all(s.state == "COMPLETED" for s in states):
                client.set_terminated(parent, "FINISHED")


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] != "close":
        print("usage: python -m c2seg.slurm.tracking close RUN_DIR", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    close_chain(Path(argv[1]))
    print(json.dumps({"closed": argv[1]}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
