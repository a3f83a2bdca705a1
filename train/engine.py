"""DeepSpeed engine set-up from the typed config: one code path from 1 CPU process to many GPUs.

Ranks come from c2seg.distributed (torchrun, the deepspeed launcher, or srun with SLURM variables);
on a machine without GPUs DeepSpeed uses its CPU accelerator and the gloo backend.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from c2seg.errors import C2SegError
from c2seg.distributed import DistEnv, detect_env, init_process_group, rank
from c2seg.train.config import TrainConfig

log = logging.getLogger("c2seg.train")


def deepspeed_config(cfg: TrainConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed JSON for ``cfg``: AdamW (torch implementation), warmup + cosine
    LR, ZeRO stage and offload, precision, accumulation and clipping; ``deepspeed.extra`` wins."""
    ds, opt = cfg.deepspeed, cfg.optim
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if ds.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    conf: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": ds.gradient_accumulation_steps,
        "train_batch_size": cfg.data.batch_size * ds.gradient_accumulation_steps * world_size,
        "gradient_clipping": opt.grad_clip,
        # torch's AdamW: nothing to compile; its fused kernel on GPUs (one launch for all parameters)
        "optimizer": {"type": "AdamW", "params": {"lr": opt.lr, "betas": list(opt.betas), "eps": 1e-8,
                                                  "weight_decay": opt.weight_decay, "torch_adam": True,
                                                  "fused": torch.cuda.is_available() and not ds.offload_optimizer}},
        "scheduler": {"type": "WarmupCosineLR", "params": {
            "total_num_steps": cfg.steps, "warmup_num_steps": max(1, min(opt.warmup_steps, cfg.steps - 1)),
            "warmup_min_ratio": 0.0, "cos_min_ratio": opt.min_lr_ratio, "warmup_type": "linear"}},
        "zero_optimization": zero,
        "bf16": {"enabled": ds.precision == "bf16"},
        "fp16": {"enabled": ds.precision == "fp16", "initial_scale_power": 12},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    return _merge(conf, ds.extra)


def _merge(base: dict, extra: dict) -> dict:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value
    return base


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(timeout_s: float = 600.0) -> DistEnv:
    """Map the launcher's variables and start torch.distributed through DeepSpeed; ``timeout_s`` bounds every
    collective (a silent peer fails the others instead of hanging them)."""
    import deepspeed

    env = detect_env()
    if env.launcher == "single":  # one plain process: a world of one on a free local port
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if torch.cuda.is_available():  # before the group starts, so NCCL binds this rank's GPU
        torch.cuda.set_device(env.local_rank)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    init_process_group(env, backend, timeout_s)  # rendezvous on MASTER_ADDR's interface only
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)  # adopts the started group
    return env


def weight_decay_split(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """The parameters that get weight decay (matrices and kernels) and those that do not: biases, norms and
    embedding tables named ``*embed*``. The pretrainer's mask-slot embeddings (``slot_embed.<modality>``) are
    decayed: moving them to the other group would change the optimizer's group sizes, and DeepSpeed refuses
    to resume the pretraining checkpoints written so far."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim > 1 and "embed" not in name.rsplit(".", 1)[-1] else no_decay).append(p)
    return decay, no_decay


def create_engine(model: nn.Module, cfg: TrainConfig, world_size: int):
    """Wrap ``model`` in a DeepSpeed engine with optimizer and LR scheduler from ``cfg``."""
    import deepspeed

    if cfg.deepspeed.precision == "fp16" and not torch.cuda.is_available():
        raise C2SegError("deepspeed.precision fp16 needs a CUDA GPU (DeepSpeed's CPU accelerator has no fp16 "
                         "kernels); use bf16 or fp32 on CPU")
    conf = deepspeed_config(cfg, world_size)
    if cfg.compile:
        model.compile()  # in place, so checkpoints and exports keep the plain weight names
    decay, no_decay = weight_decay_split(model)
    groups = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=conf)
    log.info("DeepSpeed engine: ZeRO-%d, %s, micro-batch %d x accumulation %d x %d ranks%s",
             cfg.deepspeed.zero_stage, cfg.deepspeed.precision, cfg.data.batch_size,
             cfg.deepspeed.gradient_accumulation_steps, world_size, ", compiled" if cfg.compile else "")
    return engine


def engine_dtype(cfg: TrainConfig) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.deepspeed.precision]


def iter_full_state(engine) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, whole tensor on the engine's device) of every entry of the module's state dict. Under ZeRO-3
    the parameters of one module at a time are gathered, only while its entries are yielded, so no rank
    ever holds the whole model at once (collective: every rank must consume it all)."""
    module = engine.module
    if engine.zero_optimization_stage() != 3:  # whole parameters on every rank already: no gather
        yield from module.state_dict().items()
        return
    import deepspeed

    owners: dict[str, list[str]] = {}
    for name in module.state_dict(keep_vars=True):
        owners.setdefault(name.rpartition(".")[0], []).append(name)
    for prefix, keys in owners.items():
        owner = module.get_submodule(prefix) if prefix else module
        params = list(owner.parameters(recurse=False))  # a module of buffers only has nothing to gather
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None) if params else contextlib.nullcontext():
            own = dict(owner.named_parameters(recurse=False)) | dict(owner.named_buffers(recurse=False))
            for key in keys:
                yield key, own[key.rpartition(".")[2]]


def full_state_dict(engine, rank0_only: bool = False) -> dict[str, torch.Tensor]:
    """Consolidated fp32 weights of the engine's module, on the host: on every rank, or with ``rank0_only``
    on rank 0 alone (the others return {} and hold no copy). Collective: every rank must call it."""
    keep = not rank0_only or rank() == 0
    return {k: v.detach().float().cpu().clone() for k, v in iter_full_state(engine) if keep}
