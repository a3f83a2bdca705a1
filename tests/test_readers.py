"""Scene readers: every format round-trips, windows equal full reads, HDF5 reads stay bounded, and each
bad input gets its message."""

from __future__ import annotations

import logging
import shutil
import tracemalloc
from dataclasses import replace

import numpy as np
import pytest
import rasterio
from affine import Affine

from c2seg.spec import load_spec
from c2seg.data_prep.readers import SceneError, Window, open_city
from c2seg.data_prep.readers.sensor import BandMeta
from c2seg.data_prep.synth import CitySynth, generate_city, generate_dataset
from c2seg.data_prep.synth.writers import city_tiles
from tests.fixtures_data import CONFIGS, geotiff_spec, write_geotiff

# (spec, format, height, width): AB-like pair as .mat v5 and tiles, BW-like as v7.3 with 30 m HSI and raw
# label codes, GeoTIFF stacks with an on-grid and a coarse modality.
CASES = [
    ("demo_tiny.yaml", "geotiff", 48, 64),
    ("demo_ab.yaml", "mat_v5", 40, 56),
    ("demo_ab.yaml", "tiles", 160, 136),
    ("demo_bw.yaml", "mat_v73", 50, 70),
    ("demo_bw.yaml", "geotiff", 50, 70),
]


@pytest.fixture(scope="module", params=CASES, ids=[f"{c[0].split('.')[0]}-{c[1]}" for c in CASES])
def generated(request, tmp_path_factory):
    name, fmt, h, w = request.param
    spec = load_spec(CONFIGS / name, data_root=tmp_path_factory.mktemp(fmt))
    if fmt == "tiles":  # AB-like tiles at a test size: 32 px tiles
        spec = replace(spec, tiling=replace(spec.tiling, size=32, stride=16))
    spec = generate_dataset(spec, h, w, seed=3, fmt=fmt)
    return spec, h, w


def test_round_trip_equals_generated(generated):
    spec, h, w = generated
    for city in spec.cities:
        synth = CitySynth(spec, city, h, w, seed=3)
        scenes = open_city(spec, city.name)
        windows = city_tiles(synth) if city.format == "tiles" else [Window(0, 0, h, w)]
        assert [s.name for s in scenes] == ([str(i) for i in range(1, len(windows) + 1)]
                                            if city.format == "tiles" else [city.name])
        for scene, window in zip(scenes, windows):
            expected = synth.render(window)
            assert (scene.height, scene.width) == (window.height, window.width)
            assert scene.modalities == spec.modality_names and scene.has_label
            for m in spec.modalities:
                got = scene.read(m.name)
                assert got.dtype == np.float32 and got.shape == (m.bands, window.height, window.width)
                np.testing.assert_array_equal(got, expected[m.name])
            label = scene.read_label()
            assert label.dtype == np.uint8
            np.testing.assert_array_equal(label, expected["label"])
            scene.close()


def test_window_read_equals_full_read(generated):
    spec, h, w = generated
    scene = open_city(spec, spec.cities[0].name)[0]
    full = {m: scene.read(m) for m in spec.modality_names}
    full_label = scene.read_label()
    rng = np.random.default_rng(0)
    for _ in range(4):
        r, c = int(rng.integers(0, scene.height - 5)), int(rng.integers(0, scene.width - 5))
        win = Window(r, c, int(rng.integers(1, scene.height - r + 1)), int(rng.integers(1, scene.width - c + 1)))
        for m in spec.modality_names:
            np.testing.assert_array_equal(scene.read(m, win), full[m][(slice(None), *win.slices)])
        np.testing.assert_array_equal(scene.read_label(win), full_label[win.slices])
    with pytest.raises(SceneError, match="outside"):
        scene.read(spec.modality_names[0], Window(scene.height - 2, 0, 4, 4))


def test_mat_v73_and_georeference(tmp_path):
    spec = generate_dataset(load_spec(CONFIGS / "demo_bw.yaml", data_root=tmp_path), 40, 40)
    scene = open_city(spec, "synth_source")[0]
    assert scene.crs == "EPSG:32650"
    assert scene.transform == Affine(10, 0, 440000.0, 0, -10, 4440000.0)
    with open(spec.resolve(spec.cities[0], "scene"), "rb") as fh:
        assert fh.read(19) == b"MATLAB 7.3 MAT-file"
    import h5py

    with h5py.File(spec.resolve(spec.cities[0], "scene")) as f:  # stored transposed, HSI at 30 m
        assert f["HSI"].shape == (116, 14, 14) and f["MSI"].shape == (4, 40, 40)


def test_hdf5_window_read_is_bounded(tmp_path):
    spec = load_spec(CONFIGS / "demo_bw.yaml", data_root=tmp_path)
    city = replace(spec.cities[0], labelled=False, files={"scene": "big.mat"})
    spec = replace(spec, cities=(city,))
    generate_city(spec, city, 480, 480)
    scene = open_city(spec, city.name)[0]
    grid_bytes = 116 * 480 * 480 * 4  # the whole HSI on the grid
    tracemalloc.start()
    try:
        window = scene.read("hsi", Window(200, 300, 48, 48))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert window.shape == (116, 48, 48)
    assert peak < 4 * window.nbytes < grid_bytes / 20, f"peak {peak} B for a {window.nbytes} B window"


# ---- bad inputs ------------------------------------------------------------------------------
@pytest.fixture()
def tiny_copy(tiny_spec, tmp_path):
    """A private copy of the tiny GeoTIFF cities, to damage."""
    shutil.copytree(tiny_spec.data_root, tmp_path / "data")
    return tiny_spec.with_data_root(tmp_path / "data")


def _rewrite(path, data: np.ndarray, **changes) -> None:
    """Rewrite a GeoTIFF with new values and profile changes (crs, transform, ...)."""
    with rasterio.open(path) as ds:
        profile = ds.profile
    profile.update(count=data.shape[0], height=data.shape[1], width=data.shape[2], dtype=data.dtype.name, **changes)
    with rasterio.open(path, "w", **profile) as ds:
        ds.write(data)


def _read_raw(path) -> np.ndarray:
    with rasterio.open(path) as ds:
        return ds.read()


def test_wrong_band_count(tiny_copy):
    path = tiny_copy.resolve(tiny_copy.cities[0], "msi")
    _rewrite(path, _read_raw(path)[:3])
    with pytest.raises(SceneError, match=rf"{path}: modality 'msi' has 3 bands, spec 'demo_tiny' says 4"):
        open_city(tiny_copy, "synth_source")


@pytest.mark.parametrize("change", ["shape", "transform", "crs"])
def test_misaligned_grids(tiny_copy, change):
    path = tiny_copy.resolve(tiny_copy.cities[0], "sar")
    data = _read_raw(path)
    with rasterio.open(path) as ds:
        tf = ds.transform
    if change == "shape":
        _rewrite(path, data[:, :-4])
        match = "modality .sar. grid is 92 x 128 px, which does not align"
    elif change == "transform":
        _rewrite(path, data, transform=tf @ Affine.translation(3, 0))
        match = "transform .* does not align"
    else:
        _rewrite(path, data, crs="EPSG:4326")
        match = "CRS EPSG:4326 differs"
    with pytest.raises(SceneError, match=rf"{path}: {match}"):
        open_city(tiny_copy, "synth_source")


def test_nonfinite_values_make_their_pixels_nodata(tiny_copy, caplog):
    """A NaN / inf in one band of a SAR pixel makes the whole pixel nodata (every band at the fill value), so
    the nodata mask prep uses counts it and the statistics leave it out; it is never 0 dB beside a valid band."""
    from c2seg.data_prep.stats import BandStats, fill_value, nodata_mask

    path = tiny_copy.resolve(tiny_copy.cities[0], "sar")
    data = _read_raw(path)
    clean = data.copy()
    data[0, 3, 4], data[1, 10, 10], data[0, 50, 60] = np.nan, np.inf, -np.inf
    _rewrite(path, data)
    scene = open_city(tiny_copy, "synth_source")[0]
    with caplog.at_level(logging.WARNING):
        sar = scene.read("sar")
    assert scene.nonfinite_counts["sar"] == 3 and scene.nonfinite_counts.get("hsi", 0) == 0
    bad = [(3, 4), (10, 10), (50, 60)]
    for r, c in bad:
        assert sar[:, r, c].tolist() == [0.0, 0.0]  # both bands, the finite one too
    assert np.isfinite(sar).all() and str(path) in caplog.text and "3 non-finite" in caplog.text
    mask = nodata_mask(sar, fill_value(tiny_copy.modality("sar")))
    assert sorted(zip(*np.nonzero(mask))) == bad
    stats = BandStats.empty(2)
    stats.add(sar, ~mask, np.random.default_rng(0), keep=0)
    keep = np.ones(sar.shape[1:], bool)
    keep[tuple(np.array(bad).T)] = False
    assert stats.count.tolist() == [keep.sum()] * 2
    np.testing.assert_allclose(stats.mean, clean[:, keep].astype(np.float64).mean(axis=1), rtol=1e-6)
    # with a nodata value in the spec, the pixel holds it in every band
    mods = tuple(replace(m, nodata=-99.0) if m.name == "sar" else m for m in tiny_copy.modalities)
    scene = open_city(replace(tiny_copy, modalities=mods), "synth_source")[0]
    assert scene.read("sar", Window(0, 0, 8, 8))[:, 3, 4].tolist() == [-99.0, -99.0]
    assert scene.nonfinite_counts["sar"] == 1


def test_reads_are_the_callers_to_change(generated):
    """A read result is the caller's own array: changing it (as the non-finite fill does in place) never
    changes what the next read returns, in every format."""
    spec = generated[0]
    scene = open_city(spec, spec.cities[0].name)[0]
    with scene:
        name = spec.modality_names[-1]
        first = scene.read(name, Window(0, 0, 8, 8))
        kept = first.copy()
        first[...] = 12345.0
        np.testing.assert_array_equal(scene.read(name, Window(0, 0, 8, 8)), kept)


def test_label_values_outside_class_set(tiny_copy):
    path = tiny_copy.resolve(tiny_copy.cities[0], "label")
    label = _read_raw(path)
    label[0, 0, :3], label[0, 5, 5] = 20, 99
    _rewrite(path, label)
    scene = open_city(tiny_copy, "synth_source")[0]
    with pytest.raises(SceneError, match=rf"{path}: label values outside the class set .*\[20, 99\]"):
        scene.read_label(Window(40, 40, 8, 8))


@pytest.fixture
def raw_coded(tmp_path):
    """demo_bw (a spec with a label_remap) generated as 30 x 36 px GeoTIFF cities: labels hold raw codes."""
    return generate_dataset(load_spec(CONFIGS / "demo_bw.yaml", data_root=tmp_path), 30, 36, fmt="geotiff")


def test_raw_label_codes_remapped(raw_coded, caplog):
    spec = raw_coded
    path = spec.resolve(spec.cities[0], "label")
    raw = _read_raw(path)
    remap = spec.label_remap
    assert set(np.unique(raw).tolist()) <= set(remap.codes) | set(remap.nodata_codes) and raw.max() > 13
    expected = CitySynth(spec, spec.cities[0], 30, 36).render()["label"]
    with caplog.at_level(logging.INFO, logger="c2seg.readers"):
        got = open_city(spec, "synth_source")[0].read_label()
    np.testing.assert_array_equal(got, expected)
    assert "raw codes" in caplog.text and str(path) in caplog.text


def test_declared_raw_codes_are_remapped_in_every_scene_even_when_they_look_like_class_ids(raw_coded):
    """A label holding only raw codes that are class ids too (5, 6, 11, 12, 13) and no nodata code (-1), which a
    guess from its values would read as class ids, is remapped like any other: 5 -> 1, 6 -> 2, 11 -> 3, 12 -> 4,
    13 -> 5."""
    path = raw_coded.resolve(raw_coded.cities[0], "label")
    raw = np.array([5, 6, 11, 12, 13, 13], np.int16)[np.arange(30 * 36) % 6].reshape(1, 30, 36)
    _rewrite(path, raw)
    got = open_city(raw_coded, "synth_source")[0].read_label()
    np.testing.assert_array_equal(got, np.array([1, 2, 3, 4, 5, 5], np.uint8)[np.arange(30 * 36) % 6].reshape(30, 36))
    raw[0, :2, :3] = -1  # the nodata code -> ignore_id
    _rewrite(path, raw)
    got = open_city(raw_coded, "synth_source")[0].read_label()
    assert (got[:2, :3] == raw_coded.ignore_id).all() and got[2, 0] == 1


@pytest.mark.parametrize("values", [[77], [0, 3], [0]])
def test_values_that_are_neither_raw_codes_nor_nodata_codes_fail_naming_file_and_values(raw_coded, values):
    """Class ids 0 and 3 are not raw codes of demo_bw: a label that holds them is refused, not read as class ids."""
    path = raw_coded.resolve(raw_coded.cities[0], "label")
    raw = _read_raw(path)
    raw[0, 0, :len(values)] = values
    _rewrite(path, raw)
    with pytest.raises(SceneError) as err:
        open_city(raw_coded, "synth_source")[0].read_label(Window(10, 10, 4, 4))
    message = str(err.value)
    assert message.startswith(f"{path}: label values {values} are neither raw codes [5, 6, 11, 12, 13, 14, 21, ")
    assert message.endswith("nodata codes [-1] of the label_remap of spec 'demo_bw' (labels that hold class ids "
                            "need label_remap: null)") and "\n" not in message


def test_label_remap_null_declares_class_ids(raw_coded, tmp_path):
    """A spec extending one with a label_remap reads class ids once it sets label_remap: null, and then refuses
    raw codes beyond the class set."""
    spec_file = tmp_path / "class_ids.yaml"
    spec_file.write_text(f"extends: {CONFIGS / 'demo_bw.yaml'}\nname: demo_bw_ids\nlabel_remap: null\n")
    assert load_spec(spec_file).label_remap is None
    spec = replace(raw_coded, name="demo_bw_ids", label_remap=None)  # the generated GeoTIFF cities, read as class ids
    path = spec.resolve(spec.cities[0], "label")
    ids = (np.arange(30 * 36) % 14).astype(np.uint8).reshape(1, 30, 36)
    _rewrite(path, ids)
    np.testing.assert_array_equal(open_city(spec, "synth_source")[0].read_label(), ids[0])
    _rewrite(path, np.full((1, 30, 36), 41, np.int16))
    with pytest.raises(SceneError, match=rf"{path}: label values outside the class set of spec 'demo_bw_ids': \[41\]"):
        open_city(spec, "synth_source")[0].read_label()


@pytest.mark.parametrize("fmt", ["geotiff", "mat_v5", "mat_v73", "tiles"])
@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_or_truncated_file(tmp_path, fmt, damage):
    spec = generate_dataset(load_spec(CONFIGS / "demo_tiny.yaml", data_root=tmp_path), 64, 64, fmt=fmt)
    city = spec.cities[0]
    path = {"geotiff": lambda: spec.resolve(city, "hsi"), "tiles": lambda: spec.resolve(city, "root") / "hsi/2.tiff"}\
        .get(fmt, lambda: spec.resolve(city, "scene"))()
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"not a scene " * 50)
    with pytest.raises(SceneError, match=str(path)):
        for scene in open_city(spec, city.name):
            scene.read("hsi")


def test_missing_and_mislabelled_files(tmp_path):
    spec = generate_dataset(load_spec(CONFIGS / "demo_tiny.yaml", data_root=tmp_path), 32, 32, fmt="mat_v73")
    scene_path = spec.resolve(spec.cities[0], "scene")
    as_v5 = replace(spec, cities=tuple(replace(c, format="mat_v5") for c in spec.cities))
    with pytest.raises(SceneError, match="set format: mat_v73"):
        open_city(as_v5, "synth_source")
    scene_path.unlink()
    with pytest.raises(SceneError) as err:
        open_city(spec, "synth_source")
    assert str(err.value) == f"{scene_path}: file not found"  # the .mat files the spec names are no hint


def test_shipped_c2seg_specs_name_the_release_files(tmp_path):
    """c2seg_ab.yaml and c2seg_bw.yaml read the release as the organisers' baseline loads it: AB in data1/, BW
    in data2/, under one data root; stand-ins written at those names open."""
    for name, size in (("c2seg_ab.yaml", (16, 16)), ("c2seg_bw.yaml", (48, 48))):
        spec = generate_dataset(load_spec(CONFIGS / name, data_root=tmp_path), *size)
        assert [len(open_city(spec, c.name)) for c in spec.cities] == [1, 1]
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.mat")) == [
        "data1/augsburg_multimodal.mat", "data1/berlin_multimodal.mat", "data2/beijing.mat",
        "data2/beijing_label.mat", "data2/wuhan.mat", "data2/wuhan_label.mat"]


AUGSBURG_HINT = "data1/augsburg_multimodal.mat: set cities.augsburg.files.scene: data1/augsburg_multimodal.mat"


@pytest.mark.parametrize("named, copy, hint", [
    ("augsburg.mat", None, AUGSBURG_HINT),  # the release's name extends the one given
    ("data1/augsburg_multimodal_v2.mat", None, AUGSBURG_HINT),  # the name given extends the release's
    ("Augsbrug_multimodal.MAT", None, AUGSBURG_HINT),  # a close spelling, case aside
    ("augsburg_multimodal.mat", None, AUGSBURG_HINT),  # the same name in a sub-folder
    ("augsburg.mat", "old/augsburg-2023.mat", "data1/augsburg_multimodal.mat, old/augsburg-2023.mat: set "
                                              "cities.augsburg.files.scene to the right one"),
    ("augsburg.tif", None, None),  # another suffix is no hint
    ("multimodal.mat", None, None),  # nor is a shared word
])
def test_a_missing_file_names_the_similar_files_under_the_data_root(tmp_path, named, copy, hint):
    generate_dataset(load_spec(CONFIGS / "c2seg_ab.yaml", data_root=tmp_path), 16, 16)  # data1/<city>_multimodal.mat
    if copy:
        (tmp_path / copy).parent.mkdir()
        shutil.copy(tmp_path / "data1/augsburg_multimodal.mat", tmp_path / copy)
    spec_file = tmp_path / "renamed.yaml"
    spec_file.write_text(f"extends: {CONFIGS / 'c2seg_ab.yaml'}\ncities:\n"
                         f"  - {{name: augsburg, role: source, format: mat_v5, files: {{scene: {named}}}}}\n"
                         "  - {name: berlin, role: target, format: mat_v5, files: {scene: berlin.mat}}\n")
    with pytest.raises(SceneError) as err:
        open_city(load_spec(spec_file, data_root=tmp_path), "augsburg")
    missing = f"{tmp_path / named}: file not found"
    assert str(err.value) == (f"{missing}; the data root {tmp_path} holds {hint} in {spec_file}" if hint else missing)
    with pytest.raises(SceneError) as err:
        open_city(load_spec(spec_file, data_root=tmp_path / "absent"), "augsburg")
    assert str(err.value) == (f"{tmp_path / 'absent' / named}: file not found, and the data root {tmp_path / 'absent'} "
                              f"does not exist (set data_root in {spec_file} or pass --data-root)")


def test_tile_folders_must_match(tmp_path):
    spec = generate_dataset(load_spec(CONFIGS / "demo_tiny.yaml", data_root=tmp_path), 64, 64, fmt="tiles")
    root = spec.resolve(spec.cities[0], "root")
    (root / "sar" / "3.tiff").unlink()
    with pytest.raises(SceneError, match=r"sar: tiles \['3'\] are missing"):
        open_city(spec, "synth_source")


# ---- sensor metadata and excluded bands ---------------------------------------------------------
def test_band_centres_widths_and_bad_bands_are_read_from_the_envi_metadata(tmp_path):
    """Per-band items in micrometres or nanometres (keys in any case), a centre given by the band description
    alone, bbl flags; the centres stay in file order (an EnMAP-like SWIR restarting below the VNIR's last centre)."""
    tags = [{"wavelength": "0.99334", "fwhm": "0.0081", "wavelength_units": "Micrometers", "bbl": "1"},
            {"WAVELENGTH": "901.96", "FWHM": "12.3", "bbl": "1"},
            {"fwhm": "10", "bbl": "0"},
            {"wavelength": "2445.3", "fwhm": "9.5"}]
    write_geotiff(tmp_path / "hsi.tif", np.ones((4, 6, 6), np.int16), nodata=-32768, band_tags=tags,
                  descriptions=["", "", "band 3 (1000.5 Nanometers)", ""])
    scene = open_city(geotiff_spec(tmp_path, {"name": "hsi", "bands": 4, "resolution_m": 30}), "scene")[0]
    assert scene.band_meta == {"hsi": BandMeta("int16", -32768.0, (993.34, 901.96, 1000.5, 2445.3),
                                               (8.1, 12.3, 10.0, 9.5), (2,))}


def test_band_metadata_in_unknown_units_fails_naming_file_band_and_units(tmp_path):
    path = write_geotiff(tmp_path / "hsi.tif", np.ones((2, 6, 6), np.int16),
                         band_tags=[{"wavelength": "500"}, {"wavelength": "5", "wavelength_units": "furlongs"}])
    with pytest.raises(SceneError) as err:
        open_city(geotiff_spec(tmp_path, {"name": "hsi", "bands": 2, "resolution_m": 30}), "scene")
    assert str(err.value) == f"{path}: band 2 wavelength_units 'furlongs' is not one of Nanometers, Micrometers"


@pytest.mark.parametrize("fmt", ["geotiff", "mat_v5", "mat_v73", "tiles"])
def test_excluded_bands_are_left_out_by_every_reader(tmp_path, fmt):
    """exclude_bands by number (2: B3) and by name (B8) leave B2 and B4 of the tiny MSI, in every format."""
    spec = generate_dataset(load_spec(CONFIGS / "demo_tiny.yaml", data_root=tmp_path), 40, 40, fmt=fmt)
    msi = replace(spec.modality("msi"), exclude_bands=(2, "B8"))
    assert msi.kept_bands == (0, 2) and msi.channels == 2 and msi.kept_wavelengths_nm == (490, 665)
    excluded = replace(spec, modalities=tuple(msi if m.name == "msi" else m for m in spec.modalities))
    window = Window(3, 5, 20, 17)
    for full, kept in zip(open_city(spec, "synth_source"), open_city(excluded, "synth_source"), strict=True):
        np.testing.assert_array_equal(kept.read("msi", window), full.read("msi", window)[[0, 2]])
        np.testing.assert_array_equal(kept.read("hsi"), full.read("hsi"))


def test_an_excluded_band_of_nan_makes_no_pixel_nodata(tmp_path):
    data = np.random.default_rng(0).uniform(100, 200, (3, 6, 6)).astype(np.float32)
    data[1] = np.nan
    write_geotiff(tmp_path / "hsi.tif", data)
    scene = open_city(geotiff_spec(tmp_path, {"name": "hsi", "bands": 3, "resolution_m": 30, "exclude_bands": [2]}),
                      "scene")[0]
    np.testing.assert_array_equal(scene.read("hsi"), data[[0, 2]])
    assert scene.nonfinite_counts["hsi"] == 0
