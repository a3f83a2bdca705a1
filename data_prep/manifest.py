"""The manifest of a prepared dataset: written by finalize from the tasks' parts, read by train,
inference and verify through :func:`load_manifest`.

``manifest.json`` holds: format, creation time, tool versions, the spec (and its hash), the resolved
prep config, stored dtypes with their measured cast error, statistics per modality pooled over all
cities and per city (count, mean, std, min, max, p01, p99 per band; test scenes left out, so a test city
has none), and per city and split: tile counts (planned, kept, dropped for nodata / for straddling the val
blocks), the scenes its planned tiles come from (in scene order), the class histogram, the zarr group and the
shard list (path, samples, bytes, sha256).
"""

from __future__ import annotations

import json
import logging
import platform
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np

from c2seg.errors import C2SegError
from c2seg.config import load_json_record
from c2seg.io import write_text_atomic
from c2seg.spec import SPLITS, DatasetSpec, spec_from_dict
from c2seg.data_prep.prep import Job, load_job
from c2seg.data_prep.stats import BandStats, bounds_problem, fill_value, nodata_mask
from c2seg.data_prep.tiling import CityPlan
from c2seg.data_prep.zarr_store import STORE, write_kept

log = logging.getLogger("c2seg.prep")

MANIFEST = "manifest.json"
FORMAT = "c2seg-prep/1"


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("c2seg", "numpy", "zarr", "numcodecs", "webdataset", "rasterio"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _check_city_stats(out: Path, job: Job, city: str, acc: dict[str, BandStats]) -> None:
    """Refuse statistics outside the value bounds of a modality's unit (parts written by another version)."""
    for m in job.spec.modalities:
        problem = bounds_problem(acc[m.name], m)
        if problem:
            raise C2SegError(f"{out}: city '{city}', {problem} in the statistics parts (corrupt pixel data or "
                             f"a wrong unit; delete {out} and rerun the prep)")


def empty_splits(splits: dict[str, dict]) -> list[str]:
    """The splits of a city's manifest record that hold no tile but should: train always (a source city's labels,
    a target city's tiles to adapt on), val when tiles were planned for it (validation blocks were held out)."""
    return [s for s, rec in splits.items() if not rec["tiles"] and (s == "train" or rec["planned"])]


def _nodata_reason(job: Job, plan: CityPlan, acc: dict[str, BandStats], planned: int) -> str:
    """Why a split kept none of its ``planned`` tiles: all were dropped as nodata (naming the modality with the
    most nodata pixels); the plan gave every split that should have tiles some (:func:`data_prep.tiling.plan_city`)."""
    dropped = (f"all {planned} tiles were dropped as nodata (over max_nodata_fraction "
               f"{job.cfg.max_nodata_fraction:g} of their pixels)")
    if not plan.stats_units:  # a test city: no statistics count its pixels
        return f"{dropped} (NaN and inf are read as nodata)"
    pixels = sum(h * w for _, h, w in plan.scenes)
    nodata = {m.name: 1 - int(acc[m.name].count[0]) / pixels for m in job.spec.modalities}
    worst = max(nodata, key=nodata.get)
    return (f"{dropped}: modality '{worst}' is nodata in {100 * nodata[worst]:.1f}% of the city's pixels "
            f"(fill value {fill_value(job.spec.modality(worst)):g}; NaN and inf are read as nodata)")


def finalize(out: Path) -> Path:
    """Join the parts of every task into ``out/manifest.json``; fails naming the missing units, a city split
    that kept no tiles but should (:func:`empty_splits`), or statistics outside a modality's value bounds."""
    out = Path(out)
    job = load_job(out)
    units = job.units()
    missing = [u for u in units if not job.marker(u).is_file()]
    if missing:
        names = [job.marker(u).name for u in missing[:5]]
        raise C2SegError(f"{out}: {len(missing)} of {len(units)} work units are not done (e.g. {names}); "
                         f"rerun the prep tasks (they resume) before finalize")
    spec = job.spec
    pooled = {m.name: BandStats.empty(m.channels) for m in spec.modalities}
    cities, max_err = {}, dict.fromkeys(spec.modality_names, 0.0)
    for city, plan in job.plans.items():
        acc = {m.name: BandStats.empty(m.channels) for m in spec.modalities}
        for k in range(len(plan.stats_units)):
            with np.load(job.marker(("stats", city, "", k))) as data:
                for name in acc:
                    part = BandStats.from_arrays(data, name)
                    acc[name].merge(part)
                    pooled[name].merge(part)
        _check_city_stats(out, job, city, acc)
        splits = {}
        for split, sp in plan.splits.items():
            records = [json.loads(job.marker(("tiles", city, split, k)).read_text()) for k in range(len(sp.units))]
            kept = sorted(s for r in records for s in r["kept"])
            hist = np.sum([r["class_histogram"] for r in records], axis=0) if records else np.zeros(256, int)
            for r in records:
                for m, e in r["max_rel_error"].items():
                    max_err[m] = max(max_err[m], e)
            write_kept(out, city, split, kept)
            splits[split] = {
                "labelled": sp.labelled, "planned": len(sp.tiles), "tiles": len(kept),
                "scenes": [plan.scenes[i][0] for i in np.unique(sp.tiles[:, 0])],
                "dropped_nodata": sum(r["dropped_nodata"] for r in records),
                "class_histogram": {str(c): int(n) for c, n in enumerate(hist) if n},
                "zarr": f"{STORE}/{city}/{split}",
                "shards": [r["shard"] for r in records],
            }
        empty = empty_splits(splits)
        if empty:
            raise C2SegError(f"{out}: city '{city}' kept no {empty[0]} tiles: "
                             f"{_nodata_reason(job, plan, acc, splits[empty[0]]['planned'])}")
        cities[city] = {"id": plan.city_id, "role": plan.role, "scenes": [s[0] for s in plan.scenes],
                        "dropped_straddling": plan.straddling_dropped,
                        "scenes_smaller_than_tile": plan.small_scenes_skipped, "splits": splits}
        if plan.stats_units:
            cities[city]["stats"] = {m: a.summary() for m, a in acc.items()}
    manifest = {
        "format": FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "versions": _versions(),
        "spec": spec.to_dict(), "spec_hash": spec.spec_hash, "spec_fingerprint": spec.fingerprint,
        "config": json.loads((out / "job.json").read_text())["config"],
        "store_dtypes": {m: {"dtype": job.cfg.store_dtypes[m], "max_rel_error": max_err[m]}
                         for m in spec.modality_names},
        "stats": {m: a.summary() for m, a in pooled.items()},
        "cities": cities,
    }
    path = out / MANIFEST
    write_text_atomic(path, json.dumps(manifest, indent=1))
    totals = {s: sum(c["splits"][s]["tiles"] for c in cities.values() if s in c["splits"]) for s in SPLITS}
    log.info("finalized %s: %d train, %d val and %d test tiles in %d shards", path, totals["train"], totals["val"],
             totals["test"], sum(len(sp["shards"]) for c in cities.values() for sp in c["splits"].values()))
    return path


@dataclass(frozen=True)
class ShardInfo:
    """One shard of the manifest, with its absolute path."""

    path: Path
    city: str
    split: str
    samples: int
    bytes: int
    sha256: str


class Normalizer:
    """Per-band ``(x - mean) / std`` with the pooled statistics; nodata pixels (every band at the
    modality's fill value) become 0."""

    def __init__(self, spec: DatasetSpec, stats: dict[str, dict]) -> None:
        from c2seg.data_prep.stats import fill_value

        self.modalities = spec.modality_names
        self.mean = {m: np.asarray(stats[m]["mean"], np.float32) for m in self.modalities}
        self.std = {m: np.maximum(np.asarray(stats[m]["std"], np.float32), 1e-6) for m in self.modalities}
        self.fill = {m.name: fill_value(m) for m in spec.modalities}
        self.stats = self.as_dict()  # {modality: {"mean": [...], "std": [...]}}

    def __call__(self, modality: str, values: np.ndarray) -> np.ndarray:
        """Normalise ``(C, H, W)`` or ``(B, C, H, W)`` values of ``modality`` to float32."""
        values = np.asarray(values)
        nodata = np.expand_dims(nodata_mask(values, self.fill[modality]), -3)
        shape = (-1, 1, 1)
        out = (values.astype(np.float32) - self.mean[modality].reshape(shape)) / self.std[modality].reshape(shape)
        return np.where(nodata, np.float32(0.0), out)

    def as_dict(self) -> dict[str, dict[str, list[float]]]:
        """``{modality: {"mean": [...], "std": [...]}}``, the form exported models carry."""
        return {m: {"mean": self.mean[m].tolist(), "std": self.std[m].tolist()} for m in self.modalities}

    def remap_to(self, other: Normalizer, modality: str) -> tuple[np.ndarray, np.ndarray]:
        """Per-band ``(scale, shift)`` with ``other(x) == self(x) * scale + shift`` for data pixels: the
        exact affine map from values normalised by ``self`` to values normalised by ``other``."""
        scale = self.std[modality] / other.std[modality]
        shift = (self.mean[modality] - other.mean[modality]) / other.std[modality]
        return scale.astype(np.float32), shift.astype(np.float32)


class Manifest:
    """A prepared dataset's manifest: ``.spec``, ``.stats`` (pooled per modality), ``.city_stats``,
    ``.cities`` (per-city records), :meth:`shards`, :meth:`normalizer`."""

    def __init__(self, root: Path, data: dict) -> None:
        self.root, self.data = Path(root), data
        self.spec: DatasetSpec = spec_from_dict(data["spec"], source=str(root / MANIFEST))
        self.stats: dict[str, dict] = data["stats"]
        self.cities: dict[str, dict] = data["cities"]
        self.city_stats = {c: v["stats"] for c, v in self.cities.items() if "stats" in v}  # test cities have none
        self.tile_size: int = data["config"]["tile_size"]

    def city_names(self, cities: list[str] | tuple[str, ...] | None = None) -> list[str]:
        """``cities`` checked against the manifest (all cities when None)."""
        if cities is None:
            return list(self.cities)
        unknown = [c for c in cities if c not in self.cities]
        if unknown:
            raise C2SegError(f"{self.root / MANIFEST}: no city {unknown} (has {list(self.cities)})")
        return list(cities)

    def shards(self, split: str, cities: list[str] | tuple[str, ...] | None = None) -> list[ShardInfo]:
        """Shards of ``split`` for ``cities`` (all when None), in manifest order."""
        out = []
        for c in self.city_names(cities):
            splits = self.cities[c]["splits"]
            if split not in splits:
                raise C2SegError(f"{self.root / MANIFEST}: no split '{split}' (has {list(splits)})")
            for s in splits[split]["shards"]:
                out.append(ShardInfo(self.root / s["path"], c, split, s["samples"], s["bytes"], s["sha256"]))
        return out

    def normalizer(self) -> Normalizer:
        """Normalisation with the statistics pooled over all cities."""
        return Normalizer(self.spec, self.stats)

    def city_normalizer(self, city: str) -> Normalizer:
        """Normalisation with ``city``'s own per-band statistics (per-city standardisation)."""
        return Normalizer(self.spec, self.city_stats[self.city_names([city])[0]])

    def city_normalization(self) -> dict[str, dict[str, dict[str, list[float]]]]:
        """``{city: {modality: {"mean": [...], "std": [...]}}}`` for every city with statistics (all but test
        cities), as exported models carry it."""
        return {c: self.city_normalizer(c).as_dict() for c in self.city_stats}

    def city_remap(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Per modality ``(scale, shift)``, each ``(n_cities, C)`` float32, row ``i`` for ``spec.cities[i]``
        (the loaders' ``city_id``): maps pooled-normalised values to the city's own standardisation
        (:meth:`Normalizer.remap_to`). A spec city without statistics (not prepared, or a test city) keeps the
        identity."""
        pooled = self.normalizer()
        out = {}
        for m in self.spec.modalities:
            scale = np.ones((len(self.spec.cities), m.channels), np.float32)
            shift = np.zeros((len(self.spec.cities), m.channels), np.float32)
            for i, city in enumerate(self.spec.cities):
                if city.name in self.city_stats:
                    scale[i], shift[i] = pooled.remap_to(self.city_normalizer(city.name), m.name)
            out[m.name] = (scale, shift)
        return out


def load_manifest(prep_dir: str | Path) -> Manifest:
    """Read ``prep_dir/manifest.json`` (made by ``c2seg data prep`` / ``finalize``)."""
    data = load_json_record(Path(prep_dir) / MANIFEST, FORMAT,
                            "no manifest (run `c2seg data prep` and `c2seg data finalize` first)")
    return Manifest(Path(prep_dir), data)
