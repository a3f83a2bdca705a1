"""The scene interface every reader implements: co-registered modalities and an optional label on
one grid, read by windows.

Arrays are channel-first ``(C, h, w)`` float32 for images and ``(h, w)`` uint8 for labels (class ids,
remapped from raw codes when the spec declares a ``label_remap``). A pixel with a non-finite value in any
band is nodata: every band holds the modality's fill value (its ``nodata``, 0 when the spec gives none);
the non-finite values are counted in :attr:`Scene.nonfinite_counts`.
"""

from __future__ import annotations

import abc
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from affine import Affine

from c2seg.errors import C2SegError
from c2seg.io import file_problem
from c2seg.raster import Window
from c2seg.spec import City, DatasetSpec

if TYPE_CHECKING:
    from c2seg.data_prep.readers.sensor import BandMeta


class SceneError(C2SegError):
    """A scene file is missing, corrupt or does not match the dataset spec. The message names the
    file and the problem."""


def require_file(path: Path, expected: str) -> None:
    """Raise :class:`SceneError` unless ``path`` is a file (naming a directory as one, not as missing)."""
    problem = file_problem(path, expected)
    if problem:
        raise SceneError(f"{path}: {problem}")


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

    def close(self) -> None:  # noqa: B027 - optional: a scene that keeps no file open has nothing to release
        """Release open file handles."""

    def __enter__(self) -> Scene:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.city.name}/{self.name}, {self.height}x{self.width}, {self.path})"
