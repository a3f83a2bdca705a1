"""The scene interface every reader implements: co-registered modalities and an optional label on
one grid, read by windows.

Arrays are channel-first ``(C, h, w)`` float32 for images and ``(h, w)`` uint8 for labels (class ids,
remapped from raw codes when the spec declares a ``label_remap``). A pixel with a non-finite value in any
band is nodata: every band holds the modality's fill value (its ``nodata``, 0 when the spec gives none);
the non-finite values are counted in :attr:`Scene.nonfinite_counts`.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from affine import Affine

from c2seg.io import file_problem
from c2seg.spec import City, DatasetSpec

if TYPE_CHECKING:
    from data_prep.readers.sensor import BandMeta


class SceneError(ValueError):
    """A scene file is missing, corrupt or does not match the dataset spec. The message names the
    file and the problem."""


def require_file(path: Path, expected: str) -> None:
    """Raise :class:`SceneError` unless ``path`` is a file (naming a directory as one, not as missing)."""
    problem = file_problem(path, expected)
    if problem:
        raise SceneError(f"{path}: {problem}")


@dataclass(frozen=True)
class Window:
    """A pixel window: ``row`` / ``col`` of the upper-left corner, then its size."""

    row: int
    col: int
    height: int
    width: int

    @property
    def slices(self) -> tuple[slice, slice]:
        return slice(self.row, self.row + self.height), slice(self.col, self.col + self.width)

    def clipped(self, height: int, width: int) -> Window:
        """The part of this window inside a ``height`` x ``width`` grid."""
        r0, c0 = max(self.row, 0), max(self.col, 0)
        r1, c1 = min(self.row + self.height, height), min(self.col + self.width, width)
        return Window(r0, c0, max(r1 - r0, 0), max(c1 - c0, 0))


def iter_windows(height: int, width: int, block: int) -> list[Window]:
    """Row-major blocks covering a grid (edge blocks are smaller)."""
    return [Window(r, c, min(block, height - r), min(block, width - c))
            for r in range(0, height, block) for c in range(0, width, block)]


class Scene(abc.ABC):
    """One scene of a city: a full-scene release file set, a GeoTIFF stack or one challenge tile."""

    def __init__(self, spec: DatasetSpec, city: City, name: str, path: Path, height: int, width: int,
                 transform: Affine | None = None, crs: str | None = None) -> None:
        self.spec, self.city, self.name, self.path = spec, city, name, Path(path)
        self.height, self.width = height, width
        self.transform = transform if transform is not None else Affine.identity()
        self.crs = crs
        self.nonfinite_counts: dict[str, int] = {}
        self.band_meta: dict[str, BandMeta] = {}  # per modality, what its file says of its bands (GeoTIFF only)
        self.split: str | None = None  # the split given for it (a filelist's split files, a test city), else None

    @property
    @abc.abstractmethod
    def modalities(self) -> tuple[str, ...]:
        """Names of the modalities this scene holds (a subset of the spec's)."""

    @property
    @abc.abstractmethod
    def has_label(self) -> bool:
        """Whether a label raster is present."""

    @abc.abstractmethod
    def read(self, modality: str, window: Window | None = None) -> np.ndarray:
        """``(C, h, w)`` float32 values of ``modality`` inside ``window`` (whole scene if None)."""

    @abc.abstractmethod
    def read_label(self, window: Window | None = None) -> np.ndarray:
        """``(h, w)`` uint8 class ids inside ``window``; raises :class:`SceneError` if unlabelled."""

    def file_of(self, key: str) -> Path:
        """The file holding modality ``key`` (or ``"label"``), for messages."""
        return self.path

    def full_window(self) -> Window:
        return Window(0, 0, self.height, self.width)

    def close(self) -> None:
        """Release open file handles."""

    def __enter__(self) -> Scene:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.city.name}/{self.name}, {self.height}x{self.width}, {self.path})"
