"""Inference seams on generated GeoTIFF cities: blended sliding windows equal whole-scene application
of a per-pixel model, nodata and missing modalities, TTA, the COG writer and validator."""

from __future__ import annotations

import copy
import shutil

import numpy as np
import pytest
import rasterio
import torch
import zarr
from affine import Affine
from rasterio.windows import Window as RioWindow

from c2seg.data_prep.manifest import Normalizer
from c2seg.errors import C2SegError
from c2seg.data_prep.readers import open_city
from c2seg.inference.cog import validate_cog, write_class_cog
from c2seg.inference.config import InferConfig
from c2seg.inference.predictor import Predictor
from c2seg.inference.runner import infer_scene, select_modalities
from c2seg.inference.windows import axis_starts, blend_weights, block_grid, window_grid


class PixelLinear(torch.nn.Module):
    """A known function: logits = sum over the given modalities of a per-pixel linear map (1x1 conv)."""

    def __init__(self, spec) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = torch.nn.ParameterDict({m.name: torch.nn.Parameter(torch.randn(spec.num_logits, m.bands, generator=g))
                                         for m in spec.modalities})

    def forward(self, inputs):
        return sum(torch.nn.functional.conv2d(x, self.w[m][:, :, None, None]) for m, x in inputs.items())


@pytest.fixture(scope="module")
def setup(tiny_spec):
    stats = {m.name: {"mean": [100.0 * (i % 3) for i in range(m.bands)], "std": [1000.0] * m.bands}
             for m in tiny_spec.modalities}
    return tiny_spec, Normalizer(tiny_spec, stats), PixelLinear(tiny_spec)


def whole_scene_probs(spec, scene, norm, model, modalities):
    x = {m: torch.from_numpy(norm(m, scene.read(m))[None]) for m in modalities}
    with torch.no_grad():
        return torch.softmax(model(x)[:, list(spec.scored_class_ids)], 1)[0].numpy()


def run(spec, scene, norm, model, out, modalities=None, tta="none", **cfg):
    modalities = modalities or list(spec.modality_names)
    ids = spec.scored_class_ids
    config = InferConfig(save_probs=True, quicklook=False, cog_blocksize=128, **cfg)
    return infer_scene(scene, Predictor(model, ids, "cpu", tta), norm, modalities, ids, config, out, spec)


def test_window_grid_covers_scene_and_shifts_last_window_inward():
    assert axis_starts(100, 40, 30) == [0, 30, 60]
    assert axis_starts(96, 32, 16)[-1] == 64
    assert axis_starts(20, 32, 16) == [0]
    wins = window_grid(50, 70, 32, 0.5)
    cover = np.zeros((50, 70), int)
    for w in wins:
        assert w.row + w.height <= 50 and w.col + w.width <= 70 and (w.height, w.width) == (32, 32)
        cover[w.slices] += 1
    assert cover.min() >= 1
    assert sum(b.height * b.width for b in block_grid(50, 70, 16)) == 50 * 70


@pytest.mark.parametrize("mode", ["gaussian", "cosine"])
def test_blend_weights_peak_in_centre_clamped_at_edges(mode):
    w = blend_weights(64, mode)
    assert w.shape == (64, 64) and w.dtype == np.float32
    assert w.max() == pytest.approx(1.0, abs=1e-3) and w.min() >= 1e-3
    assert w[0, 0] < w[16, 16] < w[31, 31]
    np.testing.assert_allclose(w, w.T)
    np.testing.assert_allclose(w, w[::-1, ::-1])


@pytest.mark.parametrize("window, overlap, blend, tta, block", [
    (40, 0.0, "gaussian", "none", 32),     # 96 x 128 px not divisible by 40: last windows shifted inward
    (40, 0.25, "cosine", "none", 32),
    (56, 0.5, "gaussian", "flips", 48),
    (48, 0.6, "cosine", "d4", 64),
    (160, 0.5, "gaussian", "none", 32),    # window larger than the scene: reflect padding
])
def test_blended_mosaic_equals_whole_scene(setup, tmp_path, window, overlap, blend, tta, block):
    spec, norm, model = setup
    scene = open_city(spec, "synth_target")[0]
    out = run(spec, scene, norm, model, tmp_path, tta=tta, window=window, overlap=overlap, blend=blend, block=block)
    expected = whole_scene_probs(spec, scene, norm, model, spec.modality_names)
    probs = zarr.open_group(out.store, mode="r")["probs"][:]
    np.testing.assert_allclose(probs, expected, atol=2e-5)
    with rasterio.open(out.class_map) as ds:
        classes = ds.read(1)
        with rasterio.open(spec.resolve(spec.city("synth_target"), "msi")) as src:
            assert ds.crs == src.crs and ds.transform == src.transform and (ds.height, ds.width) == src.shape
    decided = np.sort(expected, axis=0)
    clear = decided[-1] - decided[-2] > 1e-4  # argmax ties are up to float rounding
    assert np.array_equal(classes[clear], np.asarray(spec.scored_class_ids)[expected.argmax(0)][clear])
    with rasterio.open(out.probabilities) as ds:
        assert ds.count == len(spec.scored_class_ids)
        np.testing.assert_allclose(ds.read(), expected, atol=2e-5)


def test_nodata_stays_zero_and_missing_modality_uses_the_others(setup, tmp_path, caplog):
    spec, norm, model = setup
    root = tmp_path / "data"
    shutil.copytree(spec.data_root, root)
    spec = spec.with_data_root(root)
    city = spec.city("synth_target")
    for m in spec.modality_names:  # every modality nodata (fill 0) in rows 10:30, cols 20:60
        with rasterio.open(spec.resolve(city, m), "r+") as ds:
            ds.write(np.zeros((ds.count, 20, 40), ds.dtypes[0]), window=RioWindow(20, 10, 40, 20))
    scene = open_city(spec, "synth_target")[0]
    with caplog.at_level("WARNING"):
        used = select_modalities(list(spec.modality_names), scene, ["msi", "sar"])
    assert used == ["msi", "sar"] and "without modality ['hsi']" in caplog.text
    out = run(spec, scene, norm, model, tmp_path / "out", modalities=used, window=32, overlap=0.5, block=48)
    with rasterio.open(out.class_map) as ds:
        classes = ds.read(1)
    assert (classes[10:30, 20:60] == 0).all()
    assert (classes[:10] > 0).all() and (classes[30:] > 0).all()
    expected = whole_scene_probs(spec, scene, norm, model, used)
    probs = zarr.open_group(out.store, mode="r")["probs"][:]
    np.testing.assert_allclose(probs, expected, atol=2e-5)


def test_class_cog_is_valid_with_overviews_colours_and_names(tiny_spec, tmp_path):
    rng = np.random.default_rng(0)
    cmap = rng.integers(0, 14, (300, 420)).astype(np.uint8)
    blocks = block_grid(300, 420, 128)
    path = write_class_cog(tmp_path / "c.tif", 300, 420, "EPSG:32632", Affine(10, 0, 5e5, 0, -10, 5.4e6), blocks,
                           lambda b: cmap[b.slices], tiny_spec, blocksize=128)
    errors, warnings = validate_cog(path)
    assert errors == [] and warnings == []
    with rasterio.open(path) as ds:
        assert ds.profile["tiled"] and ds.block_shapes[0] == (128, 128) and ds.nodata == 0
        assert ds.overviews(1) == [2, 4]
        assert np.array_equal(ds.read(1), cmap)
        assert ds.colormap(1)[1][:3] == tiny_spec.classes[1].rgb
        assert ds.tags()["CLASS_3"] == tiny_spec.class_name(3)
        assert ds.crs.to_epsg() == 32632
    # a plain striped GeoTIFF fails the checks
    plain = tmp_path / "plain.tif"
    with rasterio.open(plain, "w", driver="GTiff", height=300, width=420, count=1, dtype="uint8", crs="EPSG:32632",
                       transform=Affine(10, 0, 5e5, 0, -10, 5.4e6)) as ds:
        ds.write(cmap[None])
    errors, warnings = validate_cog(plain)
    assert "the main image is not tiled" in errors and warnings


def test_nodata_is_the_ignore_id_where_class_0_is_a_real_class(setup, tmp_path):
    """With ignore_id 255, class 0 is predicted like any class, and nodata pixels (every modality at its fill) are
    written as 255, which the class-map COG and the submission tile declare as their nodata value."""
    from dataclasses import replace
    from types import SimpleNamespace

    from c2seg.inference.mosaic import write_submission_tile

    spec, norm, model = setup
    root = tmp_path / "data"
    shutil.copytree(spec.data_root, root)
    spec = replace(spec.with_data_root(root), ignore_id=255)
    assert 0 in spec.scored_class_ids
    city = spec.city("synth_target")
    for m in spec.modality_names:  # every modality nodata (fill 0) in rows 10:30, cols 20:60
        with rasterio.open(spec.resolve(city, m), "r+") as ds:
            ds.write(np.zeros((ds.count, 20, 40), ds.dtypes[0]), window=RioWindow(20, 10, 40, 20))
    scene = open_city(spec, "synth_target")[0]
    model = copy.deepcopy(model)
    with torch.no_grad():  # class 0 takes over where the most frequent class wins with a positive logit
        winners = whole_scene_probs(spec, scene, norm, model, spec.modality_names).argmax(0)
        common = np.bincount(winners.ravel()).argmax()
        for w in model.w.values():
            w[0] = 1.05 * w[spec.scored_class_ids[common]]
    out = run(spec, scene, norm, model, tmp_path / "out", window=32, overlap=0.5, block=48)
    with rasterio.open(out.class_map) as ds:
        classes, nodata = ds.read(1), ds.nodata
    assert nodata == 255 and (classes[10:30, 20:60] == 255).all()
    valid = np.ones(classes.shape, bool)
    valid[10:30, 20:60] = False
    expected = whole_scene_probs(spec, scene, norm, model, spec.modality_names)
    decided = np.sort(expected, axis=0)
    clear = valid & (decided[-1] - decided[-2] > 1e-4)
    predicted = np.asarray(spec.scored_class_ids)[expected.argmax(0)]
    assert np.array_equal(classes[clear], predicted[clear]) and (classes[valid] != 255).all()
    assert (predicted[valid] == 0).any() and (classes[clear] == 0).any()  # a real class 0 is kept, not nodata
    tile = write_submission_tile(SimpleNamespace(classes=classes), scene, spec, tmp_path / "submission")
    with rasterio.open(tile) as ds:
        assert ds.nodata == 255 and np.array_equal(ds.read(1), classes)


def test_window_defaults_to_the_training_tile_and_another_one_warns(caplog):
    """A c2seg model's predictions depend on the window (its GroupNorm statistics and attention span it), so
    inference uses the model's tile size unless told otherwise, and says so."""
    assert InferConfig().window is None
    assert InferConfig().for_model(64).window == 64
    assert InferConfig().for_model(64).store_key()["window"] == 64
    with caplog.at_level("WARNING", logger="c2seg.infer"):
        assert InferConfig(window=64).for_model(64).window == 64
        assert not caplog.records
        assert InferConfig(window=128).for_model(64).window == 128
    assert [r.getMessage() for r in caplog.records] == [
        "window 128 px, but the model was trained on 64 px tiles: its predictions depend on the window "
        "(leave --window out to use the tile size)"]


def test_a_window_must_be_resolved_before_a_scene_is_predicted(setup, tmp_path):
    spec, norm, model = setup
    with pytest.raises(C2SegError, match="needs a window size"):
        run(spec, open_city(spec, "synth_target")[0], norm, model, tmp_path)


def test_absent_classes_get_probability_zero_and_the_others_share_it(setup):
    spec, _, model = setup
    ids = spec.scored_class_ids
    gen = torch.Generator().manual_seed(0)
    x = {m.name: torch.randn(2, m.bands, 16, 16, generator=gen).numpy() for m in spec.modalities}
    every = Predictor(model, ids, "cpu")(x)
    absent = (ids[0], ids[2])
    probs = Predictor(model, ids, "cpu", absent=absent)(x)
    assert (every[:, [0, 2]] > 0).all() and (probs[:, [0, 2]] == 0).all()
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
    kept = [i for i in range(len(ids)) if ids[i] not in absent]  # the kept classes keep their odds
    np.testing.assert_allclose(probs[:, kept], every[:, kept] / every[:, kept].sum(1, keepdims=True), rtol=1e-5)
