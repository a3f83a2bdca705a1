"""Prep throughput in MB/s of float32 input, against only reading the same scenes by windows and against
the limit: reading them plus writing prep's output bytes plainly.

Generates AB-like GeoTIFF cities (configs/datasets/demo_ab.yaml: 242-band HSI, 4-band MSI, 2-band SAR,
tile 128 / stride 64) of --size px, reads every scene once by row windows (the raw read rate), then
runs ``c2seg data prep`` + finalize on them (statistics, tiles, zarr, shards, manifest). The limit is
that read plus a plain write of the same output, measured in the same run on prep's own output: every
shard's bytes written as one file (fsynced, as prep does) and every zarr array written whole by one zarr
call with its own codecs (Blosc lz4 and the crc32c checksum are part of the format). Prep writes each
pixel about 4 times per format (stride half the tile), so the write is most of the limit.

    .venv/bin/python benchmarks/bench_prep.py --size 768x768      # ~1.2 GB of input, ~1-2 min on 2 cores
    .venv/bin/python benchmarks/bench_prep.py --quick              # 256 x 256
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import zarr

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.report import figure  # noqa: E402
from c2seg.cli import parse_size  # noqa: E402
from c2seg.io import atomic_write  # noqa: E402
from c2seg.spec import DatasetSpec, load_spec  # noqa: E402
from c2seg.data_prep.manifest import finalize  # noqa: E402
from c2seg.data_prep.prep import run_prep  # noqa: E402
from c2seg.data_prep.prep_config import PrepConfig  # noqa: E402
from c2seg.data_prep.readers import Window, open_city  # noqa: E402
from c2seg.data_prep.synth import generate_dataset  # noqa: E402
from c2seg.data_prep.zarr_store import STORE  # noqa: E402

AB_SPEC = ROOT / "configs/datasets/demo_ab.yaml"



def generated_cities(spec_path: str | Path, data_root: Path, size: tuple[int, int]) -> DatasetSpec:
    """The spec's cities generated as GeoTIFFs under ``data_root`` (kept when already there)."""
    return generate_dataset(load_spec(spec_path, data_root=data_root), *size, seed=0, fmt="geotiff")


def read_by_windows(spec: DatasetSpec, rows: int) -> int:
    """Read every scene of every city once, ``rows`` rows at a time; returns the float32 bytes read."""
    nbytes = 0
    for city in spec.cities:
        for scene in open_city(spec, city.name):
            for r in range(0, scene.height, rows):
                win = Window(r, 0, min(rows, scene.height - r), scene.width)
                nbytes += sum(scene.read(m, win).nbytes for m in spec.modality_names)
            scene.close()
    return nbytes


def plain_write(prep: Path, dest: Path) -> float:
    """Seconds to write ``prep``'s output plainly into ``dest``: each shard's bytes as one fsynced file, each
    zarr array in one write with its own chunks and codecs. Each file or array is read into memory first
    (not timed)."""
    seconds = 0.0
    for shard in sorted(prep.glob("shards/*/*.tar")):
        data, target = shard.read_bytes(), dest / shard.relative_to(prep)
        target.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        with atomic_write(target, fsync=True) as f:
            f.write(data)
        seconds += time.perf_counter() - t0
    arrays = [(path, a) for path, a in zarr.open_group(prep / STORE, mode="r").members(max_depth=None)
              if isinstance(a, zarr.Array)]
    for path, arr in arrays:
        data = arr[:]
        t0 = time.perf_counter()
        copy = zarr.create_array(dest / STORE / path, shape=arr.shape, chunks=arr.chunks, dtype=arr.dtype,
                                 compressors=arr.compressors, fill_value=arr.fill_value)
        copy[:] = data
        seconds += time.perf_counter() - t0
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spec", default=str(AB_SPEC), help="dataset spec whose cities are generated (GeoTIFF)")
    ap.add_argument("--size", default="768x768", help="HxW of each generated city")
    ap.add_argument("--tile", type=int, default=None, help="tile size (default: the spec's)")
    ap.add_argument("--workers", type=int, default=1, help="prep worker processes")
    ap.add_argument("--work", default=None, help="folder for the generated cities (kept; default: a temp dir)")
    ap.add_argument("--quick", action="store_true", help="256 x 256 cities")
    args = ap.parse_args()
    size = (256, 256) if args.quick else parse_size(args.size)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        spec = generated_cities(args.spec, work / f"data-{size[0]}x{size[1]}", size)
        cfg = PrepConfig(tile_size=args.tile)
        read_by_windows(spec, cfg.stats_block_rows)  # warm the page cache: both runs read from memory
        t0 = time.perf_counter()
        nbytes = read_by_windows(spec, cfg.stats_block_rows)
        read_s = time.perf_counter() - t0
        out = work / "prep"
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        counts = run_prep(spec, cfg, out, workers=args.workers)
        t1 = time.perf_counter()
        finalize(out)
        prep_s, finalize_s = time.perf_counter() - t0, time.perf_counter() - t1
        out_mb = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 2**20
        limit_s = read_s + plain_write(out, work / "plain")
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(work / "plain", ignore_errors=True)
    mb = nbytes / 2**20
    note = f"{len(spec.cities)} cities {size[0]}x{size[1]} px, {spec.name}, {mb:.0f} MB float32 input"
    figure("prep", "read only, by row windows", mb / read_s, "MB/s", note)
    figure("prep", "limit: read + plain write of the output", mb / limit_s, "MB/s", f"{out_mb:.0f} MB written")
    figure("prep", f"prep + finalize (workers={args.workers})", mb / prep_s, "MB/s",
           f"{note}; {counts['units']} units; finalize (one process) {finalize_s:.1f} of {prep_s:.1f} s")
    figure("prep", "prep tiles", counts["tiles"] / prep_s, "tiles/s", f"{counts['tiles']} tiles")
    figure("prep", "ratio prep / limit", limit_s / prep_s, "x", "1 = prep as fast as reading + writing plainly")
    figure("prep", "ratio prep / read only", read_s / prep_s, "x", "1 = prep as fast as only reading")


if __name__ == "__main__":
    main()
