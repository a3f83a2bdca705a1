"""``c2seg data generate`` and ``c2seg data inspect`` through the command line."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from c2seg.cli import main
from c2seg.spec import load_spec
from tests.fixtures_data import CONFIGS, TINY_SIZE


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
