"""State of a submitted chain (``RUN_DIR/chain.json``) from the queue and the jobs' exit-status files.

Each job writes ``RUN_DIR/status/<job>[_<task>].exit`` (its exit status, ``running`` or ``requeued``), so
the outcome stays known after SLURM forgets the job (accounting need not be on).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from c2seg.config import load_json_record
from c2seg.slurm.cluster import SlurmError, job_info, queue_states
from c2seg.slurm.render import Job

FAILED_STATES = ("FAILED", "CANCELLED")
CHAIN_FORMAT = "c2seg-chain/1"


def load_chain(run_dir: Path) -> dict:
    """The chain record written by ``c2seg slurm submit``."""
    return load_json_record(Path(run_dir) / "chain.json", CHAIN_FORMAT,
                            "no chain was submitted into this run directory")


def chain_jobs(chain: dict) -> list[Job]:
    return [Job(**{**j, "script": Path(j["script"])}) for j in chain["jobs"]]


@dataclass
class JobStatus:
    """Outcome of one job of the chain."""

    job: Job
    state: str  # PENDING, RUNNING, COMPLETED, FAILED, CANCELLED, UNKNOWN
    detail: str = ""
    log: Path | None = None


def _exit_files(run_dir: Path, job: Job) -> list[tuple[int | None, str | None]]:
    tasks = range(job.array_tasks) if job.array_tasks else [None]
    out = []
    for task in tasks:
        path = run_dir / "status" / (f"{job.name}_{task}.exit" if task is not None else f"{job.name}.exit")
        out.append((task, path.read_text().strip() if path.is_file() else None))
    return out


def job_nodes(run_dir: Path, job: Job) -> list[str]:
    """The node lists the job (each array task) last ran on, as the jobs recorded them, in task order."""
    tasks = range(job.array_tasks) if job.array_tasks else [None]
    files = [Path(run_dir) / "status" / (f"{job.name}_{t}.nodes" if t is not None else f"{job.name}.nodes") for t in tasks]
    return [f.read_text().strip() for f in files if f.is_file() and f.read_text().strip()]


def job_status(run_dir: Path, job: Job, query_slurm: bool = True) -> JobStatus:
    """Where one job stands: queue first, then its exit-status files."""
    run_dir = Path(run_dir)
    if query_slurm:
        try:
            states = queue_states(job.job_id)
        except SlurmError:
            states = []
        if states:
            state = "RUNNING" if "RUNNING" in states else states[0]
            return JobStatus(job, state, f"{len(states)} task(s) in the queue", job.log_path(run_dir))
    exits = _exit_files(run_dir, job)
    for task, code in exits:
        if code is not None and code not in ("0", "running", "requeued"):
            return JobStatus(job, "FAILED", f"exit {code}" + (f" in array task {task}" if task is not None else ""),
                             job.log_path(run_dir, task))
    if all(code == "0" for _, code in exits):
        return JobStatus(job, "COMPLETED", "", job.log_path(run_dir))
    slurm_state = job_info(job.job_id).get("JobState", "") if query_slurm else ""
    task, code = next((t, c) for t, c in exits if c != "0")
    if code is None and not slurm_state:
        return JobStatus(job, "CANCELLED" if query_slurm else "UNKNOWN", "never started (an earlier job failed, "
                         "or it was cancelled)", None)
    if code in ("running", "requeued") and not query_slurm:
        return JobStatus(job, "RUNNING", code, job.log_path(run_dir, task))
    return JobStatus(job, "FAILED" if code else "CANCELLED",
                     f"ended without exit status (SLURM state {slurm_state or 'unknown'}: killed, time limit or "
                     "node failure)" if code else f"SLURM state {slurm_state}", job.log_path(run_dir, task))


def first_failure(states: list[JobStatus]) -> JobStatus | None:
    """The job to blame when the chain failed: the first FAILED one, else the first CANCELLED one."""
    failed = [s for s in states if s.state in FAILED_STATES]
    return next((s for s in failed if s.state == "FAILED"), failed[0]) if failed else None


def chain_status(run_dir: Path, query_slurm: bool = True) -> list[JobStatus]:
    """Status of every job of the chain in submission order."""
    chain = load_chain(run_dir)
    return [job_status(Path(run_dir), job, query_slurm) for job in chain_jobs(chain)]


def _tail(path: Path | None, lines: int = 15) -> str:
    if path is None or not path.is_file():
        return ""
    text = path.read_text(errors="replace").splitlines()[-lines:]
    return "\n".join("    " + line for line in text)


def failure_message(st: JobStatus) -> str:
    """Which stage failed, how, and where its log is (with the log's last lines)."""
    msg = f"stage {st.job.name} (job {st.job.job_id}) {st.state.lower()}: {st.detail}"
    if st.log is not None:
        msg += f"; log: {st.log}"
        tail = _tail(st.log)
        if tail:
            msg += f"\n  last lines:\n{tail}"
    return msg


def wait_chain(run_dir: Path, timeout_s: float = 3600, poll_s: float = 2.0, progress=None) -> list[JobStatus]:
    """Wait until every job completed; SlurmError naming the failed stage and its log otherwise."""
    deadline = time.monotonic() + timeout_s
    last = ""
    while True:
        states = chain_status(run_dir)
        summary = ", ".join(f"{s.job.name} {s.state}" for s in states)
        if progress is not None and summary != last:
            progress(summary)
            last = summary
        failed = first_failure(states)
        if failed is not None:
            raise SlurmError(failure_message(failed))
        if all(s.state == "COMPLETED" for s in states):
            return states
        if time.monotonic() > deadline:
            raise SlurmError(f"chain in {run_dir} not done after {timeout_s:.0f} s: {summary}")
        time.sleep(poll_s)
