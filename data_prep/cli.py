"""``c2seg data``: scene sub-commands (generate, inspect) and dataset sub-commands (prep, verify)."""

from __future__ import annotations

import argparse

from c2seg.data_prep import cli_prep, cli_scenes


def register(stages: argparse._SubParsersAction) -> None:
    parser = stages.add_parser(
        "data", help="data_prep: generate demo cities, inspect scenes, tile and shard into Zarr + WebDataset",
        description="Read city scenes (GeoTIFF, MATLAB .mat, challenge tile folders), check them, compute "
        "normalisation statistics, cut tiles and shard them into a Zarr store and WebDataset tar archives.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    cli_scenes.register(sub)
    cli_prep.register(sub)
