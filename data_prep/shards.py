"""WebDataset tar shards: deterministic writing (fixed member order and metadata, temp name then
rename) and reading back. A sample ``KEY`` holds ``KEY.<modality>.npy`` per modality, ``KEY.label.npy``
when labelled and ``KEY.json`` (city, split, scene, window, slot)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np


def encode_npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def decode_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def sample_key(city: str, split: str, slot: int) -> str:
    return f"{city}-{split}-{slot:06d}"


def write_shard(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> tuple[int, str]:
    """Write ``(key, {suffix: bytes})`` samples to ``path`` atomically; returns (bytes, sha256)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for key, entries in samples:
                for suffix in sorted(entries):
                    data = entries[suffix]
                    info = tarfile.TarInfo(f"{key}.{suffix}")
                    info.size, info.mtime, info.mode = len(data), 0, 0o644
                    tar.addfile(info, io.BytesIO(data))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path.stat().st_size, file_sha256(path)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_shard(path: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """``(key, {suffix: bytes})`` samples of a shard, in stored order."""
    key, entries = None, {}
    with tarfile.open(path, mode="r|") as tar:
        for member in tar:
            if not member.isreg():
                continue
            k, _, suffix = member.name.partition(".")
            if k != key:
                if key is not None:
                    yield key, entries
                key, entries = k, {}
            entries[suffix] = tar.extractfile(member).read()
    if key is not None:
        yield key, entries


def sample_meta(entries: dict[str, bytes]) -> dict:
    return json.loads(entries["json"])
