"""File-list cities (``format: filelist``): one scene per chip, read by
:class:`~data_prep.readers.geotiff.GeoTiffScene` with the chip's own georeference.

A chip's file of each modality (and label) is the city's pattern for that key with the chip id in ``{chip}``
(``S2Hand/{chip}_S2Hand.tif``), relative to the data root. The chips are the rows of the city's split files,
in their order (``splits``: a csv or text list, one chip a row, any column naming a file of a ``files`` key as
``columns`` says; or a glob of the first key's files), each scene carrying its split; without split files, the
files matching the first key's pattern (``{chip}`` read as ``*``), sorted. A row's file is matched against the
end of the key's pattern (a bare file name against the pattern's file name, a longer path against the whole
pattern) to find the chip id, so the other keys' files are found by the pattern whatever the row names.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from c2seg.spec import CHIP, City, DatasetSpec
from c2seg.data_prep.readers.base import SceneError, require_file
from c2seg.data_prep.readers.geotiff import GeoTiffScene

GLOB_CHARS = "*?["


@dataclass(frozen=True)
class Row:
    """One row of a split list: where it is (``file:line``, for messages) and the file it names per key."""

    where: str
    cells: dict[str, str]


def chip_id(pattern: str, cell: str, where: str) -> str:
    """The chip id in file path ``cell``, matched against the end of ``pattern`` (as many path parts as both
    have); raises :class:`SceneError` naming ``where`` when it does not match."""
    parts, cell_parts = PurePosixPath(pattern).parts, PurePosixPath(cell.strip().replace("\\", "/")).parts
    n = min(len(parts), len(cell_parts))
    tail = "/".join(parts[-n:])
    regex = re.escape(tail).replace(re.escape(CHIP), "(?P<chip>[^/]+)")
    match = re.fullmatch(regex, "/".join(cell_parts[-n:])) if CHIP in tail else None
    if match is None:
        raise SceneError(f"{where}: '{cell}' does not match the pattern '{pattern}' (so its chip id is unknown)")
    return match["chip"]


def _list_rows(path: Path, columns: dict[str, int | str]) -> list[Row]:
    """The rows of a csv or text list: by header name (the first row is the header) or 0-based position."""
    require_file(path, "a split list (csv or text, one chip a row)")
    with path.open(newline="") as f:
        lines = [(n, row) for n, row in enumerate(csv.reader(f), start=1) if any(c.strip() for c in row)]
    if isinstance(next(iter(columns.values())), str):
        if not lines:
            raise SceneError(f"{path}: empty, expected a header row naming the columns {sorted(columns.values())}")
        (n, header), lines = lines[0], lines[1:]
        header = [c.strip() for c in header]
        absent = [c for c in columns.values() if c not in header]
        if absent:
            raise SceneError(f"{path}:{n}: the header {header} has no column {absent}")
        columns = {key: header.index(c) for key, c in columns.items()}
    rows = []
    for n, row in lines:
        short = [c for c in columns.values() if c >= len(row)]
        if short:
            raise SceneError(f"{path}:{n}: {len(row)} column(s), but columns names column {short[0]} (0-based)")
        rows.append(Row(f"{path}:{n}", {key: row[c].strip() for key, c in columns.items()}))
    return rows


def _glob_rows(spec: DatasetSpec, pattern: str, key: str, setting: str) -> list[Row]:
    """One row per file under the data root matching glob ``pattern``, sorted, as files of ``key``."""
    root = Path(spec.data_root).resolve()
    found = sorted(root.glob(pattern))
    if not found:
        raise SceneError(f"{spec.source_file or spec.name}: {setting}: pattern '{pattern}' matches no file under "
                         f"{root}")
    return [Row(f"{setting} ({pattern})", {key: p.relative_to(root).as_posix()}) for p in found]


def _split_rows(spec: DatasetSpec, city: City) -> list[tuple[str | None, Row]]:
    """(split, row) for every chip the city lists: its split files' rows, else the first pattern's files."""
    first = next(iter(city.split_columns))
    if city.splits is None:
        setting = f"cities.{city.name}.files.{first}"
        return [(None, row) for row in _glob_rows(spec, city.files[first].replace(CHIP, "*"), first, setting)]
    rows = []
    for split, source in city.splits.items():
        setting = f"cities.{city.name}.splits.{split}"
        if any(c in source for c in GLOB_CHARS):
            rows += [(split, row) for row in _glob_rows(spec, source, first, setting)]
        else:
            rows += [(split, row) for row in _list_rows(spec.path(source), city.split_columns)]
    return rows


def _chip_files(spec: DatasetSpec, city: City, row: Row, keys: list[str]) -> tuple[str, dict[str, Path]]:
    """The chip id a row names (the same in each of its cells) and the chip's existing file of every key."""
    ids = {key: chip_id(city.files[key], cell, row.where) for key, cell in row.cells.items()}
    if len(set(ids.values())) > 1:
        raise SceneError(f"{row.where}: the row names different chips {ids}")
    chip = next(iter(ids.values()))
    files = {key: spec.path(city.files[key].replace(CHIP, chip)) for key in keys}
    for path in files.values():
        if not path.is_file():
            raise SceneError(f"{row.where}: {path}: file not found")
    return chip, files


def open_filelist_city(spec: DatasetSpec, city: City) -> list[GeoTiffScene]:
    """One scene per chip, named by its chip id, with ``split`` the split file that lists it (None without)."""
    keys = list(spec.modality_names) + (["label"] if city.labelled else [])
    scenes, seen = [], {}
    for split, row in _split_rows(spec, city):
        chip, files = _chip_files(spec, city, row, keys)
        if chip in seen:
            raise SceneError(f"{row.where}: chip '{chip}' is listed already ({seen[chip]})")
        seen[chip] = row.where
        scene = GeoTiffScene(spec, city, chip, files)
        scene.split = split
        scenes.append(scene)
    return scenes
