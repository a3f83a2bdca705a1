"""Whole-scene and whole-city inference: blocks split across ranks, scenes across array tasks.

Per scene, every rank predicts the output blocks ``i`` with ``i % world_size == rank`` that are not
yet marked done, writing them to the scene's :class:`~inference.accumulator.BlockStore`; rank 0
then waits for every block and writes the outputs (class-map COG, quicklook, probabilities,
submission tile). Scenes of a city are split across SLURM array tasks (``task_index::num_tasks``).
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from c2seg.errors import C2SegError
from c2seg.distributed import array_task, detect_env
from c2seg.spec import DatasetSpec, Modality
from c2seg.data_prep.readers.base import Scene
from c2seg.inference.accumulator import BlockStore
from c2seg.inference.config import InferConfig
from c2seg.inference.mosaic import write_class_map, write_probabilities, write_quicklook, write_submission_tile
from c2seg.inference.sliding import Normalize, PredictFn, predict_block
from c2seg.inference.windows import block_grid, window_grid

log = logging.getLogger("c2seg.infer")


@dataclass
class SceneOutputs:
    """What rank 0 wrote for a scene (paths are None when not made)."""

    class_map: Path
    store: Path
    quicklook: Path | None = None
    probabilities: Path | None = None
    submission: Path | None = None
    windows: int = 0
    seconds: float = 0.0


def select_modalities(model_modalities: list[str], scene: Scene, requested: list[str] | None = None) -> list[str]:
    """The model's modalities this scene provides (and the user asked for); logs those left out."""
    wanted = list(model_modalities) if requested is None else list(requested)
    unknown = [m for m in wanted if m not in model_modalities]
    if unknown:
        raise C2SegError(f"modalities {unknown} are not inputs of the model (it takes {list(model_modalities)})")
    present = [m for m in wanted if m in scene.modalities]
    missing = [m for m in model_modalities if m not in present]
    if not present:
        raise C2SegError(f"scene {scene.name} ({scene.path}) has none of the model's modalities {model_modalities}")
    if missing:
        log.warning("scene %s: predicting without modality %s (not %s); the model was trained with modality "
                    "dropout and uses %s", scene.name, missing,
                    "requested" if requested is not None else "in the scene", present)
    return present


def infer_scene(scene: Scene, predict: PredictFn, normalize: Normalize, modalities: list[str],
                class_ids: tuple[int, ...], cfg: InferConfig, out_dir: Path, spec: DatasetSpec,
                store_key: dict | None = None, rank: int = 0, world_size: int = 1,
                overwrite: bool = False, first_block: int = 0) -> SceneOutputs | None:
    """Predict this rank's blocks of ``scene`` (block ``i`` goes to rank ``(first_block + i) % world_size``:
    a city of many one-block tiles is spread over every rank); on rank 0 also wait for all blocks and write
    the outputs under ``out_dir`` (returned). Other ranks return None. ``cfg.window`` must be set
    (:meth:`InferConfig.for_model`)."""
    if cfg.window is None:
        raise C2SegError("infer_scene needs a window size: resolve the settings with InferConfig.for_model")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    store_path = out_dir / f"{scene.name}.zarr"
    if overwrite and world_size > 1:
        raise C2SegError(f"--overwrite needs a single rank; delete {store_path} before a multi-rank run")
    if overwrite and store_path.exists():
        shutil.rmtree(store_path)
    key = {**cfg.store_key(), "modalities": list(modalities), **(store_key or {})}
    store = BlockStore.open(store_path, scene.height, scene.width, cfg.block, class_ids, key, cfg.save_probs,
                            rank=rank, timeout_s=cfg.wait_timeout_s)
    grid = window_grid(scene.height, scene.width, cfg.window, cfg.overlap)
    blocks = block_grid(scene.height, scene.width, cfg.block)
    mine = [b for i, b in enumerate(blocks, first_block) if i % world_size == rank]
    todo = [b for b in mine if not store.is_done(b)]
    if len(todo) < len(mine):
        log.info("scene %s: resuming, %d of this rank's %d blocks already done", scene.name,
                 len(mine) - len(todo), len(mine))
    windows = 0
    for block in tqdm(todo, desc=f"{scene.name} rank {rank}", unit="block", disable=len(todo) < 2):
        result = predict_block(scene, block, grid, cfg.window, predict, normalize, modalities, class_ids,
                               cfg.blend, cfg.batch_size)
        store.write(block, result.classes, result.probs if cfg.save_probs else None)
        windows += result.windows
        del result  # free the block's buffers before the next block allocates its own
    if rank != 0:
        log.info("scene %s rank %d: %d blocks, %d windows in %.1f s", scene.name, rank, len(todo), windows,
                 time.perf_counter() - t0)
        return None
    store.wait_all(blocks, cfg.wait_timeout_s)
    outputs = SceneOutputs(class_map=write_class_map(store, scene, spec, out_dir / f"{scene.name}.tif",
                                                     cfg.cog_blocksize), store=store_path, windows=windows)
    tiles = scene.city.format == "tiles"
    if cfg.quicklook and not tiles:
        outputs.quicklook = write_quicklook(store, scene, spec, out_dir / f"{scene.name}.png")
    if cfg.save_probs:
        outputs.probabilities = write_probabilities(store, scene, spec, out_dir / f"{scene.name}.probs.tif")
    if tiles:
        outputs.submission = write_submission_tile(store, scene, spec, out_dir / "submission")
    outputs.seconds = time.perf_counter() - t0
    log.info("scene %s: %d x %d px, %d blocks (%d here), %d windows in %.1f s -> %s", scene.name, scene.height,
             scene.width, len(blocks), len(todo), windows, outputs.seconds, outputs.class_map)
    return outputs


def city_statistics(spec: DatasetSpec, city: str, modalities: tuple[Modality, ...],
                    block: int = 1024) -> dict[str, dict[str, list[float]]]:
    """``{modality: {"mean", "std"}}`` per band of ``modalities`` over every scene of ``city`` (nodata pixels
    left out; a modality no scene has gets mean 0, std 1), read block by block: the standardisation of a
    city a ``per_city`` model has no statistics for."""
    import numpy as np

    from c2seg.data_prep.readers import open_city
    from c2seg.raster import iter_windows
    from c2seg.data_prep.stats import BandStats, fill_value, nodata_mask

    acc = {m.name: BandStats.empty(m.channels) for m in modalities}
    rng = np.random.default_rng(0)
    for scene in tqdm(open_city(spec, city), desc=f"statistics of {city}", unit="scene"):
        with scene:
            for window in iter_windows(scene.height, scene.width, block):
                for m in modalities:
                    if m.name in scene.modalities:
                        values = scene.read(m.name, window)
                        acc[m.name].add(values, ~nodata_mask(values, fill_value(m)), rng, keep=0)
    return {m: {k: v for k, v in a.summary().items() if k in ("mean", "std")} for m, a in acc.items()}


def city_normalization(exported, spec: DatasetSpec, city: str) -> dict[str, dict[str, list[float]]]:
    """The statistics an exported model normalises ``city`` with: pooled, the city's own from training,
    or, for a city a ``per_city`` model has none for, computed from the city's scenes (one pass)."""
    if exported.normalization_mode == "per_city" and city not in exported.city_normalization:
        log.warning("the model standardises each city with its own statistics and has none for city '%s' (it has "
                    "%s): computing them from the city's scenes", city, sorted(exported.city_normalization))
        return city_statistics(spec, city, exported.spec.modalities)
    return exported.normalization_for(city)


def infer_city(model_path: str | Path, spec: DatasetSpec, city: str, out: str | Path, cfg: InferConfig,
               modalities: list[str] | None = None, task_index: int | None = None, num_tasks: int | None = None,
               overwrite: bool = False, split: str | None = None) -> list[SceneOutputs]:
    """Run an exported model over this task's scenes of ``city`` (those given ``split`` only, when not None);
    outputs under ``out/<city>/``."""
    import torch

    from c2seg.spec import spec_compatible
    from c2seg.data_prep.manifest import Normalizer
    from c2seg.data_prep.readers import open_city
    from c2seg.inference.predictor import Predictor, pick_device
    from c2seg.train.export import load_exported
    from c2seg.io import file_sha256

    dist = detect_env()
    task_index, num_tasks = array_task(task_index, num_tasks)
    device = pick_device(cfg.device)
    if device.type == "cuda" and device.index is None:  # one GPU per local rank unless one was named
        device = torch.device("cuda", dist.local_rank)
    model_path = Path(model_path)
    exported = load_exported(model_path, map_location=device)
    cfg = cfg.for_model(exported.tile_size)
    # a modality the data lacks is no problem: the model takes any subset (checked per scene)
    problems = [p.text for p in spec_compatible(exported.spec, spec) if p.kind != "missing_modality"]
    if problems:
        raise C2SegError(f"{model_path}: the model does not fit spec {spec.source_file or spec.name}: "
                         + "; ".join(problems))
    class_ids = exported.spec.scored_class_ids
    absent = () if cfg.predict_absent or exported.target_classes is None else \
        tuple(c for c in class_ids if c not in exported.target_classes)
    if absent:
        log.info("the model's partial adaptation found %s absent from its target city: never predicted "
                 "(--predict-absent predicts them)", ", ".join(exported.spec.class_name(c) for c in absent))
    predictor = Predictor(exported.model, class_ids, device, cfg.tta, absent)
    normalize = Normalizer(exported.spec, city_normalization(exported, spec, city))
    store_key = {"model_sha256": file_sha256(model_path)}  # the weights, not the file's name or mtime
    scenes = open_city(spec, city, split)
    mine = scenes[task_index::num_tasks]
    log.info("city %s: %d scenes, %d for task %d/%d; rank %d/%d on %s; window %d overlap %.2f blend %s tta %s; "
             "%s normalisation", city, len(scenes), len(mine), task_index, num_tasks, dist.rank, dist.world_size,
             device, cfg.window, cfg.overlap, cfg.blend, cfg.tta, exported.normalization_mode)
    results = []
    out_dir = Path(out) / city
    first_block = 0
    for scene in tqdm(mine, desc=f"infer {city}", unit="scene", disable=len(mine) < 2):
        with scene:
            used = select_modalities(exported.modalities, scene, modalities)
            res = infer_scene(scene, predictor, normalize, used, class_ids, cfg, out_dir, spec, store_key,
                              dist.rank, dist.world_size, overwrite, first_block)
        first_block += len(block_grid(scene.height, scene.width, cfg.block))
        if res is not None:
            results.append(res)
    return results
