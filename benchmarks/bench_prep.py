"""Prep throughput (MB/s of float32 input) against only reading the same scenes by windows, in one run.

    .venv/bin/python benchmarks/bench_prep.py --size 256x384 --workers 1
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from c2seg.spec import load_spec
from data_prep.manifest import finalize
from data_prep.prep import run_prep
from data_prep.prep_config import PrepConfig
from data_prep.readers import Window, open_city
from data_prep.synth import generate_dataset

ROOT = Path(__file__).parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--spec", default=str(ROOT / "configs/datasets/demo_tiny.yaml"))
    ap.add_argument("--tile", type=int, default=None, help="tile size (default: the spec's)")
    ap.add_argument("--size", default="256x384", help="HxW of each generated city")
    ap.add_argument("--workers", type=int, default=1)
    args = ap.parse_args()
    h, w = map(int, args.size.split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        spec = generate_dataset(load_spec(args.spec, data_root=Path(tmp) / "data"), h, w, seed=0)
        cfg = PrepConfig(tile_size=args.tile)
        rows = cfg.stats_block_rows
        t0 = time.perf_counter()
        nbytes = 0
        for city in spec.cities:
            for scene in open_city(spec, city.name):
                for r in range(0, scene.height, rows):
                    win = Window(r, 0, min(rows, scene.height - r), scene.width)
                    nbytes += sum(scene.read(m, win).nbytes for m in spec.modality_names)
        read_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        run_prep(spec, cfg, Path(tmp) / "prep", workers=args.workers)
        finalize(Path(tmp) / "prep")
        prep_s = time.perf_counter() - t0
    mb = nbytes / 2**20
    print(f"input {mb:.1f} MB (float32) in {len(spec.cities)} cities of {h}x{w} px, tiling {spec.tiling}")
    print(f"read only by windows: {mb / read_s:8.1f} MB/s")
    print(f"prep (stats + tiles + zarr + shards + manifest, workers={args.workers}): {mb / prep_s:8.1f} MB/s")
    print(f"ratio prep / read-only: {read_s / prep_s:.2f}")


if __name__ == "__main__":
    main()
