"""Issue 18, "trust nothing on disk": hostile inputs made here (real GeoTIFFs, folders where files belong,
dead writers' temp files, orphaned workers) and the one-line errors prep and inspect give for them."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import psutil
import pytest
import rasterio

from c2seg.cli import main
from c2seg.config import ConfigError
from c2seg.spec import City, load_spec
from c2seg.data_prep.manifest import finalize
from c2seg.data_prep.prep import run_prep
from c2seg.data_prep.readers import SceneError, open_city
from c2seg.data_prep.verify import verify
from tests.fixtures_data import CONFIGS
from tests.fixtures_prep import TINY_PREP

SPEC = CONFIGS / "demo_tiny.yaml"
PREP_SETS = ["--set", "tile_size=32", "--set", "stride=16", "--set", "val_block_size=48"]
RAW_PIXEL_ROW = 10  # the row of msi.tif overwritten by the corruption tests


@pytest.fixture
def data_copy(tiny_spec, tmp_path) -> Path:
    """A copy of the tiny cities, free to damage."""
    return Path(shutil.copytree(tiny_spec.data_root, tmp_path / "data"))


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if ": error: " in line]


def _overwrite_pixel_row(tif: Path, raw: bytes) -> None:
    """Write ``raw`` over the stored bytes of row RAW_PIXEL_ROW of an uncompressed, tiled, pixel-interleaved
    GeoTIFF (first tile), as a damaged disk or transfer would: the header stays valid."""
    with rasterio.open(tif) as ds:
        assert ds.compression is None and ds.block_shapes[0] == (256, 256)
        offset = int(ds.get_tag_item("BLOCK_OFFSET_0_0", "TIFF", bidx=1))
        pixel_bytes = ds.count * np.dtype(ds.dtypes[0]).itemsize
    with open(tif, "r+b") as f:
        f.seek(offset + RAW_PIXEL_ROW * 256 * pixel_bytes)
        f.write(raw)


# ---- 13: duplicate band names, a city whose tiles are all nodata ------------------------------------------
def test_duplicate_band_names_are_refused_naming_file_modality_and_name(tmp_path):
    spec_file = tmp_path / "dup.yaml"
    spec_file.write_text(f"extends: {SPEC}\nmodalities:\n  - {{name: msi, bands: 3, resolution_m: 10, "
                         "band_names: [B2, B4, B4]}\n")
    with pytest.raises(ConfigError) as err:
        load_spec(spec_file)
    assert str(err.value) == f"{spec_file}: modalities[0]: modalities.msi.band_names: 'B4' appears twice"


def test_city_whose_tiles_are_all_nodata_fails_prep_naming_city_modality_and_reason(data_copy, tmp_path, capsys):
    with rasterio.open(data_copy / "synth_target" / "sar.tif", "r+") as ds:
        ds.write(np.full((ds.count, ds.height, ds.width), np.nan, np.float32))
    out = tmp_path / "prep"
    code = main(["data", "prep", "--spec", str(SPEC), "--data-root", str(data_copy), "--out", str(out), *PREP_SETS])
    assert code == 2
    (line,) = _error_lines(capsys.readouterr().err)
    assert line.startswith(f"c2seg data: error: {out}: city 'synth_target' kept no train tiles: all ")
    assert line.endswith(" tiles were dropped as nodata (over max_nodata_fraction 0.5 of their pixels): modality "
                         "'sar' is nodata in 100.0% of the city's pixels (fill value 0; NaN and inf are read as "
                         "nodata)")
    assert not (out / "manifest.json").exists() and len(list((out / "parts" / "units").glob("*.json"))) > 0


def test_a_tile_size_larger_than_every_scene_fails_prep_before_any_work(tiny_spec, tmp_path, capsys):
    """The one line names the city, the split, both sizes and the setting; nothing is tiled first."""
    out = tmp_path / "prep"
    code = main(["data", "prep", "--spec", str(SPEC), "--data-root", str(tiny_spec.data_root), "--out", str(out),
                 "--set", "tile_size=128"])
    (line,) = _error_lines(capsys.readouterr().err)
    assert (code, line) == (2, f"c2seg data: error: {SPEC}: city 'synth_source' gets no train tiles: its scene is 96 x "
                               "128 px, smaller than the 128 px tile size: set tile_size: 96 (or less) in the prep "
                               "config, or --set tile_size=96")
    assert not (out / "job.json").exists()


def test_verify_refuses_a_store_where_a_city_has_no_train_tiles(tiny_prepared, tmp_path):
    """A store whose city kept no train tile, as prep wrote one before it refused them, is not OK."""
    from c2seg.data_prep.zarr_store import write_kept

    out = Path(shutil.copytree(tiny_prepared, tmp_path / "prep"))
    manifest = json.loads((out / "manifest.json").read_text())
    train = manifest["cities"]["synth_target"]["splits"]["train"]
    for shard in train["shards"]:
        (out / shard["path"]).unlink()
    train.update(tiles=0, dropped_nodata=train["planned"], class_histogram={}, shards=[])
    (out / "manifest.json").write_text(json.dumps(manifest))
    write_kept(out, "synth_target", "train", [])
    assert verify(out) == [f"{out / 'manifest.json'}: city 'synth_target' has no train tiles, so training cannot "
                           "use it (rerun `c2seg data prep`, which says why)"]


# ---- 14: values far outside the modality's unit ---------------------------------------------------------
def test_random_bytes_in_pixel_data_are_flagged_by_inspect(data_copy, capsys):
    tif = data_copy / "synth_source" / "msi.tif"
    raw = np.random.default_rng(0).bytes(256 * 4 * 4)  # one stored row of the 256 px tile, 4 float32 bands
    _overwrite_pixel_row(tif, raw)
    visible = np.frombuffer(raw, "<f4").reshape(256, 4)[:128]  # the scene is 128 px wide
    finite = np.isfinite(visible).all(axis=1, keepdims=True)  # a pixel with a NaN / inf band is nodata (filled)
    expected = int((finite & ((visible < -1e4) | (visible > 1e5))).sum())
    code = main(["data", "inspect", "--spec", str(SPEC), "--data-root", str(data_copy), "--city", "synth_source"])
    assert code == 1
    (problem,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("PROBLEM: ")]
    assert problem.startswith(f"PROBLEM: {tif}: city 'synth_source', modality 'msi' holds {expected} value(s) "
                              "outside [-10000, 100000] for unit 'reflectance x 1e4' (min ")
    assert expected > 100


def test_absurd_statistics_are_refused_at_prep_naming_city_modality_band_and_value(data_copy, tmp_path, capsys):
    tif = data_copy / "synth_source" / "msi.tif"
    _overwrite_pixel_row(tif, np.full((128, 4), 1e34, "<f4").tobytes())
    out = tmp_path / "prep"
    code = main(["data", "prep", "--spec", str(SPEC), "--data-root", str(data_copy), "--out", str(out), *PREP_SETS,
                 "--set", "store_dtypes.msi=float32"])
    assert code == 2
    assert _error_lines(capsys.readouterr().err) == [
        f"c2seg data: error: {tif}: city 'synth_source', modality 'msi', band 1 (B2): max 1e+34 is outside "
        "[-10000, 100000] for unit 'reflectance x 1e4' (corrupt pixel data or a wrong unit in the spec; "
        "`c2seg data inspect` counts such values)"]


def test_finalize_refuses_absurd_statistics_in_the_parts_on_disk(tiny_prepared, tmp_path):
    out = Path(shutil.copytree(tiny_prepared, tmp_path / "prep"))
    marker = sorted((out / "parts" / "stats").glob("synth_target-*.npz"))[0]
    with np.load(marker) as data:
        arrays = dict(data)
    arrays["sar/maximum"][1] = 3.4e38
    np.savez(marker, **arrays)
    with pytest.raises(ValueError) as err:
        finalize(out)
    assert str(err.value) == (f"{out}: city 'synth_target', modality 'sar', band 2 (VV): max 3.4e+38 is outside "
                              f"[-100, 100] for unit 'dB' in the statistics parts (corrupt pixel data or a wrong "
                              f"unit; delete {out} and rerun the prep)")


# ---- 15: a directory where a file is expected -----------------------------------------------------------
@pytest.mark.parametrize("fmt, expected", [("geotiff", "a GeoTIFF"), ("mat_v5", "a MATLAB v5 .mat file"),
                                           ("mat_v73", "a MATLAB v7.3 .mat file")])
def test_a_directory_given_for_a_scene_file_is_named_as_one(tiny_spec, tmp_path, fmt, expected):
    folder = tmp_path / "scene.mat"
    folder.mkdir()
    keys = [m.name for m in tiny_spec.modalities] if fmt == "geotiff" else ["scene"]
    city = City(name="broken", role="source", format=fmt, files=dict.fromkeys(keys, folder.name), labelled=False)
    spec = replace(tiny_spec, cities=(city,), data_root=str(tmp_path))
    with pytest.raises(SceneError) as err:
        open_city(spec, "broken")
    assert str(err.value) == f"{folder}: is a directory, expected {expected}"


def test_a_file_given_for_a_tile_folder_is_named_as_one(tiny_spec, tmp_path):
    root = tmp_path / "tiles"
    root.mkdir()
    (root / "hsi").write_bytes(b"")
    city = City(name="broken", role="source", format="tiles", files={"root": "tiles"}, labelled=False)
    with pytest.raises(SceneError) as err:
        open_city(replace(tiny_spec, cities=(city,), data_root=str(tmp_path)), "broken")
    assert str(err.value) == f"{root / 'hsi'}: is a file, expected a folder of tiles (N.tiff)"


@pytest.mark.parametrize("command", ["inspect", "prep"])
def test_cli_names_a_directory_given_as_spec_and_a_file_given_as_out(tiny_spec, tmp_path, capsys, command):
    not_a_folder = tmp_path / "out.txt"
    not_a_folder.write_text("")
    assert main(["data", command, "--spec", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert main(["data", command, "--spec", str(SPEC), "--data-root", tiny_spec.data_root, "--out",
                 str(not_a_folder)]) == 2
    what = "the quicklooks (--out)" if command == "inspect" else "the prep output folder (--out)"
    assert _error_lines(capsys.readouterr().err) == [
        f"c2seg data: error: {tmp_path}: is a directory, expected a dataset spec YAML file",
        f"c2seg data: error: {not_a_folder}: is a file, expected {'a folder for ' if command == 'inspect' else ''}"
        f"{what}"]


# ---- 16 and 17: killed preps leave no process and no partial file behind ---------------------------------
def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def _running(procs: list[psutil.Process], within_s: float) -> list[int]:
    """Pids of ``procs`` still running (zombies count as gone) after waiting up to ``within_s`` seconds."""
    deadline = time.monotonic() + within_s
    while True:
        alive = []
        for p in procs:
            try:
                if p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(p.pid)
            except psutil.NoSuchProcess:
                pass
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.05)


def _kill_leftovers(procs: list[psutil.Process]) -> None:
    """Kill what a failing test would leave running."""
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def _c2seg_partials(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob(".*.tmp-*"))


def test_kill9_of_prep_with_workers_takes_its_workers_and_rerun_leaves_no_partial(tiny_spec, tmp_path):
    out = tmp_path / "prep"
    cmd = [sys.executable, "-m", "c2seg.cli", "data", "prep", "--spec", str(SPEC), "--data-root",
           tiny_spec.data_root, "--out", str(out), "--workers", "2", *PREP_SETS, "--set", "shard_max_samples=1"]
    env = {**os.environ, "TQDM_DISABLE": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parent, units = psutil.Process(proc.pid), out / "parts" / "units"
    deadline = time.monotonic() + 30  # until both workers work (they record themselves) and units are done
    while time.monotonic() < deadline and (len(list(units.glob("*.json")) if units.is_dir() else []) < 2
                                           or len(list(out.glob("parts/workers/task-*.json"))) < 2):
        time.sleep(0.01)
    children = parent.children(recursive=True)  # 2 workers + the multiprocessing resource tracker
    try:
        assert len(children) == 3 and not (out / "manifest.json").exists()
        proc.send_signal(signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL
        assert _running(children, within_s=5) == []
    finally:
        _kill_leftovers(children)

    dead = _dead_pid()
    planted = [out / f".job.json.tmp-{dead}", out / "parts" / "units" / f".x.json.tmp-{dead}",
               out / "parts" / "stats" / f".x.npz.tmp-{dead}.npz", out / "shards" / "train" / f".x.tar.tmp-{dead}"]
    for p in planted:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"partial")
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert verify(out) == []
    assert _c2seg_partials(out) == []
    assert list((out / "parts" / "workers").iterdir()) == []


def test_rerun_kills_the_orphaned_workers_of_its_task(tiny_spec, tmp_path):
    out = tmp_path / "prep"
    ready = tmp_path / "ready"
    code = ("import sys, time; from pathlib import Path; from data_prep.prep import register_worker; "
            f"register_worker(Path({str(out)!r}), 0, int(sys.argv[1])); Path({str(ready)!r}).touch(); time.sleep(120)")
    # sh starts the worker in the background and exits: the worker outlives its parent, as an orphan does
    subprocess.run(["sh", "-c", f'"{sys.executable}" -c "{code}" $$ >/dev/null 2>&1 &'], check=True,
                   cwd=Path(__file__).parents[1])
    deadline = time.monotonic() + 60
    while not ready.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    (record,) = [json.loads(p.read_text()) for p in (out / "parts" / "workers").glob("task-00000-*.json")]
    orphan = psutil.Process(record["pid"])
    try:
        assert _running([orphan], within_s=0) == [orphan.pid]
        run_prep(tiny_spec, TINY_PREP, out, task_index=1, num_tasks=2)  # another task's run leaves it
        assert _running([orphan], within_s=0) == [orphan.pid]
        run_prep(tiny_spec, TINY_PREP, out, task_index=0, num_tasks=2)
        assert _running([orphan], within_s=0) == []
    finally:
        _kill_leftovers([orphan])
    assert list((out / "parts" / "workers").iterdir()) == []
