"""Generated-city fixtures shared by every stage's tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from c2seg.spec import DatasetSpec, load_spec
from c2seg.data_prep.synth import generate_dataset

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "datasets"
TINY_SIZE = (96, 128)


@pytest.fixture(scope="session")
def tiny_spec(tmp_path_factory) -> DatasetSpec:
    """configs/datasets/demo_tiny.yaml (HSI 32, MSI 4, SAR 2; GeoTIFF cities synth_source and
    synth_target, both labelled), generated at 96 x 128 px (seed 0) under a temporary data root."""
    root = tmp_path_factory.mktemp("demo_tiny")
    spec = load_spec(CONFIGS / "demo_tiny.yaml", data_root=root)
    generate_dataset(spec, *TINY_SIZE, seed=0)
    return spec


def write_geotiff(path: Path, data, *, crs: str = "EPSG:32633", transform=None, nodata: float | None = None,
                  band_tags: list[dict] | None = None, descriptions: list[str] | None = None) -> Path:
    """Write ``data`` (C, H, W) as a GeoTIFF, 30 m pixels at (500000, 5300000) unless ``transform`` is given,
    with per-band metadata items ``band_tags`` and band ``descriptions``."""
    import rasterio
    from affine import Affine

    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", driver="GTiff", count=data.shape[0], height=data.shape[1], width=data.shape[2],
                       dtype=data.dtype.name, crs=crs, nodata=nodata,
                       transform=transform or Affine(30, 0, 500000, 0, -30, 5300000)) as ds:
        ds.write(data)
        for band, tags in enumerate(band_tags or [], start=1):
            ds.update_tags(band, **tags)
        for band, text in enumerate(descriptions or [], start=1):
            ds.set_band_description(band, text)
    return path


def geotiff_spec(root: Path, modality: dict, grid_resolution_m: float = 30) -> DatasetSpec:
    """A spec of one GeoTIFF city ``scene`` (``root/<modality>.tif``, unlabelled) of the one ``modality``."""
    from c2seg.spec import spec_from_dict

    name = modality["name"]
    return spec_from_dict({
        "name": "sensor", "grid_resolution_m": grid_resolution_m, "modalities": [modality],
        "classes": [{"id": 0, "name": "bg", "colour": "#000000"}, {"id": 1, "name": "water", "colour": "#0000ff"}],
        "cities": [{"name": "scene", "role": "source", "format": "geotiff", "labelled": False,
                    "files": {name: f"{name}.tif"}}]}, data_root=root)


def hand_scores(confusion) -> dict[str, float]:
    """OA, mIoU and kappa of a K x (K + 1) confusion matrix (rows truth, last column predictions outside the
    classes), counted the plain way: the test's own reading of the C2Seg scoring, not c2seg.metrics."""
    k = len(confusion)
    total = sum(map(sum, confusion))
    tp = [confusion[i][i] for i in range(k)]
    truth = [sum(row) for row in confusion]
    predicted = [sum(row[i] for row in confusion) for i in range(k)]
    ious = [tp[i] / (truth[i] + predicted[i] - tp[i]) for i in range(k) if truth[i] + predicted[i] > 0]
    oa = sum(tp) / total
    pe = sum(truth[i] * predicted[i] for i in range(k)) / total**2
    return {"oa": oa, "miou": sum(ious) / len(ious), "kappa": (oa - pe) / (1 - pe)}
