"""Checkpoints of a run: DeepSpeed state (model, optimizer, LR schedule; per-rank ZeRO partitions),
the data position, and consolidated fp32 weights (plus the task's extras, e.g. the EMA teacher) for
export / init / a restart at another world size. No RNG state is stored: training reseeds per
micro-batch (train/determinism.py), so the position alone fixes every random draw after a resume.

Layout: ``OUTPUT/checkpoints/step_00000100/`` (DeepSpeed files, ``train_state.json``, ``weights.pt``)
and ``OUTPUT/checkpoints/LATEST`` naming the newest complete one; LATEST is replaced atomically only
after every rank finished writing, so a kill -9 mid-save leaves the previous checkpoint in charge.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
from pathlib import Path
from typing import Any

import torch

from c2seg.distributed import any_rank, barrier, rank
from c2seg.spec import DatasetSpec, spec_compatible, spec_from_dict
from train.engine import full_state_dict

log = logging.getLogger("c2seg.train")
WEIGHTS_FORMAT = "c2seg-weights/1"


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, or does not fit this run."""


class StopRequest:
    """Set by SIGTERM / SIGUSR1; checked at step boundaries, where all ranks agree (any rank asked)."""

    def __init__(self) -> None:
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame) -> None:  # noqa: ARG002
        log.warning("received %s: will checkpoint and stop at the next step boundary", signal.Signals(signum).name)
        self.requested = True

    def agreed(self) -> bool:
        return any_rank(self.requested)


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run dir, or None."""
    root = checkpoint_dir(output_dir)
    marker = root / "LATEST"
    if not marker.is_file():
        return None
    path = root / marker.read_text().strip()
    return path if (path / "train_state.json").is_file() else None


def save_checkpoint(engine, output_dir: str | Path, state: dict[str, Any], weights_meta: dict[str, Any],
                    extra_weights: dict[str, dict[str, torch.Tensor]] | None = None, keep: int = 2) -> Path:
    """Write a checkpoint at ``state["step"]`` (collective: every rank calls it)."""
    root = checkpoint_dir(output_dir)
    tag = f"step_{state['step']:08d}"
    path = root / tag
    engine.save_checkpoint(str(root), tag=tag, save_latest=False)
    weights = full_state_dict(engine, rank0_only=True)  # only rank 0 writes weights.pt
    if rank() == 0:
        torch.save({"format": WEIGHTS_FORMAT, "model": weights, **(extra_weights or {}), **weights_meta,
                    "step": state["step"]}, path / "weights.pt")
        (path / "train_state.json").write_text(json.dumps(state, indent=1))
    barrier()
    if rank() == 0:
        tmp = root / "LATEST.tmp"
        tmp.write_text(tag)
        os.replace(tmp, root / "LATEST")
        old = sorted(p for p in root.glob("step_*") if p.is_dir() and p.name != tag)
        for stale in old[: max(0, len(old) - (keep - 1))]:
            shutil.rmtree(stale, ignore_errors=True)
        log.info("checkpoint saved: %s", path)
    barrier()
    return path


def resolve_resume(resume: str | None, output_dir: str | Path) -> Path | None:
    """``--resume``: None (fresh start), ``auto`` (newest checkpoint of the run dir, if any) or a path."""
    if resume is None:
        return None
    if resume == "auto":
        found = latest_checkpoint(output_dir)
        if found is None:
            log.info("--resume auto: no checkpoint in %s, starting from step 0", checkpoint_dir(output_dir))
        return found
    path = Path(resume)
    if not (path / "train_state.json").is_file():
        raise CheckpointError(f"--resume {resume}: not a complete checkpoint folder (no train_state.json); "
                              f"checkpoints are OUTPUT/checkpoints/step_N")
    return path


def saved_state(path: Path) -> dict[str, Any]:
    """The train state a checkpoint folder was written at (step, world size, ZeRO stage, ...)."""
    return json.loads((path / "train_state.json").read_text())


def load_checkpoint(engine, path: Path, world_size: int) -> dict[str, Any]:
    """Restore engine, optimizer and LR schedule; returns the saved train state."""
    state = saved_state(path)
    restart = (f"or restart from its consolidated weights with a fresh optimizer: --set "
               f"init_from={path / 'weights.pt'} (and a new output_dir)")
    if state["world_size"] != world_size:
        raise CheckpointError(
            f"checkpoint {path} was written by {state['world_size']} ranks, this job has {world_size}: ZeRO "
            f"optimizer partitions do not fit. Resume with {state['world_size']} ranks, {restart}")
    stage = engine.zero_optimization_stage()
    if state.get("zero_stage", stage) != stage:
        raise CheckpointError(
            f"checkpoint {path} was written under ZeRO-{state['zero_stage']}, this job runs ZeRO-{stage}: its "
            f"optimizer state is laid out for the other stage. Resume with --set "
            f"deepspeed.zero_stage={state['zero_stage']}, {restart}")
    try:
        loaded, _ = engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True,
                                           load_lr_scheduler_states=True)
    except ValueError as exc:
        if "parameter group" not in str(exc):  # torch's words when the saved groups are not this optimizer's
            raise
        raise CheckpointError(
            f"checkpoint {path}: its optimizer state does not fit this run's parameter groups ({exc}); it was "
            f"written by another model or c2seg version. Resume with the version that wrote it, {restart}") from exc
    if loaded is None:
        raise CheckpointError(f"DeepSpeed could not load checkpoint {path}")
    log.info("resumed from %s at step %d", path, state["step"])
    return state


def load_weights(path: str | Path, spec: DatasetSpec | None = None) -> dict[str, Any]:
    """Consolidated weights from a run dir (its newest checkpoint), a checkpoint folder or a weights /
    exported model file; checked against ``spec`` when given."""
    path = Path(path)
    if path.is_dir():
        ckpt = latest_checkpoint(path) if (path / "checkpoints").is_dir() else path
        if ckpt is None or not (ckpt / "weights.pt").is_file():
            raise CheckpointError(f"{path}: no complete checkpoint with weights.pt found")
        path = ckpt / "weights.pt"
    if not path.is_file():
        raise CheckpointError(f"{path}: weights file not found")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise CheckpointError(f"{path}: not a readable c2seg weights file ({exc})") from exc
    if not isinstance(data, dict) or "spec" not in data or ("model" not in data and "state_dict" not in data):
        raise CheckpointError(f"{path}: not a c2seg weights file (no spec / model weights)")
    if spec is not None:
        problems = spec_compatible(spec_from_dict(data["spec"], source=str(path)), spec)
        if problems:
            raise CheckpointError(f"{path}: the dataset spec does not match the checkpoint: " + "; ".join(problems))
    return data
