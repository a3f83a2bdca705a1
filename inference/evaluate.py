"""Scoring predictions against labels: the confusion matrix over labelled pixels (read by blocks),
per-class IoU and F1, mIoU, OA, macro-F1 and kappa (:mod:`c2seg.metrics`), a JSON file, a
confusion-matrix plot and, when a run is given, MLflow metrics and artifacts.

Truth comes from a city's readers (``--city``: label remapping included) or from a label raster /
folder of label tiles (``--truth``). The prediction is a class-map raster (single-scene city) or a
folder holding ``<scene>.tif`` (``N.tif`` per tile, as ``c2seg infer run`` writes them).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from rasterio.windows import Window as RioWindow
from tqdm import tqdm

from c2seg.metrics import confusion_matrix, scores_from_confusion
from c2seg.spec import DatasetSpec
from data_prep.readers.base import Window, iter_windows

log = logging.getLogger("c2seg.infer")
BLOCK = 2048
SUFFIXES = (".tif", ".tiff")


@dataclass
class Truth:
    """One labelled scene: its name, grid size and a windowed label reader."""

    name: str
    height: int
    width: int
    read: Callable[[Window], np.ndarray]


def truth_from_city(spec: DatasetSpec, city: str) -> Iterator[Truth]:
    """Labels of every scene of ``city`` through the readers (remapped to class ids)."""
    from data_prep.readers import open_city

    if not spec.city(city).labelled:
        raise ValueError(f"city '{city}' has no labels in spec {spec.source_file or spec.name}")
    for scene in open_city(spec, city):
        yield Truth(scene.name, scene.height, scene.width, scene.read_label)


def _raster_reader(path: Path) -> Callable[[Window], np.ndarray]:
    def read(w: Window) -> np.ndarray:
        with rasterio.open(path) as ds:
            return ds.read(1, window=RioWindow(w.col, w.row, w.width, w.height))
    return read


def truth_from_rasters(path: Path) -> Iterator[Truth]:
    """Labels from one raster (scene named by its stem) or a folder of ``N.tif[f]`` label tiles."""
    path = Path(path)
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in SUFFIXES) if path.is_dir() else [path]
    if not files:
        raise FileNotFoundError(f"{path}: no label rasters (*.tif, *.tiff)")
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"{f}: label raster not found")
        with rasterio.open(f) as ds:
            yield Truth(f.stem, ds.height, ds.width, _raster_reader(f))


def find_prediction(pred: Path, name: str, single: bool) -> Path:
    """The prediction raster of scene ``name``: ``pred`` itself (a file, single scene) or
    ``pred/<name>.tif[f]`` or ``pred/submission/<name>.tif``."""
    pred = Path(pred)
    if pred.is_file():
        if not single:
            raise ValueError(f"{pred}: one prediction file given for a city of several scenes; give the folder")
        return pred
    for folder in (pred, pred / "submission"):
        for suffix in SUFFIXES:
            if (folder / f"{name}{suffix}").is_file():
                return folder / f"{name}{suffix}"
    raise FileNotFoundError(f"{pred}: no prediction for scene '{name}' ({name}.tif)")


def confusion_over(truths: list[Truth], pred: Path, class_ids: tuple[int, ...], block: int = BLOCK) -> np.ndarray:
    """Summed confusion matrix of every scene's prediction against its truth, read block by block."""
    k = len(class_ids)
    cm = np.zeros((k, k + 1), np.int64)
    for truth in tqdm(truths, desc="evaluate", unit="scene", disable=len(truths) < 2):
        path = find_prediction(pred, truth.name, len(truths) == 1)
        with rasterio.open(path) as ds:
            if (ds.height, ds.width) != (truth.height, truth.width):
                raise ValueError(f"{path}: prediction is {ds.height} x {ds.width} px, the labels of scene "
                                 f"'{truth.name}' are {truth.height} x {truth.width} px")
            for w in iter_windows(truth.height, truth.width, block):
                p = ds.read(1, window=RioWindow(w.col, w.row, w.width, w.height))
                cm += confusion_matrix(truth.read(w), p, class_ids)
    return cm


def evaluate(spec: DatasetSpec, pred: Path, truths: list[Truth]) -> dict:
    """Scores (``miou``, ``oa``, ``macro_f1``, ``kappa``, ``per_class``) plus the confusion matrix."""
    class_ids = spec.scored_class_ids
    cm = confusion_over(truths, pred, class_ids)
    scores = scores_from_confusion(cm, class_ids)
    result = scores.as_dict({c.id: c.name for c in spec.classes})
    result.update(confusion_matrix=cm.tolist(), class_ids=list(class_ids), pixels=int(cm.sum()),
                  scenes=[t.name for t in truths], prediction=str(pred))
    log.info("evaluated %d scenes, %d labelled px: mIoU %.2f%%, OA %.2f%%, macro-F1 %.2f%%, kappa %.3f",
             len(truths), result["pixels"], 100 * scores.miou, 100 * scores.oa, 100 * scores.macro_f1, scores.kappa)
    return result


def plot_confusion(result: dict, spec: DatasetSpec, path: Path) -> Path:
    """The row-normalised confusion matrix of ``result`` as a PNG (:func:`train.plots.confusion_figure`)."""
    from train.plots import confusion_figure

    title = f"mIoU {100 * result['miou']:.1f}%  OA {100 * result['oa']:.1f}%"
    confusion_figure(np.asarray(result["confusion_matrix"]), spec, title).savefig(path, dpi=110)
    return path


def log_to_mlflow(result: dict, run_id: str, prefix: str, artifacts: list[Path], tracking_uri: str | None = None) -> None:
    """Log the scores (``<prefix>/miou`` ...) and the files to an existing MLflow run."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    for key in ("miou", "oa", "macro_f1", "kappa"):
        client.log_metric(run_id, f"{prefix}/{key}", float(result[key]))
    for c in result["per_class"]:
        client.log_metric(run_id, f"{prefix}/iou_{c['id']}", float(c["iou"]))
    for path in artifacts:
        client.log_artifact(run_id, str(path), artifact_path=prefix)
    log.info("logged %s scores and %d files to MLflow run %s", prefix, len(artifacts), run_id)


def write_result(result: dict, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    return out
