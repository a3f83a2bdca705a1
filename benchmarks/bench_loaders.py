"""Loader throughput in tiles/s (normalised float32 batches, as training gets them), steady state:

(a)  what users do today: open each city's per-modality GeoTIFFs with rasterio and read every train
     tile window of each modality and the label, normalised into float tensors (the same output);
(b)  the disk limit: read the shard bytes with no decoding;
(c)  the Zarr dataset's limit: read each tile's zarr chunk files and decode them with the format's codecs
     (crc32c checked, Blosc decompressed), without zarr and without normalisation;
then ``make_wds_loader`` (0 workers, with and without augmentation, and with new memory per batch
instead of its ring of batch memory) and ``ZarrTileDataset`` through a
DataLoader with a batch sampler (its ``__getitems__`` reads a batch at once) and item by item.

Cities are AB-like (configs/datasets/demo_ab.yaml: 242-band HSI + 4 MSI + 2 SAR, tile 128) GeoTIFFs of
--size px, prepared with the default config. Each rate is the best of --passes passes over the train
split after one warm-up pass (page cache warm, file handles open); the first pass is reported in the
note. The runs take turns within every pass, so load from other processes hits them alike.

    .venv/bin/python benchmarks/bench_loaders.py --size 768x768 --batch-size 8
    .venv/bin/python benchmarks/bench_loaders.py --quick
    .venv/bin/python benchmarks/bench_loaders.py --sweep   # batch 8 / 32 / 64 x 0 / 1 / 2 workers against (b),
                                                           # steady state (epochs of SWEEP_TILES tiles)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import google_crc32c
import numpy as np
import rasterio
import torch
import zarr
from numcodecs import Blosc
from rasterio.windows import Window
from zarr.codecs import BloscCodec

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_prep import AB_SPEC, generated_cities  # noqa: E402
from c2seg.cli import parse_size  # noqa: E402
from benchmarks.report import figure  # noqa: E402
from c2seg.data_prep.loaders import RING_SIZE, ZarrTileDataset, collate_views, make_wds_loader  # noqa: E402
from c2seg.data_prep.manifest import finalize, load_manifest  # noqa: E402
from c2seg.data_prep.prep import run_prep  # noqa: E402
from c2seg.data_prep.prep_config import PrepConfig  # noqa: E402
from c2seg.data_prep.zarr_store import array_dir  # noqa: E402


SWEEP_TILES = 4096  # tiles per epoch in the sweep (the train tiles cycled): 32 batches of 64 per worker at 2


def rasterio_tiles(spec, manifest, prep: Path) -> int:
    """Every train tile read straight from the GeoTIFFs by windows and normalised into tensors."""
    norm, n = manifest.normalizer(), 0
    for city in spec.cities:
        rec = manifest.cities[city.name]["splits"]["train"]
        g = zarr.open_group(prep / rec["zarr"], mode="r")
        windows = g["windows"][:][g["kept"][:]]
        files = {m: rasterio.open(spec.resolve(city, m)) for m in spec.modality_names}
        label = rasterio.open(spec.resolve(city, "label")) if rec["labelled"] else None
        for r, c, h, w in windows:
            win = Window(int(c), int(r), int(w), int(h))
            sample = {m: torch.from_numpy(norm(m, f.read(window=win).astype(np.float32))) for m, f in files.items()}
            if label is not None:
                sample["label"] = torch.from_numpy(label.read(1, window=win).astype(np.int64))
            n += 1
        for f in [*files.values(), label]:
            if f is not None:
                f.close()
    return n


def shard_bytes(manifest) -> int:
    for s in manifest.shards("train"):
        s.path.read_bytes()
    return sum(s.samples for s in manifest.shards("train"))


def zarr_chunks(manifest, prep: Path) -> int:
    """Every train tile's zarr chunks read from their files and decoded by the format's codecs (crc32c
    checked, Blosc decompressed), without zarr and without normalisation: the Zarr dataset's limit."""
    blosc, n = Blosc(), 0  # Blosc reads codec, shuffle and type size from each chunk's header
    for city in manifest.cities.values():
        rec = city["splits"]["train"]
        g = zarr.open_group(prep / rec["zarr"], mode="r")
        tiles = [g[name] for name in g.array_keys() if g[name].ndim >= 3]  # the modalities and the label
        for slot in g["kept"][:]:
            for arr in tiles:
                data = (array_dir(arr) / arr.metadata.encode_chunk_key((int(slot),) + (0,) * (arr.ndim - 1))
                        ).read_bytes()
                if google_crc32c.value(data[:-4]) != int.from_bytes(data[-4:], "little"):
                    raise ValueError(f"{array_dir(arr)}: chunk of slot {slot} fails its checksum")
                if any(isinstance(c, BloscCodec) for c in arr.compressors):
                    blosc.decode(data[:-4])
            n += 1
    return n


Run = Callable[[], "int | tuple[int, float, float]"]


def steady(loader) -> tuple[int, float, float]:
    """A loader's steady state: the tiles after its first batch, the seconds from the first batch to the
    last, and the seconds to the first batch (with workers: spawning them, their imports, opening shards)."""
    t0, first, n = time.perf_counter(), None, 0
    for b in loader:
        if first is None:
            first = time.perf_counter()
            continue
        n += b["msi"].shape[0]
    assert first is not None and n, "a steady-state run needs at least two batches"
    return n, time.perf_counter() - first, first - t0


def timed(runs: dict[str, Run], passes: int) -> dict[str, tuple[float, float, float]]:
    """Per run: (first-pass rate, best rate of ``passes`` further passes, start-up seconds of that pass) in
    tiles/s. A run returns its tiles (timed whole) or :func:`steady`'s figures. The runs take turns within
    each pass, so load from other processes on the machine hits them alike."""
    rates: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    for _ in range(passes + 1):
        for name, run in runs.items():
            t0 = time.perf_counter()
            out = run()
            n, seconds, startup = out if isinstance(out, tuple) else (out, time.perf_counter() - t0, 0.0)
            rates[name].append((n / seconds, startup))
    return {name: (r[0][0], *max(r[1:])) for name, r in rates.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spec", default=str(AB_SPEC), help="dataset spec whose cities are generated (GeoTIFF)")
    ap.add_argument("--size", default="768x768", help="HxW of each generated city")
    ap.add_argument("--tile", type=int, default=None, help="tile size (default: the spec's)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--passes", type=int, default=3, help="timed passes after the first one")
    ap.add_argument("--work", default=None, help="folder for generated cities and prep (kept; default: temp)")
    ap.add_argument("--quick", action="store_true", help="384 x 384 cities, 2 passes")
    ap.add_argument("--sweep", action="store_true", help="only the WebDataset loader, at batch sizes 8, 32 and 64 "
                                                         "with 0, 1 and 2 workers, against (b): epochs of "
                                                         f"{SWEEP_TILES} tiles, timed from the first batch")
    args = ap.parse_args()
    size = (384, 384) if args.quick else parse_size(args.size)
    passes = 2 if args.quick else args.passes
    bs = args.batch_size
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        spec = generated_cities(args.spec, work / f"data-{size[0]}x{size[1]}", size)
        prep = work / f"prep-{size[0]}x{size[1]}-{args.tile or spec.tiling.size}"
        run_prep(spec, PrepConfig(tile_size=args.tile), prep)  # resumes / skips when already done
        finalize(prep)
        m = load_manifest(prep)
        zarr_ds = ZarrTileDataset(prep, "train")

        def wds(augment: bool = False, ring_size: int = RING_SIZE) -> Callable[[], int]:
            return lambda: sum(b["msi"].shape[0] for b in make_wds_loader(
                prep, "train", batch_size=bs, augment=augment, ring_size=ring_size))

        def zarr_batches() -> int:
            loader = torch.utils.data.DataLoader(zarr_ds, batch_size=bs, shuffle=True, drop_last=True,
                                                 collate_fn=collate_views)
            return sum(b["msi"].shape[0] for b in loader)

        def zarr_items() -> int:
            for i in torch.randperm(len(zarr_ds)).tolist():
                zarr_ds[i]
            return len(zarr_ds)

        def wds_steady(batch_size: int, workers: int) -> Run:
            return lambda: steady(make_wds_loader(prep, "train", batch_size=batch_size, num_workers=workers,
                                                  batches_per_epoch=SWEEP_TILES // batch_size))

        raw: dict[str, Run] = {"(b) shard bytes, no decoding": lambda: shard_bytes(m)}
        if args.sweep:
            runs = {**raw, **{f"WebDataset loader, batch {n}, {w} workers": wds_steady(n, w)
                              for n in (8, 32, 64) for w in (0, 1, 2)}}
        else:
            runs = {"(a) rasterio windows from GeoTIFF": lambda: rasterio_tiles(spec, m, prep), **raw,
                    "(c) zarr chunks decoded (codec + checksum), no zarr": lambda: zarr_chunks(m, prep),
                    "WebDataset loader": wds(),
                    "WebDataset loader, augment": wds(augment=True),
                    "WebDataset loader, new memory per batch": wds(ring_size=0),
                    "Zarr dataset, batch sampler": zarr_batches,
                    "Zarr dataset, item by item": zarr_items}
        rates = timed(runs, passes)
    total = sum(s.samples for s in m.shards("train"))
    tile_mb = sum(mod.bands for mod in spec.modalities) * m.tile_size**2 * 2 / 2**20
    note = f"{total} train tiles of {m.tile_size} px ({tile_mb:.1f} MB float16), {spec.name}"
    refs = {ref: rates[name][1] for name in rates for ref in ("(a)", "(b)", "(c)") if name.startswith(ref)}
    for name, (first, best, startup) in rates.items():
        ratios = ", ".join(f"{best / rate:.2f} of {ref}" for ref, rate in refs.items())
        batch = "" if args.sweep else f"batch {bs}, "
        start = f"; {startup:.1f} s to the first batch" if "loader, batch" in name else ""
        figure("loaders", name, best, "tiles/s", f"{ratios}; first pass {first:.0f}{start}; {batch}{note}")


if __name__ == "__main__":
    main()
