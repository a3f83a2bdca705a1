"""What every reader shares: modalities stored as arrays on the scene grid (or on an integer-coarser
grid, like BW's 30 m HSI), the checks against the spec, non-finite values as nodata and label remapping.

A concrete reader implements :meth:`GridScene._read_native` and :meth:`GridScene._read_label_native`,
which return the stored values of a block of rows / columns of its native grid; this class brings
coarse modalities onto the grid by block replication (nearest neighbour), converts to float32, makes
pixels with non-finite values nodata and checks / remaps labels.

Rules (documented in docs/demo-data.md):

- Non-finite image values (NaN, +-inf) make their pixel nodata: every band of a pixel with a non-finite
  value in any band is set to the modality's fill value (its ``nodata`` from the spec, or 0 when it has
  none), so prep counts the pixel in its nodata mask and leaves it out of the statistics, and the loaders
  feed it as 0 in normalised units (the band mean). The non-finite values are counted per modality in
  ``scene.nonfinite_counts`` (accumulated over the reads made through the scene object) and logged once
  per modality and scene.
- Labels follow the convention the spec declares, in every scene alike: without a ``label_remap`` they
  store class ids, and every value must be a class id of the spec (or its ``ignore_id``); with one they
  store raw codes, and every value must be one of its raw codes (mapped onto their class ids) or nodata
  codes (mapped onto ``ignore_id``). No scene is read by guessing from its values. The check is made
  once per scene on the values of the whole label, read by blocks.
- A modality's ``exclude_bands`` are left out of every read (after the band count of the files is checked
  against ``bands``), before the non-finite fill: reads hold ``Modality.channels`` bands.
"""

from __future__ import annotations

import abc
import logging
import math
from pathlib import Path

import numpy as np

from c2seg.spec import City, DatasetSpec, Modality
from c2seg.raster import Window, iter_windows
from c2seg.data_prep.readers.base import Scene, SceneError
from c2seg.data_prep.stats import fill_value

log = logging.getLogger("c2seg.readers")

LABEL_SCAN_BLOCK = 2048


def grid_factor(spec: DatasetSpec, modality: Modality) -> int:
    """How many grid pixels one native pixel of ``modality`` spans per axis (1 = on the grid)."""
    ratio = modality.resolution_m / spec.grid_resolution_m
    factor = round(ratio)
    if factor < 1 or not math.isclose(ratio, factor, rel_tol=1e-6):
        raise SceneError(f"{spec.source_file or spec.name}: modality '{modality.name}' at {modality.resolution_m} m "
                         f"is not an integer multiple of the {spec.grid_resolution_m} m grid")
    return factor


def coarse_shape_ok(native: int, grid: int, factor: int) -> bool:
    """A coarse axis may hold ceil(grid / factor) pixels, or floor when the last partial one is dropped."""
    return native in {math.ceil(grid / factor), grid // factor} and native >= 1


class GridScene(Scene, abc.ABC):
    """A scene whose modalities are native-grid arrays; see the module docstring for the rules."""

    def __init__(self, spec: DatasetSpec, city: City, name: str, path: Path, height: int, width: int,
                 **kwargs) -> None:
        super().__init__(spec, city, name, path, height, width, **kwargs)
        self._native_shapes: dict[str, tuple[int, int]] = {}
        self._label_lut: tuple[int, np.ndarray] | None = None
        self._warned_nonfinite: set[str] = set()

    # ---- what a concrete reader provides ------------------------------------------------
    @abc.abstractmethod
    def _read_native(self, modality: str, rows: slice, cols: slice) -> np.ndarray:
        """``(C, h, w)`` stored values of a block of the modality's native grid, in an array the caller owns
        (never a view of data the scene keeps: reads fill non-finite values in place)."""

    @abc.abstractmethod
    def _read_label_native(self, rows: slice, cols: slice) -> np.ndarray:
        """``(h, w)`` stored label values (raw, any numeric dtype)."""

    @abc.abstractmethod
    def file_of(self, modality: str) -> Path:
        """The file holding ``modality`` (or ``"label"``), for messages."""

    # ---- checks used by readers at open time ----------------------------------------------
    def _check_modality(self, name: str, path: Path, bands: int, height: int, width: int) -> None:
        """Check a modality's stored band count and native grid size against the spec and scene grid."""
        m = self.spec.modality(name)
        if bands != m.bands:
            raise SceneError(f"{path}: modality '{name}' has {bands} bands, spec '{self.spec.name}' says {m.bands}")
        f = grid_factor(self.spec, m)
        if f == 1:
            ok = (height, width) == (self.height, self.width)
        else:
            ok = coarse_shape_ok(height, self.height, f) and coarse_shape_ok(width, self.width, f)
        if not ok:
            expect = f"{self.height} x {self.width}" if f == 1 else \
                f"about {math.ceil(self.height / f)} x {math.ceil(self.width / f)} ({m.resolution_m} m)"
            raise SceneError(f"{path}: modality '{name}' grid is {height} x {width} px, which does not align with the "
                             f"scene grid {self.height} x {self.width} px (expected {expect})")
        self._native_shapes[name] = (height, width)

    def _check_label_shape(self, path: Path, height: int, width: int) -> None:
        if (height, width) != (self.height, self.width):
            raise SceneError(f"{path}: label grid is {height} x {width} px, which does not align with the scene grid "
                             f"{self.height} x {self.width} px")

    # ---- the Scene API ------------------------------------------------------------------------
    def _window(self, window: Window | None) -> Window:
        window = window or self.full_window()
        if window.clipped(self.height, self.width) != window or window.height < 1 or window.width < 1:
            raise SceneError(f"{self.path}: window {window} lies outside the {self.height} x {self.width} px scene")
        return window

    def read(self, modality: str, window: Window | None = None) -> np.ndarray:
        if modality not in self.modalities:
            raise SceneError(f"{self.path}: scene has no modality '{modality}' (has {list(self.modalities)})")
        window = self._window(window)
        m = self.spec.modality(modality)
        factor = grid_factor(self.spec, m)
        rows, cols = window.slices
        if factor == 1:
            values = self._read_kept(m, rows, cols)
        else:
            nh, nw = self._native_shapes[modality]
            ri = np.minimum(np.arange(rows.start, rows.stop) // factor, nh - 1)
            ci = np.minimum(np.arange(cols.start, cols.stop) // factor, nw - 1)
            coarse = self._read_kept(m, slice(ri[0], ri[-1] + 1), slice(ci[0], ci[-1] + 1))
            values = coarse[:, ri - ri[0]][:, :, ci - ci[0]]
        values = np.asarray(values, dtype=np.float32)
        return self._fill_nonfinite(modality, values)

    def _read_kept(self, m: Modality, rows: slice, cols: slice) -> np.ndarray:
        """The native block of ``m`` without its ``exclude_bands`` (left out before the non-finite fill, so a NaN
        band that is excluded makes no pixel nodata)."""
        values = self._read_native(m.name, rows, cols)
        return values[list(m.kept_bands)] if m.exclude_bands else values

    def _fill_nonfinite(self, modality: str, values: np.ndarray) -> np.ndarray:
        """``values`` with every band of each pixel holding a non-finite value set to the fill value (nodata)."""
        bad = ~np.isfinite(values)
        count = int(np.count_nonzero(bad))
        self.nonfinite_counts[modality] = self.nonfinite_counts.get(modality, 0) + count
        if count:
            fill = fill_value(self.spec.modality(modality))
            values[:, bad.any(axis=0)] = fill
            if modality not in self._warned_nonfinite:
                self._warned_nonfinite.add(modality)
                log.warning("%s: modality '%s' holds %d non-finite value(s) (NaN/inf) in this read; their pixels are "
                            "nodata (every band set to %s)", self.file_of(modality), modality, count, fill)
        return values

    def read_label(self, window: Window | None = None) -> np.ndarray:
        if not self.has_label:
            raise SceneError(f"{self.path}: city '{self.city.name}' scene '{self.name}' has no label")
        window = self._window(window)
        offset, lut = self._label_mapping()
        raw = self._read_label_native(*window.slices)
        return lut[self._as_int_label(raw) - offset]

    def _as_int_label(self, raw: np.ndarray) -> np.ndarray:
        if raw.dtype.kind == "f":
            if not np.isfinite(raw).all() or (raw != np.round(raw)).any():
                bad = np.unique(raw[~np.isfinite(raw) | (raw != np.round(raw))])[:10]
                raise SceneError(f"{self.file_of('label')}: label holds non-integer values {bad.tolist()}")
        return raw.astype(np.int64)

    def label_values(self) -> np.ndarray:
        """Sorted distinct raw values of the whole label, read by blocks."""
        seen: set[int] = set()
        for w in iter_windows(self.height, self.width, LABEL_SCAN_BLOCK):
            seen.update(np.unique(self._as_int_label(self._read_label_native(*w.slices))).tolist())
        return np.array(sorted(seen), dtype=np.int64)

    def _label_mapping(self) -> tuple[int, np.ndarray]:
        """(offset, lookup table) turning stored label values into class ids, by the convention the spec
        declares (raw codes when it has a ``label_remap``, else class ids); checked once per scene."""
        if self._label_lut is not None:
            return self._label_lut
        values = self.label_values().tolist()
        mapping = self._raw_code_mapping(values) if self.spec.label_remap else self._class_id_mapping(values)
        offset = min(values) if values else 0
        lut = np.full(max(values) - offset + 1 if values else 1, self.spec.ignore_id, dtype=np.uint8)
        for stored, class_id in mapping.items():
            lut[stored - offset] = class_id
        self._label_lut = (offset, lut)
        return self._label_lut

    def _class_id_mapping(self, values: list[int]) -> dict[int, int]:
        """Identity on ``values``, refused unless each is a class id (or the ignore id) of the spec."""
        allowed = set(self.spec.class_ids) | {self.spec.ignore_id}
        outside = sorted(set(values) - allowed)
        if outside:
            raise SceneError(f"{self.file_of('label')}: label values outside the class set of spec "
                             f"'{self.spec.name}': {outside} (class ids: {sorted(allowed)})")
        return {v: v for v in values}

    def _raw_code_mapping(self, values: list[int]) -> dict[int, int]:
        """The class id of each raw code in ``values`` (nodata codes: the ignore id), refused unless each is
        a raw code or nodata code of the spec's ``label_remap``."""
        remap = self.spec.label_remap
        path = self.file_of("label")
        unknown = sorted(set(values) - set(remap.codes) - set(remap.nodata_codes))
        if unknown:
            raise SceneError(f"{path}: label values {unknown} are neither raw codes {sorted(remap.codes)} nor "
                             f"nodata codes {list(remap.nodata_codes)} of the label_remap of spec "
                             f"'{self.spec.name}' (labels that hold class ids need label_remap: null)")
        log.info("%s: label raw codes %s remapped onto class ids with the spec's label_remap (nodata codes %s -> %d)",
                 path, values, list(remap.nodata_codes), self.spec.ignore_id)
        return {v: remap.codes.get(v, self.spec.ignore_id) for v in values}


def mat_transform(spec: DatasetSpec, city: City):
    """Affine transform of a .mat city: the grid's pixel size at ``city.origin`` (0, 0 when not given)."""
    from affine import Affine

    x0, y0 = city.origin or (0.0, 0.0)
    res = spec.grid_resolution_m
    return Affine(res, 0.0, x0, 0.0, -res, y0)
