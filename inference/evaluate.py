"""Scoring predictions against labels: the confusion matrix over labelled pixels (read by blocks),
per-class IoU and F1, mIoU, OA, macro-F1 and kappa (:mod:`c2seg.metrics`), a JSON file, a
confusion-matrix plot and, when a run is given, MLflow metrics and artifacts.

Truth comes from a city's readers (``--city``: label remapping included) or from a label raster /
folder of label tiles (``--truth``). The prediction is a class-map raster (single-scene city) or a
folder holding ``<scene>.tif`` (``N.tif`` per tile, as ``c2seg infer run`` writes them, also under
``submission/``; ``*.probs.tif`` left out). Predictions pair with the labels by scene: one label scene and
one prediction pair whatever their names; otherwise by name, and a labelled scene without a prediction
fails naming the scenes that did not pair on either side (predictions without labels are named and left
out of the scores).

Nothing on disk is trusted: rasters open through the readers' checks (missing, empty or corrupt files),
a read that fails names the file and window, a raster must have one band (a prediction: of integer
class ids) and a prediction must lie on the truth's grid (size, CRS, transform: one line naming both files
and every difference); values outside the spec's classes are refused. Each problem is a
:class:`~data_prep.readers.SceneError` naming the file.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from affine import Affine
from rasterio.crs import CRS
from rasterio.errors import RasterioError
from rasterio.windows import Window as RioWindow
from tqdm import tqdm

from c2seg.errors import C2SegError
from c2seg.metrics import confusion_matrix, scores_from_confusion
from c2seg.spec import DatasetSpec
from c2seg.raster import Window, iter_windows
from c2seg.data_prep.readers.base import SceneError
from c2seg.data_prep.readers.geotiff import _open as open_raster  # missing / empty / corrupt file: SceneError

log = logging.getLogger("c2seg.infer")
BLOCK = 2048
SUFFIXES = (".tif", ".tiff")


@dataclass
class Truth:
    """One labelled scene: its name, the file named in messages, its grid and a windowed label reader."""

    name: str
    path: Path
    height: int
    width: int
    transform: Affine
    crs: str | None
    read: Callable[[Window], np.ndarray]


def truth_from_city(spec: DatasetSpec, city: str, split: str | None = None) -> Iterator[Truth]:
    """Labels of every scene of ``city`` (those given ``split`` only, when not None) through the readers
    (remapped to class ids)."""
    from c2seg.data_prep.readers import open_city

    if not spec.city(city).labelled:
        raise C2SegError(f"city '{city}' has no labels in spec {spec.source_file or spec.name}")
    for scene in open_city(spec, city, split):
        yield Truth(scene.name, scene.file_of("label"), scene.height, scene.width, scene.transform, scene.crs,
                    scene.read_label)


def read_window(ds, w: Window) -> np.ndarray:
    """Band 1 of open raster ``ds`` inside ``w``; a failed read raises :class:`SceneError` naming the file."""
    try:
        return ds.read(1, window=RioWindow(w.col, w.row, w.width, w.height))
    except RasterioError as exc:
        raise SceneError(f"{ds.name}: read failed at rows {w.row}:{w.row + w.height}, cols {w.col}:"
                         f"{w.col + w.width} (corrupt or truncated?): {exc.__cause__ or exc}") from exc


def open_class_raster(path: Path, role: str, integer: bool):
    """``path`` opened through the readers' checks, refused unless it has one band (of an integer dtype
    when ``integer``); ``role`` ("prediction", "label") names it in messages."""
    ds = open_raster(path)
    problem = _class_raster_problem(ds, integer)
    if problem:
        ds.close()
        raise SceneError(f"{path}: {role} raster {problem}")
    return ds


def _class_raster_problem(ds, integer: bool) -> str | None:
    if ds.count != 1:
        return f"has {ds.count} bands, expected 1 band of class ids"
    if integer and np.dtype(ds.dtypes[0]).kind not in "ui":
        return f"holds {ds.dtypes[0]} values, expected integer class ids (a class map, not scores)"
    return None


def _raster_reader(path: Path) -> Callable[[Window], np.ndarray]:
    def read(w: Window) -> np.ndarray:
        with open_class_raster(path, "label", integer=False) as ds:
            return read_window(ds, w)
    return read


def class_rasters(folder: Path) -> dict[str, Path]:
    """The ``*.tif[f]`` rasters of ``folder`` by stem, in name order (``*.probs.tif`` probabilities left out);
    none when it is no folder."""
    files = sorted(folder.iterdir()) if folder.is_dir() else []
    return {p.stem: p for p in files if p.suffix.lower() in SUFFIXES and not p.stem.endswith(".probs")}


def truth_from_rasters(path: Path) -> Iterator[Truth]:
    """Labels from one raster (scene named by its stem) or a folder of ``N.tif[f]`` label tiles."""
    path = Path(path)
    files = list(class_rasters(path).values()) if path.is_dir() else [path]
    if not files:
        raise FileNotFoundError(f"{path}: no label rasters (*.tif, *.tiff)")
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"{f}: label raster not found")
        with open_class_raster(f, "label", integer=False) as ds:
            crs = ds.crs.to_string() if ds.crs else None
            yield Truth(f.stem, f, ds.height, ds.width, ds.transform, crs, _raster_reader(f))


def prediction_rasters(pred: Path) -> dict[str, Path]:
    """Prediction rasters by scene name: ``pred`` itself (a file, or a path that is no folder: opening it
    says what is wrong), or the class maps of folder ``pred``, with those of ``pred/submission`` for names
    not in it."""
    pred = Path(pred)
    if not pred.is_dir():
        return {pred.stem: pred}
    found = class_rasters(pred / "submission") | class_rasters(pred)
    if not found:
        raise FileNotFoundError(f"{pred}: no prediction rasters (*.tif, *.tiff) here or in {pred / 'submission'}")
    return found


def pair_scenes(truths: list[Truth], preds: dict[str, Path], pred: Path) -> list[tuple[Truth, Path]]:
    """Each labelled scene with its prediction: a single one with a single one whatever their names, else by
    scene name. A labelled scene without a prediction fails naming what did not pair on both sides; predictions
    without labels are named in a warning and not scored."""
    if len(truths) == 1 and len(preds) == 1:
        return [(truths[0], *preds.values())]
    unlabelled = sorted(set(preds) - {t.name for t in truths})
    missing = [t.name for t in truths if t.name not in preds]
    if missing:
        raise FileNotFoundError(f"{pred}: {len(missing)} of {len(truths)} labelled scenes have no prediction of "
                                f"their name: {_few(missing)} (labels in {truths[0].path.parent}); predictions "
                                f"that pair with no labels: {_few(unlabelled) if unlabelled else 'none'}")
    if unlabelled:
        log.warning("%s: %d predictions pair with no labels and are not scored: %s", pred, len(unlabelled),
                    _few(unlabelled))
    return [(t, preds[t.name]) for t in truths]


def _few(names: list[str]) -> str:
    return f"{names[:10]}{' ...' if len(names) > 10 else ''}"


def check_grid(path: Path, ds, truth: Truth) -> None:
    """Refuse prediction ``ds`` unless its grid (size, CRS, transform) is that of ``truth``: one line naming
    both files and every difference."""
    differences = []
    if (ds.height, ds.width) != (truth.height, truth.width):
        differences.append(f"size {ds.height} x {ds.width} px vs {truth.height} x {truth.width} px")
    if ds.crs != (CRS.from_user_input(truth.crs) if truth.crs else None):
        differences.append(f"CRS {ds.crs} vs {truth.crs}")
    if not ds.transform.almost_equals(truth.transform, precision=1e-6 * abs(truth.transform.a)):
        differences.append(f"transform {tuple(ds.transform)[:6]} vs {tuple(truth.transform)[:6]}")
    if differences:
        raise SceneError(f"{path}: prediction grid differs from the labels of scene '{truth.name}' ({truth.path}), "
                         f"prediction vs labels: {'; '.join(differences)}")


def check_values(path: Path, values: np.ndarray, allowed: np.ndarray, role: str) -> None:
    """Refuse ``values`` read from ``path`` unless each is in ``allowed`` (the class ids and ignore id)."""
    outside = ~np.isin(values, allowed)
    if outside.any():
        raise SceneError(f"{path}: {role} holds values outside the class set {allowed.tolist()}: "
                         f"{np.unique(values[outside])[:10].tolist()}")


def confusion_over(truths: list[Truth], pred: Path, spec: DatasetSpec, block: int = BLOCK) -> np.ndarray:
    """Summed confusion matrix of every scene's prediction against its truth, read block by block."""
    class_ids = spec.scored_class_ids
    allowed = np.array(sorted(set(spec.class_ids) | {spec.ignore_id}))
    k = len(class_ids)
    cm = np.zeros((k, k + 1), np.int64)
    pairs = pair_scenes(truths, prediction_rasters(pred), pred)
    for truth, path in tqdm(pairs, desc="evaluate", unit="scene", disable=len(pairs) < 2):
        with open_class_raster(path, "prediction", integer=True) as ds:
            windows = iter_windows(truth.height, truth.width, block)
            # both first blocks read before the grids are compared: a truncated file (georeference tags lost)
            # fails as truncated; once the grids match, the prediction's block is the labels' one
            first = read_window(ds, windows[0].clipped(ds.height, ds.width)), truth.read(windows[0])
            check_grid(path, ds, truth)
            for i, w in enumerate(windows):
                p, t = first if i == 0 else (read_window(ds, w), truth.read(w))
                check_values(path, p, allowed, "prediction")
                check_values(truth.path, t, allowed, "label")
                cm += confusion_matrix(t, p, class_ids)
    return cm


def evaluate(spec: DatasetSpec, pred: Path, truths: list[Truth]) -> dict:
    """Scores (``miou``, ``oa``, ``macro_f1``, ``kappa``, ``per_class``) plus the confusion matrix."""
    class_ids = spec.scored_class_ids
    cm = confusion_over(truths, pred, spec)
    scores = scores_from_confusion(cm, class_ids)
    result = scores.as_dict({c.id: c.name for c in spec.classes})
    result.update(confusion_matrix=cm.tolist(), class_ids=list(class_ids), pixels=int(cm.sum()),
                  scenes=[t.name for t in truths], prediction=str(pred))
    log.info("evaluated %d scenes, %d labelled px: mIoU %.2f%%, OA %.2f%%, macro-F1 %.2f%%, kappa %.3f",
             len(truths), result["pixels"], 100 * scores.miou, 100 * scores.oa, 100 * scores.macro_f1, scores.kappa)
    return result


def plot_confusion(result: dict, spec: DatasetSpec, path: Path) -> Path:
    """The row-normalised confusion matrix of ``result`` as a PNG (:func:`c2seg.plots.confusion_figure`)."""
    from c2seg.plots import confusion_figure

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
