"""``c2seg data prep | finalize | verify``: tile and shard cities into Zarr + WebDataset."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from c2seg.cli import add_spec_args, spec_from_args

log = logging.getLogger("c2seg.prep")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prep", help="tile the cities of a spec into dataset.zarr + WebDataset shards (resumable, parallel)",
        description="Compute per-band statistics, cut tiles (train / spatially disjoint val blocks), write "
        "them to DIR/dataset.zarr and DIR/shards/<split>/<city>-<n>.tar. Work is split into units with "
        "done-markers: a rerun resumes, a finished job does nothing. For SLURM array jobs each task runs "
        "every num-tasks-th unit (defaults from SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT); then run "
        "`c2seg data finalize --out DIR`. With one task, finalize runs at the end.\n"
        "Example: c2seg data prep --spec configs/datasets/demo_ab.yaml --out data/prep/demo_ab --workers 2",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_spec_args(p)
    p.add_argument("--out", required=True, type=Path, help="output folder DIR")
    p.add_argument("--config", type=Path, default=None,
                   help="prep config YAML (configs/prep/default.yaml); defaults: tiling from the spec")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a prep config key, e.g. --set tile_size=64 (repeatable)")
    p.add_argument("--workers", type=int, default=1, help="processes on this machine (default 1)")
    p.add_argument("--task-index", type=int, default=None, help="this array task (default SLURM_ARRAY_TASK_ID)")
    p.add_argument("--num-tasks", type=int, default=None, help="array size (default SLURM_ARRAY_TASK_COUNT or 1)")
    p.add_argument("--no-finalize", action="store_true", help="do not finalize even when this is the only task")
    p.set_defaults(func=_prep)

    f = sub.add_parser("finalize", help="join the array tasks' parts of DIR into DIR/manifest.json",
                       description="Merge statistics and shard records of every task into the manifest; "
                       "fails naming the units not done yet.")
    f.add_argument("--out", required=True, type=Path, help="the prep output folder DIR")
    f.set_defaults(func=_finalize)

    v = sub.add_parser("verify", help="check DIR against its manifest (counts, hashes, zarr == tar)",
                       description="Check shard sizes, sha256 and sample counts, zarr shapes and kept tiles, "
                       "and that tar entries equal the zarr tiles for a sample of each shard. Zarr chunks carry "
                       "crc32c checksums: a corrupt chunk read is reported by array and chunk (stores written "
                       "before the checksums get a warning). Exit 1 and list every problem when something is "
                       "wrong.")
    v.add_argument("--out", required=True, type=Path, help="the prep output folder DIR")
    v.add_argument("--samples-per-shard", type=int, default=2, help="tiles compared tar vs zarr per shard")
    v.add_argument("--all-chunks", action="store_true",
                   help="read every stored zarr chunk (checksums checked) and compare every tile of every shard "
                        "with zarr, instead of --samples-per-shard of them; reads the whole dataset once")
    v.set_defaults(func=_verify)


def _prep(args: argparse.Namespace) -> int:
    from c2seg.config import parse_override
    from c2seg.distributed import array_task
    from c2seg.data_prep.manifest import finalize
    from c2seg.data_prep.prep import run_prep
    from c2seg.data_prep.prep_config import load_prep_config

    spec = spec_from_args(args)
    cfg = load_prep_config(args.config, dict(parse_override(s) for s in args.set))
    task, tasks = array_task(args.task_index, args.num_tasks)
    run_prep(spec, cfg, args.out, task_index=task, num_tasks=tasks, workers=args.workers)
    if tasks == 1 and not args.no_finalize:
        print(finalize(args.out))
    return 0


def _finalize(args: argparse.Namespace) -> int:
    from c2seg.data_prep.manifest import finalize

    print(finalize(args.out))
    return 0


def _verify(args: argparse.Namespace) -> int:
    from c2seg.data_prep.verify import verify

    problems = verify(args.out, args.samples_per_shard, args.all_chunks)
    for p in problems:
        print(f"PROBLEM: {p}")
    print(f"{args.out}: {'OK' if not problems else f'{len(problems)} problem(s)'}")
    return 1 if problems else 0
