"""GeoTIFF stacks: one raster per modality (any CRS and dtype) plus an optional label raster.

Used for ``format: geotiff`` cities and for each tile of the challenge tile folders. Windowed reads go
through rasterio windows, so only the needed blocks are read. Files are opened per read (no handles
are held), so thousands of tile scenes can be open at once.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import rasterio
from affine import Affine
from rasterio.errors import RasterioError
from rasterio.windows import Window as RioWindow

from c2seg.spec import City, DatasetSpec
from c2seg.data_prep.readers.base import SceneError, require_file
from c2seg.data_prep.readers.grid import GridScene, grid_factor
from c2seg.data_prep.readers.sensor import read_band_meta


def _open(path: Path):
    require_file(path, "a GeoTIFF")
    try:
        return rasterio.open(path)
    except RasterioError as exc:
        raise SceneError(f"{path}: cannot be read as a raster (corrupt or truncated?): {exc}") from exc


class GeoTiffScene(GridScene):
    """Co-registered GeoTIFFs; ``files`` maps modality names (and optionally ``label``) to paths."""

    def __init__(self, spec: DatasetSpec, city: City, name: str, files: dict[str, Path]) -> None:
        self._files = {k: Path(v) for k, v in files.items() if k != "label" or city.labelled}
        missing = [m for m in spec.modality_names if m not in self._files]
        if missing:
            raise SceneError(f"{spec.source_file or spec.name}: city '{city.name}' scene '{name}' has no file for "
                             f"modality {missing}")
        if city.labelled and "label" not in self._files:
            raise SceneError(f"city '{city.name}' scene '{name}': no label file, but the spec says labelled "
                             "(set labelled: false for unlabelled cities)")
        meta = {key: self._meta(path) for key, path in self._files.items()}
        on_grid = [k for k in self._files if k == "label" or grid_factor(spec, spec.modality(k)) == 1]
        if not on_grid:
            raise SceneError(f"city '{city.name}': no modality on the {spec.grid_resolution_m} m grid to define it")
        ref = on_grid[0]
        _, height, width, transform, crs, _ = meta[ref]
        super().__init__(spec, city, name, self._files[ref], height, width, transform=transform,
                         crs=crs.to_string() if crs else None)
        self.band_meta = {key: m[5] for key, m in meta.items() if key != "label"}
        for key, (bands, h, w, tf, file_crs, _) in meta.items():
            path = self._files[key]
            if key == "label":
                self._check_label_shape(path, h, w)
                if bands != 1:
                    raise SceneError(f"{path}: label raster has {bands} bands, expected 1")
                factor = 1
            else:
                self._check_modality(key, path, bands, h, w)
                factor = grid_factor(spec, spec.modality(key))
            if file_crs != crs:
                raise SceneError(f"{path}: CRS {file_crs} differs from {self._files[ref]} ({crs})")
            if not tf.almost_equals(transform @ Affine.scale(factor), precision=1e-6 * abs(transform.a)):
                raise SceneError(f"{path}: transform {tuple(tf)[:6]} does not align with {self._files[ref]} "
                                 f"({tuple(transform @ Affine.scale(factor))[:6]})")

    @staticmethod
    def _meta(path: Path):
        with _open(path) as ds:
            return ds.count, ds.height, ds.width, ds.transform, ds.crs, read_band_meta(ds, path)

    @property
    def modalities(self) -> tuple[str, ...]:
        return self.spec.modality_names

    @property
    def has_label(self) -> bool:
        return "label" in self._files

    def file_of(self, modality: str) -> Path:
        return self._files[modality]

    def _read_block(self, key: str, rows: slice, cols: slice) -> np.ndarray:
        path = self._files[key]
        window = RioWindow(cols.start, rows.start, cols.stop - cols.start, rows.stop - rows.start)
        with _open(path) as ds:
            try:
                return ds.read(window=window)
            except RasterioError as exc:
                raise SceneError(f"{path}: read failed at rows {rows.start}:{rows.stop}, cols {cols.start}:"
                                 f"{cols.stop} (corrupt or truncated?): {exc}") from exc

    def _read_native(self, modality: str, rows: slice, cols: slice) -> np.ndarray:
        return self._read_block(modality, rows, cols)

    def _read_label_native(self, rows: slice, cols: slice) -> np.ndarray:
        return self._read_block("label", rows, cols)[0]


def open_geotiff_city(spec: DatasetSpec, city: City) -> list[GeoTiffScene]:
    """One scene from the city's per-modality GeoTIFF files."""
    files = {key: spec.resolve(city, key) for key in city.files}
    return [GeoTiffScene(spec, city, city.name, files)]
