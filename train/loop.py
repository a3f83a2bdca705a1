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
from c2seg.distributed import mean_over_ranks, world_size
from c2seg.spec import DatasetSpec
from train.checkpoint import (StopRequest, check_same_model, load_checkpoint, load_weights, resolve_resume,
                              save_checkpoint, saved_state)
from train.config import ModelConfig, TrainConfig, load_model_config
from train.determinism import data_wait_seconds, seed_micro_batch
from train.engine import create_engine, init_distributed
from train.tracking import Tracker, git_commit
from train.weights import Weights

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

    def after_step(self, engine, step: int) -> None:
        """After each optimizer step (an EMA update)."""

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
    if ckpt is not None and (out / "COMPLETED").is_file():
        done = saved_state(ckpt)["step"]
        if done >= cfg.steps:  # nothing to train: no engine, so no optimizer state to fit
            log.info("%s already finished at step %d (steps: %d); nothing to train", out, done, cfg.steps)
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
    engine = create_engine(task.module, cfg, world)
    state: dict[str, Any] = {"step": 0}
    if ckpt is not None:
        state = load_checkpoint(engine, ckpt, world)
        task.load_extra(resumed)
    gas = cfg.deepspeed.gradient_accumulation_steps
    resolved = to_dict(cfg)
    weights_meta = {"model_config": to_dict(model_cfg), "spec": spec.to_dict(), "task": task.name,
                    "normalization": data.normalization, "modalities": list(spec.modality_names),
                    "tile_size": data.tile_size, **data.normalization_meta()}
    tracker = Tracker(cfg.tracking.enabled and env.rank == 0, cfg.tracking.experiment,
                      cfg.tracking.run_name or f"{task.name}-{out.name}", out)
    if env.rank == 0:
        (out / "config.yaml").write_text(yaml.safe_dump({**resolved, "model_config": to_dict(model_cfg)},
                                                        sort_keys=False))
        tracker.params({**resolved, "model_config": to_dict(model_cfg), "task": task.name})
        tracker.tags({"git_commit": git_commit(), "world_size": world,
                      "slurm_job_id": os.environ.get("SLURM_JOB_ID", "none"),
                      "slurm_nodes": os.environ.get("SLURM_JOB_NODELIST", "none"), "manifest_hash": data.manifest_hash,
                      "task": task.name, "launcher": env.launcher, "zero_stage": cfg.deepspeed.zero_stage})
        tracker.artifact(out / "config.yaml", "config")
        if config_path:
            tracker.artifact(config_path, "config")
    task.start(engine, state["step"] * gas)
    step = state["step"]
    samples = cfg.data.batch_size * gas * world
    bar = tqdm(total=cfg.steps, initial=step, desc=task.name, disable=True if env.rank != 0 else None,
               dynamic_ncols=True)  # None: off when stderr is not a terminal
    metrics_file = out / "metrics.jsonl"
    while step < cfg.steps:
        t0, waited = time.perf_counter(), data_wait_seconds()
        logs: dict[str, float] = {}
        for micro in range(gas):
            seed_micro_batch(cfg.seed, env.rank, step * gas + micro)
            loss, extra = task.micro_loss(engine, step)
            engine.backward(loss)
            engine.step()
            logs["loss"] = logs.get("loss", 0.0) + float(loss.detach()) / gas
            for k, v in extra.items():
                logs[k] = logs.get(k, 0.0) + v / gas
        step += 1
        task.after_step(engine, step)
        took = time.perf_counter() - t0
        logs["data_wait_s"] = data_wait_seconds() - waited  # the step's time spent waiting for batches
        logs = mean_over_ranks(logs)
        grad_norm = engine.get_global_grad_norm()
        logs.update({"lr": engine.get_lr()[0], "step_time_s": took, "samples_per_s": samples / took,
                     "memory_mb": _memory_mb()})
        if grad_norm is not None:
            logs["grad_norm"] = float(grad_norm)
        if env.rank == 0:
            with metrics_file.open("a") as f:
                f.write(json.dumps({"step": step, **logs}) + "\n")
            if step % cfg.tracking.log_every == 0:
                tracker.metrics(logs, step)
            bar.update(1)
            bar.set_postfix(loss=f"{logs['loss']:.4f}")
            if bar.disable and (step % cfg.tracking.progress_every == 0 or step == cfg.steps):
                log.info("%s step %d/%d loss %.4f lr %.2e %.1f samples/s", task.name, step, cfg.steps,
                         logs["loss"], logs["lr"], logs["samples_per_s"])
        stopping = stop.agreed()
        if step % cfg.checkpoint_every == 0 or step == cfg.steps or stopping:
            save_checkpoint(engine, out, {"step": step, "world_size": world, "micro_batches": step * gas,
                                          "zero_stage": cfg.deepspeed.zero_stage}, weights_meta,
                            task.extra_weights(), cfg.keep_checkpoints)
        if not stopping and (task.wants_validation(step) or step == cfg.steps):
            task.validate(engine, step, tracker)
        if stopping and step < cfg.steps:
            log.warning("stopped at step %d after a signal; continue with --resume auto", step)
            tracker.close("KILLED")
            return EXIT_INTERRUPTED
    bar.close()
    if env.rank == 0:
        (out / "COMPLETED").write_text(f"{step}\n")
        tracker.close()
        log.info("%s finished: %d steps, run dir %s", task.name, step, out)
    sys.stdout.flush()
    return 0
