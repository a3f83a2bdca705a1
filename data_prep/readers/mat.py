"""MATLAB scene files: v5 (C2Seg-AB, read with scipy) and v7.3 / HDF5 (C2Seg-BW, read with h5py).

Both hold one array per modality under ``Modality.key_in_mat`` and a ``label`` array, H x W x C as
MATLAB sees them. v5 files cannot be read by parts: the whole file is loaded at open (memory = file
size). v7.3 files are HDF5: h5py sees MATLAB's column-major arrays transposed (C x W x H), and a window
read fetches only the needed hyperslab, so scenes far larger than memory are read in bounded memory.
Coarser modalities (BW's 30 m HSI) are stored at their resolution and brought onto the 10 m grid by
:class:`~data_prep.readers.grid.GridScene`. ``.mat`` files carry no georeferencing: ``City.crs`` and
``City.origin`` place the grid (10 m pixels).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from c2seg.spec import City, DatasetSpec
from data_prep.readers.base import SceneError, require_file
from data_prep.readers.grid import GridScene, grid_factor, mat_transform

LABEL_KEY = "label"


def _grid_size(spec: DatasetSpec, shapes: dict[str, tuple[int, int]], path: Path) -> tuple[int, int]:
    """Grid height and width: from the label, else from the first modality on the grid."""
    if LABEL_KEY in shapes:
        return shapes[LABEL_KEY]
    for m in spec.modalities:
        if m.name in shapes and grid_factor(spec, m) == 1:
            return shapes[m.name]
    raise SceneError(f"{path}: no label and no modality on the {spec.grid_resolution_m} m grid to size the scene")


class MatV5Scene(GridScene):
    """A MATLAB v5 scene file (keys per modality plus ``label``), loaded whole at open."""

    def __init__(self, spec: DatasetSpec, city: City, path: Path) -> None:
        from scipy.io import loadmat

        require_file(path, "a MATLAB v5 .mat file")
        try:
            data = loadmat(path)
        except NotImplementedError as exc:
            raise SceneError(f"{path}: is a MATLAB v7.3 (HDF5) file; set format: mat_v73 for city '{city.name}'") \
                from exc
        except Exception as exc:  # scipy raises many types on damaged files
            raise SceneError(f"{path}: cannot be read as a MATLAB v5 file (corrupt or truncated?): {exc}") from exc
        keys = sorted(k for k in data if not k.startswith("__"))
        self._arrays: dict[str, np.ndarray] = {}
        for m in spec.modalities:
            if m.key_in_mat not in data:
                raise SceneError(f"{path}: no variable '{m.key_in_mat}' for modality '{m.name}' (holds {keys})")
            arr = data[m.key_in_mat]
            self._arrays[m.name] = arr[:, :, None] if arr.ndim == 2 else arr
        if LABEL_KEY in data and city.labelled:
            self._arrays[LABEL_KEY] = data[LABEL_KEY]
        elif city.labelled:
            raise SceneError(f"{path}: no variable '{LABEL_KEY}' (holds {keys}), but the spec says city "
                             f"'{city.name}' is labelled (set labelled: false)")
        for key, arr in self._arrays.items():
            if arr.ndim != (2 if key == LABEL_KEY else 3):
                raise SceneError(f"{path}: variable for '{key}' has shape {arr.shape}, expected H x W"
                                 f"{'' if key == LABEL_KEY else ' x C'}")
        shapes = {k: a.shape[:2] for k, a in self._arrays.items()}
        height, width = _grid_size(spec, shapes, path)
        super().__init__(spec, city, city.name, path, height, width, transform=mat_transform(spec, city),
                         crs=city.crs)
        for m in spec.modalities:
            self._check_modality(m.name, path, self._arrays[m.name].shape[2], *shapes[m.name])
        if LABEL_KEY in shapes:
            self._check_label_shape(path, *shapes[LABEL_KEY])

    @property
    def modalities(self) -> tuple[str, ...]:
        return self.spec.modality_names

    @property
    def has_label(self) -> bool:
        return LABEL_KEY in self._arrays

    def file_of(self, modality: str) -> Path:
        return self.path

    def _read_native(self, modality: str, rows: slice, cols: slice) -> np.ndarray:
        return np.array(self._arrays[modality][rows, cols].transpose(2, 0, 1))  # a copy: reads must not alias

    def _read_label_native(self, rows: slice, cols: slice) -> np.ndarray:
        return self._arrays[LABEL_KEY][rows, cols]

    def close(self) -> None:
        self._arrays = {}


class MatV73Scene(GridScene):
    """A MATLAB v7.3 (HDF5) scene file plus an optional separate label file, read by hyperslabs."""

    def __init__(self, spec: DatasetSpec, city: City, path: Path, label_path: Path | None) -> None:
        self._h5 = {"scene": self._open(path)}
        self._paths = {"scene": path}
        self._datasets = {}
        try:
            scene = self._h5["scene"]
            for m in spec.modalities:
                if m.key_in_mat not in scene:
                    raise SceneError(f"{path}: no variable '{m.key_in_mat}' for modality '{m.name}' "
                                     f"(holds {sorted(scene.keys())})")
                self._datasets[m.name] = scene[m.key_in_mat]
            if label_path is not None and city.labelled:
                self._h5["label"] = self._open(label_path)
                self._paths["label"] = label_path
                if LABEL_KEY not in self._h5["label"]:
                    raise SceneError(f"{label_path}: no variable '{LABEL_KEY}' (holds {sorted(self._h5['label'])})")
                self._datasets[LABEL_KEY] = self._h5["label"][LABEL_KEY]
            elif city.labelled:
                raise SceneError(f"city '{city.name}': no label file in files, but the spec says it is labelled "
                                 "(add files.label or set labelled: false)")
            shapes = {}
            for key, ds in self._datasets.items():
                if ds.ndim not in ((2,) if key == LABEL_KEY else (2, 3)):
                    raise SceneError(f"{self.file_of(key)}: variable for '{key}' has shape {ds.shape}")
                # MATLAB H x W (x C) is seen by h5py as (C x) W x H
                shapes[key] = (ds.shape[-1], ds.shape[-2])
            height, width = _grid_size(spec, shapes, path)
            super().__init__(spec, city, city.name, path, height, width, transform=mat_transform(spec, city),
                             crs=city.crs)
            for m in spec.modalities:
                ds = self._datasets[m.name]
                self._check_modality(m.name, path, ds.shape[0] if ds.ndim == 3 else 1, *shapes[m.name])
            if LABEL_KEY in shapes:
                self._check_label_shape(self._paths["label"], *shapes[LABEL_KEY])
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _open(path: Path):
        import h5py

        require_file(path, "a MATLAB v7.3 .mat file")
        try:
            return h5py.File(path, "r")
        except OSError as exc:
            raise SceneError(f"{path}: cannot be read as a MATLAB v7.3 / HDF5 file (corrupt or truncated, or a "
                             f"v5 file: then set format: mat_v5): {exc}") from exc

    @property
    def modalities(self) -> tuple[str, ...]:
        return self.spec.modality_names

    @property
    def has_label(self) -> bool:
        return LABEL_KEY in self._datasets

    def file_of(self, modality: str) -> Path:
        return self._paths["label" if modality == LABEL_KEY else "scene"]

    def _hyperslab(self, key: str, index: tuple) -> np.ndarray:
        try:
            return self._datasets[key][index]
        except (OSError, RuntimeError) as exc:
            raise SceneError(f"{self.file_of(key)}: reading '{key}' failed (corrupt or truncated?): {exc}") from exc

    def _read_native(self, modality: str, rows: slice, cols: slice) -> np.ndarray:
        if self._datasets[modality].ndim == 2:
            return self._hyperslab(modality, (cols, rows)).T[None]
        return self._hyperslab(modality, (slice(None), cols, rows)).transpose(0, 2, 1)

    def _read_label_native(self, rows: slice, cols: slice) -> np.ndarray:
        return self._hyperslab(LABEL_KEY, (cols, rows)).T

    def close(self) -> None:
        for f in getattr(self, "_h5", {}).values():
            f.close()
        self._h5 = {}
        self._datasets = {}


def open_mat_v5_city(spec: DatasetSpec, city: City) -> list[MatV5Scene]:
    """One scene from the city's v5 ``scene`` file."""
    return [MatV5Scene(spec, city, spec.resolve(city, "scene"))]


def open_mat_v73_city(spec: DatasetSpec, city: City) -> list[MatV73Scene]:
    """One scene from the city's v7.3 ``scene`` file and optional ``label`` file."""
    label = spec.resolve(city, "label") if "label" in city.files else None
    return [MatV73Scene(spec, city, spec.resolve(city, "scene"), label)]
