"""The Zarr v3 store ``dataset.zarr``: one group per ``<city>/<split>`` holding, for N planned tiles,
one array per modality ``(N, C, T, T)`` in its stored dtype, ``label`` ``(N, T, T)`` uint8 when the
split is labelled, ``windows`` ``(N, 4)`` int32 (row, col, height, width in the scene) and ``scene``
``(N,)`` int32 (index into the group attribute ``scenes``). One tile per chunk, compressed by ``zarr_codec``
(Blosc lz4 with byte shuffle by default; zstd with bitshuffle for floats; or none). Tiles dropped for nodata stay unwritten; the
``kept`` array (written by finalize) lists the slots that hold tiles. Plain zarr reads it all.

Every chunk of every array ends in a crc32c checksum (``Crc32cCodec``), so a corrupt chunk fails on read
instead of decoding into wrong values; :func:`read_tiles` and :func:`read_slots` turn that failure into a
:class:`ChunkError` naming the array and chunk. Stores written before the checksums stay readable
(:func:`has_checksums`)."""

from __future__ import annotations

import asyncio
import fcntl
import itertools
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec
from zarr.core.sync import sync

from c2seg.errors import C2SegError
from c2seg.spec import DatasetSpec
from c2seg.data_prep.prep_config import PrepConfig
from c2seg.data_prep.tiling import CityPlan, SplitPlan

STORE = "dataset.zarr"


@contextmanager
def file_lock(path: Path):
    """An exclusive ``flock`` on ``path`` (created if missing), so only one task creates shared files."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class ChunkError(C2SegError):
    """A zarr chunk fails to decode (checksum mismatch or corrupt compressed bytes); the message names the
    array folder and the chunk key (its file inside that folder)."""


CHECKSUM = (Crc32cCodec(),)  # the compressors of the small index arrays (windows, scene, kept)


def _codec(dtype: str, cfg: PrepConfig) -> list[BloscCodec | Crc32cCodec]:
    """The compressors of a tile array: none, lz4 with byte shuffle (fast to decode), or zstd with
    bitshuffle for floats (smaller); then the crc32c checksum."""
    if cfg.zarr_codec == "none":
        return list(CHECKSUM)
    bits = cfg.zarr_codec == "zstd" and np.dtype(dtype).kind == "f"
    shuffle = "bitshuffle" if bits else "shuffle"
    return [BloscCodec(cname=cfg.zarr_codec, clevel=cfg.zarr_clevel, shuffle=shuffle), *CHECKSUM]


def has_checksums(arr: zarr.Array) -> bool:
    """Whether the chunks of ``arr`` carry a crc32c checksum (stores written before it do not)."""
    return any(isinstance(c, Crc32cCodec) for c in arr.compressors)


def array_dir(arr: zarr.Array) -> Path:
    """The folder of ``arr`` on disk, for messages."""
    return Path(arr.store_path.store.root) / arr.path


DECODE_ERRORS = (ValueError, RuntimeError)  # crc32c mismatch (ValueError), blosc failure (RuntimeError)


def read_tiles(arr: zarr.Array, start: int, stop: int) -> np.ndarray:
    """``arr[start:stop]``; a chunk that fails to decode raises :class:`ChunkError` naming it."""
    try:
        return arr[start:stop]
    except DECODE_ERRORS as exc:
        raise _chunk_error(arr, start, stop, exc) from exc


def read_slots(arrays: dict[str, zarr.Array], slots: Sequence[int]) -> dict[str, list[np.ndarray]]:
    """``{name: [arr[slot] for slot in slots]}`` for increasing ``slots``, in one zarr request: each run of
    consecutive slots of each array is one slice, and all are read at once (``asyncio.gather`` over the
    arrays' ``async_array``), so zarr fetches, checks and decodes their chunks concurrently and pays its
    per-call cost (a hop to its event loop) once, not once per tile and array. A chunk that fails to decode
    raises :class:`ChunkError` naming it (the first failing read, run by run and array by array)."""
    runs = [(slots[a], slots[b - 1] + 1) for a, b in consecutive_runs(slots)]
    reads = [(name, arr, start, stop) for start, stop in runs for name, arr in arrays.items()]

    async def read_all() -> list[np.ndarray | BaseException]:
        return await asyncio.gather(*(arr.async_array.getitem(slice(start, stop)) for _, arr, start, stop in reads),
                                    return_exceptions=True)

    tiles: dict[str, list[np.ndarray]] = {name: [] for name in arrays}
    for (name, arr, start, stop), block in zip(reads, sync(read_all())):
        if isinstance(block, DECODE_ERRORS):
            raise _chunk_error(arr, start, stop, block) from block
        if isinstance(block, BaseException):
            raise block
        tiles[name].extend(block)
    return tiles


def _chunk_error(arr: zarr.Array, start: int, stop: int, exc: BaseException) -> ChunkError:
    return ChunkError(f"{array_dir(arr)}: chunk {_failing_chunk(arr, start, stop)} is corrupt, "
                      f"it fails to decode ({exc})")


def _failing_chunk(arr: zarr.Array, start: int, stop: int) -> str:
    """The key of the first chunk of rows ``start:stop`` that fails to decode (read chunk by chunk)."""
    step = arr.chunks[0]
    rows = range(start // step, -(-stop // step))
    for coords in itertools.product(rows, *(range(n) for n in arr.cdata_shape[1:])):
        try:
            arr.get_block_selection(coords)
        except DECODE_ERRORS:
            return arr.metadata.encode_chunk_key(coords)
    return f"of rows {start}:{stop} (none fails alone)"


def group_path(out: Path, city: str, split: str) -> Path:
    return Path(out) / STORE / city / split


def create_store(out: Path, spec: DatasetSpec, cfg: PrepConfig, plans: dict[str, CityPlan]) -> None:
    """Create every array with its full tile count (idempotent; call under :func:`file_lock`)."""
    root = zarr.open_group(Path(out) / STORE, mode="a")
    if root.attrs.get("complete"):
        return
    root.attrs.update({"spec_hash": spec.spec_hash, "tile_size": cfg.tile_size, "stride": cfg.stride})
    t = cfg.tile_size
    for plan in plans.values():
        for sp in plan.splits.values():
            _create_split(root, spec, cfg, plan, sp, t)
    root.attrs["complete"] = True


def _create_split(root, spec: DatasetSpec, cfg: PrepConfig, plan: CityPlan, sp: SplitPlan, t: int) -> None:
    n = len(sp.tiles)
    g = root.require_group(f"{plan.city}/{sp.split}")
    for m in spec.modalities:
        dtype = cfg.store_dtypes[m.name]
        g.create_array(m.name, shape=(n, m.channels, t, t), chunks=(1, m.channels, t, t), dtype=dtype,
                       compressors=_codec(dtype, cfg), fill_value=0, overwrite=True,
                       dimension_names=("tile", "band", "y", "x"))
    if sp.labelled:
        g.create_array("label", shape=(n, t, t), chunks=(1, t, t), dtype="uint8",
                       compressors=_codec("uint8", cfg), fill_value=0, overwrite=True,
                       dimension_names=("tile", "y", "x"))
    windows = np.column_stack([sp.tiles[:, 1], sp.tiles[:, 2], np.full(n, t), np.full(n, t)]).astype(np.int32)
    g.create_array("windows", data=windows.reshape(n, 4), chunks=(max(n, 1), 4), compressors=CHECKSUM,
                   overwrite=True)
    g.create_array("scene", data=sp.tiles[:, 0].astype(np.int32), chunks=(max(n, 1),), compressors=CHECKSUM,
                   overwrite=True)
    g.attrs.update({"city": plan.city, "city_id": plan.city_id, "split": sp.split, "labelled": sp.labelled,
                    "scenes": [s[0] for s in plan.scenes], "modalities": list(spec.modality_names),
                    "tile_size": t})


def consecutive_runs(slots: Sequence[int]) -> list[tuple[int, int]]:
    """``(a, b)`` index ranges of ``slots`` whose values ``slots[a:b]`` run consecutively (one zarr call each)."""
    runs, start = [], 0
    for i in range(1, len(slots) + 1):
        if i == len(slots) or slots[i] != slots[i - 1] + 1:
            runs.append((start, i))
            start = i
    return runs


def write_tiles(out: Path, city: str, split: str, parts: list[tuple[list[int], dict[str, np.ndarray]]]) -> None:
    """Write each part's ``tiles[name][i]`` to slot ``slots[i]`` of array ``name`` (the group opened once for
    all parts); runs of consecutive slots go in one call (each slot is one chunk)."""
    if not parts:
        return
    g = zarr.open_group(group_path(out, city, split), mode="r+")
    arrays: dict[str, zarr.Array] = {}
    for slots, tiles in parts:
        runs = consecutive_runs(slots)
        for name, array in tiles.items():
            arr = arrays.setdefault(name, g[name])
            for a, b in runs:
                arr[slots[a] : slots[b - 1] + 1] = array[a:b]


def write_kept(out: Path, city: str, split: str, kept: list[int]) -> None:
    g = zarr.open_group(group_path(out, city, split), mode="r+")
    g.create_array("kept", data=np.asarray(kept, dtype=np.int64), chunks=(max(len(kept), 1),),
                   compressors=CHECKSUM, overwrite=True)
