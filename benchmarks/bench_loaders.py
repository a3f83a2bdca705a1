"""Loader throughput in tiles/s, measured in one run: the WebDataset pipeline and the Zarr dataset
against (a) reading each tile from the GeoTIFFs with rasterio windows and normalising it (what users
do today) and (b) reading the shard bytes with no decoding (the disk limit).

    .venv/bin/python benchmarks/bench_loaders.py --size 256x384 --batch-size 16
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio
import zarr
from rasterio.windows import Window

from c2seg.spec import load_spec
from data_prep.loaders import ZarrTileDataset, make_wds_loader
from data_prep.manifest import finalize, load_manifest
from data_prep.prep import run_prep
from data_prep.prep_config import PrepConfig
from data_prep.synth import generate_dataset

ROOT = Path(__file__).parents[1]


def rasterio_tiles(spec, manifest, prep: Path) -> int:
    """Every train tile read straight from the GeoTIFFs by windows and normalised."""
    norm, n = manifest.normalizer(), 0
    for city in spec.cities:
        rec = manifest.cities[city.name]["splits"]["train"]
        g = zarr.open_group(prep / rec["zarr"], mode="r")
        windows = g["windows"][:][g["kept"][:]]
        files = {m: rasterio.open(spec.resolve(city, m)) for m in spec.modality_names}
        for r, c, h, w in windows:
            for m, f in files.items():
                norm(m, f.read(window=Window(int(c), int(r), int(w), int(h))).astype(np.float32))
            n += 1
        for f in files.values():
            f.close()
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--spec", default=str(ROOT / "configs/datasets/demo_tiny.yaml"))
    ap.add_argument("--tile", type=int, default=None, help="tile size (default: the spec's)")
    ap.add_argument("--size", default="256x384")
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()
    h, w = map(int, args.size.split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        spec = generate_dataset(load_spec(args.spec, data_root=Path(tmp) / "data"), h, w, seed=0)
        prep = Path(tmp) / "prep"
        run_prep(spec, PrepConfig(tile_size=args.tile), prep)
        finalize(prep)
        m = load_manifest(prep)
        total = sum(s.samples for s in m.shards("train"))
        rates = {}
        t0 = time.perf_counter()
        n = rasterio_tiles(spec, m, prep)
        rates["(a) rasterio windows from GeoTIFF"] = n / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        for s in m.shards("train"):
            s.path.read_bytes()
        rates["(b) shard bytes, no decoding"] = total / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        n = sum(b["msi"].shape[0] for b in make_wds_loader(prep, "train", batch_size=args.batch_size))
        rates["WebDataset loader (0 workers)"] = n / (time.perf_counter() - t0)
        ds = ZarrTileDataset(prep, "train")
        t0 = time.perf_counter()
        for i in range(len(ds)):
            ds[i]
        rates["Zarr dataset (random access)"] = len(ds) / (time.perf_counter() - t0)
    print(f"{total} train tiles of {m.tile_size} px, {len(spec.cities)} cities of {h}x{w} px")
    for name, rate in rates.items():
        print(f"{name:40s} {rate:10.1f} tiles/s   x{rate / rates['(a) rasterio windows from GeoTIFF']:.2f} of (a)"
              f"   {rate / rates['(b) shard bytes, no decoding']:.3f} of (b)")


if __name__ == "__main__":
    main()
