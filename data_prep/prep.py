"""``c2seg data prep``: run this task's share of the work units (statistics and tile shards),
resumably, optionally over a process pool; ``finalize`` joins the parts into the manifest.

Layout of the output folder: ``job.json`` (spec, resolved config, tile plan; written once, checked by
every later task), ``dataset.zarr``, ``shards/<split>/<city>-<n>.tar``, ``parts/units/*.json`` and
``parts/stats/*.npz`` (one done-marker per finished unit, written last and atomically), then
``manifest.json`` from finalize. A rerun skips units whose marker exists and redoes the others, which
rewrite the same chunks and shard names, so a crash leaves nothing duplicated or missing; every file is
written atomically (``c2seg.io``), and a run first deletes the temp files of killed writers.

Pool workers die with the task that started them (Linux: ``PR_SET_PDEATHSIG``), and each records itself in
``parts/workers/``: a rerun kills the workers of an earlier run of its task that outlived their parent
(orphans), so it never runs beside them.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import socket
import sys
import time
import zlib
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import psutil
from tqdm import tqdm

from c2seg.errors import C2SegError
from c2seg.config import from_dict, load_json_record, to_dict
from c2seg.io import atomic_path, remove_dead_partials, write_text_atomic
from c2seg.spec import DatasetSpec, spec_from_dict
from c2seg.data_prep.prep_config import PrepConfig
from c2seg.raster import Window
from c2seg.data_prep.readers.base import Scene
from c2seg.data_prep.scene_checks import require_matching
from c2seg.data_prep.shards import sample_key, write_shard
from c2seg.data_prep.stats import BandStats, bounds_problem, fill_value, nodata_mask
from c2seg.data_prep.tiling import CityPlan, SplitPlan, plan_city
from c2seg.data_prep.zarr_store import create_store, file_lock, write_tiles

log = logging.getLogger("c2seg.prep")

JOB_FORMAT = "c2seg-prep-job/1"
FLOAT16_MAX = 65504.0
PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
SceneOpener = Callable[[DatasetSpec, str], list[Scene]]


def default_opener(spec: DatasetSpec, city: str) -> list[Scene]:
    from c2seg.data_prep.readers import open_city

    return open_city(spec, city)


@dataclass
class Job:
    """What every task of one prep job shares: spec, resolved config, plan and output folder."""

    out: Path
    spec: DatasetSpec
    cfg: PrepConfig
    plans: dict[str, CityPlan]
    opener: SceneOpener = default_opener

    def units(self) -> list[tuple[str, str, str, int]]:
        """Every work unit, in a fixed order: ("stats", city, "", k) and ("tiles", city, split, k)."""
        units = []
        for city, plan in self.plans.items():
            units += [("stats", city, "", k) for k in range(len(plan.stats_units))]
            for split, sp in plan.splits.items():
                units += [("tiles", city, split, k) for k in range(len(sp.units))]
        return units

    def marker(self, unit: tuple[str, str, str, int]) -> Path:
        kind, city, split, k = unit
        if kind == "stats":
            return self.out / "parts" / "stats" / f"{city}-{k:05d}.npz"
        return self.out / "parts" / "units" / f"{self.plans[city].splits[split].unit_name(k)}.json"


# ---- the job record ------------------------------------------------------------------------------
def _plan_to_dict(plan: CityPlan) -> dict:
    d = dict(plan.__dict__)
    d["splits"] = {s: {"labelled": sp.labelled, "tiles": sp.tiles.tolist(), "units": sp.units}
                   for s, sp in plan.splits.items()}
    return d


def _plan_from_dict(d: dict) -> CityPlan:
    splits = {s: SplitPlan(d["city"], s, v["labelled"], np.array(v["tiles"], np.int64).reshape(-1, 3),
                           [tuple(u) for u in v["units"]]) for s, v in d["splits"].items()}
    return CityPlan(**{**d, "splits": splits, "scenes": [tuple(s) for s in d["scenes"]],
                       "stats_units": [[tuple(i) for i in u] for u in d["stats_units"]]})


def _job_record(job: Job) -> dict:
    return {"format": JOB_FORMAT, "spec": job.spec.to_dict(), "data_root": job.spec.data_root,
            "spec_hash": job.spec.spec_hash, "config": to_dict(job.cfg),
            "plans": {c: _plan_to_dict(p) for c, p in job.plans.items()}}


def load_job(out: Path, opener: SceneOpener = default_opener) -> Job:
    """The job recorded in ``out/job.json`` (written by the first task)."""
    path = Path(out) / "job.json"
    rec = load_json_record(path, JOB_FORMAT, f"no prep job here (run `c2seg data prep --out {out}` first)")
    spec = spec_from_dict(rec["spec"], source=str(path), data_root=rec["data_root"])
    cfg = from_dict(PrepConfig, rec["config"], source=str(path))
    return Job(Path(out), spec, cfg, {c: _plan_from_dict(p) for c, p in rec["plans"].items()}, opener)


def _plan(spec: DatasetSpec, cfg: PrepConfig, opener: SceneOpener) -> tuple[PrepConfig, dict[str, CityPlan]]:
    """The resolved config and every city's plan. Tile-folder cities are opened first (their scenes hold no
    file handles), as the side of their smallest tile may set the tile size (:class:`PrepConfig`). A scene whose
    pixel size or band centres do not match the spec fails (:func:`data_prep.scene_checks.require_matching`)."""
    tiled = {c.name: opener(spec, c.name) for c in spec.cities if c.format == "tiles"}
    sides = {name: min(min(s.height, s.width) for s in scenes) for name, scenes in tiled.items()}
    resolved = cfg.resolved(spec, sides)
    if resolved.tile_size < spec.tiling.size and cfg.tile_size is None:
        city = min(sides, key=sides.get)
        log.info("tile size %d px, stride %d: the smallest tile of city '%s' (the spec's tiling.size %d is larger)",
                 resolved.tile_size, resolved.stride, city, spec.tiling.size)
    plans = {}
    for city in spec.cities:
        scenes = tiled.pop(city.name, None) or opener(spec, city.name)
        try:
            require_matching(spec, scenes)
            plans[city.name] = plan_city(spec, city, scenes, resolved)
        finally:
            for s in scenes:
                s.close()
    return resolved, plans


def open_job(spec: DatasetSpec, cfg: PrepConfig, out: Path, opener: SceneOpener = default_opener) -> Job:
    """Plan the job and record it in ``out`` (first task), or check it against the record (later tasks)."""
    out = Path(out)
    cfg, plans = _plan(spec, cfg, opener)
    job = Job(out, spec, cfg, plans, opener)
    record = _job_record(job)
    with file_lock(out / ".prep.lock"):
        path = out / "job.json"
        if path.is_file():
            old = json.loads(path.read_text())
            for key in ("spec_hash", "config", "plans"):
                if old.get(key) != json.loads(json.dumps(record[key])):
                    raise C2SegError(f"{path}: this folder holds a prep job with another {key.rstrip('s')} "
                                     f"(use a new --out, or delete {out})")
        else:
            write_text_atomic(path, json.dumps(record))
        create_store(out, spec, cfg, plans)
    return job


# ---- work units ------------------------------------------------------------------------------------
_SCENES: dict[str, list[Scene]] = {}
_JOB: Job | None = None


def _scenes(job: Job, city: str) -> list[Scene]:
    if city not in _SCENES:
        _SCENES[city] = job.opener(job.spec, city)
    return _SCENES[city]


def _close_scenes() -> None:
    for scenes in _SCENES.values():
        for s in scenes:
            s.close()
    _SCENES.clear()


def _covered(shape: tuple[int, ...], parts: list[tuple[slice, slice]]) -> np.ndarray | bool:
    """``(h, w)`` True on the pixels of ``parts`` (a ``where=`` for reductions); plain True when they cover
    every pixel."""
    covered = np.zeros(shape, bool)
    for rs, cs in parts:
        covered[rs, cs] = True
    return True if covered.all() else covered


def _band_chunks(*arrays: np.ndarray) -> Iterator[list[np.ndarray]]:
    """``arrays`` (C, h, w each) a cache-sized chunk of bands at a time."""
    step = max(1, (1 << 18) // max(arrays[0][0].size, 1))
    for c0 in range(0, len(arrays[0]), step):
        yield [a[c0:c0 + step] for a in arrays]


def _max_rel_error(stored: np.ndarray, values: np.ndarray, covered: np.ndarray | bool) -> float:
    """Largest ``|stored - values| / max(|values|, 1e-6)`` over the ``covered`` pixels."""
    worst = 0.0
    for s, v in _band_chunks(stored, values):
        err = s.astype(np.float32)
        np.subtract(err, v, out=err)
        np.abs(err, out=err)
        den = np.abs(v)
        np.maximum(den, np.float32(1e-6), out=den)
        np.divide(err, den, out=err)
        worst = max(worst, float(err.max(where=covered, initial=0.0)))
    return worst


def _to_store(values: np.ndarray, dtype: str, modality: str, where: str,
              parts: list[tuple[slice, slice]]) -> tuple[np.ndarray, float]:
    """``values`` (C, h, w) cast to the stored dtype (once, whole), and the largest relative error of the
    cast; only the pixels of ``parts`` (the kept tiles' windows) are stored, so only they must fit the
    dtype and count in the error (each pixel checked once, though tiles overlap)."""
    if dtype == "float32" or not parts:
        return values, 0.0
    covered = _covered(values.shape[1:], parts)
    lo, hi = np.inf, -np.inf
    for (v,) in _band_chunks(values):
        lo = min(lo, float(v.min(where=covered, initial=np.inf)))
        hi = max(hi, float(v.max(where=covered, initial=-np.inf)))
    if dtype == "uint16":
        whole = all(np.all(v == np.round(v), where=covered) for (v,) in _band_chunks(values))
        if lo < 0 or hi > 65535 or not whole:
            raise C2SegError(f"{where}: modality '{modality}' holds values that are not integers in 0..65535, "
                             f"so store_dtypes.{modality}: uint16 would lose them (use float16 or float32)")
        return values.astype(np.uint16), 0.0
    if max(-lo, hi) > FLOAT16_MAX:
        raise C2SegError(f"{where}: modality '{modality}' holds values beyond the float16 range (|v| > 65504); "
                         f"set store_dtypes.{modality}: float32")
    with np.errstate(over="ignore"):  # out-of-range values can only lie in pixels that are not stored
        stored = values.astype(np.float16)
    return stored, _max_rel_error(stored, values, covered)


def _run_tiles(job: Job, city: str, split: str, k: int) -> dict:
    """One unit: per scene, read the box around its tiles once per modality, cast it once and copy its kept
    tiles out once, into one array per modality (the shard's payloads are its rows, the zarr writes its
    slices); then write the shard (in a thread) while the zarr chunks are compressed and written."""
    spec, cfg, t = job.spec, job.cfg, job.cfg.tile_size
    sp = job.plans[city].splits[split]
    start, stop = sp.units[k]
    tiles = sp.tiles[start:stop]
    scenes = _scenes(job, city)
    kept: list[int] = []
    zarr_parts: list[tuple[list[int], dict[str, np.ndarray]]] = []  # per scene: slots, their tiles per array
    samples, hist, max_err = [], np.zeros(256, np.int64), dict.fromkeys(spec.modality_names, 0.0)
    dropped = 0
    for scene_idx in np.unique(tiles[:, 0]):
        scene = scenes[scene_idx]
        rows = tiles[tiles[:, 0] == scene_idx]
        r0, c0 = rows[:, 1].min(), rows[:, 2].min()
        box = Window(int(r0), int(c0), int(rows[:, 1].max() + t - r0), int(rows[:, 2].max() + t - c0))
        raw = {m.name: scene.read(m.name, box) for m in spec.modalities}
        nodata = np.zeros((box.height, box.width), bool)
        for m in spec.modalities:
            nodata |= nodata_mask(raw[m.name], fill_value(m))
        slot0 = start + int(np.flatnonzero(tiles[:, 0] == scene_idx)[0])
        windows = [(slot0 + j, r, c, slice(r - r0, r - r0 + t), slice(c - c0, c - c0 + t))
                   for j, (_, r, c) in enumerate(rows)]
        keep = [w for w in windows if nodata[w[3], w[4]].mean() <= cfg.max_nodata_fraction]
        dropped += len(windows) - len(keep)
        block = {}
        for m in spec.modality_names:
            block[m], err = _to_store(raw.pop(m), cfg.store_dtypes[m], m, str(scene.path),
                                      [(rs, cs) for *_, rs, cs in keep])
            max_err[m] = max(max_err[m], err)
        if not keep:
            continue
        if sp.labelled:
            block["label"] = scene.read_label(box)
        tiles_of = {name: np.stack([b[..., rs, cs] for *_, rs, cs in keep]) for name, b in block.items()}
        zarr_parts.append(([w[0] for w in keep], tiles_of))
        for j, (slot, r, c, _, _) in enumerate(keep):
            entries: dict = {f"{name}.npy": stacked[j] for name, stacked in tiles_of.items()}
            if sp.labelled:
                hist += np.bincount(tiles_of["label"][j].ravel(), minlength=256)
            entries["json"] = json.dumps({"city": city, "split": split, "scene": scene.name, "slot": slot,
                                          "window": [int(r), int(c), t, t]}).encode()
            samples.append((sample_key(city, split, slot), entries))
            kept.append(slot)
    with ThreadPoolExecutor(1) as pool:  # file writes, sha256, fsync and blosc all release the GIL
        shard = pool.submit(write_shard, job.out / sp.shard_path(k), samples)
        write_tiles(job.out, city, split, zarr_parts)
        size, sha = shard.result()
    return {"unit": sp.unit_name(k), "city": city, "split": split, "kept": kept, "dropped_nodata": dropped,
            "class_histogram": hist.tolist(), "max_rel_error": max_err,
            "shard": {"path": sp.shard_path(k), "samples": len(samples), "bytes": size, "sha256": sha}}


def _run_stats(job: Job, city: str, k: int) -> dict[str, np.ndarray]:
    spec, cfg = job.spec, job.cfg
    items = job.plans[city].stats_units[k]
    scenes = _scenes(job, city)
    acc = {m.name: BandStats.empty(m.channels) for m in spec.modalities}
    rng = np.random.default_rng([cfg.seed, zlib.crc32(city.encode()), k])
    keep = max(1, cfg.stats_samples_per_block // len(items))
    for scene_idx, r0, rows in items:
        scene = scenes[scene_idx]
        window = Window(r0, 0, rows, scene.width)
        for m in spec.modalities:
            values = scene.read(m.name, window)
            acc[m.name].add(values, ~nodata_mask(values, fill_value(m)), rng, keep)
            problem = bounds_problem(acc[m.name], m)
            if problem:
                raise C2SegError(f"{scene.file_of(m.name)}: city '{city}', {problem} (corrupt pixel data or a "
                                 "wrong unit in the spec; `c2seg data inspect` counts such values)")
    arrays: dict[str, np.ndarray] = {}
    for name, stats in acc.items():
        arrays.update(stats.to_arrays(name))
    return arrays


def _run_unit(unit: tuple[str, str, str, int], job: Job | None = None) -> int:
    """Do one unit and write its done-marker last; returns the tiles it handled."""
    job = job or _JOB
    kind, city, split, k = unit
    marker = job.marker(unit)
    marker.parent.mkdir(parents=True, exist_ok=True)
    if kind == "stats":
        arrays = _run_stats(job, city, k)
        with atomic_path(marker, suffix=".npz") as tmp:  # np.savez adds .npz to names without it
            np.savez(tmp, **arrays)
        return 0
    write_text_atomic(marker, json.dumps(_run_tiles(job, city, split, k)))
    return _unit_tiles(job, unit)


def _unit_tiles(job: Job, unit: tuple[str, str, str, int]) -> int:
    kind, city, split, k = unit
    if kind == "stats":
        return 0
    a, b = job.plans[city].splits[split].units[k]
    return b - a


# ---- pool workers: they die with their parent, and a rerun kills those that did not ------------------
def _die_with_parent(parent: int) -> None:
    """Have the kernel SIGKILL this process when ``parent`` dies (Linux); exit now if it already has."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG, SIGKILL) failed")
    if os.getppid() != parent:  # the parent died before the death signal was set
        os._exit(1)


def _worker_records(out: Path) -> Path:
    return out / "parts" / "workers"


def register_worker(out: Path, task_index: int, parent: int) -> None:
    """Record this process as a pool worker of task ``task_index``, started by ``parent``."""
    folder = _worker_records(out)
    folder.mkdir(parents=True, exist_ok=True)
    record = {"host": socket.gethostname(), "pid": os.getpid(), "started": psutil.Process().create_time(),
              "parent": parent}
    write_text_atomic(folder / f"task-{task_index:05d}-{os.getpid()}.json", json.dumps(record))


def _live_worker(record: dict) -> psutil.Process | None:
    """The recorded worker if it still runs (the same process, not a reused pid nor a zombie), else None."""
    try:
        proc = psutil.Process(record["pid"])
        same = proc.create_time() == record["started"] and proc.status() != psutil.STATUS_ZOMBIE
        return proc if same else None
    except psutil.NoSuchProcess:
        return None


def reap_workers(out: Path, task_index: int) -> None:
    """Kill the recorded workers of task ``task_index`` on this host that outlived their parent and forget the
    records of workers that are gone. Workers whose parent still runs (a live run of the task) are left."""
    killed, forget = [], []
    for path in sorted(_worker_records(out).glob(f"task-{task_index:05d}-*.json")):
        record = json.loads(path.read_text())
        if record["host"] != socket.gethostname():
            continue
        proc = _live_worker(record)
        if proc is not None and proc.ppid() == record["parent"]:
            continue
        if proc is not None:
            log.warning("%s: killing worker %d of an earlier prep task %d, orphaned when its parent %d died",
                        out, record["pid"], task_index, record["parent"])
            proc.kill()
            killed.append(proc)
        forget.append(path)
    psutil.wait_procs(killed, timeout=10)
    for path in forget:
        path.unlink(missing_ok=True)


def _init_worker(out: str, task_index: int, parent: int) -> None:
    _die_with_parent(parent)
    register_worker(Path(out), task_index, parent)
    global _JOB
    _JOB = load_job(Path(out))


def _remove_dead_partials(out: Path) -> None:
    """Delete the temp files killed writers left in the folders prep writes files into."""
    shard_dirs = sorted(p for p in (out / "shards").glob("*") if p.is_dir())
    folders = [out, out / "parts" / "units", out / "parts" / "stats", _worker_records(out), *shard_dirs]
    removed = [p for folder in folders for p in remove_dead_partials(folder)]
    if removed:
        log.info("%s: removed %d partial file(s) of killed writers (e.g. %s)", out, len(removed), removed[0].name)


def run_prep(spec: DatasetSpec, cfg: PrepConfig, out: Path, *, task_index: int = 0, num_tasks: int = 1,
             workers: int = 1, opener: SceneOpener = default_opener) -> dict:
    """Run task ``task_index`` of ``num_tasks`` (every ``num_tasks``-th unit); returns counts."""
    t0 = time.monotonic()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise C2SegError(f"{out}: is a file, expected the prep output folder (--out)")
    reap_workers(out, task_index)
    _remove_dead_partials(out)
    job = open_job(spec, cfg, out, opener)
    mine = job.units()[task_index::num_tasks]
    todo = [u for u in mine if not job.marker(u).is_file()]
    log.info("task %d/%d: %d of its %d units to do (%d already done) in %s", task_index, num_tasks,
             len(todo), len(mine), len(mine) - len(todo), out)
    total = sum(_unit_tiles(job, u) for u in todo)
    done_tiles = 0
    with tqdm(total=int(total), unit="tile", desc=f"prep task {task_index}", dynamic_ncols=True) as bar:
        if workers > 1 and len(todo) > 1:
            if opener is not default_opener:
                raise ValueError("workers > 1 needs the default scene readers (open_city)")
            import multiprocessing as mp

            with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                                     initargs=(str(out), task_index, os.getpid())) as pool:
                for n in pool.map(_run_unit, todo):
                    bar.update(n)
                    done_tiles += n
            reap_workers(out, task_index)
        else:
            try:
                for unit in todo:
                    n = _run_unit(unit, job)
                    bar.update(n)
                    done_tiles += n
            finally:
                _close_scenes()
    seconds = time.monotonic() - t0
    log.info("task %d/%d: %d units, %d tiles in %.1f s", task_index, num_tasks, len(todo), done_tiles, seconds)
    return {"units": len(todo), "skipped": len(mine) - len(todo), "tiles": done_tiles, "seconds": seconds}
