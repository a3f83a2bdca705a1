"""Sensor metadata a GeoTIFF carries per band, in the ENVI convention GDAL writes (and EnMAP L2A products hold).

Per band, the GDAL metadata items ``wavelength`` (the band centre), ``fwhm`` (its width), ``wavelength_units``
(``Nanometers`` or ``Micrometers``; a dataset-level item of that name holds for every band; nanometres when
neither is given) and ``bbl`` (the bad-band-list flag: 1 good, 0 bad); without a ``wavelength`` item, a band
description ending in ``(418.24 Nanometers)`` gives the centre. Centres are kept in file order and need not
rise (EnMAP's VNIR runs to ~993 nm, its SWIR restarts near 902 nm).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from c2seg.data_prep.readers.base import SceneError

NM_PER_UNIT = {"nanometers": 1.0, "nanometer": 1.0, "nm": 1.0, "micrometers": 1000.0, "micrometer": 1000.0,
               "um": 1000.0, "µm": 1000.0, "microns": 1000.0}
_DESCRIPTION = re.compile(r"\(\s*([-+0-9.eE]+)\s*([A-Za-zµ]+)\s*\)\s*$")


@dataclass(frozen=True)
class BandMeta:
    """What a raster file says of its bands: sample type, nodata value, and (when every band carries them)
    centres and widths in nm; ``bad_bands``: 0-based bands its ``bbl`` flags bad."""

    dtype: str
    nodata: float | None
    wavelengths_nm: tuple[float, ...] | None = None
    fwhm_nm: tuple[float, ...] | None = None
    bad_bands: tuple[int, ...] = ()


def _number(path: Path, band: int, key: str, text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise SceneError(f"{path}: band {band} metadata {key} '{text}' is not a number") from None


def _nm_per_unit(path: Path, band: int, units: str) -> float:
    scale = NM_PER_UNIT.get(units.strip().lower())
    if scale is None:
        raise SceneError(f"{path}: band {band} wavelength_units '{units}' is not one of Nanometers, Micrometers")
    return scale


def _centre_and_width(path: Path, band: int, tags: dict[str, str], description: str | None,
                      units: str) -> tuple[float | None, float | None]:
    """Band ``band``'s (1-based) centre and width in nm from its metadata items, else its description."""
    units = tags.get("wavelength_units", units)
    centre = tags.get("wavelength")
    match = _DESCRIPTION.search(description or "") if centre is None else None
    if match:
        centre, units = match.groups()
    if centre is None:
        return None, None
    scale = _nm_per_unit(path, band, units)
    width = tags.get("fwhm")
    return (_number(path, band, "wavelength", centre) * scale,
            None if width is None else _number(path, band, "fwhm", width) * scale)


def read_band_meta(ds, path: Path) -> BandMeta:
    """The :class:`BandMeta` of an open rasterio dataset ``ds`` (read from ``path``)."""
    units = {k.lower(): v for k, v in ds.tags().items()}.get("wavelength_units", "Nanometers")
    centres, widths, bad = [], [], []
    for band in range(1, ds.count + 1):
        tags = {k.lower(): v for k, v in ds.tags(band).items()}
        centre, width = _centre_and_width(path, band, tags, ds.descriptions[band - 1], units)
        centres.append(centre)
        widths.append(width)
        if "bbl" in tags and _number(path, band, "bbl", tags["bbl"]) == 0:
            bad.append(band - 1)
    return BandMeta(dtype=ds.dtypes[0], nodata=ds.nodata,
                    wavelengths_nm=None if None in centres else tuple(round(c, 4) for c in centres),
                    fwhm_nm=None if None in widths else tuple(round(w, 4) for w in widths),
                    bad_bands=tuple(bad))
