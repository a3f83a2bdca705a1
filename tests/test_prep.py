"""data_prep pipeline: tiling, statistics, zarr + shards, manifest, array tasks, crash and rerun, verify."""

from __future__ import annotations

import hashlib
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
import pytest
import zarr

from c2seg.config import ConfigError
from c2seg.spec import load_spec
from c2seg.data_prep.manifest import finalize, load_manifest
from c2seg.data_prep.prep import run_prep
from c2seg.data_prep.prep_config import PrepConfig, load_prep_config
from c2seg.data_prep.readers import open_city
from c2seg.data_prep.shards import decode_npy, read_shard
from c2seg.data_prep.synth import generate_dataset, with_format
from c2seg.data_prep.tiling import plan_city, tile_origins
from c2seg.data_prep.verify import verify
from tests.fixtures_data import CONFIGS
from tests.fixtures_prep import TINY_PREP

ROOT = Path(__file__).parents[1]


def _dataset_digest(prep: Path) -> tuple[dict, dict]:
    """Shard sha256 by path, and zarr contents of every city / split."""
    m = load_manifest(prep)
    shards = {s["path"]: s["sha256"] for c in m.cities.values() for sp in c["splits"].values() for s in sp["shards"]}
    arrays = {}
    for city, c in m.cities.items():
        for split, sp in c["splits"].items():
            g = zarr.open_group(prep / sp["zarr"], mode="r")
            for name in g.array_keys():
                arrays[f"{city}/{split}/{name}"] = g[name][:]
    return shards, arrays


def test_tile_origins_cover_the_edge():
    assert tile_origins(96, 32, 16) == [0, 16, 32, 48, 64]
    assert tile_origins(100, 32, 32) == [0, 32, 64, 68]
    assert tile_origins(20, 32, 16) == []


def test_every_tile_accounted_and_splits_disjoint(tiny_spec, tiny_prepared):
    m = load_manifest(tiny_prepared)
    assert verify(tiny_prepared) == []
    for city in tiny_spec.cities:
        rec = m.cities[city.name]
        scene = open_city(tiny_spec, city.name)[0]
        footprint = {}
        for split, sp in rec["splits"].items():
            assert sp["planned"] == sp["tiles"] + sp["dropped_nodata"]
            assert sum(s["samples"] for s in sp["shards"]) == sp["tiles"] > 0
            assert len(sp["shards"]) >= 4
            g = zarr.open_group(tiny_prepared / sp["zarr"], mode="r")
            mask = np.zeros((scene.height, scene.width), bool)
            for r, c, h, w in g["windows"][:][g["kept"][:]]:
                mask[r:r + h, c:c + w] = True
            footprint[split] = mask
            # source cities keep labels in both splits; target cities only in val
            assert sp["labelled"] == (city.role == "source" or split == "val")
            assert ("label" in g) == sp["labelled"]
        assert not (footprint["train"] & footprint["val"]).any(), "a pixel is in both train and val"
        assert rec["dropped_straddling"] > 0


def test_tar_and_zarr_hold_the_scene_values(tiny_spec, tiny_prepared):
    m = load_manifest(tiny_prepared)
    city = "synth_source"
    scene = open_city(tiny_spec, city)[0]
    sp = m.cities[city]["splits"]["train"]
    g = zarr.open_group(tiny_prepared / sp["zarr"], mode="r")
    key, entries = next(read_shard(tiny_prepared / sp["shards"][1]["path"]))
    meta = json.loads(entries["json"])
    r, c, h, w = meta["window"]
    from c2seg.data_prep.readers import Window

    raw = scene.read("hsi", Window(r, c, h, w))
    tile = decode_npy(entries["hsi.npy"])
    assert tile.dtype == np.float16
    np.testing.assert_array_equal(tile, g["hsi"][meta["slot"]])
    np.testing.assert_allclose(tile.astype(np.float32), raw, rtol=2**-11)
    np.testing.assert_array_equal(decode_npy(entries["label.npy"]), scene.read_label(Window(r, c, h, w)))
    assert m.data["store_dtypes"]["hsi"]["max_rel_error"] <= 2**-11


def test_statistics_match_a_direct_computation(tiny_spec, tiny_prepared):
    m = load_manifest(tiny_prepared)
    values = {}
    for city in tiny_spec.cities:
        scene = open_city(tiny_spec, city.name)[0]
        values[city.name] = scene.read("msi").reshape(4, -1).astype(np.float64)
        got = m.city_stats[city.name]["msi"]
        np.testing.assert_allclose(got["mean"], values[city.name].mean(axis=1), rtol=1e-9)
        np.testing.assert_allclose(got["std"], values[city.name].std(axis=1), rtol=1e-9)
    pooled = np.concatenate(list(values.values()), axis=1)
    np.testing.assert_allclose(m.stats["msi"]["mean"], pooled.mean(axis=1), rtol=1e-9)
    np.testing.assert_allclose(m.stats["msi"]["std"], pooled.std(axis=1), rtol=1e-9)
    # percentiles come from a pixel sample: close to the exact ones
    for q, key in ((1, "p01"), (99, "p99")):
        exact = np.percentile(pooled, q, axis=1)
        np.testing.assert_allclose(m.stats["msi"][key], exact, rtol=0.05)


def test_three_array_tasks_give_the_same_dataset_and_rerun_does_nothing(tiny_spec, tiny_prepared, tmp_path):
    out = tmp_path / "tasks"
    for i in (2, 0, 1):
        run_prep(tiny_spec, TINY_PREP, out, task_index=i, num_tasks=3)
    shutil.copytree(out, tmp_path / "partial")
    next((tmp_path / "partial" / "parts" / "units").glob("*.json")).unlink()
    with pytest.raises(ValueError, match=r"1 of \d+ work units are not done"):
        finalize(tmp_path / "partial")
    finalize(out)
    shards1, arrays1 = _dataset_digest(tiny_prepared)
    shards3, arrays3 = _dataset_digest(out)
    assert shards3 == shards1
    assert arrays3.keys() == arrays1.keys()
    for k in arrays1:
        np.testing.assert_array_equal(arrays3[k], arrays1[k], err_msg=k)
    assert run_prep(tiny_spec, TINY_PREP, out)["units"] == 0


# what prep wrote for the tiny cities at 79da524, before prep was made faster (issue 20): the manifest without
# "created" and "versions" (its shard sha256s, statistics and histograms included), and every zarr array's bytes
PINNED_MANIFEST = "efadb974752ccbc5fc6772d8d311997cb3418630e09b61e32f025b2446da3e00"
PINNED_ARRAYS = "ccade0d7d684f91526529b15c1f67a55f17c053488d7c34126f3c048f6a16782"


def _pinned_digests(prep: Path) -> tuple[str, str]:
    manifest = json.loads((prep / "manifest.json").read_text())
    del manifest["created"], manifest["versions"]
    arrays = hashlib.sha256()
    for name, a in sorted(_dataset_digest(prep)[1].items()):
        arrays.update(f"{name}:{a.dtype}:{a.shape}".encode())
        arrays.update(a.tobytes())
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest(), arrays.hexdigest()


@pytest.mark.parametrize("workers", [1, 2])
def test_prep_writes_the_pinned_bytes_at_one_and_two_workers(tiny_spec, tiny_prepared, tmp_path, workers):
    """Speed-ups of prep change no byte: the same manifest (so the same shard sha256s) and zarr arrays."""
    out = tiny_prepared
    if workers > 1:
        out = tmp_path / "prep"
        run_prep(tiny_spec, TINY_PREP, out, workers=workers)
        finalize(out)
    assert _pinned_digests(out) == (PINNED_MANIFEST, PINNED_ARRAYS)


def test_job_folder_refuses_another_config(tiny_spec, tiny_prepared):
    with pytest.raises(ValueError, match="another config"):
        run_prep(tiny_spec, PrepConfig(tile_size=32, stride=32), tiny_prepared)


@pytest.mark.slow
def test_kill9_midway_then_rerun_completes_exactly(tiny_spec, tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "c2seg.cli", "data", "prep", "--spec", str(ROOT / "configs/datasets/demo_tiny.yaml"),
           "--data-root", tiny_spec.data_root, "--out", str(out), "--set", "tile_size=32", "--set", "stride=16",
           "--set", "val_block_size=48", "--set", "shard_max_samples=1"]
    env = {**os.environ, "TQDM_DISABLE": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    units = out / "parts" / "units"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list(units.glob("*.json")) if units.is_dir() else []) < 5:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    done_at_kill = len(list(units.glob("*.json")))
    assert not (out / "manifest.json").exists() and done_at_kill < 57
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert verify(out) == []
    m = load_manifest(out)
    for rec in m.cities.values():
        for sp in rec["splits"].values():
            assert sum(s["samples"] for s in sp["shards"]) == sp["tiles"] == sp["planned"] - sp["dropped_nodata"]


def test_verify_names_what_is_wrong(tiny_prepared, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_prepared, broken)
    m = load_manifest(broken)
    shards = m.shards("train", ["synth_source"])
    shards[0].path.unlink()
    data = bytearray(shards[1].path.read_bytes())
    data[-2000] ^= 0xFF
    shards[1].path.write_bytes(bytes(data))
    problems = verify(broken)
    assert any(str(shards[0].path) in p and "missing" in p for p in problems)
    assert any(str(shards[1].path) in p and "sha256" in p for p in problems)
    assert any("shards and zarr disagree" in p for p in problems)


def test_config_errors_are_clear(tmp_path, tiny_spec):
    bad = tmp_path / "prep.yaml"
    bad.write_text("tile_sise: 64\n")
    with pytest.raises(ConfigError, match="unknown key 'tile_sise'"):
        load_prep_config(bad)
    with pytest.raises(ValueError, match="store_dtypes names modalities"):
        PrepConfig(store_dtypes={"lidar": "uint16"}).resolved(tiny_spec)
    cfg = load_prep_config(ROOT / "configs/prep/default.yaml").resolved(tiny_spec)
    assert (cfg.tile_size, cfg.stride, cfg.val_block_size) == (32, 16, 128)
    with pytest.raises(ValueError, match="not integers in 0..65535"):
        run_prep(tiny_spec, PrepConfig(store_dtypes={"sar": "uint16"}, val_block_size=48), tmp_path / "u16")


def test_shards_read_by_webdataset_and_by_sample_range(tiny_prepared, tmp_path):
    import webdataset as wds

    from c2seg.data_prep.shards import decode_npy, iter_samples

    m = load_manifest(tiny_prepared)
    shard = m.shards("train", ["synth_source"])[0]
    every = list(read_shard(shard.path))
    assert len(every) == shard.samples > 2
    plain = list(wds.WebDataset(str(shard.path), shardshuffle=False).decode())
    assert [s["__key__"] for s in plain] == [k for k, _ in every]
    np.testing.assert_array_equal(plain[1]["hsi.npy"], decode_npy(every[1][1]["hsi.npy"]))
    part = list(iter_samples(shard.path, 1, 3))
    assert [k for k, _ in part] == [k for k, _ in every[1:3]]
    assert bytes(part[0][1]["sar.npy"]) == every[1][1]["sar.npy"]
    cut = tmp_path / "cut.tar"
    cut.write_bytes(shard.path.read_bytes()[: shard.bytes // 2])
    with pytest.raises(ValueError, match=r"cut\.tar.*(truncated|checksum)"):
        list(iter_samples(cut))


@pytest.mark.parametrize("codec", ["none", "zstd"])
def test_zarr_codecs_store_the_same_tiles(tiny_spec, tiny_prepared, tmp_path, codec):
    from dataclasses import replace

    from zarr.codecs import Crc32cCodec

    out = tmp_path / codec
    run_prep(tiny_spec, replace(TINY_PREP, zarr_codec=codec), out)
    finalize(out)
    assert verify(out) == []
    _, arrays = _dataset_digest(out)
    _, expect = _dataset_digest(tiny_prepared)
    for key in expect:
        np.testing.assert_array_equal(arrays[key], expect[key], err_msg=key)
    sp = load_manifest(out).cities["synth_source"]["splits"]["train"]
    g = zarr.open_group(out / sp["zarr"], mode="r")
    if codec == "none":  # the crc32c checksum only
        assert g["hsi"].compressors == g["label"].compressors == (Crc32cCodec(),)
    else:  # zstd, bit-shuffled for the float16 bands, byte-shuffled for the labels; then the checksum
        (hsi, _), (label, _) = g["hsi"].compressors, g["label"].compressors
        assert (hsi.cname.value, hsi.shuffle.value) == ("zstd", "bitshuffle")
        assert (label.cname.value, label.shuffle.value) == ("zstd", "shuffle")


def test_only_stored_pixels_must_fit_the_store_dtype(tiny_spec, tmp_path):
    """A value beyond float16 in a tile that is dropped (mostly nodata) is never stored, so prep goes on;
    the same value in a kept tile is refused, naming the file and the fix."""
    import rasterio

    def damaged(name: str, pixel: tuple[int, int]):
        root = tmp_path / name
        shutil.copytree(tiny_spec.data_root, root)
        spec = tiny_spec.with_data_root(root)
        city = spec.cities[0]
        for m in spec.modalities:
            path = spec.resolve(city, m.name)
            with rasterio.open(path, "r+") as ds:
                data = ds.read()
                data[:, :32, :32] = 0  # nodata (fill 0 in every band): the tile at (0, 0) is dropped
                if m.name == "hsi":
                    data[0, pixel[0], pixel[1]] = 70000.0
                ds.write(data)
        return spec

    run_prep(damaged("dropped", (2, 2)), TINY_PREP, tmp_path / "ok")
    finalize(tmp_path / "ok")
    dropped = sum(s["dropped_nodata"] for c in load_manifest(tmp_path / "ok").cities.values()
                  for s in c["splits"].values())
    assert dropped >= 1
    with pytest.raises(ValueError, match=r"hsi\.tif.*beyond the float16 range.*store_dtypes\.hsi: float32"):
        run_prep(damaged("kept", (60, 60)), TINY_PREP, tmp_path / "bad")


def test_source_cities_train_whole_by_default(tiny_spec):
    """With the default ``source_val_fraction`` (0) a source city holds out no block, so no tile straddles
    one and every labelled pixel is in a train tile; the target city still holds out its val blocks."""
    from c2seg.data_prep.tiling import plan_city

    cfg = PrepConfig(tile_size=32, stride=16, val_block_size=48).resolved(tiny_spec)
    plans = {c.name: plan_city(tiny_spec, c, open_city(tiny_spec, c.name), cfg) for c in tiny_spec.cities}
    source, target = plans["synth_source"], plans["synth_target"]
    assert (len(source.splits["train"].tiles), len(source.splits["val"].tiles), source.straddling_dropped) == (35, 0, 0)
    assert len(target.splits["val"].tiles) > 0 and target.straddling_dropped > 0
    held = plan_city(tiny_spec, tiny_spec.city("synth_source"), open_city(tiny_spec, "synth_source"),
                     PrepConfig(tile_size=32, stride=16, val_block_size=48, source_val_fraction=None).resolved(tiny_spec))
    assert len(held.splits["train"].tiles) < 35  # the old behaviour: source blocks held out like the target's


def test_tile_folders_smaller_than_the_spec_tile_set_the_tile_size(tmp_path):
    """32 px tile folders under a spec whose tiling is 64 / 32: prep without a tile_size cuts 32 px tiles with
    stride 16 (the spec's proportion), so every tile of the release is one tile of the store."""
    generate_dataset(load_spec(CONFIGS / "demo_tiny.yaml", data_root=tmp_path), 96, 128, fmt="tiles")  # 32 px
    spec_file = tmp_path / "tiles64.yaml"
    spec_file.write_text(f"extends: {CONFIGS / 'demo_tiny.yaml'}\ntiling: {{size: 64, stride: 32}}\n")
    spec = with_format(load_spec(spec_file, data_root=tmp_path), "tiles")
    out = tmp_path / "prep"
    run_prep(spec, PrepConfig(), out)
    finalize(out)
    m = load_manifest(out)
    assert (m.tile_size, m.data["config"]["stride"]) == (32, 16)
    tiles = {c: len(list((tmp_path / c / "hsi").glob("*.tiff"))) for c in m.cities}
    assert tiles == {"synth_source": 35, "synth_target": 12}
    assert {c: rec["splits"]["train"]["tiles"] for c, rec in m.cities.items()} == tiles
    assert verify(out) == []


def _plan_target(spec, **cfg):
    city = spec.city("synth_target")
    return plan_city(spec, city, open_city(spec, city.name), PrepConfig(tile_size=32, stride=16, **cfg).resolved(spec))


def test_an_unlabelled_city_holds_out_no_validation_blocks(tiny_spec):
    """Its val split could score nothing: every candidate tile of it is a train tile, to adapt on."""
    def counts(plan) -> tuple[int, int, int]:
        return len(plan.splits["train"].tiles), len(plan.splits["val"].tiles), plan.straddling_dropped

    unlabelled = replace(tiny_spec, cities=(tiny_spec.cities[0], replace(tiny_spec.cities[1], labelled=False)))
    assert counts(_plan_target(unlabelled, val_fraction=0.9, val_block_size=24)) == (35, 0, 0)
    assert counts(_plan_target(tiny_spec, val_fraction=0.5, val_block_size=48)) == (11, 16, 8)  # labelled


@pytest.mark.parametrize("fraction, block, split, where, straddling", [
    (0.9, 24, "train", "outside", 11),  # the blocks left to train hold no whole tile
    (0.2, 16, "val", "inside", 19),  # the held-out blocks hold no whole tile
])
def test_a_split_left_without_tiles_by_the_validation_blocks_fails_naming_city_split_and_settings(
        tiny_spec, fraction, block, split, where, straddling):
    with pytest.raises(ValueError) as err:
        _plan_target(tiny_spec, val_fraction=fraction, val_block_size=block)
    assert str(err.value) == (
        f"{tiny_spec.source_file}: city 'synth_target' gets no {split} tiles: none of its 35 tiles lies wholly "
        f"{where} the held-out validation blocks of {block} px ({straddling} straddle them and are dropped; 0 of its "
        f"1 scenes are smaller than the 32 px tile): change val_block_size or val_fraction ({fraction:g})")


def test_excluded_bands_are_what_prep_stores_the_manifest_records_and_an_exported_model_keeps(tiny_spec, tiny_prepared,
                                                                                               tmp_path):
    """MSI without B3 and B8: the store and the statistics hold B2 and B4 (the values of the full prep's bands 1
    and 3), the manifest's spec keeps exclude_bands, and a model exported with that spec reloads for 2 bands."""
    import torch

    from c2seg.config import to_dict
    from c2seg.train.config import load_model_config
    from c2seg.train.export import load_exported, save_exported
    from c2seg.train.models import FusionSegmenter

    msi = replace(tiny_spec.modality("msi"), exclude_bands=("B3", 4))
    spec = replace(tiny_spec, modalities=tuple(msi if m.name == "msi" else m for m in tiny_spec.modalities))
    out = tmp_path / "prep"
    run_prep(spec, TINY_PREP, out)
    finalize(out)
    manifest, full = load_manifest(out), load_manifest(tiny_prepared)
    assert manifest.spec.to_dict() == spec.to_dict()
    assert manifest.data["spec"]["modalities"][1]["exclude_bands"] == ["B3", 4]
    sp = manifest.cities["synth_source"]["splits"]["train"]
    stored = zarr.open_group(out / sp["zarr"], mode="r")["msi"][:]
    assert stored.shape[1] == 2
    np.testing.assert_array_equal(stored, zarr.open_group(tiny_prepared / sp["zarr"], mode="r")["msi"][:][:, [0, 2]])
    assert manifest.stats["msi"]["mean"] == [full.stats["msi"]["mean"][i] for i in (0, 2)]
    cfg = load_model_config(ROOT / "configs" / "models" / "tiny.yaml")
    model = tmp_path / "model.pt"
    save_exported(model, to_dict(cfg), manifest.data["spec"], FusionSegmenter(manifest.spec, cfg).state_dict(),
                  manifest.normalizer().as_dict(), list(spec.modality_names), 32)
    exported = load_exported(model)
    assert exported.spec.to_dict() == spec.to_dict() and exported.spec.modality("msi").channels == 2
    x = {m.name: torch.zeros(1, m.channels, 32, 32) for m in spec.modalities}
    assert exported.model(x).shape[1] == spec.num_logits
