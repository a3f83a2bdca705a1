"""Prep fixtures: ``tiny_prepared``, a prep output folder made from ``tiny_spec`` (tile 32, stride 16)."""

from __future__ import annotations

from pathlib import Path

import pytest

from c2seg.data_prep.prep_config import PrepConfig

# tile 32 / stride 16 over 96 x 128 px cities; 48 px validation blocks so that both splits have tiles
TINY_PREP = PrepConfig(tile_size=32, stride=16, val_block_size=48, source_val_fraction=0.2, shard_max_samples=8,
                       min_shards_per_split=4)  # the tests read both splits of the source city too


@pytest.fixture(scope="session")
def tiny_prepared(tiny_spec, tmp_path_factory) -> Path:
    from c2seg.data_prep.manifest import finalize
    from c2seg.data_prep.prep import run_prep

    out = tmp_path_factory.mktemp("tiny_prepared")
    run_prep(tiny_spec, TINY_PREP, out)
    finalize(out)
    return out
