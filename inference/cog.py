"""Cloud-Optimized GeoTIFF output and its validation.

:func:`write_class_cog` streams a uint8 class map block by block into a tiled GeoTIFF, then lets
GDAL's COG driver copy it (internal tiles, DEFLATE, overviews by mode resampling, the colour table
and class-name metadata carried over); both files are written beside the target under temp names
(:func:`c2seg.io.atomic_path`), so a failed write leaves nothing and an older output stays whole.
:func:`validate_cog` runs rio-cogeo's ``cog_validate`` (the maintained port of GDAL's
``validate_cloud_optimized_geotiff.py``), requires internal tiles and ``LAYOUT=COG``, then reads every
band of the image and of each overview in full, so a truncated or damaged file fails.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import rasterio
import rasterio.shutil
from rasterio.errors import RasterioError
from rasterio.windows import Window as RioWindow

from c2seg.io import atomic_path, partial_path
from c2seg.spec import DatasetSpec
from c2seg.raster import Window, iter_windows

GDAL_CACHE_MB = 256  # GDAL's block cache while writing (its default, 5 % of RAM, would grow with the scene)
READ_BLOCK = 4096  # px per side of the windows read when validating (memory stays bounded)


def class_colormap(spec: DatasetSpec) -> dict[int, tuple[int, int, int, int]]:
    """Palette of the class map: the spec's class colours, nodata (ignore id) transparent black."""
    cmap = {c.id: (*c.rgb, 255) for c in spec.classes}
    cmap[spec.ignore_id] = (0, 0, 0, 0)
    return cmap


def class_tags(spec: DatasetSpec) -> dict[str, str]:
    """GeoTIFF metadata naming every class id."""
    tags = {f"CLASS_{c.id}": c.name for c in spec.classes}
    tags["CLASS_NAMES"] = ",".join(f"{c.id}:{c.name}" for c in spec.classes)
    return tags


def write_class_cog(path: Path, height: int, width: int, crs: str | None, transform,
                    blocks: Iterable[Window], read_block: Callable[[Window], np.ndarray], spec: DatasetSpec,
                    blocksize: int = 512) -> Path:
    """Write the class map given by ``read_block(block)`` (uint8) as a COG at ``path``, nodata the spec's
    ``output_nodata``."""
    path = Path(path)
    stage = partial_path(path, ".stage.tif")  # the tiled GeoTIFF the COG driver copies
    profile = {"driver": "GTiff", "height": height, "width": width, "count": 1, "dtype": "uint8",
               "crs": crs, "transform": transform, "nodata": spec.output_nodata, "tiled": True, "blockxsize": 256,
               "blockysize": 256, "compress": "deflate", "BIGTIFF": "IF_SAFER"}
    try:
        with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB), rasterio.open(stage, "w", **profile) as dst:
            dst.write_colormap(1, class_colormap(spec))  # before the data: the palette sets photometric
            dst.update_tags(**class_tags(spec))
            dst.set_band_description(1, "class id")
            for b in blocks:
                dst.write(read_block(b)[None], window=RioWindow(b.col, b.row, b.width, b.height))
        with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB), atomic_path(path, suffix=".tif") as out:
            rasterio.shutil.copy(stage, out, driver="COG", COMPRESS="DEFLATE", BLOCKSIZE=str(blocksize),
                                 OVERVIEW_RESAMPLING="MODE", OVERVIEWS="IGNORE_EXISTING", BIGTIFF="IF_SAFER")
    finally:
        stage.unlink(missing_ok=True)
    return path


# ---- validation -------------------------------------------------------------------------------
def validate_cog(path: str | Path) -> tuple[list[str], list[str]]:
    """``(errors, warnings)`` of a COG: rio-cogeo's checks (IFD and data order, overviews, ghost header),
    internal tiles, ``LAYOUT=COG``, and a full read of every band of the image and its overviews."""
    from rio_cogeo.cogeo import cog_validate  # 0.2 s of imports that writers of COGs do not need

    path = Path(path)
    try:
        _, errors, warnings = cog_validate(path, quiet=True)
    except RasterioError as exc:
        return [f"cannot be opened as a GeoTIFF ({exc})"], []
    with rasterio.open(path) as ds:
        if not ds.profile.get("tiled"):
            errors.append("the main image is not tiled")
        if ds.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") != "COG":
            warnings.append("GDAL does not report LAYOUT=COG (not written by the COG driver)")
        levels = len(ds.overviews(1))
    errors += [e for level in range(-1, levels) if (e := _unreadable(path, level))]
    return errors, warnings


def _unreadable(path: Path, level: int) -> str | None:
    """Why the pixels of the image (``level`` -1) or of overview ``level`` cannot all be read, or None."""
    name = "the image" if level < 0 else f"overview {level}"
    try:
        with rasterio.open(path, overview_level=None if level < 0 else level) as ds:
            for w in iter_windows(ds.height, ds.width, READ_BLOCK):
                ds.read(window=RioWindow(w.col, w.row, w.width, w.height))
    except RasterioError as exc:
        return f"the data of {name} cannot be read (truncated or corrupt?): {exc.__cause__ or exc}"
    return None
