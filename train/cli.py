"""``c2seg train``: pretrain, finetune, export, params.

Launch the training commands with torchrun / the deepspeed launcher / srun for several processes,
e.g. ``torchrun --nproc_per_node 2 -m c2seg.cli train pretrain --config configs/train/pretrain_tiny.yaml``.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger("c2seg.train")


def register(stages: argparse._SubParsersAction) -> None:
    parser = stages.add_parser(
        "train", help="train: masked multimodal pretraining, fine-tuning with target-city adaptation, export",
        description="Train the multimodal transformer fusion segmenter on prepared tiles (c2seg data prep) with "
        "DeepSpeed (ZeRO 0-3), from 1 CPU process to many GPUs (torchrun, deepspeed launcher or srun), "
        "tracked in MLflow (MLFLOW_TRACKING_URI, default sqlite:///mlflow.db).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, text in (("pretrain", "self-supervised masked multimodal reconstruction on the train tiles of every "
                                    "source and target city (city-balanced; never a test city)"),
                       ("finetune", "supervised on source labels + mean-teacher adaptation on target tiles, "
                                    "validated on the val split of data.val_cities (default: the labelled "
                                    "targets, else the sources)")):
        p = sub.add_parser(name, help=text, description=text + ". Checkpoints every checkpoint_every steps and "
                           "on SIGTERM/SIGUSR1 (then exits with status 75); --resume auto continues.")
        p.add_argument("--config", required=True, type=Path, help="training config YAML (configs/train/*.yaml)")
        p.add_argument("--resume", default=None, metavar="auto|CHECKPOINT",
                       help="'auto': continue from the newest checkpoint in output_dir (fresh start if none); "
                       "or a checkpoint folder OUTPUT/checkpoints/step_N")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value, e.g. --set steps=100 --set data.prep_dir=runs/prep "
                       "(repeatable; values are YAML)")
        p.set_defaults(func=_run_training, task=name)
    p = sub.add_parser("export", help="write a finetune run's weights as one model file for inference",
                       description="Consolidate the newest checkpoint of a finetune run into one file (weights, "
                       "model config, dataset spec, normalisation) loadable without DeepSpeed.")
    p.add_argument("--run-dir", required=True, type=Path, help="output_dir of a finetune run")
    p.add_argument("--out", required=True, type=Path, help="model file to write, e.g. models/adapted.pt")
    p.add_argument("--weights", choices=("auto", "student", "ema", "best"), default="auto",
                   help="student: the trained student of the newest checkpoint (the validated model); ema: its "
                   "mean teacher; best: the student of the best val mIoU (finetune.keep_best); auto (default): "
                   "best when the run kept one, else student")
    p.set_defaults(func=_export)
    p = sub.add_parser("params", help="print a model config's parameter count for a dataset spec",
                       description="Build the model on the meta device (no memory) and print its parameter "
                       "count, per part.")
    p.add_argument("--model", required=True, type=Path, help="model config YAML (configs/models/*.yaml)")
    from c2seg.cli import add_spec_args

    add_spec_args(p)
    p.set_defaults(func=_params)


def _run_training(args: argparse.Namespace) -> int:
    from c2seg.config import parse_override
    from c2seg.distributed import detect_env, exit_without_teardown
    from c2seg.train.config import load_train_config
    from c2seg.train.data import PreparedData
    from c2seg.train.finetune import FinetuneTask
    from c2seg.train.loop import run_training
    from c2seg.train.pretrain import PretrainTask

    overrides = dict(parse_override(o) for o in args.overrides)
    cfg = load_train_config(args.config, overrides)
    data = PreparedData(cfg.data.prep_dir, cfg.data.spec, cfg.data.normalization)
    task = PretrainTask if args.task == "pretrain" else FinetuneTask
    code = run_training(cfg, task, data, resume=args.resume, config_path=str(args.config))
    if detect_env().world_size > 1:
        exit_without_teardown(code)
    return code


def _export(args: argparse.Namespace) -> int:
    from c2seg.train.export import export_model

    path = export_model(args.run_dir, args.out, args.weights)
    print(path)
    return 0


def count_parameters(model_path: Path, spec) -> dict[str, int]:
    """Parameters per top-level part of the segmenter, built on the meta device."""
    import torch

    from c2seg.train.config import load_model_config
    from c2seg.train.models import FusionSegmenter

    with torch.device("meta"):
        model = FusionSegmenter(spec, load_model_config(model_path))
    parts = {name: sum(p.numel() for p in child.parameters()) for name, child in model.backbone.named_children()}
    parts["head"] = sum(p.numel() for p in model.head.parameters())
    parts["modality_embed"] = sum(p.numel() for p in model.parameters()) - sum(parts.values())
    parts["total"] = sum(p.numel() for p in model.parameters())
    return parts


def _params(args: argparse.Namespace) -> int:
    from c2seg.cli import spec_from_args

    parts = count_parameters(args.model, spec_from_args(args))
    for name, n in parts.items():
        print(f"{name:<16}{n:>16,}")
    return 0
