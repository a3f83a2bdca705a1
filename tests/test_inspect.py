"""``c2seg data generate`` and ``c2seg data inspect`` through the command line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from affine import Affine
from PIL import Image

from c2seg.cli import main
from c2seg.spec import load_spec
from c2seg.data_prep.prep import run_prep
from c2seg.data_prep.prep_config import PrepConfig
from c2seg.data_prep.readers import SceneError
from tests.fixtures_data import CONFIGS, TINY_SIZE, geotiff_spec, write_geotiff


def test_inspect_tiny_cities(tiny_spec, tmp_path, capsys):
    spec_file = CONFIGS / "demo_tiny.yaml"
    assert main(["data", "inspect", "--spec", str(spec_file), "--data-root", tiny_spec.data_root,
                 "--out", str(tmp_path), "--block", "40"]) == 0
    table = capsys.readouterr().out
    assert "synth_source    source  geotiff        1  96 x 128" in table
    assert "hsi x 32, msi x 4, sar x 2" in table and "non-finite 0" in table
    summary = {s["city"]: s for s in json.loads((tmp_path / "summary.json").read_text())}
    assert set(summary) == {"synth_source", "synth_target"}
    pixels = summary["synth_target"]["class_pixels"]
    assert sum(pixels.values()) == TINY_SIZE[0] * TINY_SIZE[1] and len(pixels) > 4
    for city in summary:
        image = np.asarray(Image.open(tmp_path / f"{city}.png"))
        assert image.shape[0] > 200 and image.shape[1] > 400 and image[..., :3].std() > 20


def test_generate_other_format_then_inspect(tmp_path, capsys):
    root = tmp_path / "tiles"
    assert main(["data", "generate", "--spec", str(CONFIGS / "demo_tiny.yaml"), "--data-root", str(root),
                 "--size", "64x48", "--seed", "1", "--format", "tiles"]) == 0
    spec = load_spec(root / "spec.yaml")
    assert {c.format for c in spec.cities} == {"tiles"}
    assert main(["data", "inspect", "--spec", str(root / "spec.yaml"), "--city", "synth_target",
                 "--out", str(tmp_path / "look")]) == 0
    out = capsys.readouterr().out
    assert "synth_target    target  tiles          4  32 x 32" in out
    assert (tmp_path / "look" / "synth_target.png").is_file()


def test_inspect_reports_bad_city(tiny_spec, tmp_path, capsys):
    import shutil

    shutil.copytree(tiny_spec.data_root, tmp_path / "data")
    (tmp_path / "data" / "synth_target" / "sar.tif").write_bytes(b"\x00" * 100)
    code = main(["data", "inspect", "--spec", str(CONFIGS / "demo_tiny.yaml"), "--data-root", str(tmp_path / "data")])
    assert code == 2
    assert "synth_target/sar.tif: cannot be read as a raster" in capsys.readouterr().err


# ---- what the files say of their sensor and grid --------------------------------------------------
# an EnMAP-like stack: centres in um and nm (SWIR restarting below the VNIR's last centre), band 3 flagged bad by
# bbl, band 4 nodata everywhere (a water-vapour band)
HSI_TAGS = [{"wavelength": "0.99334", "fwhm": "0.0081", "wavelength_units": "Micrometers", "bbl": "1"},
            {"wavelength": "901.96", "fwhm": "12.3", "bbl": "1"},
            {"wavelength": "1000.5", "fwhm": "10", "bbl": "0"},
            {"wavelength": "1400", "fwhm": "10", "bbl": "1"},
            {"wavelength": "2445.3", "fwhm": "9.5", "bbl": "1"}]


def _hsi_city(root, crs="EPSG:32633", transform=None):
    data = np.arange(5 * 8 * 8, dtype=np.int16).reshape(5, 8, 8)
    data[3] = -32768
    return write_geotiff(root / "hsi.tif", data, nodata=-32768, band_tags=HSI_TAGS, crs=crs, transform=transform)


def _spec_file(root, modality: dict, grid_resolution_m: float = 30):
    spec = geotiff_spec(root, modality, grid_resolution_m)
    path = root / "spec.yaml"
    path.write_text(yaml.safe_dump({**spec.to_dict(), "data_root": str(root)}))
    return path


def test_inspect_prints_the_modalities_block_from_the_files(tmp_path, capsys):
    """The block holds the files' dtype, nodata, centres (in file order), widths and the bands to exclude (flagged
    bad, nodata everywhere); pasted into the spec, the city inspects cleanly with 3 bands (before, the nodata
    value the spec did not declare was a value outside the unit's bounds)."""
    _hsi_city(tmp_path)
    spec_file = _spec_file(tmp_path, {"name": "hsi", "bands": 5, "resolution_m": 30, "unit": "reflectance x 1e4"})
    assert main(["data", "inspect", "--spec", str(spec_file)]) == 1
    out = capsys.readouterr().out
    assert "modality 'hsi' holds 64 value(s) outside [-10000, 100000]" in out
    assert "    hsi    one value everywhere (nodata or constant): bands [4]\n" in out
    assert "    hsi    flagged bad (bbl = 0): bands [3]\n" in out
    block = yaml.safe_load(out.split(f"(paste into {spec_file}):\n")[1].split("PROBLEM")[0])
    assert block == {"modalities": [{
        "name": "hsi", "bands": 5, "resolution_m": 30.0, "dtype": "int16", "unit": "reflectance x 1e4",
        "nodata": -32768.0, "wavelengths_nm": [993.34, 901.96, 1000.5, 1400.0, 2445.3],
        "bandwidths_nm": [8.1, 12.3, 10.0, 10.0, 9.5], "exclude_bands": [3, 4]}]}
    spec_file.write_text(yaml.safe_dump({**yaml.safe_load(spec_file.read_text()), **block}))
    assert main(["data", "inspect", "--spec", str(spec_file)]) == 0
    out = capsys.readouterr().out
    assert "hsi x 3" in out and "PROBLEM" not in out and "one value everywhere" not in out


def test_band_centres_unlike_the_spec_are_an_inspect_problem_and_fail_prep(tmp_path, capsys):
    path = _hsi_city(tmp_path)
    spec_file = _spec_file(tmp_path, {"name": "hsi", "bands": 5, "resolution_m": 30,
                                      "wavelengths_nm": [993, 902, 1000, 1410, 2445]})
    expected = (f"{path}: modality 'hsi', band 4: the file's centre 1400 nm differs from the spec's wavelengths_nm "
                "1410 nm by more than 5 nm (`c2seg data inspect` prints the files' wavelengths)")
    assert main(["data", "inspect", "--spec", str(spec_file)]) == 1
    assert f"PROBLEM: {expected}\n" in capsys.readouterr().out
    with pytest.raises(SceneError) as err:
        run_prep(load_spec(spec_file), PrepConfig(), tmp_path / "prep")
    assert str(err.value) == expected


@pytest.mark.parametrize("crs, transform, problem", [
    ("EPSG:32633", Affine(30, 0, 5e5, 0, -30, 53e5), None),
    ("EPSG:32633", Affine(20, 0, 5e5, 0, -20, 53e5),
     "pixel size 20 x 20 m (EPSG:32633) differs from the grid_resolution_m 30 of {spec} by more than 1%"),
    ("EPSG:2263", Affine(98.4, 0, 1e6, 0, -98.4, 2e5), None),  # New York, US survey feet: 29.99 m
    ("EPSG:4326", Affine(2.7e-4, 0, 11, 0, -2.7e-4, 0.5), None),  # 30.02 x 30.02 m at the equator
    ("EPSG:4326", Affine(2.7e-4, 0, 11, 0, -2.7e-4, 48.2),
     "the grid is in degrees (EPSG:4326): pixels of 0.00027 x 0.00027 deg span 20.01 x 30.02 m at latitude 48.20, "
     "which differs from the grid_resolution_m 30 of {spec} by more than 10% (reproject the files to a projected "
     "CRS such as UTM, or set grid_resolution_m)"),
], ids=["utm", "utm-20m", "feet", "degrees-equator", "degrees-48N"])
def test_pixel_size_is_checked_against_grid_resolution(tmp_path, capsys, crs, transform, problem):
    path = _hsi_city(tmp_path, crs, transform)
    spec_file = _spec_file(tmp_path, {"name": "hsi", "bands": 5, "resolution_m": 30})
    code = main(["data", "inspect", "--spec", str(spec_file)])
    out = capsys.readouterr().out
    if problem is None:
        assert code == 0 and "PROBLEM" not in out
        return
    expected = f"{path}: {problem.format(spec=spec_file)}"
    assert code == 1 and f"PROBLEM: {expected}\n" in out
    with pytest.raises(SceneError) as err:
        run_prep(load_spec(spec_file), PrepConfig(), tmp_path / "prep")
    assert str(err.value) == expected
