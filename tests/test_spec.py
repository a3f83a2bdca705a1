"""The dataset contract: shipped specs load, bad specs fail naming the file and the key."""

from pathlib import Path

import pytest

from c2seg.config import ConfigError
from c2seg.errors import C2SegError
from c2seg.spec import load_spec, spec_compatible

SPECS = sorted(Path("configs/datasets").glob("*.yaml"))


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.stem)
def test_shipped_specs_load(path):
    spec = load_spec(path)
    assert spec.cities_with_role("source")
    for m in spec.modalities:
        if m.wavelengths_nm is not None:
            assert len(m.wavelengths_nm) == m.bands


def test_real_figures():
    ab = load_spec("configs/datasets/c2seg_ab.yaml")
    bw = load_spec("configs/datasets/c2seg_bw.yaml")
    assert [ab.modality(m).bands for m in ("hsi", "msi", "sar")] == [242, 4, 2]
    assert [bw.modality(m).bands for m in ("hsi", "msi", "sar")] == [116, 4, 2]
    assert bw.modality("hsi").resolution_m == 30
    assert ab.scored_class_ids == tuple(range(1, 14)) and ab.num_logits == 14
    assert bw.label_remap.codes[41] == 13 and bw.label_remap.nodata_codes == (-1,)
    assert bw.tiling.size == 256 and ab.tiling.size == 128
    # same classes, different sensors: compatible contract fingerprints differ
    assert ab.fingerprint != bw.fingerprint
    assert [(p.kind, p.text) for p in spec_compatible(ab, bw)] == [
        ("band_count", "modality 'hsi' has 116 bands, the model expects 242")]


def _write(tmp_path, text):
    p = tmp_path / "spec.yaml"
    p.write_text(text)
    return p


BASE = """
name: s
grid_resolution_m: 10
modalities: [{name: msi, bands: 4, resolution_m: 10}]
classes: [{id: 0, name: bg, colour: "#000000"}, {id: 1, name: water, colour: "#0000ff"}]
cities: [{name: a, role: source, format: geotiff, files: {msi: a.tif}}]
"""


@pytest.mark.parametrize("patch, message", [
    ("extra_key: 1", "unknown key 'extra_key'"),
    ("modalities: [{name: msi, bands: 4, resolution_m: 10, colour: red}]", "unknown key 'modalities[0].colour'"),
    ("modalities: [{name: msi, bands: 0, resolution_m: 10}]", "bands must be >= 1"),
    ("modalities: [{name: msi, bands: 2, resolution_m: 10, wavelengths_nm: [1, 2, 3]}]", "3 entries for 2 bands"),
    ("classes: [{id: 0, name: bg, colour: blue}]", "must look like #rrggbb"),
    ("cities: [{name: a, role: target, format: geotiff, files: {}}]", "role 'source'"),
    ("cities: [{name: a, role: source, format: mat_v73, files: {}}]", "needs key(s) ['scene']"),
    ("label_remap: {codes: {5: 1, -1: 1}, nodata_codes: [-1]}", "raw code(s) [-1] are in both codes and nodata_codes"),
    ("ignore_id: 256", "ignore_id 256 must be in 0..255"),
    ("modalities: [{name: msi, bands: 4, resolution_m: 10, nodata: .nan}]", "nodata must be a finite number"),
    ("cities: [{name: a, role: sauce, format: geotiff, files: {}}]", "'sauce' is not one of"),
    ("grid_resolution_m: ten", "expected a number"),
    ("modalities: [{name: msi, bands: 4, resolution_m: 10, exclude_bands: [5]}]",
     "modalities.msi.exclude_bands: band 5 is not in 1..4 (1-based band numbers)"),
    ("modalities: [{name: msi, bands: 2, resolution_m: 10, band_names: [B4, B8], exclude_bands: [B9]}]",
     "modalities.msi.exclude_bands: 'B9' is not a band name (band_names: ['B4', 'B8'])"),
    ("modalities: [{name: msi, bands: 2, resolution_m: 10, band_names: [B4, B8], exclude_bands: [2, B8]}]",
     "modalities.msi.exclude_bands: '2' appears twice"),
    ("modalities: [{name: msi, bands: 2, resolution_m: 10, exclude_bands: [1, 2]}]",
     "modalities.msi.exclude_bands leaves none of the 2 bands"),
])
def test_bad_spec_names_file_and_key(tmp_path, patch, message):
    import yaml

    data = yaml.safe_load(BASE)
    data.update(yaml.safe_load(patch))
    path = _write(tmp_path, yaml.safe_dump(data))
    with pytest.raises(ConfigError) as err:
        load_spec(path)
    assert str(path) in str(err.value) and message in str(err.value)


def test_new_dataset_needs_only_yaml(tmp_path):
    """A Sentinel-1 + Sentinel-2 flood dataset with 2 classes, from one YAML."""
    path = _write(tmp_path, """
name: floods
grid_resolution_m: 10
modalities:
  - {name: s1, bands: 2, resolution_m: 10, unit: dB}
  - {name: s2, bands: 13, resolution_m: 10, spectral_range_nm: [443, 2190]}
classes: [{id: 0, name: nodata, colour: "#000000"}, {id: 1, name: dry, colour: "#aa8800"},
          {id: 2, name: flooded, colour: "#0044ff"}]
cities: [{name: chip_train, role: source, format: tiles, files: {root: train}},
         {name: chip_test, role: target, format: tiles, files: {root: test}, labelled: false}]
""")
    spec = load_spec(path, data_root=tmp_path)
    assert spec.modality_names == ("s1", "s2") and spec.num_logits == 3
    assert spec.resolve(spec.city("chip_train"), "root") == (tmp_path / "train").resolve()


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.stem)
def test_spec_survives_the_json_records(path):
    """Prep stores the spec in job.json / manifest.json, where integer keys (label_remap codes) become
    strings: reading it back gives the same spec."""
    import json

    from c2seg.spec import spec_from_dict

    spec = load_spec(path)
    again = spec_from_dict(json.loads(json.dumps(spec.to_dict())), source="manifest.json")
    assert again.to_dict() == spec.to_dict() and again.spec_hash == spec.spec_hash


def test_output_nodata_is_the_ignore_id():
    """Class maps declare the ignore id as nodata: 0 for the shipped specs, 255 for a spec whose class 0 is real."""
    import yaml

    from c2seg.spec import spec_from_dict

    assert load_spec("configs/datasets/c2seg_ab.yaml").output_nodata == 0
    real_zero = spec_from_dict({**yaml.safe_load(BASE), "ignore_id": 255})
    assert real_zero.output_nodata == 255 and real_zero.scored_class_ids == (0, 1)


def test_excluded_bands_set_what_the_model_sees_and_travel_in_the_records():
    """exclude_bands (a number or a name) leave their bands out of the channels, the wavelengths the model
    sees and the band numbers messages give; the spec keeps them through the JSON records (manifest, job) and
    the exported model's spec dict, and a spec excluding bands is not compatible with one that does not."""
    import json

    import yaml

    from c2seg.spec import spec_from_dict

    data = yaml.safe_load(BASE)
    data["modalities"] = [{"name": "msi", "bands": 4, "resolution_m": 10, "wavelengths_nm": [490, 560, 665, 842],
                           "band_names": ["B2", "B3", "B4", "B8"], "exclude_bands": ["B3", 1]}]
    spec = spec_from_dict(data)
    msi = spec.modality("msi")
    assert (msi.bands, msi.channels, msi.kept_bands, msi.kept_wavelengths_nm) == (4, 2, (2, 3), (665, 842))
    assert [msi.band_label(c) for c in range(2)] == ["band 3 (B4)", "band 4 (B8)"]
    again = spec_from_dict(json.loads(json.dumps(spec.to_dict())), source="manifest.json")
    assert again == spec and again.modality("msi").exclude_bands == ("B3", 1) and again.modality("msi").channels == 2
    plain = spec_from_dict(yaml.safe_load(BASE))
    assert spec.fingerprint != plain.fingerprint
    assert [p.text for p in spec_compatible(plain, spec)] == ["modality 'msi' has 2 bands, the model expects 4"]


def test_example_specs_carry_the_sensors_band_centres():
    """Sentinel-2's 13 centres, and EnMAP's 224, whose SWIR restarts below the end of its VNIR."""
    s2 = load_spec("configs/datasets/example_floods.yaml").modality("s2")
    assert s2.wavelengths_nm == (443, 490, 560, 665, 705, 740, 783, 842, 865, 945, 1375, 1610, 2190)
    assert s2.band_names[8] == "B8A" and len(s2.bandwidths_nm) == 13
    enmap = load_spec("configs/datasets/example_enmap.yaml").modality("enmap")
    centres = enmap.wavelengths_nm
    assert len(centres) == 224 and centres[0] == 418.42 and centres[-1] == 2445.3
    assert centres[90] == 993.34 and centres[91] == 901.96  # band 91 ends the VNIR, band 92 starts the SWIR


def test_the_scored_city_is_a_labelled_test_city_else_a_target():
    from dataclasses import replace

    spec = load_spec("configs/datasets/demo_tiny.yaml")
    source, target = spec.cities
    assert spec.scored_city().name == "synth_target"
    unlabelled = replace(target, labelled=False)
    test = replace(target, name="held_out", role="test")
    assert replace(spec, cities=(source, unlabelled, test)).scored_city().name == "held_out"
    assert replace(spec, cities=(source, unlabelled, replace(test, labelled=False))).scored_city().name == "synth_target"
    with pytest.raises(C2SegError, match="has no target or test city"):
        replace(spec, cities=(source,)).scored_city()
