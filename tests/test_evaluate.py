"""``c2seg infer evaluate``: scores agree with a confusion matrix counted by hand; JSON, plot, MLflow."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine

from c2seg.cli import main
from c2seg.inference.evaluate import evaluate, truth_from_rasters
from tests.fixtures_data import hand_scores

ROOT = Path(__file__).resolve().parent.parent


GRID = Affine(10, 0, 0, 0, -10, 0)


def write(path: Path, array: np.ndarray, transform: Affine = GRID) -> Path:
    with rasterio.open(path, "w", driver="GTiff", height=array.shape[0], width=array.shape[1], count=1,
                       dtype="uint8", crs="EPSG:32632", transform=transform) as ds:
        ds.write(array[None])
    return path


def test_scores_agree_with_a_confusion_matrix_counted_by_hand(tiny_spec, tmp_path):
    rng = np.random.default_rng(3)
    truth = rng.choice([0, 1, 2, 3], size=(9, 11), p=[0.2, 0.4, 0.3, 0.1]).astype(np.uint8)
    pred = rng.choice([0, 1, 2, 3, 5], size=(9, 11)).astype(np.uint8)
    (tmp_path / "truth").mkdir()
    (tmp_path / "pred").mkdir()
    write(tmp_path / "truth" / "7.tif", truth)
    write(tmp_path / "pred" / "7.tif", pred)
    result = evaluate(tiny_spec, tmp_path / "pred", list(truth_from_rasters(tmp_path / "truth")))

    ids = list(tiny_spec.scored_class_ids)  # 1..13; prediction 0 counts in the "no prediction" column
    cm = np.zeros((len(ids), len(ids) + 1), int)
    for t, p in zip(truth.ravel(), pred.ravel()):
        if t in ids:
            cm[ids.index(t), ids.index(p) if p in ids else len(ids)] += 1
    assert result["confusion_matrix"] == cm.tolist()
    assert result["pixels"] == int((truth > 0).sum())
    oa = sum(cm[i, i] for i in range(len(ids))) / cm.sum()
    ious = []
    for i in range(len(ids)):
        tp, fn, fp = cm[i, i], cm[i].sum() - cm[i, i], cm[:, i].sum() - cm[i, i]
        if tp + fn + fp:
            ious.append(tp / (tp + fn + fp))
    expected_pe = sum(cm[i].sum() * cm[:, i].sum() for i in range(len(ids))) / cm.sum() ** 2
    assert result["oa"] == pytest.approx(oa)
    assert result["miou"] == pytest.approx(np.mean(ious))
    assert result["kappa"] == pytest.approx((oa - expected_pe) / (1 - expected_pe))
    assert [c["iou"] for c in result["per_class"]][:3] == pytest.approx(ious[:3])


def test_evaluate_cli_writes_json_plot_and_logs_to_mlflow(tiny_spec, tmp_path):
    import mlflow
    from mlflow.tracking import MlflowClient

    city = tiny_spec.city("synth_target")
    with rasterio.open(tiny_spec.resolve(city, "label")) as ds:
        truth, transform = ds.read(1), ds.transform
    pred = truth.copy()
    pred[:20] = 3  # a wrong band across the top; elsewhere perfect
    (tmp_path / "pred").mkdir()
    write(tmp_path / "pred" / "synth_target.tif", pred, transform)  # on the city's grid
    uri = (tmp_path / "mlruns").as_uri()
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run() as run:
        run_id = run.info.run_id
    cmd = [sys.executable, "-m", "c2seg.cli", "infer", "evaluate", "--pred", str(tmp_path / "pred"), "--spec",
           tiny_spec.source_file, "--data-root", tiny_spec.data_root, "--city", "synth_target",
           "--mlflow-run", run_id, "--tracking-uri", uri]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "MLFLOW_ALLOW_FILE_STORE": "true"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "pred" / "metrics.json").read_text())
    labelled = truth > 0
    assert result["oa"] == pytest.approx((pred[labelled] == truth[labelled]).mean())
    expected = hand_scores(result["confusion_matrix"])
    assert result["miou"] == pytest.approx(expected["miou"]) and result["kappa"] == pytest.approx(expected["kappa"])
    wrong = int((labelled[:20] & (truth[:20] != 3)).sum())  # the pixels the wrong band got wrong
    assert sum(map(sum, result["confusion_matrix"])) == int(labelled.sum()) and wrong > 0
    assert result["oa"] == pytest.approx(1 - wrong / labelled.sum())
    assert (tmp_path / "pred" / "metrics_confusion.png").stat().st_size > 0
    logged = MlflowClient(uri).get_run(run_id).data.metrics
    assert logged["eval/synth_target/miou"] == pytest.approx(result["miou"])
    assert {a.path for a in MlflowClient(uri).list_artifacts(run_id, "eval/synth_target")} == \
        {"eval/synth_target/metrics.json", "eval/synth_target/metrics_confusion.png"}


def test_prediction_of_the_wrong_size_is_refused(tiny_spec, tmp_path):
    (tmp_path / "pred").mkdir()
    write(tmp_path / "pred" / "synth_target.tif", np.ones((10, 10), np.uint8))
    cmd = [sys.executable, "-m", "c2seg.cli", "infer", "evaluate", "--pred", str(tmp_path / "pred"), "--spec",
           tiny_spec.source_file, "--data-root", tiny_spec.data_root, "--city", "synth_target"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    labels = tiny_spec.resolve(tiny_spec.city("synth_target"), "label")
    assert proc.returncode == 2 and (f"synth_target.tif: prediction grid differs from the labels of scene "
                                     f"'synth_target' ({labels}), prediction vs labels: size 10 x 10 px vs 96 x "
                                     "128 px; transform (10.0, 0.0, 0.0, 0.0, -10.0, 0.0) vs") in proc.stderr


# ---- pairing predictions with labels by scene; their grids ----------------------------------------------
SPEC = ROOT / "configs" / "datasets" / "demo_tiny.yaml"
LABELS = np.array([[1, 2, 2, 3], [0, 2, 3, 3], [1, 1, 4, 0]], np.uint8)


def _evaluate_cli(pred: Path, truth: Path) -> list[str]:
    return ["infer", "evaluate", "--pred", str(pred), "--truth", str(truth), "--spec", str(SPEC)]


def test_one_label_raster_pairs_with_one_prediction_of_another_name(tmp_path):
    """``infer run`` writes <scene>.tif (with a quicklook and probabilities beside it); the labels come as
    another name: one label scene and one class map pair whatever their names."""
    from c2seg.spec import load_spec

    (tmp_path / "pred").mkdir()
    write(tmp_path / "pred" / "berlin.tif", LABELS)
    (tmp_path / "pred" / "berlin.png").write_bytes(b"quicklook")
    write(tmp_path / "pred" / "berlin.probs.tif", LABELS)  # probabilities: never a class map to score
    truth = write(tmp_path / "berlin_label.tif", np.where(LABELS == 4, 2, LABELS).astype(np.uint8))
    result = evaluate(load_spec(SPEC), tmp_path / "pred", list(truth_from_rasters(truth)))
    assert (result["scenes"], result["pixels"], result["oa"]) == (["berlin_label"], 10, 0.9)


def test_blocks_count_every_pixel_once(tmp_path):
    """The first block, read before the grids are compared, is counted once, like every other block."""
    from c2seg.spec import load_spec
    from c2seg.inference.evaluate import confusion_over

    truths = list(truth_from_rasters(write(tmp_path / "labels.tif", LABELS)))
    pred = write(tmp_path / "pred.tif", np.roll(LABELS, 1, axis=1))
    whole, by_2 = (confusion_over(truths, pred, load_spec(SPEC), block) for block in (2048, 2))
    assert whole.tolist() == by_2.tolist() and whole.sum() == 10 and np.trace(whole) == 3


def test_folders_pair_by_name_and_say_which_scenes_did_not(tmp_path, capsys, caplog):
    (tmp_path / "pred" / "submission").mkdir(parents=True)
    (tmp_path / "truth").mkdir()
    for name in ("1", "2", "4"):  # the challenge's submission tiles
        write(tmp_path / "pred" / "submission" / f"{name}.tif", LABELS)
    for name in ("1", "2", "3"):
        write(tmp_path / "truth" / f"{name}.tif", LABELS)
    assert main(_evaluate_cli(tmp_path / "pred", tmp_path / "truth")) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line == (f"c2seg infer: error: {tmp_path / 'pred'}: 1 of 3 labelled scenes have no prediction of their "
                    f"name: ['3'] (labels in {tmp_path / 'truth'}); predictions that pair with no labels: ['4']")
    (tmp_path / "truth" / "3.tif").unlink()
    assert main(_evaluate_cli(tmp_path / "pred", tmp_path / "truth")) == 0
    result = json.loads((tmp_path / "pred" / "metrics.json").read_text())
    assert (result["scenes"], result["pixels"], result["oa"]) == (["1", "2"], 20, 1.0)
    assert f"{tmp_path / 'pred'}: 1 predictions pair with no labels and are not scored: ['4']" in caplog.text


def test_a_prediction_off_the_labels_grid_names_both_files_and_every_difference(tmp_path, capsys):
    truth = write(tmp_path / "labels.tif", LABELS)
    with rasterio.open(tmp_path / "pred.tif", "w", driver="GTiff", height=3, width=5, count=1, dtype="uint8",
                       crs="EPSG:32633", transform=Affine(10, 0, 0, 0, -10, 0)) as ds:
        ds.write(np.ones((1, 3, 5), np.uint8))
    assert main(_evaluate_cli(tmp_path / "pred.tif", truth)) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line == (f"c2seg infer: error: {tmp_path / 'pred.tif'}: prediction grid differs from the labels of scene "
                    f"'labels' ({truth}), prediction vs labels: size 3 x 5 px vs 3 x 4 px; CRS EPSG:32633 vs "
                    "EPSG:32632")
