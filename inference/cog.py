"""Cloud-Optimized GeoTIFF output and its validation.

:func:`write_class_cog` streams a uint8 class map block by block into a tiled GeoTIFF, then lets
GDAL's COG driver copy it (internal tiles, DEFLATE, overviews by mode resampling, the colour table
and class-name metadata carried over). :func:`validate_cog` implements the key checks of GDAL's
``validate_cloud_optimized_geotiff.py`` (which needs the GDAL Python bindings, not installed here) by
reading the TIFF structure directly.
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import rasterio
import rasterio.shutil
from rasterio.windows import Window as RioWindow

from c2seg.spec import DatasetSpec
from data_prep.readers.base import Window

GDAL_CACHE_MB = 256  # GDAL's block cache while writing (its default, 5 % of RAM, would grow with the scene)


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
    """Write the class map given by ``read_block(block)`` (uint8) as a COG at ``path``."""
    path = Path(path)
    tmp = path.with_name(path.stem + ".tmp.tif")
    profile = {"driver": "GTiff", "height": height, "width": width, "count": 1, "dtype": "uint8",
               "crs": crs, "transform": transform, "nodata": 0, "tiled": True, "blockxsize": 256,
               "blockysize": 256, "compress": "deflate", "BIGTIFF": "IF_SAFER"}
    with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB), rasterio.open(tmp, "w", **profile) as dst:
        dst.write_colormap(1, class_colormap(spec))  # before the data: the palette sets the TIFF photometric tag
        dst.update_tags(**class_tags(spec))
        dst.set_band_description(1, "class id")
        for block in blocks:
            dst.write(read_block(block)[None], window=RioWindow(block.col, block.row, block.width, block.height))
    with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB):
        rasterio.shutil.copy(tmp, path, driver="COG", COMPRESS="DEFLATE", BLOCKSIZE=str(blocksize),
                             OVERVIEW_RESAMPLING="MODE", OVERVIEWS="IGNORE_EXISTING", BIGTIFF="IF_SAFER")
    tmp.unlink()
    return path


# ---- validation -------------------------------------------------------------------------------
_TAGS = {256: "width", 257: "height", 322: "tile_width", 323: "tile_height", 324: "tile_offsets",
         325: "tile_counts", 273: "strip_offsets", 254: "subfile_type"}
_TYPES = {3: ("H", 2), 4: ("I", 4), 16: ("Q", 8), 1: ("B", 1)}


def _read_ifds(data: bytes) -> tuple[list[dict], list[int]]:
    """The IFDs of a TIFF file (tags of interest only) and their offsets."""
    order = {b"II": "<", b"MM": ">"}.get(data[:2])
    if order is None:
        raise ValueError("not a TIFF file")
    version = struct.unpack(order + "H", data[2:4])[0]
    big = version == 43
    if version not in (42, 43):
        raise ValueError(f"unknown TIFF version {version}")
    first = struct.unpack(order + ("Q" if big else "I"), data[8:16] if big else data[4:8])[0]
    ifds, offsets, offset = [], [], first
    count_fmt, entry_size, next_fmt = ("Q", 20, "Q") if big else ("H", 12, "I")
    while offset:
        offsets.append(offset)
        n = struct.unpack_from(order + count_fmt, data, offset)[0]
        pos = offset + (8 if big else 2)
        tags = {}
        for i in range(n):
            tag, typ = struct.unpack_from(order + "HH", data, pos + i * entry_size)
            count = struct.unpack_from(order + ("Q" if big else "I"), data, pos + i * entry_size + 4)[0]
            if tag not in _TAGS or typ not in _TYPES:
                continue
            fmt, size = _TYPES[typ]
            value_pos = pos + i * entry_size + (12 if big else 8)
            if count * size > (8 if big else 4):
                value_pos = struct.unpack_from(order + ("Q" if big else "I"), data, value_pos)[0]
            values = struct.unpack_from(order + fmt * count, data, value_pos)
            tags[_TAGS[tag]] = values if tag in (324, 325, 273) else values[0]
        ifds.append(tags)
        offset = struct.unpack_from(order + next_fmt, data, pos + n * entry_size)[0]
    return ifds, offsets


def validate_cog(path: str | Path) -> tuple[list[str], list[str]]:
    """``(errors, warnings)`` of the COG checks: every IFD tiled, IFDs at the start of the file in
    main-then-overview order, each image's data after every IFD and the overviews' data before the
    main image's (smallest overview first), overviews present above 512 px, GDAL's ghost header
    (``LAYOUT=COG``)."""
    path = Path(path)
    errors, warnings = [], []
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        ifds, ifd_offsets = _read_ifds(data)
        ghost = b"GDAL_STRUCTURAL_METADATA_SIZE" in data[:64]
    main = ifds[0]
    if "tile_width" not in main:
        errors.append("the main image is not tiled")
    overviews = [d for d in ifds[1:] if d.get("subfile_type", 0) & 1 and not d.get("subfile_type", 0) & 4]
    if (main["width"] > 512 or main["height"] > 512) and not overviews:
        warnings.append(f"{main['width']} x {main['height']} px without internal overviews")
    for i, ifd in enumerate(ifds[1:], 1):
        if "tile_width" not in ifd:
            errors.append(f"IFD {i} (overview) is not tiled")
    if ifd_offsets != sorted(ifd_offsets):
        errors.append(f"IFDs are not in increasing file order: {ifd_offsets}")
    first_data = [min((o for o in ifd.get("tile_offsets", ()) if o), default=None) for ifd in ifds]
    present = [o for o in first_data if o is not None]
    if present and max(ifd_offsets) > min(present):
        errors.append("an IFD lies after image data (IFDs must all come first)")
    for i in range(1, len(ifds)):
        if first_data[i] is not None and first_data[i - 1] is not None and first_data[i] > first_data[i - 1]:
            errors.append(f"data of IFD {i} lies after data of IFD {i - 1} (smallest overview must come first)")
    for i, ifd in enumerate(ifds):
        offs = [o for o in ifd.get("tile_offsets", ()) if o]
        if offs != sorted(offs):
            errors.append(f"tiles of IFD {i} are not in increasing file order")
    if not ghost:
        warnings.append("no GDAL structural metadata (ghost header): not written by the COG driver")
    with rasterio.open(path) as ds:
        if ds.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") != "COG":
            warnings.append("GDAL does not report LAYOUT=COG")
    return errors, warnings
