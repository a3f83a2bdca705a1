"""``c2seg infer run`` end to end on an exported model file: 2 ranks equal 1 rank byte for byte, a
killed run resumes to the same output, the challenge submission of a tile city, georeferenced COGs."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
import yaml
import zarr

from c2seg.data_prep.manifest import Normalizer
from c2seg.data_prep.synth import generate_dataset
from c2seg.inference.cog import validate_cog

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def exported_model(tiny_spec, tmp_path_factory) -> Path:
    """A c2seg-model/1 file of the tiny fusion segmenter (random weights), as `c2seg train export` writes."""
    from c2seg.config import to_dict
    from c2seg.train.config import load_model_config
    from c2seg.train.export import save_exported
    from c2seg.train.models import FusionSegmenter

    cfg = load_model_config(ROOT / "configs" / "models" / "tiny.yaml")
    torch.manual_seed(0)
    model = FusionSegmenter(tiny_spec, cfg)
    stats = {m.name: {"mean": [500.0] * m.bands, "std": [800.0] * m.bands} for m in tiny_spec.modalities}
    path = tmp_path_factory.mktemp("model") / "model.pt"
    save_exported(path, to_dict(cfg), tiny_spec.to_dict(), model.state_dict(), Normalizer(tiny_spec, stats).as_dict(),
                  tiny_spec.modality_names, 32)
    return path


def infer_cmd(model: Path, spec, city: str, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "c2seg.cli", "infer", "run", "--model", str(model), "--spec", spec.source_file,
            "--data-root", spec.data_root, "--city", city, "--out", str(out), "--window", "32", "--overlap", "0.5",
            "--block", "32", *extra]


def env(**extra: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")
            and not k.startswith("SLURM_")}
    return {**base, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", **extra}


def run_ranks(cmd: list[str], world: int) -> list[str]:
    """Run ``cmd`` as ``world`` processes with RANK / WORLD_SIZE set; their logs."""
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=env(RANK=str(r), WORLD_SIZE=str(world)), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(world)]
    logs = []
    for r, p in enumerate(procs):
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, f"rank {r} failed:\n{err[-3000:]}"
        logs.append(err)
    return logs


@pytest.fixture(scope="module")
def one_rank(tiny_spec, exported_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one_rank")
    run_ranks(infer_cmd(exported_model, tiny_spec, "synth_target", out), 1)
    return out / "synth_target"


def test_one_rank_outputs_are_georeferenced_valid_cogs(tiny_spec, one_rank):
    cog = one_rank / "synth_target.tif"
    assert validate_cog(cog)[0] == []
    with rasterio.open(cog) as ds, rasterio.open(tiny_spec.resolve(tiny_spec.city("synth_target"), "msi")) as src:
        assert (ds.crs, ds.transform, ds.shape) == (src.crs, src.transform, src.shape)
        classes = ds.read(1)
        assert ds.dtypes[0] == "uint8" and ds.nodata == 0
    assert set(np.unique(classes)) <= set(tiny_spec.scored_class_ids)
    assert (one_rank / "synth_target.png").stat().st_size > 0


def test_two_ranks_equal_one_rank_byte_for_byte(tiny_spec, exported_model, one_rank, tmp_path):
    logs = run_ranks(infer_cmd(exported_model, tiny_spec, "synth_target", tmp_path), 2)
    assert "scene synth_target rank 1: 6 blocks" in logs[1] and "12 blocks (6 here)" in logs[0]
    two = tmp_path / "synth_target"
    assert (two / "synth_target.tif").read_bytes() == (one_rank / "synth_target.tif").read_bytes()
    a = zarr.open_group(two / "synth_target.zarr", mode="r")["classes"][:]
    assert np.array_equal(a, zarr.open_group(one_rank / "synth_target.zarr", mode="r")["classes"][:])


def test_killed_run_resumes_to_the_same_output(tiny_spec, exported_model, tmp_path):
    cmd = infer_cmd(exported_model, tiny_spec, "synth_target", tmp_path, "--tta", "flips", "--batch-size", "1")
    done = tmp_path / "synth_target" / "synth_target.zarr" / "done"
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (done.is_dir() and len(list(done.iterdir())) >= 3):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = len([p for p in done.iterdir() if not p.name.endswith(".tmp")])
    assert 3 <= finished < 12, f"kill landed after {finished} of 12 blocks"
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resuming, {finished} of this rank's 12 blocks already done" in proc.stderr
    # TTA changes the class map (and is slower, so the kill lands mid-run): compare with an uninterrupted run
    ref = tmp_path / "ref"
    run_ranks(infer_cmd(exported_model, tiny_spec, "synth_target", ref, "--tta", "flips", "--batch-size", "1"), 1)
    assert (tmp_path / "synth_target" / "synth_target.tif").read_bytes() == \
        (ref / "synth_target" / "synth_target.tif").read_bytes()


def test_changed_settings_are_refused_rather_than_mixed(tiny_spec, exported_model, one_rank, tmp_path):
    cmd = infer_cmd(exported_model, tiny_spec, "synth_target", one_rank.parent, "--blend", "cosine")
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "made with other settings (settings)" in proc.stderr
    # the same weights re-exported (a new file, a new mtime) are the same model: the work is kept
    copy = tmp_path / "re_exported.pt"
    shutil.copyfile(exported_model, copy)
    cmd = infer_cmd(copy, tiny_spec, "synth_target", one_rank.parent)
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "12 of this rank's 12 blocks already done" in proc.stderr, proc.stderr[-2000:]


def test_window_defaults_to_the_tile_size_the_model_records(tiny_spec, exported_model, one_rank):
    """Without --window, `infer run` predicts through windows of the model's training tile size (32 px for this
    export): the same settings as the 32 px run, so its finished work is kept."""
    cmd = infer_cmd(exported_model, tiny_spec, "synth_target", one_rank.parent)
    at = cmd.index("--window")
    proc = subprocess.run(cmd[:at] + cmd[at + 2:], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "window 32 overlap 0.50" in proc.stderr and "12 of this rank's 12 blocks already done" in proc.stderr


def test_tile_city_submission_has_one_tile_per_input_tile(tiny_spec, exported_model, tmp_path):
    spec = generate_dataset(tiny_spec.with_data_root(tmp_path / "tiles"), 64, 96, seed=1, fmt="tiles")
    spec_file = tmp_path / "tiles_spec.yaml"
    spec_file.write_text(yaml.safe_dump(spec.to_dict()))
    city = spec.city("synth_target")
    cmd = [sys.executable, "-m", "c2seg.cli", "infer", "run", "--model", str(exported_model), "--spec",
           str(spec_file), "--data-root", str(tmp_path / "tiles"), "--city", "synth_target", "--out",
           str(tmp_path / "out"), "--window", "32", "--overlap", "0.25", "--num-tasks", "2"]
    sub = tmp_path / "out" / "synth_target" / "submission"
    per_task = []
    for task in ("0", "1"):  # two array tasks split the tiles
        before = set(sub.glob("*.tif"))
        proc = subprocess.run(cmd + ["--task-index", task], cwd=ROOT, env=env(), capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        per_task.append(set(sub.glob("*.tif")) - before)
    inputs = sorted(p.stem for p in (spec.resolve(city, "root") / "msi").glob("*.tif*"))
    assert [len(t) for t in per_task] == [3, 3]
    assert len(inputs) == 6 and sorted(p.stem for p in sub.glob("*.tif")) == inputs
    for name in inputs:
        with rasterio.open(sub / f"{name}.tif") as ds, \
                rasterio.open(next((spec.resolve(city, "root") / "msi").glob(f"{name}.tif*"))) as src:
            assert ds.count == 1 and ds.dtypes[0] == "uint8" and ds.nodata == 0
            assert (ds.crs, ds.transform, ds.shape) == (src.crs, src.transform, src.shape)
            assert set(np.unique(ds.read(1))) <= set(spec.scored_class_ids)
