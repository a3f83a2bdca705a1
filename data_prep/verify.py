"""``c2seg data verify``: check a prepared dataset against its manifest and say exactly what is wrong.

Checks: every shard exists with the recorded size and sha256 and holds the recorded sample count
with keys of kept slots only; each split's zarr arrays exist with the planned shape and ``kept``
matches the shards; for a sample of tiles per shard the tar entries equal the zarr tiles bit for bit.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import zarr
from tqdm import tqdm

from data_prep.manifest import load_manifest
from data_prep.shards import decode_npy, file_sha256, iter_samples, sample_key

log = logging.getLogger("c2seg.prep")


def verify(prep_dir: str | Path, samples_per_shard: int = 2) -> list[str]:
    """Problems found (empty when the dataset matches its manifest)."""
    root = Path(prep_dir)
    manifest = load_manifest(root)
    modalities = manifest.spec.modality_names
    problems: list[str] = []
    work = [(c, s, rec) for c, v in manifest.cities.items() for s, rec in v["splits"].items()]
    for city, split, rec in tqdm(work, desc="verify", unit="split"):
        where = f"{city}/{split}"
        try:
            g = zarr.open_group(root / rec["zarr"], mode="r")
            kept = set(g["kept"][:].tolist())
        except (FileNotFoundError, KeyError, ValueError) as exc:
            problems.append(f"{root / rec['zarr']}: cannot open the zarr group or its 'kept' array ({exc})")
            continue
        for m in modalities + (("label",) if rec["labelled"] else ()):
            if m not in g or g[m].shape[0] != rec["planned"]:
                problems.append(f"{root / rec['zarr']}: array '{m}' missing or not {rec['planned']} tiles long")
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
                problems += _check_shard(path, shard, city, split, g, kept, in_shards, samples_per_shard,
                                         modalities, rec["labelled"])
            except Exception as exc:  # a corrupt tar: report it and go on with the others
                problems.append(f"{path}: cannot be read as a tar shard ({exc})")
        if in_shards != kept:
            missing, extra = sorted(kept - in_shards), sorted(in_shards - kept)
            problems.append(f"{where}: shards and zarr disagree: in zarr not in shards {missing[:10]}, "
                            f"in shards not in zarr {extra[:10]}")
    log.info("verify %s: %s", root, "OK" if not problems else f"{len(problems)} problem(s)")
    return problems


def _check_shard(path: Path, shard: dict, city: str, split: str, g, kept: set[int], in_shards: set[int],
                 samples_per_shard: int, modalities: tuple[str, ...], labelled: bool) -> list[str]:
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
        if count <= samples_per_shard:
            names = modalities + (("label",) if labelled else ())
            for m in names:
                if f"{m}.npy" not in entries:
                    problems.append(f"{path}: sample '{key}' has no '{m}.npy'")
                elif not np.array_equal(decode_npy(entries[f"{m}.npy"]), g[m][slot]):
                    problems.append(f"{path}: sample '{key}' entry '{m}' differs from zarr tile {slot}")
    if count != shard["samples"]:
        problems.append(f"{path}: {count} samples, the manifest says {shard['samples']}")
    return problems
