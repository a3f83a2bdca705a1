"""``c2seg data verify``: check a prepared dataset against its manifest and say exactly what is wrong.

Checks: every city has the tiles it should (train tiles, and val tiles where validation blocks were held
out); every shard exists with the recorded size and sha256 and holds the recorded sample count
with keys of kept slots only; each split's zarr arrays exist with the planned shape and ``kept``
matches the shards; for a sample of tiles per shard (every tile with ``all_chunks``) the tar entries equal
the zarr tiles bit for bit. Zarr tiles are read through :func:`data_prep.zarr_store.read_tiles`, so a chunk
whose crc32c checksum fails is reported by array and chunk; ``all_chunks`` also decodes the index arrays,
so that every stored chunk is read once. A store written before the checksums is checked all the same, with
a warning that its chunks carry none.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import zarr
from tqdm import tqdm

from c2seg.io import file_sha256
from c2seg.data_prep.manifest import MANIFEST, empty_splits, load_manifest
from c2seg.data_prep.shards import decode_npy, iter_samples, sample_key
from c2seg.data_prep.zarr_store import ChunkError, has_checksums, read_tiles

log = logging.getLogger("c2seg.prep")
INDEX_ARRAYS = ("windows", "scene")


def verify(prep_dir: str | Path, samples_per_shard: int = 2, all_chunks: bool = False) -> list[str]:
    """Problems found (empty when the dataset matches its manifest). ``all_chunks``: compare every tile of
    every shard (not ``samples_per_shard``) and decode the index arrays too, so every chunk is read."""
    root = Path(prep_dir)
    manifest = load_manifest(root)
    modalities = manifest.spec.modality_names
    problems = _missing_tiles(root, manifest.cities)
    work = [(c, s, rec) for c, v in manifest.cities.items() for s, rec in v["splits"].items()]
    for city, split, rec in tqdm(work, desc="verify", unit="split"):
        where = f"{city}/{split}"
        try:
            g = zarr.open_group(root / rec["zarr"], mode="r")
            kept = set(read_tiles(g["kept"], 0, g["kept"].shape[0]).tolist())
        except (FileNotFoundError, KeyError, ValueError) as exc:
            problems.append(f"{root / rec['zarr']}: cannot open the zarr group or its 'kept' array ({exc})")
            continue
        tile_arrays = modalities + (("label",) if rec["labelled"] else ())
        for m in tile_arrays:
            if m not in g or g[m].shape[0] != rec["planned"]:
                problems.append(f"{root / rec['zarr']}: array '{m}' missing or not {rec['planned']} tiles long")
        _warn_without_checksums(root / rec["zarr"], g, tile_arrays + INDEX_ARRAYS + ("kept",))
        if all_chunks:
            problems += _corrupt_index_chunks(g)
        if len(kept) != rec["tiles"]:
            problems.append(f"{where}: zarr 'kept' lists {len(kept)} tiles, the manifest says {rec['tiles']}")
        in_shards: set[int] = set()
        for shard in rec["shards"]:
            path = root / shard["path"]
            if not path.is_file():
                problems.append(f"{path}: shard missing")
                continue
            if path.stat().st_size != shard["bytes"]:
                problems.append(f"{path}: {path.stat().st_size} bytes, the manifest says {shard['bytes']}")
            elif file_sha256(path) != shard["sha256"]:
                problems.append(f"{path}: sha256 differs from the manifest (file changed or corrupt)")
            try:
                problems += _check_shard(path, shard, city, split, g, kept, in_shards,
                                         None if all_chunks else samples_per_shard, modalities, rec["labelled"])
            except Exception as exc:  # a corrupt tar: report it and go on with the others
                problems.append(f"{path}: cannot be read as a tar shard ({exc})")
        if in_shards != kept:
            missing, extra = sorted(kept - in_shards), sorted(in_shards - kept)
            problems.append(f"{where}: shards and zarr disagree: in zarr not in shards {missing[:10]}, "
                            f"in shards not in zarr {extra[:10]}")
    log.info("verify %s: %s", root, "OK" if not problems else f"{len(problems)} problem(s)")
    return problems


def _missing_tiles(root: Path, cities: dict[str, dict]) -> list[str]:
    """A problem for each city split that holds no tile but should (:func:`data_prep.manifest.empty_splits`)."""
    return [f"{root / MANIFEST}: city '{city}' has no {split} tiles, so training cannot use it (rerun `c2seg data "
            f"prep`, which says why)" for city, rec in cities.items() for split in empty_splits(rec["splits"])]


def _warn_without_checksums(group_dir: Path, g, names: tuple[str, ...]) -> None:
    unchecked = [n for n in names if n in g and not has_checksums(g[n])]
    if unchecked:
        log.warning("%s: arrays %s carry no checksums (written before crc32c chunks): a corrupt chunk shows "
                    "only where its tile differs from the shards (--all-chunks compares every tile)",
                    group_dir, unchecked)


def _corrupt_index_chunks(g) -> list[str]:
    problems = []
    for name in (n for n in INDEX_ARRAYS if n in g):
        try:
            read_tiles(g[name], 0, g[name].shape[0])
        except ChunkError as exc:
            problems.append(str(exc))
    return problems


def _check_shard(path: Path, shard: dict, city: str, split: str, g, kept: set[int], in_shards: set[int],
                 samples_per_shard: int | None, modalities: tuple[str, ...], labelled: bool) -> list[str]:
    """Problems of one shard; the first ``samples_per_shard`` samples (all when None) are compared with zarr."""
    problems, count = [], 0
    for key, entries in iter_samples(path):  # payloads stay views: only a few samples are decoded
        count += 1
        slot = int(key.rsplit("-", 1)[-1])
        if key != sample_key(city, split, slot) or slot not in kept:
            problems.append(f"{path}: sample '{key}' is not a kept tile of {city}/{split}")
            continue
        if slot in in_shards:
            problems.append(f"{path}: tile {key} is stored twice")
        in_shards.add(slot)
        if samples_per_shard is None or count <= samples_per_shard:
            for m in modalities + (("label",) if labelled else ()):
                problems += _compare_entry(path, key, entries, m, g[m], slot)
    if count != shard["samples"]:
        problems.append(f"{path}: {count} samples, the manifest says {shard['samples']}")
    return problems


def _compare_entry(path: Path, key: str, entries: dict, name: str, arr, slot: int) -> list[str]:
    """Problems of entry ``name`` of sample ``key`` against zarr tile ``slot`` (a corrupt chunk included)."""
    if f"{name}.npy" not in entries:
        return [f"{path}: sample '{key}' has no '{name}.npy'"]
    try:
        tile = read_tiles(arr, slot, slot + 1)[0]
    except ChunkError as exc:
        return [str(exc)]
    if not np.array_equal(decode_npy(entries[f"{name}.npy"]), tile):
        return [f"{path}: sample '{key}' entry '{name}' differs from zarr tile {slot}"]
    return []
