"""Generated cities: deterministic, seamless by windows, physically plausible, and shifted between cities
enough that a classifier fitted on the source city loses accuracy on the target."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from c2seg.spec import load_spec
from c2seg.data_prep.readers import Window, open_city
from c2seg.data_prep.synth import CitySynth, city_outputs, generate_dataset
from c2seg.data_prep.synth.spectra import band_matrix
from tests.fixtures_data import CONFIGS

H, W = 192, 384  # crosses the 256 px block grid


@pytest.fixture(scope="module")
def spec():
    return load_spec(CONFIGS / "demo_tiny.yaml")


@pytest.fixture(scope="module")
def cities(spec):
    return {c.role: CitySynth(spec, c, H, W, seed=0).render() for c in spec.cities}


def test_deterministic_by_seed_and_seamless(spec):
    city = spec.cities[0]
    a, b = CitySynth(spec, city, 300, 300, seed=1), CitySynth(spec, city, 300, 300, seed=1)
    full = a.render()
    win = Window(200, 240, 90, 50)  # spans four generation blocks
    part = b.render(win)
    for key in ("label", *spec.modality_names):
        np.testing.assert_array_equal(part[key], full[key][..., 200:290, 240:290])
    other = CitySynth(spec, city, 300, 300, seed=2).render(win)
    assert not np.array_equal(other["msi"], part["msi"])
    # the layout does not depend on the city size: a bigger city starts with the same land cover
    big = CitySynth(spec, city, 400, 420, seed=1).land_cover(Window(0, 0, 300, 300))[1]
    np.testing.assert_array_equal(big, full["label"])


def test_land_cover_is_coherent(spec, cities):
    label = cities["source"]["label"]
    present = set(np.unique(label).tolist())
    assert len(present - {0}) >= 8
    # parcels, not noise: most pixels share their class with their right-hand neighbour
    assert (label[:, 1:] == label[:, :-1]).mean() > 0.85
    # roads are thin lines: a few percent of the city, rarely more than 2 px across
    roads = label == 2
    assert 0.01 < roads.mean() < 0.15
    interior = np.ones_like(roads[1:-1, 1:-1])
    for dr in range(3):
        for dc in range(3):
            interior &= roads[dr:dr + H - 2, dc:dc + W - 2]
    assert interior.sum() < 0.1 * roads.sum()


def test_spectra_look_physical(spec, cities):
    data = cities["source"]
    hsi, msi, sar, label = data["hsi"], data["msi"], data["sar"], data["label"]
    lam = np.asarray(spec.modality("hsi").wavelengths_nm)
    red, nir = (np.abs(lam - 665).argmin(), np.abs(lam - 842).argmin())
    veg, water, urban = label == 9, label == 1, np.isin(label, (3, 4))
    assert veg.any() and water.any() and urban.any()
    # vegetation: red edge (NIR >> red); water: dark in the NIR
    assert hsi[nir][veg].mean() > 2.5 * hsi[red][veg].mean()
    assert hsi[nir][water].mean() < hsi[red][water].mean() < 800
    # smooth curves: at AB's 242 bands every material's spectrum has small second differences
    ab_hsi = load_spec(CONFIGS / "c2seg_ab.yaml").modality("hsi")
    curves = band_matrix(ab_hsi.wavelengths_nm, ab_hsi.bandwidths_nm)
    assert (np.abs(np.diff(curves, 2, axis=1)).mean(1) < 0.01 * curves.mean(1)).all()
    # MSI integrated from the same spectra: its NIR band follows the HSI band at 842 nm
    assert np.corrcoef(msi[3].ravel(), hsi[nir].ravel())[0, 1] > 0.95
    # SAR in dB: bright cities, dark water, cross-pol below co-pol, speckle
    assert sar[1][urban].mean() - sar[1][water].mean() > 8
    assert sar[0].mean() < sar[1].mean() - 4
    assert 2 < sar[1][water].std() < 8


def _nearest_centroid_accuracy(spec, cities) -> tuple[float, float]:
    """Per-class-balanced accuracy of a nearest-centroid classifier fitted on the source's left half,
    on the source's right half and on the target (features normalised with pooled statistics)."""
    feats = {r: np.concatenate([d[m] for m in spec.modality_names]).reshape(-1, H * W).T for r, d in cities.items()}
    pooled = np.concatenate(list(feats.values()))
    z = {r: (x - pooled.mean(0)) / pooled.std(0) for r, x in feats.items()}
    y = {r: d["label"].ravel() for r, d in cities.items()}
    left = np.arange(H * W) % W < W // 2
    classes = [c for c in range(1, 14) if (left & (y["source"] == c)).sum() > 50]
    centroids = np.stack([z["source"][left & (y["source"] == c)].mean(0) for c in classes])

    def balanced(zz, yy, mask):
        pred = np.array(classes)[((zz[mask][:, None] - centroids[None]) ** 2).sum(-1).argmin(1)]
        truth = yy[mask]
        return float(np.mean([(pred[truth == c] == c).mean() for c in classes if (truth == c).any()]))

    return balanced(z["source"], y["source"], ~left & (y["source"] > 0)), balanced(z["target"], y["target"],
                                                                                   y["target"] > 0)


def test_domain_shift_costs_accuracy(spec, cities):
    source_acc, target_acc = _nearest_centroid_accuracy(spec, cities)
    assert source_acc > 0.8
    assert target_acc < source_acc - 0.3, (source_acc, target_acc)
    # the documented components: darker, hazier optical data, a SAR calibration offset, other proportions
    src, tgt = cities["source"], cities["target"]
    assert not np.allclose(np.bincount(src["label"].ravel(), minlength=14) / src["label"].size,
                           np.bincount(tgt["label"].ravel(), minlength=14) / tgt["label"].size, atol=0.03)
    water_s, water_t = src["sar"][1][src["label"] == 1], tgt["sar"][1][tgt["label"] == 1]
    assert abs(water_s.mean() - water_t.mean()) > 1.5


@pytest.mark.parametrize("name", ["example_floods.yaml", "example_enmap.yaml"])
def test_new_dataset_specs_generate_and_read(tmp_path, name):
    spec = load_spec(CONFIGS / name, data_root=tmp_path)
    with pytest.raises(ValueError, match="are file lists .format: filelist., which are not generated"):
        generate_dataset(spec, H, W, seed=0)
    spec = generate_dataset(spec, H, W, seed=0, fmt="tiles")  # their file lists' stand-in: tile folders
    for city in spec.cities:
        scenes = open_city(spec, city.name)
        assert scenes and all(s.has_label == city.labelled for s in scenes)
        for m in spec.modalities:
            values = scenes[0].read(m.name)
            assert values.shape[0] == m.bands and np.isfinite(values).all() and values.std() > 0
    if name == "example_floods.yaml":  # the dB modality is SAR-like, 'flooded' is drawn as water
        s1 = open_city(spec, "chips")[0].read("s1")
        assert -30 < s1.mean() < 0
        labels = np.concatenate([s.read_label().ravel() for s in open_city(spec, "chips")])
        assert set(np.unique(labels).tolist()) <= {0, 1, 2} and (labels == 2).any()


def test_existing_cities_are_kept_and_mat_v5_limit(tmp_path):
    spec = load_spec(CONFIGS / "demo_tiny.yaml", data_root=tmp_path)
    generate_dataset(spec, 32, 32)
    outputs = city_outputs(spec, spec.cities[0])
    stamps = [p.stat().st_mtime_ns for p in outputs]
    generate_dataset(spec, 32, 32)
    assert [p.stat().st_mtime_ns for p in outputs] == stamps
    assert not [p for p in tmp_path.rglob("*") if ".tmp-" in p.name]
    generate_dataset(spec, 32, 32, overwrite=True)
    assert [p.stat().st_mtime_ns for p in outputs] != stamps
    ab = load_spec(CONFIGS / "demo_ab.yaml", data_root=tmp_path / "ab")
    with pytest.raises(ValueError, match="over MATLAB v5's 2 GiB per variable"):
        generate_dataset(replace(ab, cities=ab.cities[:1]), 1600, 1600)
