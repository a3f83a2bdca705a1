"""``c2seg data generate`` and ``c2seg data inspect``: the scene-level sub-commands."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import get_args

import yaml

from c2seg.errors import C2SegError
from c2seg.cli import add_spec_args, parse_size, spec_from_args
from c2seg.spec import SceneFormat
from c2seg.data_prep.synth.domain import SHIFT_PROFILES

log = logging.getLogger("c2seg.data")
FORMATS = tuple(f for f in get_args(SceneFormat) if f != "filelist")  # the formats generate writes


def register(sub: argparse._SubParsersAction) -> None:
    gen = sub.add_parser(
        "generate", help="write generated source and target cities for a spec, in its release formats",
        description="Generate every city of a spec: coherent land cover (parcels, roads, water, urban blocks), "
        "smooth per-class spectra, MSI integrated from them, SAR in dB with speckle, and a domain shift between "
        "source and target cities (docs/demo-data.md). Written window by window (except mat_v5) under the spec's "
        "data root; deterministic by seed. Cities whose files exist are kept unless --overwrite.",
    )
    add_spec_args(gen)
    gen.add_argument("--size", type=parse_size, default=(256, 384), metavar="HxW",
                     help="city size in grid pixels, e.g. 256x384 (default: %(default)s)")
    gen.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    gen.add_argument("--format", choices=FORMATS, default=None,
                     help="write every city in this format instead of the spec's, with a default file layout; the "
                     "matching spec is written to DATA_ROOT/spec.yaml")
    gen.add_argument("--overwrite", action="store_true", help="regenerate cities whose files already exist")
    gen.add_argument("--shift", choices=SHIFT_PROFILES, default="default",
                     help="domain-shift profile between the cities: " + "; ".join(
                         f"{name}: {what}" for name, what in SHIFT_PROFILES.items()).replace("%", "%%")
                     + " (default: %(default)s)")
    gen.set_defaults(func=_generate)

    ins = sub.add_parser(
        "inspect", help="check every city of a spec window by window; print a summary, write quicklooks",
        description="Open every city with the readers, read it window by window (all checks: band counts, grid "
        "alignment, label values, NaN/inf, damaged files, values outside the bounds of each modality's unit, pixel "
        "size against grid_resolution_m, band centres against wavelengths_nm), print a table (size, modalities, "
        "value ranges, non-finite and out-of-bounds counts, bands with one value everywhere or flagged bad, class "
        "histogram) and the spec's modalities block as the files describe it (to paste), and, with --out, write "
        "OUT/<city>.png and OUT/summary.json. Exit 1 and list every problem when values lie outside their unit's "
        "bounds or the pixel size or band centres do not match the spec.",
    )
    add_spec_args(ins)
    ins.add_argument("--out", type=Path, default=None, help="folder for quicklook PNGs and summary.json")
    ins.add_argument("--block", type=int, default=512, help="window size in px for reading (default: %(default)s)")
    ins.add_argument("--city", action="append", default=None, help="inspect only this city (repeatable)")
    ins.set_defaults(func=_inspect)


def _generate(args: argparse.Namespace) -> int:
    from c2seg.config import to_dict
    from c2seg.data_prep.synth import generate_dataset

    spec = spec_from_args(args)
    height, width = args.size
    out_spec = generate_dataset(spec, height, width, seed=args.seed, fmt=args.format, overwrite=args.overwrite,
                                shift=args.shift)
    if args.format:
        data = to_dict(out_spec)
        data.pop("source_file")
        data["data_root"] = str(Path(out_spec.data_root).resolve())
        path = Path(out_spec.data_root) / "spec.yaml"
        path.write_text(f"# {spec.name} generated as {args.format} by c2seg data generate\n"
                        + yaml.safe_dump(data, sort_keys=False))
        log.info("spec for the %s files written to %s (use --spec %s)", args.format, path, path)
    print(f"generated {len(out_spec.cities)} cities of {height} x {width} px under {out_spec.data_root}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from c2seg.data_prep.inspect import city_problems, format_summary, inspect_dataset, spec_block

    if args.out is not None and args.out.exists() and not args.out.is_dir():
        raise C2SegError(f"{args.out}: is a file, expected a folder for the quicklooks (--out)")
    spec = spec_from_args(args)
    summaries = inspect_dataset(spec, args.out, args.block, cities=args.city)
    print(format_summary(spec, summaries))
    print(f"\n# the modalities as the files describe them (paste into {spec.source_file or 'the spec'}):")
    print(spec_block(spec, summaries), end="")
    problems = [p for s in summaries for p in city_problems(spec, s)]
    for p in problems:
        print(f"PROBLEM: {p}")
    return 1 if problems else 0
