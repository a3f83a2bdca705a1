"""The training loop shared by pretrain and finetune: DeepSpeed engine, gradient accumulation,
step metrics, checkpoints every N steps and on SIGTERM / SIGUSR1, ``--resume``, MLflow on rank 0.
A resumed run continues bit for bit like the uninterrupted one (same world size and thread count):
random numbers are reseeded per micro-batch (train/determinism.py) and batch streams restart at the
saved position.

A task (train/pretrain.py, train/finetune.py) provides the module to optimise, its batch streams,
the loss of one micro-batch, what happens after an optimizer step (EMA), validation, and extra
weights to checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import torch
import yaml
from torch import nn
from tqdm import tqdm

from c2seg.config import to_dict
from c2seg.distributed import leave_process_group, mean_over_ranks, world_size
from c2seg.spec import DatasetSpec
from c2seg.train.checkpoint import (BestWeights, StopRequest, check_same_model, load_checkpoint, load_weights,
                                    resolve_resume, save_checkpoint, saved_state)
from c2seg.train.config import ModelConfig, TrainConfig, load_model_config
from c2seg.train.determinism import data_wait_seconds, seed_micro_batch
from c2seg.train.engine import create_engine, init_distributed
from c2seg.train.tracking import Tracker, git_commit
from c2seg.train.weights import Weights

log = logging.getLogger("c2seg.train")
EXIT_INTERRUPTED = 75  # EX_TEMPFAIL: stopped by a signal after saving a checkpoint; rerun with --resume auto


class Task:
    """What a training task provides to :func:`run_training`; the defaults are those of a task without
    validation, extra state or statistics (the pretrainer)."""

    name: str
    module: nn.Module

    def start(self, engine, first_batch: int) -> None:
        raise NotImplementedError

    def micro_loss(self, engine, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def init_from(self, weights: Weights) -> None:
        raise NotImplementedError

    def prepare_fresh_run(self, rank: int) -> None:
        """Before the engine of a run that starts at step 0 (not a resumed one), on every rank (may be
        collective): e.g. fitting a head to the data."""

    def before_step(self, engine, step: int) -> None:
        """Before optimizer step ``step + 1`` (0-based ``step``), on every rank (may be collective)."""

    def after_step(self, engine, step: int) -> None:
        """After each optimizer step ``step`` (1-based; an EMA update)."""

    def wants_validation(self, step: int) -> bool:
        return False

    def validate(self, engine, step: int, tracker: Tracker) -> dict[str, float]:
        return {}

    def extra_weights(self) -> dict[str, Any]:
        return {}

    def load_extra(self, weights: Weights) -> None:
        """State of :meth:`extra_weights` (``weights.extra``) from a resumed checkpoint."""


def _memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return psutil.Process().memory_info().rss / 2**20


def _finished_already(ckpt: Path | None, out: Path, steps: int) -> bool:
    """Whether the run in ``out`` completed ``steps`` steps already (then nothing starts: no engine, so no
    optimizer state has to fit)."""
    if ckpt is None or not (out / "COMPLETED").is_file():
        return False
    done = saved_state(ckpt)["step"]
    if done >= steps:
        log.info("%s already finished at step %d (steps: %d); nothing to train", out, done, steps)
    return done >= steps


def _start_tracking(cfg: TrainConfig, model_cfg: ModelConfig, task: Task, data, rank: int, world: int,
                    launcher: str, config_path: str | None) -> Tracker:
    """The run's tracker (a null object off rank 0 or when tracking is off), with the resolved config written
    to the run dir and logged with its tags."""
    out = Path(cfg.output_dir)
    tracker = Tracker(cfg.tracking.enabled and rank == 0, cfg.tracking.experiment,
                      cfg.tracking.run_name or f"{task.name}-{out.name}", out)
    if rank != 0:
        return tracker
    resolved = {**to_dict(cfg), "model_config": to_dict(model_cfg)}
    (out / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
    tracker.params({**resolved, "task": task.name})
    tracker.tags({"git_commit": git_commit(), "world_size": world,
                  "slurm_job_id": os.environ.get("SLURM_JOB_ID", "none"),
                  "slurm_nodes": os.environ.get("SLURM_JOB_NODELIST", "none"), "manifest_hash": data.manifest_hash,
                  "task": task.name, "launcher": launcher, "zero_stage": cfg.deepspeed.zero_stage})
    tracker.artifact(out / "config.yaml", "config")
    if config_path:
        tracker.artifact(config_path, "config")
    return tracker


def _train_step(task: Task, engine, cfg: TrainConfig, rank: int, step: int) -> dict[str, float]:
    """One optimizer step of ``gradient_accumulation_steps`` micro-batches; the step's mean losses and
    extras, averaged over the ranks, with its timings."""
    gas = cfg.deepspeed.gradient_accumulation_steps
    t0, waited = time.perf_counter(), data_wait_seconds()
    task.before_step(engine, step)
    logs: dict[str, float] = {}
    for micro in range(gas):
        seed_micro_batch(cfg.seed, rank, step * gas + micro)
        loss, extra = task.micro_loss(engine, step)
        engine.backward(loss)
        engine.step()
        logs["loss"] = logs.get("loss", 0.0) + float(loss.detach()) / gas
        for k, v in extra.items():
            logs[k] = logs.get(k, 0.0) + v / gas
    task.after_step(engine, step + 1)
    took = time.perf_counter() - t0
    logs["data_wait_s"] = data_wait_seconds() - waited  # the step's time spent waiting for batches
    logs = mean_over_ranks(logs)
    logs.update({"lr": engine.get_lr()[0], "step_time_s": took,
                 "samples_per_s": cfg.data.batch_size * gas * world_size() / took, "memory_mb": _memory_mb()})
    grad_norm = engine.get_global_grad_norm()
    if grad_norm is not None:
        logs["grad_norm"] = float(grad_norm)
    return logs


class _StepLog:
    """Rank 0's record of each step: ``metrics.jsonl``, the tracker every ``log_every`` steps and the progress
    bar (or a log line every ``progress_every`` steps when stderr is not a terminal)."""

    def __init__(self, cfg: TrainConfig, task_name: str, first_step: int, rank: int, tracker: Tracker) -> None:
        self.cfg, self.task_name, self.rank, self.tracker = cfg, task_name, rank, tracker
        self.file = Path(cfg.output_dir) / "metrics.jsonl"
        self.bar = tqdm(total=cfg.steps, initial=first_step, desc=task_name, disable=True if rank != 0 else None,
                        dynamic_ncols=True)  # None: off when stderr is not a terminal

    def __call__(self, step: int, logs: dict[str, float]) -> None:
        if self.rank != 0:
            return
        with self.file.open("a") as f:
            f.write(json.dumps({"step": step, **logs}) + "\n")
        if step % self.cfg.tracking.log_every == 0:
            self.tracker.metrics(logs, step)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{logs['loss']:.4f}")
        if self.bar.disable and (step % self.cfg.tracking.progress_every == 0 or step == self.cfg.steps):
            log.info("%s step %d/%d loss %.4f lr %.2e %.1f samples/s", self.task_name, step, self.cfg.steps,
                     logs["loss"], logs["lr"], logs["samples_per_s"])


def run_training(cfg: TrainConfig, make_task, data, resume: str | None = None,
                 config_path: str | None = None) -> int:
    """Train ``cfg.steps`` optimizer steps of the task built by ``make_task(cfg, model_cfg, spec, data)``.
    Returns 0 when done, EXIT_INTERRUPTED after a signal-triggered checkpoint."""
    stop = StopRequest()  # first: a USR1 / TERM during the slow start-up is honoured at the first step boundary
    spec: DatasetSpec = data.spec
    model_cfg: ModelConfig = load_model_config(cfg.model)
    out = Path(cfg.output_dir)
    ckpt = resolve_resume(resume, out)  # checked before the (slow) distributed start
    if ckpt is not None:
        check_same_model(ckpt, cfg.model)  # another model in the run dir: one clear line, no engine started
    if _finished_already(ckpt, out, cfg.steps):
        return 0
    resumed = load_weights(ckpt, spec) if ckpt is not None else None  # the spec must fit before anything starts
    init = load_weights(cfg.init_from, spec) if cfg.init_from and ckpt is None else None
    env = init_distributed(cfg.collective_timeout_s)
    world = world_size()
    torch.manual_seed(cfg.seed * 1000 + env.rank)
    out.mkdir(parents=True, exist_ok=True)
    task: Task = make_task(cfg, model_cfg, spec, data)
    if init is not None:
        task.init_from(init)
        log.info("initialised from %s", cfg.init_from)
    if ckpt is None:
        task.prepare_fresh_run(env.rank)
    engine = create_engine(task.module, cfg, world)
    step = 0
    if resumed is not None:
        step = load_checkpoint(engine, ckpt, world)["step"]
        task.load_extra(resumed)
    weights_meta = {"model_config": to_dict(model_cfg), "spec": spec.to_dict(), "task": task.name,
                    "normalization": data.normalization, "modalities": list(spec.modality_names),
                    "tile_size": data.tile_size, **data.normalization_meta()}
    tracker = _start_tracking(cfg, model_cfg, task, data, env.rank, world, env.launcher, config_path)
    gas = cfg.deepspeed.gradient_accumulation_steps
    task.start(engine, step * gas)
    step_log = _StepLog(cfg, task.name, step, env.rank, tracker)
    best = BestWeights(out, cfg.finetune.keep_best, weights_meta, fresh=ckpt is None)
    if step == 0 and task.wants_validation(0):
        best.offer(engine, 0, task.validate(engine, 0, tracker))
    while step < cfg.steps:
        logs = _train_step(task, engine, cfg, env.rank, step)
        step += 1
        step_log(step, logs)
        stopping = stop.agreed()
        if step % cfg.checkpoint_every == 0 or step == cfg.steps or stopping:
            save_checkpoint(engine, out, {"step": step, "world_size": world, "micro_batches": step * gas,
                                          "zero_stage": cfg.deepspeed.zero_stage}, weights_meta,
                            task.extra_weights(), cfg.keep_checkpoints)
        if not stopping and (task.wants_validation(step) or step == cfg.steps):
            best.offer(engine, step, task.validate(engine, step, tracker))
        if stopping and step < cfg.steps:
            log.warning("stopped at step %d after a signal; continue with --resume auto", step)
            tracker.close("KILLED")
            leave_process_group()
            return EXIT_INTERRUPTED
    step_log.bar.close()
    if env.rank == 0:
        (out / "COMPLETED").write_text(f"{step}\n")
        tracker.close()
        log.info("%s finished: %d steps, run dir %s", task.name, step, out)
    sys.stdout.flush()
    leave_process_group()
    return 0
