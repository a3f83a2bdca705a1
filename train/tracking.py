"""MLflow tracking on rank 0 that never stops training: every call is guarded, and a tracking server
that is down gives one warning, after which tracking is off for the run.

The URI comes from MLFLOW_TRACKING_URI (default: the local ``sqlite:///mlflow.db`` store).
:class:`TrackingCall` is the one guard of every MLflow call of the project (training, the slurm chain's
runs, ``infer evaluate``): it bounds MLflow's HTTP requests (no retries, a 5 s timeout, unless the user
set MLFLOW_HTTP_REQUEST_MAX_RETRIES / MLFLOW_HTTP_REQUEST_TIMEOUT), so a dead server costs seconds, and
turns any MLflow error into one warning line.
"""

from __future__ import annotations

import logging
import os
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Any, Callable


log = logging.getLogger("c2seg.train")
REQUEST_BOUNDS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}


class TrackingCall:
    """``with TrackingCall("what failed", log) as call:`` around MLflow calls that must never stop the job:
    requests are bounded (REQUEST_BOUNDS, unless set in the environment), and an error inside becomes one
    warning, ``MLflow <what failed>: <the error's first line>``, with ``call.failed`` set."""

    def __init__(self, failure: str, logger: logging.Logger = log) -> None:
        self.failure, self.logger, self.failed = failure, logger, False

    def __enter__(self) -> TrackingCall:
        for name, value in REQUEST_BOUNDS.items():
            os.environ.setdefault(name, value)
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> bool:
        if not isinstance(exc, Exception):  # no error, or KeyboardInterrupt / SystemExit: not ours to swallow
            return False
        self.failed = True
        self.logger.warning("MLflow %s: %s", self.failure, (str(exc).strip().splitlines() or [repr(exc)])[0][:300])
        return True


def _flatten(data: Any, prefix: str = "") -> dict[str, str]:
    if isinstance(data, dict):
        out: dict[str, str] = {}
        for k, v in data.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: str(data)[:500]}


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                              cwd=Path(__file__).resolve().parent, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class Tracker:
    """MLflow run of a training job. Every rank has one: on ranks other than 0 (``enabled`` False there), when
    disabled or once MLflow failed, every call is a no-op, so callers never check which rank they run on."""

    def __init__(self, enabled: bool, experiment: str, run_name: str | None, run_dir: Path) -> None:
        self.active = False
        self.resumed = False
        if not enabled:
            return
        id_file = run_dir / "mlflow_run_id"
        with TrackingCall("tracking disabled") as call:
            import mlflow

            self.mlflow = mlflow
            mlflow.set_experiment(experiment)
            previous = id_file.read_text().strip() if id_file.is_file() else None
            run = mlflow.start_run(run_id=previous) if previous else mlflow.start_run(run_name=run_name)
            id_file.write_text(run.info.run_id)
            self.resumed = previous is not None
            log.info("MLflow run %s in %s (experiment %s)", run.info.run_id, mlflow.get_tracking_uri(), experiment)
        self.active = not call.failed

    def _guard(self, what: str, *args, **kwargs) -> None:
        if not self.active:
            return
        with TrackingCall(f"{what} failed, tracking disabled for this run") as call:
            getattr(self.mlflow, what)(*args, **kwargs)
        self.active = not call.failed

    def params(self, config: dict[str, Any]) -> None:
        """Log the resolved config once (a resumed run keeps the params it started with; MLflow refuses
        changed values)."""
        if self.resumed:
            return
        flat = _flatten(config)
        items = list(flat.items())
        for i in range(0, len(items), 90):
            self._guard("log_params", dict(items[i:i + 90]))

    def tags(self, tags: dict[str, Any]) -> None:
        self._guard("set_tags", {k: str(v) for k, v in tags.items()})

    def metrics(self, values: dict[str, float], step: int) -> None:
        self._guard("log_metrics", values, step=step)

    def artifact(self, path: str | Path, folder: str | None = None) -> None:
        self._guard("log_artifact", str(path), folder)

    def figure(self, draw: Callable[[], Any], name: str) -> None:
        """Log the figure ``draw()`` makes as ``figures/<name>``; drawn only when there is a run to log it to."""
        if not self.active:
            return
        fig = draw()
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            fig.savefig(path, dpi=80, bbox_inches="tight")
            self.artifact(path, "figures")

    def close(self, status: str = "FINISHED") -> None:
        self._guard("end_run", status)
        self.active = False
