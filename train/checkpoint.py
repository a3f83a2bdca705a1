"""Checkpoints of a run: DeepSpeed state (model, optimizer, LR schedule; per-rank ZeRO partitions),
the data position, and consolidated fp32 weights (plus the task's extras, e.g. the EMA teacher) for
export / init / a restart at another world size. No RNG state is stored: training reseeds per
micro-batch (train/determinism.py), so the position alone fixes every random draw after a resume.

Layout: ``OUTPUT/checkpoints/step_00000100/`` (DeepSpeed files, ``train_state.json``, ``weights.pt``)
and ``OUTPUT/checkpoints/LATEST`` naming the newest complete one; LATEST is replaced atomically only
after every rank finished writing, so a kill -9 mid-save leaves the previous checkpoint in charge.

Nothing on disk is trusted. ``train_state.json`` is written last and lists every file of the checkpoint
with its size and sha256: ``--resume auto`` skips (and logs) a newest checkpoint that is unfinished,
truncated or has a state file that is not JSON, and resumes from the newest intact one. Before DeepSpeed
opens a checkpoint (its loader unpickles in full), every ``.pt`` file is hashed against that list and
loaded with torch's ``weights_only`` unpickler, allowing only the classes DeepSpeed stores; a file that
holds anything else is refused. ``weights.pt`` and exported models carry a sha256 of their tensors.
"""

from __future__ import annotations

import json
import logging
import pickle
import shutil
import signal
import zipfile
from pathlib import Path
from typing import Any

import torch

from c2seg.config import to_dict
from c2seg.distributed import any_rank, barrier, gather_objects, rank
from c2seg.distributed import world_size as ranks
from c2seg.io import file_sha256, write_text_atomic
from c2seg.spec import DatasetSpec, spec_compatible, spec_from_dict
from c2seg.train.config import ModelConfig, load_model_config, model_config_from_dict
from c2seg.train.engine import full_state_dict
from c2seg.train.weights import CheckpointError, Weights, first_line, read_weights, save_weights

log = logging.getLogger("c2seg.train")
STATE_FILE = "train_state.json"
BEST_DIR = "best"  # finetune.keep_best's weights, in the run dir
# model config keys that do not change the weights' layout: a run may resume with other values
NOT_ARCHITECTURE = ("name", "activation_checkpointing", "modality_dropout")


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
    """The newest intact checkpoint of a run dir: the one LATEST names, else the newest older intact one
    (each one skipped is logged with the reason); None when there is none."""
    root = checkpoint_dir(output_dir)
    marker = root / "LATEST"
    if not marker.is_file():
        return None
    newest = root / marker.read_text().strip()
    older = sorted((p for p in root.glob("step_*") if p.is_dir() and p.name < newest.name), reverse=True)
    for path in (newest, *older):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        log.warning("skipping checkpoint %s: %s", path, problem)
    return None


def checkpoint_problem(path: Path) -> str | None:
    """Why checkpoint folder ``path`` cannot be resumed from, naming the file: no train state (an unfinished
    save), a state file that is not JSON, a listed file missing or of another size than saved; None when
    intact. Cheap (reads the state file and stats the others); contents are checked by load_checkpoint."""
    try:
        state = saved_state(path)
    except CheckpointError as exc:
        return str(exc)
    for name, saved in state.get("files", {}).items():
        file = path / name
        if not file.is_file():
            return f"{file}: missing"
        if file.stat().st_size != saved["bytes"]:
            return f"{file}: {file.stat().st_size} bytes, {saved['bytes']} when saved (truncated or overwritten)"
    return None


def _share_of_ranks(names: list[str]) -> list[str]:
    """This rank's share of ``names`` (every world_size-th), so that the ranks read the files in parallel."""
    return names[rank()::ranks()]


def _saved_files(path: Path) -> dict[str, dict[str, Any]]:
    """``{name: {"bytes", "sha256"}}`` of every file of a checkpoint folder but its train state; each rank
    hashes a share (collective: every rank calls it)."""
    names = sorted(p.name for p in path.iterdir() if p.is_file() and p.name != STATE_FILE
                   and not p.name.startswith("."))
    share = {n: {"bytes": (path / n).stat().st_size, "sha256": file_sha256(path / n)} for n in _share_of_ranks(names)}
    return {name: saved for part in gather_objects(share) for name, saved in part.items()}


def save_checkpoint(engine, output_dir: str | Path, state: dict[str, Any], weights_meta: dict[str, Any],
                    extra_weights: dict[str, dict[str, torch.Tensor]] | None = None, keep: int = 2) -> Path:
    """Write a checkpoint at ``state["step"]`` (collective: every rank calls it)."""
    root = checkpoint_dir(output_dir)
    tag = f"step_{state['step']:08d}"
    path = root / tag
    if rank() == 0:  # left by an unfinished or damaged save of this step: none of its files may stay
        shutil.rmtree(path, ignore_errors=True)
    barrier()
    engine.save_checkpoint(str(root), tag=tag, save_latest=False)
    weights = full_state_dict(engine, rank0_only=True)  # only rank 0 writes weights.pt
    if rank() == 0:
        save_weights(path / "weights.pt", Weights(kind="checkpoint", step=state["step"], state_dict=weights,
                                                  extra=extra_weights or {}, **weights_meta))
    barrier()
    files = _saved_files(path)
    if rank() == 0:
        write_text_atomic(path / STATE_FILE, json.dumps({**state, "files": files}, indent=1))
        write_text_atomic(root / "LATEST", tag)
        old = sorted(p for p in root.glob("step_*") if p.is_dir() and p.name != tag)
        for stale in old[: max(0, len(old) - (keep - 1))]:
            shutil.rmtree(stale, ignore_errors=True)
        log.info("checkpoint saved: %s", path)
    barrier()
    return path


class BestWeights:
    """``finetune.keep_best``: the weights of the best val mIoU so far, in OUTPUT/best/weights.pt (a weights file
    of kind ``checkpoint``, its step and score in OUTPUT/best/score.json). A resumed run compares with the kept
    score; a ``fresh`` run drops what an earlier run of the folder kept. Only rank 0's score decides."""

    def __init__(self, output_dir: str | Path, enabled: bool, weights_meta: dict[str, Any], fresh: bool) -> None:
        self.dir, self.enabled, self.meta = Path(output_dir) / BEST_DIR, enabled, weights_meta
        if enabled and fresh and rank() == 0:
            shutil.rmtree(self.dir, ignore_errors=True)
        score = self.dir / "score.json"
        self.score = json.loads(score.read_text())["val_miou"] if enabled and score.is_file() else -float("inf")

    def offer(self, engine, step: int, values: dict[str, float]) -> None:
        """Keep the model at ``step`` if its ``values`` (rank 0's validation) beat the kept score (collective:
        every rank calls it)."""
        if not self.enabled:
            return
        miou = values.get("val_miou", -float("inf"))
        if not any_rank(miou > self.score):
            return
        weights = full_state_dict(engine, rank0_only=True)
        if rank() == 0:
            save_weights(self.dir / "weights.pt", Weights(kind="checkpoint", step=step, state_dict=weights,
                                                          **self.meta))
            write_text_atomic(self.dir / "score.json", json.dumps({"step": step, "val_miou": miou}))
            log.info("step %d: best val mIoU so far (%.3f), weights kept in %s", step, miou, self.dir)
            self.score = miou


def resolve_resume(resume: str | None, output_dir: str | Path) -> Path | None:
    """``--resume``: None (fresh start), ``auto`` (newest checkpoint of the run dir, if any) or a path."""
    if resume is None:
        return None
    root = checkpoint_dir(output_dir)
    if resume == "auto":
        found = latest_checkpoint(output_dir)
        if found is None and (root / "LATEST").is_file():
            raise CheckpointError(f"--resume auto: no checkpoint in {root} is intact (the warnings above say why); "
                                  "resume one with --resume PATH after repairing it, or move them away to start "
                                  "from step 0")
        if found is None:
            log.info("--resume auto: no checkpoint in %s, starting from step 0", root)
        return found
    path = Path(resume)
    problem = checkpoint_problem(path)
    if problem is not None:
        raise CheckpointError(f"--resume {resume}: not a complete checkpoint folder: {problem}; checkpoints are "
                              "OUTPUT/checkpoints/step_N")
    return path


def check_same_model(ckpt: Path, model_path: str | Path) -> None:
    """Refuse to resume ``ckpt`` with the model config at ``model_path`` when its weights are laid out for
    another model (read from weights.pt's model config, before anything starts)."""
    weights = ckpt / "weights.pt"
    saved = read_weights(weights, verify=False).model_config  # checked in full when loaded
    theirs = _architecture(model_config_from_dict(saved, source=str(weights)))
    ours = load_model_config(model_path)
    differ = [f"{k} {v} vs {_architecture(ours)[k]}" for k, v in theirs.items() if v != _architecture(ours)[k]]
    if not differ:
        return
    match = next((str(f) for f in sorted(Path(model_path).parent.glob("*.yaml")) if _is_model(f, theirs)),
                 f"<the config of model '{saved['name']}'>")
    raise CheckpointError(
        f"{ckpt} holds another model: '{saved['name']}', this run's {model_path} is '{ours.name}' (checkpoint vs "
        f"this run: {', '.join(differ)}). Continue that run with --set model={match}, or train this model in a "
        "new output_dir (--set output_dir=...)")


def _architecture(cfg: ModelConfig) -> dict[str, Any]:
    return {k: v for k, v in to_dict(cfg).items() if k not in NOT_ARCHITECTURE}


def _is_model(path: Path, architecture: dict[str, Any]) -> bool:
    try:
        return _architecture(load_model_config(path)) == architecture
    except ValueError:  # not a model config
        return False


def saved_state(path: Path) -> dict[str, Any]:
    """The train state a checkpoint folder was written at (step, world size, ZeRO stage, its files' sizes and
    sha256, ...); a CheckpointError naming the file when it is missing or not a train state."""
    file = path / STATE_FILE
    if not file.is_file():
        raise CheckpointError(f"{file}: missing (not a checkpoint folder, or its save did not finish)")
    try:
        state = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{file}: not valid JSON ({exc})") from exc
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise CheckpointError(f"{file}: not a c2seg train state (no step)")
    return state


def _deepspeed_pickled_classes() -> list[type]:
    """The classes DeepSpeed 0.19 pickles into its checkpoint files besides tensors, containers and numbers,
    found on real checkpoints at ZeRO 0-3 in fp32, bf16 and fp16: the ZeRO stage, the loss scaler (dynamic
    under fp16) and the fragment addresses of ZeRO-1/2 partitions (optimizer states)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


def unpickling_problem(file: Path) -> str | None:
    """Why ``file`` must not reach DeepSpeed's full unpickler: it holds objects that are not plain tensors,
    containers or DeepSpeed's own classes, or is unreadable; None when torch's weights-only loader reads it.
    Zip-format files are memory-mapped, so the tensors' bytes are not read."""
    try:
        with torch.serialization.safe_globals(_deepspeed_pickled_classes()):
            torch.load(file, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(file))
    except pickle.UnpicklingError as exc:
        return f"{file}: holds objects that are not plain tensors/containers ({first_line(exc)}); refused"
    except Exception as exc:  # noqa: BLE001 - torch reports truncated zips as RuntimeError, others as OSError...
        return f"{file}: unreadable, truncated or damaged ({first_line(exc)})"
    return None


def _content_problem(file: Path, saved: dict[str, Any] | None) -> str | None:
    if saved is not None and file_sha256(file) != saved["sha256"]:
        return f"{file}: its sha256 differs from the one saved with the checkpoint (damaged or replaced)"
    return unpickling_problem(file)


def refuse_untrusted_files(path: Path, state: dict[str, Any]) -> None:
    """Check every .pt file of checkpoint ``path`` (each rank a share; collective) against its saved sha256 and
    with the weights-only loader; a CheckpointError naming the first bad file, on every rank."""
    saved = state.get("files", {})
    names = sorted(p.name for p in path.glob("*.pt"))
    share = [problem for name in _share_of_ranks(names) if (problem := _content_problem(path / name, saved.get(name)))]
    problems = [problem for part in gather_objects(share) for problem in part]
    if problems:
        raise CheckpointError(f"checkpoint {path}: {problems[0]}")


def load_checkpoint(engine, path: Path, world_size: int) -> dict[str, Any]:
    """Restore engine, optimizer and LR schedule; returns the saved train state."""
    state = saved_state(path)
    refuse_untrusted_files(path, state)
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


def load_weights(path: str | Path, spec: DatasetSpec | None = None) -> Weights:
    """Consolidated weights from a run dir (its newest checkpoint), a checkpoint folder or a weights /
    exported model file; checked against ``spec`` when given."""
    path = Path(path)
    if path.is_dir():
        ckpt = latest_checkpoint(path) if (path / "checkpoints").is_dir() else path
        if ckpt is None or not (ckpt / "weights.pt").is_file():
            raise CheckpointError(f"{path}: no complete checkpoint with weights.pt found")
        path = ckpt / "weights.pt"
    weights = read_weights(path)
    if spec is not None:
        problems = spec_compatible(spec_from_dict(weights.spec, source=str(path)), spec)
        if problems:
            raise CheckpointError(f"{path}: the dataset spec does not match the checkpoint: "
                                  + "; ".join(map(str, problems)))
    return weights
