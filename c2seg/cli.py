"""The ``c2seg`` command: one sub-command group per stage, each owned by its package.

Each stage package exposes ``cli.register(subparsers)``; handlers import their heavy dependencies
lazily so that ``c2seg --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from c2seg.spec import DatasetSpec

STAGES = ("c2seg.data_prep.cli", "c2seg.train.cli", "c2seg.inference.cli", "c2seg.slurm.cli", "c2seg.demo")


def parse_size(text: str) -> tuple[int, int]:
    """``HEIGHTxWIDTH`` (or ``N`` for N x N) as an argparse type."""
    match = re.fullmatch(r"(\d+)(?:x(\d+))?", text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"size '{text}' must look like HEIGHTxWIDTH (e.g. 256x384) or N")
    h = int(match.group(1))
    return h, int(match.group(2) or h)


def add_spec_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """The dataset-spec arguments every stage shares."""
    parser.add_argument("--spec", required=required, type=Path,
                        help="dataset spec YAML (configs/datasets/*.yaml): modalities, classes, cities")
    parser.add_argument("--data-root", type=Path, default=None,
                        help="folder holding the cities' files (overrides data_root in the spec)")


def spec_from_args(args: argparse.Namespace) -> DatasetSpec:
    """Load the spec named by :func:`add_spec_args` arguments."""
    from c2seg.spec import load_spec

    return load_spec(args.spec, data_root=args.data_root)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="c2seg",
        description="Cross-city multimodal semantic segmentation of remote-sensing scenes, at scale. "
        "Stages: data (generate, inspect, prep, verify) -> train (pretrain, finetune, export) -> "
        "infer (run, evaluate); slurm chains them on a cluster; demo runs everything locally.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="stage", metavar="STAGE", required=True)
    for module in STAGES:
        importlib.import_module(module).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    from c2seg.errors import C2SegError

    try:
        return int(args.func(args) or 0)
    except (C2SegError, FileNotFoundError) as exc:  # the user's to fix: one line; anything else is a bug
        if args.verbose:
            raise
        print(f"c2seg {args.stage}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
