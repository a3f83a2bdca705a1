"""Generated-city fixtures shared by every stage's tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from c2seg.spec import DatasetSpec, load_spec
from data_prep.synth import generate_dataset

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
