"""The one place for two file chores every stage shares: atomic writes and file hashing.

An atomic write goes to ``.NAME.tmp-PID`` beside the target and is renamed over it only when complete,
so a reader sees the old file or the new one, never half of one. A writer that fails removes its temp
file; a writer killed with -9 leaves it, and ``remove_dead_partials`` (called by whoever writes into the
folder next) deletes the temp files of processes that no longer run.
"""

from __future__ import annotations

import difflib
import hashlib
import os
import re
import shutil
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

_PARTIAL = re.compile(r"^\..+\.tmp-(\d+)(\..*)?$")


def partial_path(path: str | Path, suffix: str = "") -> Path:
    """The temp file an atomic write of ``path`` goes to first (``suffix`` keeps an extension GDAL needs)."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}{suffix}")


@contextmanager
def atomic_write(path: str | Path, mode: str = "wb", fsync: bool = False, suffix: str = "") -> Iterator[IO[Any]]:
    """Open a temp file for writing; on a clean exit it replaces ``path``, on an error it is removed."""
    path = Path(path)
    tmp = partial_path(path, suffix)
    try:
        with open(tmp, mode) as f:
            yield f
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_path(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """A temp path for writers that open files themselves (GDAL, np.savez, torch.save); on a clean exit it
    replaces ``path``, on an error it is removed."""
    path = Path(path)
    tmp = partial_path(path, suffix)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """A temp folder to fill (for outputs that are folders); on a clean exit it replaces the folder ``path``,
    on an error it is removed with its contents."""
    path = Path(path)
    tmp = partial_path(path)
    tmp.mkdir()
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_write(path, "w") as f:
        f.write(text)


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """sha256 hex digest of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_problem(path: str | Path, expected: str) -> str | None:
    """Why ``path`` cannot be read as ``expected`` (e.g. "a GeoTIFF"), for a message after the path:
    ``is a directory, expected a GeoTIFF`` or ``file not found``; None when it is a file."""
    path = Path(path)
    if path.is_dir():
        return f"is a directory, expected {expected}"
    if not path.is_file():
        return "file not found"
    return None


def similar_files(root: str | Path, name: str, skip: Collection[Path] = (), depth: int = 2) -> list[str]:
    """Entries of ``root`` and its sub-folders (``depth`` levels below it) whose name is most like ``name``, as
    sorted POSIX paths relative to ``root``: those of the same name; else those whose stem extends the other
    after a separator (``augsburg`` / ``augsburg_multimodal``); else close spellings (difflib ratio >= 0.8).
    The suffix must match (case aside); entries whose resolved path is in ``skip`` are left out. For messages
    about a file that is not where a config says."""
    root, wanted = Path(root), Path(name)
    ranked: dict[int, list[str]] = {}
    for path in _entries(root, depth):
        rank = _likeness(path.stem.lower(), wanted.stem.lower())
        if rank is not None and path.suffix.lower() == wanted.suffix.lower() and path.resolve() not in skip:
            ranked.setdefault(rank, []).append(path.relative_to(root).as_posix())
    return sorted(ranked[min(ranked)]) if ranked else []


def _likeness(stem: str, wanted: str) -> int | None:
    """0 for the same stem, 1 when one extends the other after a separator, 2 for a close spelling, else None."""
    if stem == wanted:
        return 0
    short, long = sorted((stem, wanted), key=len)
    if long.startswith(short) and not long[len(short)].isalnum():
        return 1
    return 2 if difflib.SequenceMatcher(None, stem, wanted).ratio() >= 0.8 else None


def _entries(folder: Path, depth: int) -> Iterator[Path]:
    """Everything in ``folder`` and, ``depth`` levels down, its sub-folders (hidden ones and unreadable ones
    left out)."""
    try:
        children = sorted(folder.iterdir())
    except OSError:
        return
    for path in children:
        yield path
        if depth > 0 and path.is_dir() and not path.name.startswith("."):
            yield from _entries(path, depth - 1)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_dead_partials(folder: str | Path) -> list[Path]:
    """Delete the atomic-write temp files in ``folder`` (not recursive) whose writer process is gone;
    returns what was removed. Temp files of live processes (a concurrent writer) are kept."""
    removed: list[Path] = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for p in folder.iterdir():
        m = _PARTIAL.match(p.name)
        if m and p.is_file() and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1))):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed
