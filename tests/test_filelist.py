"""File-list cities (chips listed by split csv files or globs) and test cities: what prep stores, the statistics,
the cities training reads, inference and scoring, and the one-line errors for bad lists."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from affine import Affine

from c2seg.config import ConfigError, from_dict
from c2seg.spec import spec_from_dict
from c2seg.data_prep.manifest import finalize, load_manifest
from c2seg.data_prep.prep import run_prep
from c2seg.data_prep.prep_config import PrepConfig
from c2seg.data_prep.readers import SceneError, open_city
from tests.fixtures_data import write_geotiff

ROOT = Path(__file__).resolve().parent.parent
PREP = PrepConfig(tile_size=32, stride=32, shard_max_samples=4)
CLASSES = [{"id": 0, "name": "nodata", "colour": "#000000"}, {"id": 1, "name": "dry", "colour": "#aa8800"},
           {"id": 2, "name": "water", "colour": "#0044ff"}]


def _at(i: int) -> Affine:
    """Each chip its own georeference: 30 m pixels, 1 km apart."""
    return Affine(30, 0, 500000 + 1000 * i, 0, -30, 5300000)


def _chip(root: Path, files: dict[str, str], i: int, bands: dict[str, int], label_values: list[int],
          low: float) -> dict[str, np.ndarray]:
    """Write one 32 x 32 px chip (one GeoTIFF per key of ``files``); its arrays by key."""
    rng = np.random.default_rng(i)
    arrays = {k: rng.uniform(low, low + 20, (n, 32, 32)).astype(np.float32) for k, n in bands.items()}
    arrays["label"] = rng.choice(label_values, (1, 32, 32)).astype(np.int16)
    for key, rel in files.items():
        write_geotiff(root / rel, arrays[key], transform=_at(i))
    return arrays


# ---- Sen1Floods11-like chips: S1Hand / S2Hand / LabelHand, split csv files without header ----------------------
FLOOD_FILES = {"s1": "S1Hand/{chip}_S1Hand.tif", "s2": "S2Hand/{chip}_S2Hand.tif",
               "label": "LabelHand/{chip}_LabelHand.tif"}
FLOOD_SPLITS = {"train": ["Bolivia_1", "Bolivia_2", "Ghana_3"], "val": ["India_4"], "test": ["Spain_5", "Spain_6"]}


def _floods(root: Path) -> tuple[dict, dict[str, dict[str, np.ndarray]]]:
    chips = {}
    for i, chip in enumerate(c for names in FLOOD_SPLITS.values() for c in names):
        files = {k: p.replace("{chip}", chip) for k, p in FLOOD_FILES.items()}
        chips[chip] = _chip(root, files, i, {"s1": 2, "s2": 3}, [-1, 0, 1], low=-25 + i)
    for split, csv in (("train", "train"), ("val", "valid"), ("test", "test")):
        (root / "splits").mkdir(exist_ok=True)
        (root / "splits" / f"flood_{csv}_data.csv").write_text(
            "".join(f"{c}_S1Hand.tif,{c}_LabelHand.tif\n" for c in FLOOD_SPLITS[split]))
    spec = {
        "name": "floods", "grid_resolution_m": 30, "tiling": {"size": 32, "stride": 32},
        "modalities": [{"name": "s1", "bands": 2, "resolution_m": 30, "unit": "dB"},
                       {"name": "s2", "bands": 3, "resolution_m": 30}],
        "classes": CLASSES, "label_remap": {"codes": {0: 1, 1: 2}, "nodata_codes": [-1]},
        "cities": [{"name": "chips", "role": "source", "format": "filelist", "files": FLOOD_FILES,
                    "splits": {"train": "splits/flood_train_data.csv", "val": "splits/flood_valid_data.csv",
                               "test": "splits/flood_test_data.csv"},
                    "columns": {"s1": 0, "label": 1}}]}
    return spec, chips


def test_split_csv_without_header_gives_each_chip_its_split_and_test_chips_stay_out_of_the_statistics(tmp_path):
    data, chips = _floods(tmp_path / "data")
    spec = spec_from_dict(data, data_root=tmp_path / "data")
    assert [(s.name, s.split) for s in open_city(spec, "chips")] == [
        (c, split) for split, names in FLOOD_SPLITS.items() for c in names]
    assert [s.name for s in open_city(spec, "chips", "test")] == ["Spain_5", "Spain_6"]
    run_prep(spec, PREP, tmp_path / "prep")
    manifest = load_manifest(finalize(tmp_path / "prep").parent)
    splits = manifest.cities["chips"]["splits"]
    assert {s: rec["scenes"] for s, rec in splits.items()} == FLOOD_SPLITS
    assert {s: rec["tiles"] for s, rec in splits.items()} == {"train": 3, "val": 1, "test": 2}
    assert splits["test"]["labelled"] and splits["val"]["labelled"]
    trained = [chips[c] for c in FLOOD_SPLITS["train"] + FLOOD_SPLITS["val"]]
    for m in ("s1", "s2"):
        values = np.concatenate([a[m].reshape(len(a[m]), -1) for a in trained], axis=1).astype(np.float64)
        np.testing.assert_allclose(manifest.stats[m]["mean"], values.mean(axis=1), rtol=1e-12)
        np.testing.assert_allclose(manifest.stats[m]["std"], values.std(axis=1), rtol=1e-9)
        assert manifest.stats[m]["count"] == [4 * 32 * 32] * len(values)
    # the label raster's raw codes -1 / 0 / 1 are remapped: nodata 0, dry 1, water 2
    expected = sum(np.bincount((chips[c]["label"][0] + 1).ravel(), minlength=3) for c in FLOOD_SPLITS["test"])
    assert splits["test"]["class_histogram"] == {str(k): int(n) for k, n in enumerate(expected) if n}


def test_a_csv_row_naming_a_missing_file_fails_naming_csv_line_and_path(tmp_path):
    data, _ = _floods(tmp_path)
    csv = tmp_path / "splits" / "flood_train_data.csv"
    csv.write_text(csv.read_text() + "Ghana_9_S1Hand.tif,Ghana_9_LabelHand.tif\n")
    spec = spec_from_dict(data, data_root=tmp_path)
    with pytest.raises(SceneError) as exc:
        open_city(spec, "chips")
    assert str(exc.value) == f"{csv}:4: {tmp_path / 'S1Hand' / 'Ghana_9_S1Hand.tif'}: file not found"
    (tmp_path / "S2Hand" / "Bolivia_2_S2Hand.tif").unlink()  # a modality the csv does not name, found by pattern
    csv.write_text("Bolivia_1_S1Hand.tif,Bolivia_1_LabelHand.tif\nBolivia_2_S1Hand.tif,Bolivia_2_LabelHand.tif\n")
    with pytest.raises(SceneError) as exc:
        open_city(spec, "chips")
    assert str(exc.value) == f"{csv}:2: {tmp_path / 'S2Hand' / 'Bolivia_2_S2Hand.tif'}: file not found"


def test_bad_rows_and_lists_fail_in_one_line(tmp_path):
    data, _ = _floods(tmp_path)
    spec = spec_from_dict(data, data_root=tmp_path)
    csv = tmp_path / "splits" / "flood_valid_data.csv"
    cases = {
        "Bolivia_1_S1Hand.tif,Bolivia_1_LabelHand.tif\n":
            f"{csv}:1: chip 'Bolivia_1' is listed already ({tmp_path / 'splits' / 'flood_train_data.csv'}:1)",
        "India_4_S1Hand.tif,Ghana_3_LabelHand.tif\n":
            f"{csv}:1: the row names different chips {{'s1': 'India_4', 'label': 'Ghana_3'}}",
        "India_4_S2Hand.tif,India_4_LabelHand.tif\n":
            f"{csv}:1: 'India_4_S2Hand.tif' does not match the pattern 'S1Hand/{{chip}}_S1Hand.tif' (so its chip id "
            "is unknown)",
        "\nIndia_4_S1Hand.tif\n": f"{csv}:2: 1 column(s), but columns names column 1 (0-based)",
    }
    for text, message in cases.items():
        csv.write_text(text)
        with pytest.raises(SceneError) as exc:
            open_city(spec, "chips")
        assert str(exc.value) == message


# ---- EnMAP-like tile set: images/ + labels/, train / validation / test csv files with a header -------------------
def _enmap(root: Path) -> dict:
    for i, chip in enumerate(["a1", "a2", "a3", "a4", "t1", "t2"]):
        _chip(root, {"enmap": f"images/{chip}.tif", "label": f"labels/{chip}.tif"}, i, {"enmap": 4}, [0, 1, 2],
              low=1000 + 100 * i)
    for i, chip in enumerate(["b1", "b2", "b3", "b4", "b5"], start=10):
        _chip(root, {"enmap": f"target/{chip}.tif", "label": f"target_labels/{chip}.tif"}, i, {"enmap": 4},
              [0, 1, 2], low=3000)
    for name, names in (("train", ["a1", "a2", "a3"]), ("validation", ["a4"]), ("test", ["t1", "t2"])):
        (root / f"{name}_files.csv").write_text("image,mask\n" + "".join(f"images/{c}.tif,labels/{c}.tif\n"
                                                                          for c in names))
    tile_set = {"format": "filelist", "files": {"enmap": "images/{chip}.tif", "label": "labels/{chip}.tif"},
                "columns": {"enmap": "image", "label": "mask"}}
    return {
        "name": "enmap", "grid_resolution_m": 30, "tiling": {"size": 32, "stride": 32},
        "modalities": [{"name": "enmap", "bands": 4, "resolution_m": 30, "unit": "reflectance x 1e4"}],
        "classes": CLASSES,
        "cities": [
            {"name": "scene_a", "role": "source", **tile_set,
             "splits": {"train": "train_files.csv", "val": "validation_files.csv"}},
            {"name": "scene_b", "role": "target", "format": "filelist",
             "files": {"enmap": "target/{chip}.tif", "label": "target_labels/{chip}.tif"}},
            {"name": "held_out", "role": "test", **tile_set, "splits": {"test": "test_files.csv"}}]}


@pytest.fixture(scope="module")
def enmap(tmp_path_factory):
    """The EnMAP-like spec with its test city, prepared: (spec, prep folder, the same prepared without it)."""
    root = tmp_path_factory.mktemp("enmap")
    data = _enmap(root / "data")
    spec = spec_from_dict(data, data_root=root / "data")
    run_prep(spec, PREP, root / "prep")
    finalize(root / "prep")
    without = spec_from_dict({**data, "cities": data["cities"][:2]}, data_root=root / "data")
    run_prep(without, PREP, root / "prep_without")
    finalize(root / "prep_without")
    return spec, root / "prep", root / "prep_without"


def test_prep_stores_a_test_city_and_leaves_it_out_of_the_statistics(enmap):
    spec, prep, without = enmap
    manifest, other = load_manifest(prep), load_manifest(without)
    held_out = manifest.cities["held_out"]
    assert list(held_out["splits"]) == ["test"] and "stats" not in held_out
    assert held_out["splits"]["test"]["scenes"] == ["t1", "t2"] and held_out["splits"]["test"]["tiles"] == 2
    assert held_out["splits"]["test"]["labelled"]
    assert manifest.stats == other.stats
    assert manifest.stats["enmap"]["count"] == [9 * 32 * 32] * 4
    assert sorted(manifest.city_normalization()) == ["scene_a", "scene_b"]
    a = manifest.cities["scene_a"]["splits"]
    assert (a["train"]["scenes"], a["val"]["scenes"]) == (["a1", "a2", "a3"], ["a4"])
    # a file list without split files: chips from the pattern's glob, one whole chip of five held out for val
    b = manifest.cities["scene_b"]["splits"]
    assert (len(b["train"]["scenes"]), len(b["val"]["scenes"])) == (4, 1)
    assert sorted(b["train"]["scenes"] + b["val"]["scenes"]) == ["b1", "b2", "b3", "b4", "b5"]


def _train_config(prep: Path, out: Path, **data):
    from c2seg.train.config import TrainConfig

    return from_dict(TrainConfig, {"model": str(ROOT / "configs/models/tiny.yaml"), "output_dir": str(out),
                                   "steps": 1, "data": {"prep_dir": str(prep), **data}})


def test_pretraining_and_adaptation_never_read_a_test_city(enmap, tmp_path):
    from c2seg.train.config import load_model_config
    from c2seg.train.data import PreparedData
    from c2seg.train.finetune import FinetuneTask
    from c2seg.train.pretrain import PretrainTask

    _, prep, _ = enmap
    data = PreparedData(prep)
    model = load_model_config(ROOT / "configs/models/tiny.yaml")
    pretrain = PretrainTask(_train_config(prep, tmp_path), model, data.spec, data)
    finetune = FinetuneTask(_train_config(prep, tmp_path), model, data.spec, data)
    assert pretrain.cities == ["scene_a", "scene_b"]
    assert (finetune.sources, finetune.targets, finetune.val_cities) == (["scene_a"], ["scene_b"], ["scene_b"])
    read = {s.city for s in data.manifest.shards("train", pretrain.cities + finetune.targets)}
    assert read == {"scene_a", "scene_b"}
    for key in ("target_cities", "source_cities", "val_cities"):
        with pytest.raises(ValueError) as exc:
            FinetuneTask(_train_config(prep, tmp_path, **{key: ["held_out"]}), model, data.spec, data)
        assert str(exc.value) == (f"data.{key} names city 'held_out', whose role is test in spec 'enmap': "
                                  "a test city is only predicted and scored, never trained on, adapted to nor "
                                  "validated on")


def test_validation_falls_back_to_the_source_val_split_when_no_target_is_labelled(enmap, tmp_path):
    from dataclasses import replace

    from c2seg.train.data import PreparedData, select_cities

    _, prep, _ = enmap
    data = PreparedData(prep)
    unlabelled = replace(data.spec, cities=tuple(replace(c, labelled=c.role != "target") for c in data.spec.cities))
    cfg = _train_config(prep, tmp_path).data
    assert select_cities(unlabelled, cfg, data.manifest).val == ("scene_a",)
    assert select_cities(data.spec, cfg, data.manifest).val == ("scene_b",)
    assert select_cities(data.spec, replace(cfg, val_cities=("scene_a",)), data.manifest).val == ("scene_a",)


def test_inference_predicts_and_evaluate_scores_a_test_city(enmap, tmp_path):
    import torch

    from c2seg.config import to_dict
    from c2seg.inference.config import InferConfig
    from c2seg.inference.evaluate import evaluate, truth_from_city
    from c2seg.inference.runner import infer_city
    from c2seg.train.config import load_model_config
    from c2seg.train.export import save_exported
    from c2seg.train.models import FusionSegmenter

    spec, prep, _ = enmap
    cfg = load_model_config(ROOT / "configs/models/tiny.yaml")
    torch.manual_seed(0)
    model = tmp_path / "model.pt"
    save_exported(model, to_dict(cfg), spec.to_dict(), FusionSegmenter(spec, cfg).state_dict(),
                  load_manifest(prep).normalizer().as_dict(), spec.modality_names, 32)
    outputs = infer_city(model, spec, "held_out", tmp_path / "pred", InferConfig(window=32, block=32, quicklook=False,
                                                                                  device="cpu"))
    assert [o.class_map.name for o in outputs] == ["t1.tif", "t2.tif"]
    result = evaluate(spec, tmp_path / "pred" / "held_out", list(truth_from_city(spec, "held_out", "test")))
    labels = [s.read_label() for s in open_city(spec, "held_out")]
    assert result["scenes"] == ["t1", "t2"]
    assert result["pixels"] == sum(int((lab != 0).sum()) for lab in labels) == 1330


def test_a_glob_that_matches_nothing_fails_naming_the_pattern(tmp_path):
    data = _enmap(tmp_path)
    data["cities"][1]["files"] = {"enmap": "elsewhere/{chip}.tif", "label": "target_labels/{chip}.tif"}
    data["cities"][0]["splits"]["train"] = "images/z*.tif"
    spec = spec_from_dict(data, data_root=tmp_path)
    with pytest.raises(SceneError) as exc:
        open_city(spec, "scene_b")
    assert str(exc.value) == (f"enmap: cities.scene_b.files.enmap: pattern 'elsewhere/*.tif' matches no file "
                              f"under {tmp_path}")
    with pytest.raises(SceneError) as exc:
        open_city(spec, "scene_a")
    assert str(exc.value) == (f"enmap: cities.scene_a.splits.train: pattern 'images/z*.tif' matches no file "
                              f"under {tmp_path}")


def test_a_header_without_a_named_column_fails_naming_csv_and_line(tmp_path):
    data = _enmap(tmp_path)
    data["cities"][0]["columns"] = {"enmap": "image", "label": "label"}
    spec = spec_from_dict(data, data_root=tmp_path)
    with pytest.raises(SceneError) as exc:
        open_city(spec, "scene_a")
    assert str(exc.value) == f"{tmp_path / 'train_files.csv'}:1: the header ['image', 'mask'] has no column ['label']"


@pytest.mark.parametrize("city, message", [
    ({"files": {"enmap": "images/x.tif", "label": "labels/{chip}.tif"}},
     "cities.c.files.enmap: pattern 'images/x.tif' must hold {chip} once (the chip id)"),
    ({"splits": {"training": "a.csv"}}, "cities.c.splits: unknown split(s) ['training'] (allowed: train, val, test)"),
    ({"role": "test", "splits": {"train": "a.csv"}}, "cities.c: a test city's chips are all test; give only "
                                                     "splits.test"),
    ({"columns": {"enmap": 0}}, "cities.c.columns: needs splits (the csv files the columns are of)"),
    ({"splits": {"train": "a.csv"}, "columns": {"enmap": "image", "label": 1}},
     "cities.c.columns: give every column by header name or every one by 0-based position"),
    ({"files": {"enmap": "images/{chip}.tif"}},
     "cities.c.files has no pattern for ['label'] (a filelist city gives one per modality and label)"),
    ({"format": "geotiff", "files": {"enmap": "a.tif"}, "splits": {"train": "a.csv"}},
     "cities.c: splits and columns need format filelist (got geotiff)"),
])
def test_filelist_spec_errors_name_the_key(city, message):
    spec = {"name": "x", "grid_resolution_m": 30, "classes": CLASSES,
            "modalities": [{"name": "enmap", "bands": 4, "resolution_m": 30}],
            "cities": [{"name": "c", "role": "source", "format": "filelist",
                        "files": {"enmap": "images/{chip}.tif", "label": "labels/{chip}.tif"}, **city}]}
    if city.get("role") == "test":
        spec["cities"].insert(0, {"name": "s", "role": "source", "format": "geotiff", "files": {"enmap": "a.tif"}})
    with pytest.raises(ConfigError) as exc:
        spec_from_dict(spec, source="x.yaml")
    where = "" if "has no pattern" in message else f"cities[{len(spec['cities']) - 1}]: "  # a city's own checks
    assert str(exc.value) == f"x.yaml: {where}{message}"
