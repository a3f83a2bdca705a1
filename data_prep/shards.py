"""WebDataset tar shards: deterministic writing (fixed member order and metadata, temp name then
rename, sha256 computed while writing, one fsync per shard) and fast reading back (the file is
memory-mapped; members are zero-copy views and ``.npy`` payloads become arrays without copying).

A sample ``KEY`` holds ``KEY.<modality>.npy`` per modality, ``KEY.label.npy`` when labelled and
``KEY.json`` (city, split, scene, window, slot). The files are plain USTAR tars, readable by
``webdataset`` and ``tar`` without this project.
"""

from __future__ import annotations

import hashlib
import io
import mmap
import os
import tarfile
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

import numpy as np

from c2seg.errors import C2SegError
from c2seg.io import atomic_write

BLOCK = 512
Entry = bytes | np.ndarray


@lru_cache(maxsize=256)
def _npy_header(dtype: str, shape: tuple[int, ...]) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": dtype, "fortran_order": False, "shape": shape})
    return buf.getvalue()


@lru_cache(maxsize=256)
def _parse_npy_header(header: bytes) -> tuple[np.dtype, tuple[int, ...], int]:
    f = io.BytesIO(header)
    major, _ = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read(f)
    if fortran or dtype.hasobject:
        raise ValueError("only C-order, non-object .npy payloads are supported")
    return dtype, shape, f.tell()


def decode_npy(data: bytes | memoryview) -> np.ndarray:
    """The array in ``.npy`` bytes, as a view of ``data`` (no copy; read-only if ``data`` is)."""
    view = memoryview(data)
    if bytes(view[:6]) != b"\x93NUMPY":
        raise ValueError("not a .npy payload (bad magic)")
    header_len = 10 + int.from_bytes(view[8:10], "little") if view[6] == 1 else 12 + int.from_bytes(view[8:12],
                                                                                                     "little")
    dtype, shape, offset = _parse_npy_header(bytes(view[:header_len]))
    count = int(np.prod(shape))
    return np.frombuffer(view, dtype=dtype, count=count, offset=offset).reshape(shape)


def sample_key(city: str, split: str, slot: int) -> str:
    return f"{city}-{split}-{slot:06d}"


def _payload(entry: Entry) -> list:
    """Buffers whose concatenation is the member's bytes (arrays become header + raw data)."""
    if isinstance(entry, np.ndarray):
        array = np.ascontiguousarray(entry)
        return [_npy_header(np.lib.format.dtype_to_descr(array.dtype), array.shape), memoryview(array).cast("B")]
    return [entry]


def write_shard(path: Path, samples: list[tuple[str, dict[str, Entry]]]) -> tuple[int, str]:
    """Write ``(key, {suffix: bytes or array})`` samples to ``path`` atomically (arrays as ``.npy``);
    returns (bytes, sha256). The shard is fsynced once, before the rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    h, size = hashlib.sha256(), 0
    with atomic_write(path, "wb", fsync=True) as f:
        def put(buf) -> None:
            nonlocal size
            h.update(buf)
            f.write(buf)
            size += len(buf)

        for key, entries in samples:
            for suffix in sorted(entries):
                parts = _payload(entries[suffix])
                n = sum(len(p) for p in parts)
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size, info.mtime, info.mode = n, 0, 0o644
                put(info.tobuf(format=tarfile.USTAR_FORMAT))
                for p in parts:
                    put(p)
                if n % BLOCK:
                    put(bytes(BLOCK - n % BLOCK))
        put(bytes(2 * BLOCK))  # end of archive, then padding to a whole record as tarfile does
        if size % tarfile.RECORDSIZE:
            put(bytes(tarfile.RECORDSIZE - size % tarfile.RECORDSIZE))
    return size, h.hexdigest()


def map_file(path: Path) -> memoryview:
    """The whole file, memory-mapped copy-on-write (writable views that never change the file)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return memoryview(b"")
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    mm.madvise(mmap.MADV_SEQUENTIAL)
    return memoryview(mm)


def _members(buf: memoryview, where: Path) -> Iterator[tuple[str, int, int]]:
    """``(name, offset, size)`` of the regular files of a USTAR tar in ``buf``."""
    pos = 0
    while pos + BLOCK <= len(buf):
        header = bytes(buf[pos:pos + BLOCK])
        if header == bytes(BLOCK):
            return
        stored = header[148:156].split(b"\0", 1)[0].strip()
        if not stored or int(stored, 8) != sum(header[:148]) + 256 + sum(header[156:]):
            raise C2SegError(f"{where}: bad tar header checksum at byte {pos} (corrupt or truncated shard)")
        name = header[:100].split(b"\0", 1)[0].decode()
        if header[257:262] == b"ustar" and header[345]:
            name = header[345:500].split(b"\0", 1)[0].decode() + "/" + name
        size = int(header[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
        kind = header[156:157]
        if kind in (b"x", b"g", b"L", b"K"):
            raise C2SegError(f"{where}: tar member at byte {pos} uses a {kind!r} extension header, which this "
                             "reader does not support (the shard was not written by c2seg)")
        pos += BLOCK
        if pos + size > len(buf):
            raise C2SegError(f"{where}: member '{name}' runs past the end of the file (truncated shard)")
        if kind in (b"0", b"\0"):
            yield name, pos, size
        pos += -(-size // BLOCK) * BLOCK


def iter_samples(path: Path, start: int = 0, stop: int | None = None) -> Iterator[tuple[str, dict[str, memoryview]]]:
    """Samples ``start`` to ``stop`` of a shard as ``(key, {suffix: view})``, from a memory map:
    skipped samples cost only their headers, payloads are not copied."""
    buf = map_file(Path(path))
    key, entries, index = None, {}, -1
    for name, offset, size in _members(buf, path):
        k, _, suffix = name.partition(".")
        if k != key:
            if key is not None and index >= start:
                yield key, entries
            index += 1
            if stop is not None and index >= stop:
                return
            key, entries = k, {}
        if index >= start:
            entries[suffix] = buf[offset:offset + size]
    if key is not None and index >= start:
        yield key, entries


def read_shard(path: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """``(key, {suffix: bytes})`` samples of a shard, in stored order."""
    for key, entries in iter_samples(path):
        yield key, {s: bytes(v) for s, v in entries.items()}

