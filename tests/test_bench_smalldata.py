"""benchmarks/bench_smalldata.py: its stand-ins (of both generators) are read by the shipped example specs as they
ship (file lists, split csv files, band tags checked against the spec, label codes), and the classical arms see
the labelled pixels; benchmarks/synth_fields.py, the second generator."""

from __future__ import annotations

from argparse import Namespace

import numpy as np
import pytest

from benchmarks.bench_smalldata import (LAYOUTS, ROOT, SPATIAL_MEANS, _band_columns, _mixed, _sparse, generate,
                                       labelled_pixels)
from c2seg.data_prep.readers import open_city
from c2seg.raster import Window
from c2seg.spec import load_spec


@pytest.mark.parametrize("generator", ["citysynth", "fields"])
@pytest.mark.parametrize("name", ["enmap", "floods"])
def test_stand_in_is_read_by_the_example_spec(tmp_path, name, generator):
    layout = LAYOUTS[name]
    generate(name, tmp_path, Namespace(grid=2, chip=16, data_seed=0, squares=2, square_px=3, mixing=0.0,
                                       generator=generator))
    spec = load_spec(ROOT / layout.spec, data_root=tmp_path)
    train = open_city(spec, layout.train_city, "train")
    test = open_city(spec, layout.test_city, "test")
    assert len(train) == 2 and len(test) == 1  # 4 chips: 60 / 15 / 25 %
    identity = type("Identity", (), {"__call__": lambda self, m, v: v})()
    x, y = labelled_pixels(spec, identity, layout.train_city, "train")
    assert x.shape == (len(y), sum(m.channels for m in spec.modalities))
    with_means, _ = labelled_pixels(spec, identity, layout.train_city, "train", SPATIAL_MEANS)
    assert with_means.shape == (len(y), 3 * x.shape[1])
    assert np.array_equal(with_means[:, _band_columns(spec, SPATIAL_MEANS)], x)  # the bands, found among them
    assert set(np.unique(y)) <= set(spec.scored_class_ids)
    # enmap: sparse labels, two 3 x 3 squares on each of the 2 train chips (here not overlapping); floods: every
    # pixel of the 2 train chips of 16 x 16 px
    if generator == "citysynth":  # (FieldSynth leaves some fields unlabelled)
        assert len(y) == {"enmap": 2 * 2 * 9, "floods": 2 * 16 * 16}[name]


def test_sparse_keeps_only_the_squares():
    label = np.full((16, 16), 3, np.uint8)
    out = _sparse(label, 0, 3, 2, np.random.default_rng(0))
    # seed 0 draws the squares' top-left corners (12, 4), (9, 4), (7, 0): three 2 x 2 squares kept, the rest ignored
    corners = [(12, 4), (9, 4), (7, 0)]
    expected = {(r + i, c + j) for r, c in corners for i in range(2) for j in range(2)}
    assert {tuple(p) for p in np.argwhere(out == 3).tolist()} == expected
    assert set(np.unique(out)) == {0, 3}


def test_mixed_pixels_blend_every_modality_with_one_partner_pixel():
    label = np.arange(4, dtype=np.uint8).reshape(2, 2)
    data = {"label": label.copy(), "hsi": np.stack([np.arange(4.0).reshape(2, 2), 10 + np.arange(4.0).reshape(2, 2)]),
            "sar": np.full((1, 2, 2), -12.0)}
    original = {k: v.copy() for k, v in data.items()}
    _mixed(data, ["hsi", "sar"], 0.6, np.random.default_rng(0))
    rng = np.random.default_rng(0)  # the draws _mixed makes: a weight per pixel, then a partner per pixel
    weight, partner = rng.uniform(0, 0.6, (2, 2)).ravel(), rng.integers(0, 4, 4)
    flat = original["hsi"].reshape(2, -1)
    np.testing.assert_allclose(data["hsi"].reshape(2, -1), (1 - weight) * flat + weight * flat[:, partner], rtol=1e-6)
    np.testing.assert_allclose(data["sar"], original["sar"], rtol=1e-6)  # a constant band stays constant
    assert np.array_equal(data["label"], label)  # the label stays the pixel's own


def _field_synth(cloud_share: float = 0.0):
    from benchmarks.synth_fields import FieldSynth

    spec = load_spec(ROOT / LAYOUTS["floods"].spec, data_root=ROOT)
    return spec, FieldSynth(spec, 48, seed=3, field_px=60.0, unlabelled_share=0.2, cloud_share=cloud_share)


def test_field_synth_is_deterministic_and_labels_whole_fields():
    spec, synth = _field_synth()
    _, again = _field_synth()
    data = synth.render()
    assert all(np.array_equal(data[k], again.render()[k]) for k in data)
    assert data["s1"].shape == (2, 48, 48) and data["s2"].shape == (13, 48, 48) and data["label"].shape == (48, 48)
    for field in np.unique(synth.field):  # a field is one class, or unlabelled as a whole
        assert len(np.unique(data["label"][synth.field == field])) == 1
    assert set(np.unique(data["label"])) == {0, 1, 2}
    assert data["s2"].min() >= 0 and data["s2"].max() <= 1e4  # reflectance x 1e4
    window = synth.render(Window(8, 16, 10, 12))
    assert np.array_equal(window["s2"], data["s2"][:, 8:18, 16:28])


def test_field_synth_clouds_brighten_the_optical_bands_and_keep_the_labels():
    _, clear = _field_synth()
    _, cloudy = _field_synth(cloud_share=0.25)
    cloud = cloudy.cloud
    assert cloud.sum() == round(0.25 * 48 * 48)
    # under a cloud every band is bright (0.45 reflectance, a draw per band and per pixel around it), whatever the
    # ground: seed 3's mean
    assert round(float(cloudy.render()["s2"][:, cloud].mean())) == 4630
    assert np.array_equal(clear.render()["label"], cloudy.render()["label"])  # same ground, same labels
