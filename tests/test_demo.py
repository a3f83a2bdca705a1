"""The README's main command, end to end on tiny cities: every stage runs through its CLI, the
outputs exist and the metrics table is printed (the adapted model continues from the source-only one, which
starts from the pretrained encoder); a rerun skips the finished steps (generation, prep, every
training and export) and predicts and scores again."""

import json
import subprocess
import sys

import pytest
import rasterio


@pytest.mark.slow
def test_demo_runs_the_whole_pipeline(tmp_path):
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
    env_cmd = [sys.executable, "-m", "c2seg.cli", "demo", "--config", str(config)]
    run = subprocess.run(env_cmd, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "source_only" in run.stdout and "adapted" in run.stdout and "mIoU" in run.stdout
    train = tmp_path / "out" / "train"
    assert f"initialised from {train / 'pretrain'}" in run.stderr
    assert f"initialised from {train / 'source_only'}" in run.stderr
    for name in ("source_only", "adapted"):
        city = tmp_path / "out" / "predictions" / name / "synth_target"
        metrics = json.loads((city / "metrics.json").read_text())
        assert 0.0 <= metrics["miou"] <= 1.0 and len(metrics["per_class"]) == 13
        with rasterio.open(city / "synth_target.tif") as src:
            assert src.crs is not None and src.count == 1 and src.dtypes[0] == "uint8"
            assert (src.height, src.width) == (96, 128)
    # a rerun finds every step done (training COMPLETED, models exported) and only re-scores
    again = subprocess.run(env_cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert all(f"[{n}] skipped" in again.stderr
               for n in ("generate", "prep", "pretrain", "source_only", "adapted", "export adapted"))
