"""The README's main command, end to end on tiny cities: every stage runs through its CLI, the
outputs exist and the metrics table is printed (the adapted model continues from the source-only one, which
starts from the pretrained encoder); a rerun skips the finished steps (generation, prep, every
training and export) and predicts and scores again."""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import rasterio

from c2seg import demo
from c2seg.metrics import confusion_matrix
from c2seg.pipeline import STAGE_NAMES, stage
from c2seg.spec import load_spec
from tests.fixtures_data import hand_scores

ROOT = Path(__file__).resolve().parent.parent


def _write_config(tmp_path: Path) -> Path:
    config = tmp_path / "demo.yaml"
    config.write_text(f"""
spec: configs/datasets/demo_tiny.yaml
data_root: {tmp_path / 'data'}
out: {tmp_path / 'out'}
size: [96, 128]
prep_config: tests/configs/prep_tiny.yaml
pretrain_config: configs/train/pretrain_tiny.yaml
finetune_config: configs/train/finetune_tiny.yaml
source_only_config: configs/train/finetune_tiny.yaml
infer_window: 64
""")
    return config


def test_demo_runs_the_pipeline_stages(tmp_path, monkeypatch):
    """The demo's steps are c2seg.pipeline's stages (the ones `c2seg slurm submit` chains), with their commands,
    in their order; export, infer and evaluate also for source_only, for the table."""
    steps: list[tuple[str, list[str]]] = []

    def record(self, name, args, done=None):
        steps.append((name, args))
        if args[:2] == ["infer", "evaluate"]:
            metrics = Path(args[args.index("--out") + 1])
            metrics.parent.mkdir(parents=True, exist_ok=True)
            metrics.write_text(json.dumps({"miou": 0.5, "oa": 0.5, "macro_f1": 0.5, "kappa": 0.5}))

    monkeypatch.setattr(demo._Runner, "step", record)
    assert demo.run_demo(argparse.Namespace(config=_write_config(tmp_path), out=None)) == 0
    names = [name for name, _ in steps]
    assert names == ["generate", "inspect", "prep", "verify", "pretrain", "source_only", "adapted",
                     "export source_only", "infer source_only", "evaluate source_only",
                     "export adapted", "infer adapted", "evaluate adapted"]
    for name, args in steps:
        if name.split()[0] in STAGE_NAMES:
            assert tuple(args[:2]) == stage(name.split()[0]).command, name
    train = tmp_path / "out" / "train"
    by_name = dict(steps)
    assert f"init_from={train / 'pretrain'}" in by_name["source_only"]
    assert f"init_from={train / 'source_only'}" in by_name["adapted"]
    assert by_name["export adapted"][-4:] == ["--run-dir", str(train / "adapted"), "--out",
                                              str(tmp_path / "out" / "models" / "adapted.pt")]


@pytest.mark.slow
def test_demo_runs_the_whole_pipeline(tmp_path):
    config = _write_config(tmp_path)
    env_cmd = [sys.executable, "-m", "c2seg.cli", "demo", "--config", str(config)]
    run = subprocess.run(env_cmd, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "source_only" in run.stdout and "adapted" in run.stdout and "mIoU" in run.stdout
    train = tmp_path / "out" / "train"
    spec = load_spec(ROOT / "configs/datasets/demo_tiny.yaml", data_root=tmp_path / "data")
    with rasterio.open(spec.resolve(spec.city("synth_target"), "label")) as src:
        truth = src.read(1)
    assert f"initialised from {train / 'pretrain'}" in run.stderr
    assert f"initialised from {train / 'source_only'}" in run.stderr
    for name in ("source_only", "adapted"):
        city = tmp_path / "out" / "predictions" / name / "synth_target"
        metrics = json.loads((city / "metrics.json").read_text())
        with rasterio.open(city / "synth_target.tif") as src:
            assert src.crs is not None and src.count == 1 and src.dtypes[0] == "uint8"
            assert (src.height, src.width) == (96, 128)
            pred = src.read(1)
        # the scores are those of the written class map against the city's labels, recounted here
        ids = list(spec.scored_class_ids)
        assert metrics["confusion_matrix"] == confusion_matrix(truth, pred, ids).tolist()
        assert sum(map(sum, metrics["confusion_matrix"])) == int((truth != spec.ignore_id).sum())
        assert metrics["miou"] == pytest.approx(hand_scores(metrics["confusion_matrix"])["miou"])
        assert metrics["oa"] == pytest.approx(float((pred == truth)[truth != spec.ignore_id].mean()))
    # a rerun finds every step done (training COMPLETED, models exported) and only re-scores
    again = subprocess.run(env_cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert all(f"[{n}] skipped" in again.stderr
               for n in ("generate", "prep", "pretrain", "source_only", "adapted", "export adapted"))
