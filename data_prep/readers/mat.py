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

import struct
import zlib
from pathlib import Path

import numpy as np

from c2seg.spec import City, DatasetSpec
from c2seg.data_prep.readers.base import SceneError, require_file
from c2seg.data_prep.readers.grid import GridScene, grid_factor, mat_transform

LABEL_KEY = "label"

# MATLAB v5 element types scipy reads numeric data as: it looks the type of a data element up in a C table
# without checking it, so a file corrupted there crashes the process (segfault) instead of raising
_MI_NUMERIC = {1, 2, 3, 4, 5, 6, 7, 9, 12, 13, 16, 17, 18}
_MI_UINT32, _MI_INT32, _MI_INT8, _MI_MATRIX, _MI_COMPRESSED = 6, 5, 1, 14, 15
_MX_NUMERIC = set(range(6, 16))  # double, single, int8 .. uint64 (logical arrays are uint8 with a flag)


class _V5Stream:
    """Sequential bytes of a v5 file, or the inflated bytes of one of its compressed elements."""

    def __init__(self, f, order: str, compressed_bytes: int | None = None) -> None:
        self._f, self.order, self._left = f, order, compressed_bytes or 0
        self._z = zlib.decompressobj() if compressed_bytes is not None else None
        self._buf = self._tail = b""

    def read(self, n: int) -> bytes:
        if self._z is None:
            data = self._f.read(n)
        else:
            data = b""
            while len(data) < n:
                if not self._buf:
                    if not self._tail and self._left:
                        self._tail = self._f.read(min(self._left, 1 << 20))
                        self._left = self._left - len(self._tail) if self._tail else 0
                    if not self._tail:
                        break
                    self._buf, self._tail = self._z.decompress(self._tail, 1 << 20), self._z.unconsumed_tail
                data, self._buf = data + self._buf[:n - len(data)], self._buf[n - len(data):]
        if len(data) < n:
            raise EOFError("ends inside a data element")
        return data

    def skip(self, n: int) -> None:
        while n > 0:
            n -= len(self.read(min(n, 1 << 20)))

    def tag(self) -> tuple[int, int, bytes | None]:
        """The next data element's type, byte count and, for a small element, its bytes (else still unread)."""
        mdtype, nbytes = struct.unpack(self.order + "II", self.read(8))
        if mdtype >> 16:  # small element: the size in the upper half of the type word, the bytes in the next
            return mdtype & 0xFFFF, mdtype >> 16, nbytes.to_bytes(4, "little" if self.order == "<" else "big")
        return mdtype, nbytes, None

    def element(self, expect: int) -> bytes:
        mdtype, nbytes, small = self.tag()
        if mdtype != expect:
            raise ValueError(f"data element of type {mdtype} where type {expect} belongs")
        if small is not None:
            return small[:nbytes]
        data = self.read(nbytes)
        self.skip(-nbytes % 8)
        return data


def _check_mat_v5(path: Path, needed: set[str]) -> list[str]:
    """Walk a v5 file's variables before scipy reads them: a ValueError for what scipy would crash on (a data
    element of an unknown type in a ``needed`` variable) or read past the file's end; the variables' names."""
    names = []
    end = path.stat().st_size
    with open(path, "rb") as f:
        header = f.read(128)
        if len(header) < 128 or header[126:128] not in (b"IM", b"MI"):
            raise ValueError("no MATLAB v5 header")
        order = "<" if header[126:128] == b"IM" else ">"
        while f.tell() < end:
            mdtype, nbytes, _ = _V5Stream(f, order).tag()
            start = f.tell()
            if start + nbytes > end:
                raise ValueError(f"a variable of {nbytes} bytes at byte {start - 8} runs past the end of the file")
            stream = _V5Stream(f, order, nbytes if mdtype == _MI_COMPRESSED else None)
            if mdtype == _MI_COMPRESSED:
                mdtype, _, _ = stream.tag()
            if mdtype != _MI_MATRIX:
                raise ValueError(f"data element of type {mdtype} at byte {start - 8} is not a variable")
            flags = struct.unpack(order + "II", stream.element(_MI_UINT32))[0]
            stream.element(_MI_INT32)  # dimensions
            name = stream.element(_MI_INT8).decode("latin1")
            names.append(name)
            if name in needed:
                if flags & 0xFF not in _MX_NUMERIC:
                    raise ValueError(f"variable '{name}' is of MATLAB class {flags & 0xFF}, not a numeric array")
                complex_ = bool(flags & 0x800)
                for part in ("real", "imaginary")[:1 + complex_]:
                    mi, size, small = stream.tag()
                    if mi not in _MI_NUMERIC:
                        raise ValueError(f"variable '{name}': its {part} part has unknown data element type {mi}")
                    if complex_ and part == "real" and small is None:
                        stream.skip(size + -size % 8)
            f.seek(start + nbytes)
    return names


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
        from scipy.io.matlab import matfile_version

        require_file(path, "a MATLAB v5 .mat file")
        needed = {m.key_in_mat for m in spec.modalities} | ({LABEL_KEY} if city.labelled else set())
        try:
            names = _check_mat_v5(path, needed) if matfile_version(path)[0] == 1 else None
            data = loadmat(path, variable_names=sorted(needed))  # scipy parses only what _check_mat_v5 checked
        except NotImplementedError as exc:
            raise SceneError(f"{path}: is a MATLAB v7.3 (HDF5) file; set format: mat_v73 for city '{city.name}'") \
                from exc
        except Exception as exc:  # scipy raises many types on damaged files
            raise SceneError(f"{path}: cannot be read as a MATLAB v5 file (corrupt or truncated?): {exc}") from exc
        keys = sorted(k for k in (data if names is None else names) if k and not k.startswith("__"))
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
        where = path  # the file h5py reads from, for a damaged one's message
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
                where = label_path
                if LABEL_KEY not in self._h5["label"]:
                    raise SceneError(f"{label_path}: no variable '{LABEL_KEY}' (holds {sorted(self._h5['label'])})")
                self._datasets[LABEL_KEY] = self._h5["label"][LABEL_KEY]
            elif city.labelled:
                raise SceneError(f"city '{city.name}': no label file in files, but the spec says it is labelled "
                                 "(add files.label or set labelled: false)")
            shapes = {}
            for key, ds in self._datasets.items():
                where = self.file_of(key)
                if ds.ndim not in ((2,) if key == LABEL_KEY else (2, 3)):
                    raise SceneError(f"{self.file_of(key)}: variable for '{key}' has shape {ds.shape}")
                # MATLAB H x W (x C) is seen by h5py as (C x) W x H
                shapes[key] = (ds.shape[-1], ds.shape[-2])
            where = path
            height, width = _grid_size(spec, shapes, path)
            super().__init__(spec, city, city.name, path, height, width, transform=mat_transform(spec, city),
                             crs=city.crs)
            for m in spec.modalities:
                ds = self._datasets[m.name]
                self._check_modality(m.name, path, ds.shape[0] if ds.ndim == 3 else 1, *shapes[m.name])
            if LABEL_KEY in shapes:
                self._check_label_shape(self._paths["label"], *shapes[LABEL_KEY])
        except (KeyError, RuntimeError) as exc:  # h5py's words for damaged HDF5 metadata (groups, object headers)
            self.close()
            detail = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
            raise SceneError(f"{where}: HDF5 structure is damaged (corrupt or truncated?): {detail}") from exc
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
