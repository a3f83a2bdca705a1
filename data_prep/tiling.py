"""The deterministic tile plan: candidate tiles of every city, the spatially disjoint train / val
split, and the work units (one shard each) that tasks and workers share out.

The plan depends only on the spec (scene sizes and transforms) and the prep config, so every array
task computes the same plan and writes only its own units.

Validation split: the city is cut into square blocks of ``val_block_size`` px (in the city frame:
scene pixels, or for a multi-scene city the scenes placed by their georeferencing); a seeded
``val_fraction`` of the blocks (``source_val_fraction`` in source cities, none in unlabelled cities, whose
val split could score nothing) is held out. A tile lying wholly in held-out blocks is ``val``, one
touching none is ``train``, one straddling both is dropped (counted), so no pixel is in both splits.
A multi-scene city without georeferencing (all transforms equal), and a file list of chips without split files,
are split by whole scenes.

Given splits: a scene whose split is given (``Scene.split``: every scene of a test city is ``test``, a filelist
chip is in the split of the file that lists it) puts all its tiles in that split, and its city holds out no
blocks. ``test`` tiles are stored for scoring only: training reads train and val, and the statistics cover
every scene but the test ones.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field

import numpy as np

from c2seg.errors import C2SegError
from c2seg.spec import SPLITS, City, DatasetSpec
from c2seg.data_prep.prep_config import PrepConfig
from c2seg.data_prep.readers.base import Scene

STORE_ITEMSIZE = {"float32": 4, "float16": 2, "uint16": 2}


@dataclass
class SplitPlan:
    """Tiles of one city and split: ``tiles`` rows are (scene index, row, col), sorted."""

    city: str
    split: str
    labelled: bool
    tiles: np.ndarray
    units: list[tuple[int, int]] = field(default_factory=list)  # [start, stop) slot ranges, one shard each

    def unit_name(self, k: int) -> str:
        return f"{self.city}-{self.split}-{k:05d}"

    def shard_path(self, k: int) -> str:
        return f"shards/{self.split}/{self.city}-{k:05d}.tar"


@dataclass
class CityPlan:
    """Scenes of a city (name, height, width), its splits and what the split dropped."""

    city: str
    city_id: int
    role: str
    scenes: list[tuple[str, int, int]]
    splits: dict[str, SplitPlan]
    straddling_dropped: int
    small_scenes_skipped: int
    stats_units: list[list[tuple[int, int, int]]]  # per unit: (scene index, row0, rows)


def tile_origins(length: int, size: int, stride: int) -> list[int]:
    """Upper-left offsets of tiles along one axis; the last tile is aligned to the edge."""
    if length < size:
        return []
    starts = list(range(0, length - size + 1, stride))
    if starts[-1] != length - size:
        starts.append(length - size)
    return starts


def _scene_offsets(scenes: list[Scene]) -> list[tuple[int, int]] | None:
    """(row, col) of each scene in the city frame from its transform, or None without georeferencing."""
    if len(scenes) == 1:
        return [(0, 0)]
    transforms = [s.transform for s in scenes]
    if all(t == transforms[0] for t in transforms):
        return None
    res_x, res_y = abs(transforms[0].a), abs(transforms[0].e)
    left = min(t.c for t in transforms)
    top = max(t.f for t in transforms)
    return [(round((top - t.f) / res_y), round((t.c - left) / res_x)) for t in transforms]


def _pick(n: int, fraction: float, rng: np.random.Generator) -> set[int]:
    if fraction <= 0 or n < 2:
        return set()
    k = min(max(1, round(fraction * n)), n - 1)
    return set(rng.permutation(n)[:k].tolist())


def plan_city(spec: DatasetSpec, city: City, scenes: list[Scene], cfg: PrepConfig) -> CityPlan:
    """Candidate tiles of ``city`` split into train / val (test) and cut into units. ``cfg`` must be resolved."""
    size, stride, block = cfg.tile_size, cfg.stride, cfg.val_block_size
    rng = np.random.default_rng([cfg.seed, zlib.crc32(city.name.encode())])
    given = {s.split for s in scenes} - {None}
    offsets = None if city.format == "filelist" else _scene_offsets(scenes)
    per_split: dict[str, list[tuple[int, int, int]]] = {s: [] for s in SPLITS if s in _split_names(city, given)}
    straddling = small = 0
    fraction = getattr(cfg, val_fraction_key(city, cfg)) if city.labelled and not given else 0.0
    if offsets is None:  # scenes without georeferencing, chips of a file list: hold out whole scenes
        val_scenes = _pick(len(scenes), fraction, rng)
        held_out = "scenes (no georeferencing, or chips of a file list)" if val_scenes else ""
    else:
        extent_r = max(o[0] + s.height for o, s in zip(offsets, scenes))
        extent_c = max(o[1] + s.width for o, s in zip(offsets, scenes))
        nbr, nbc = math.ceil(extent_r / block), math.ceil(extent_c / block)
        val_blocks = _pick(nbr * nbc, fraction, rng)
        held_out = f"blocks of {block} px" if val_blocks else ""
    for i, scene in enumerate(scenes):
        rows, cols = tile_origins(scene.height, size, stride), tile_origins(scene.width, size, stride)
        if not rows or not cols:
            small += 1
            continue
        for r in rows:
            for c in cols:
                if scene.split is not None:
                    split = scene.split
                elif offsets is None:
                    split = "val" if i in val_scenes else "train"
                else:
                    r0, c0 = offsets[i][0] + r, offsets[i][1] + c
                    touched = {br * nbc + bc for br in range(r0 // block, (r0 + size - 1) // block + 1)
                               for bc in range(c0 // block, (c0 + size - 1) // block + 1)}
                    inside = len(touched & val_blocks)
                    if 0 < inside < len(touched):
                        straddling += 1
                        continue
                    split = "val" if inside else "train"
                per_split[split].append((i, r, c))
    splits = {}
    for split, tiles in per_split.items():
        labelled = city.labelled and (city.role == "source" or split != "train")
        plan = SplitPlan(city.name, split, labelled, np.array(tiles, dtype=np.int64).reshape(-1, 3))
        plan.units = _units(len(tiles), _samples_per_shard(spec, cfg, labelled, len(tiles)))
        splits[split] = plan
    plan = CityPlan(city.name, spec.cities.index(city), city.role,
                    [(s.name, s.height, s.width) for s in scenes], splits, straddling, small,
                    _stats_units(scenes, cfg))
    _require_tiles(spec, city, cfg, plan, held_out, given)
    return plan


def _split_names(city: City, given: set[str]) -> set[str]:
    """The splits a city's plan has: a test city's only test; others train and val, and test when given."""
    return {"test"} if city.role == "test" else {"train", "val"} | given


def val_fraction_key(city: City, cfg: PrepConfig) -> str:
    """The prep setting that gives the share of ``city``'s blocks held out for validation (in a labelled city;
    an unlabelled one holds out none, :class:`~data_prep.prep_config.PrepConfig`)."""
    return "source_val_fraction" if city.role == "source" and cfg.source_val_fraction is not None else "val_fraction"


def _require_tiles(spec: DatasetSpec, city: City, cfg: PrepConfig, plan: CityPlan, held_out: str,
                   given: set[str]) -> None:
    """Refuse a plan in which a split that should have tiles has none: train in every city but a test city (a
    source city's labels, a target city's tiles to adapt on), val when ``held_out`` names the validation blocks
    (or scenes) held out, and every split ``given`` for some of its scenes."""
    for split, sp in plan.splits.items():
        needed = split in given or (split == "train" and city.role != "test") or (split == "val" and held_out)
        if not len(sp.tiles) and needed:
            raise C2SegError(f"{spec.source_file or spec.name}: city '{city.name}' gets no {split} tiles: "
                             f"{_no_tiles_reason(city, cfg, plan, split, held_out, given)}")


def _no_tiles_reason(city: City, cfg: PrepConfig, plan: CityPlan, split: str, held_out: str,
                     given: set[str]) -> str:
    """Why ``split`` of ``plan`` has no tile, and the setting to change."""
    size, n = cfg.tile_size, len(plan.scenes)
    if given and split not in given:
        return f"the splits given for its scenes are {', '.join(sorted(given))} (add a {split} list to its splits)"
    if given:
        return (f"every scene given for it is smaller than the {size} px tile size: set tile_size (or less) in the "
                f"prep config")
    if plan.small_scenes_skipped == n:
        h, w = max(((h, w) for _, h, w in plan.scenes), key=min)
        scenes = (f"its scene is {h} x {w} px, smaller than the {size} px tile size" if n == 1 else
                  f"its {n} scenes are all smaller than the {size} px tile size (the largest is {h} x {w} px)")
        return f"{scenes}: set tile_size: {min(h, w)} (or less) in the prep config, or --set tile_size={min(h, w)}"
    key = val_fraction_key(city, cfg)
    tiles = sum(len(sp.tiles) for sp in plan.splits.values()) + plan.straddling_dropped
    return (f"none of its {tiles} tiles lies wholly {'outside' if split == 'train' else 'inside'} the held-out "
            f"validation {held_out} ({plan.straddling_dropped} straddle them and are dropped; "
            f"{plan.small_scenes_skipped} of its {n} scenes are smaller than the {size} px tile): change "
            f"val_block_size or {key} ({getattr(cfg, key):g})")


def sample_bytes(spec: DatasetSpec, cfg: PrepConfig, labelled: bool) -> int:
    """Bytes of one stored tile (all modalities, plus the label)."""
    px = cfg.tile_size * cfg.tile_size
    return sum(m.channels * px * STORE_ITEMSIZE[cfg.store_dtypes[m.name]] for m in spec.modalities) + labelled * px


def _samples_per_shard(spec: DatasetSpec, cfg: PrepConfig, labelled: bool, n: int) -> int:
    by_bytes = max(1, cfg.shard_max_bytes // sample_bytes(spec, cfg, labelled))
    spread = max(1, math.ceil(n / cfg.min_shards_per_split))
    return min(cfg.shard_max_samples, by_bytes, spread)


def _units(n: int, per: int) -> list[tuple[int, int]]:
    return [(a, min(a + per, n)) for a in range(0, n, per)]


def _stats_units(scenes: list[Scene], cfg: PrepConfig) -> list[list[tuple[int, int, int]]]:
    """Row blocks of every scene but the test ones, grouped into units of about ``stats_block_rows`` x 2048 px."""
    budget = cfg.stats_block_rows * 2048
    units: list[list[tuple[int, int, int]]] = [[]]
    used = 0
    for i, s in enumerate(scenes):
        if s.split == "test":  # test scenes never enter the statistics
            continue
        for r in range(0, s.height, cfg.stats_block_rows):
            rows = min(cfg.stats_block_rows, s.height - r)
            if units[-1] and used + rows * s.width > budget:
                units.append([])
                used = 0
            units[-1].append((i, r, rows))
            used += rows * s.width
    return [u for u in units if u]
