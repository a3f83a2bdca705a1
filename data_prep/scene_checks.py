"""Checks of opened scenes against what the spec declares beyond band counts and shapes: the pixel size of
the grid (``grid_resolution_m``) and the band centres the files carry (``wavelengths_nm``).

``c2seg data inspect`` reports every such problem (exit 1); ``c2seg data prep`` refuses the first one
(:func:`require_matching`), before any work. Scenes without georeference (``.mat`` cities without ``crs``, a
GeoTIFF without a CRS) and files without band centres are not checked.
"""

from __future__ import annotations

import math

from rasterio.crs import CRS

from c2seg.spec import DatasetSpec, Modality
from c2seg.data_prep.readers.base import Scene, SceneError
from c2seg.data_prep.readers.sensor import BandMeta

GRID_TOLERANCE = 0.01  # relative, for projected CRSs (UTM's scale factor stays within 0.1 % .. 1 %)
GEOGRAPHIC_GRID_TOLERANCE = 0.10  # relative, for degree grids (spherical Earth; latitude varies over a scene)
EARTH_RADIUS_M = 6371008.8  # mean Earth radius (IUGG)
MIN_WAVELENGTH_TOLERANCE_NM = 2.0


def pixel_size_m(scene: Scene) -> tuple[float, float, float | None]:
    """The scene's east-west and north-south pixel size in metres, and the latitude (degrees) they hold at
    when its CRS is geographic (None when projected). A geographic pixel of ``a`` x ``e`` degrees at the
    scene's centre latitude ``phi`` spans ``a * pi / 180 * R * cos(phi)`` m east-west and ``e * pi / 180 * R``
    m north-south, on a sphere of the mean Earth radius ``R`` = 6371008.8 m."""
    crs = CRS.from_user_input(scene.crs)
    a, e = abs(scene.transform.a), abs(scene.transform.e)
    if crs.is_geographic:
        lat = (scene.transform @ (scene.width / 2, scene.height / 2))[1]
        metres_per_degree = math.pi / 180 * EARTH_RADIUS_M
        return a * metres_per_degree * math.cos(math.radians(lat)), e * metres_per_degree, lat
    factor = crs.linear_units_factor[1]
    return a * factor, e * factor, None


def grid_problem(spec: DatasetSpec, scene: Scene) -> str | None:
    """The scene's pixel size against ``grid_resolution_m``, beyond :data:`GRID_TOLERANCE` (projected CRS)
    or :data:`GEOGRAPHIC_GRID_TOLERANCE` (degrees, converted by :func:`pixel_size_m`); None when it matches or
    the scene has no CRS."""
    if not scene.crs:
        return None
    x, y, lat = pixel_size_m(scene)
    res = spec.grid_resolution_m
    tolerance = GRID_TOLERANCE if lat is None else GEOGRAPHIC_GRID_TOLERANCE
    if max(abs(x / res - 1), abs(y / res - 1)) <= tolerance:
        return None
    setting = f"grid_resolution_m {res:g} of {spec.source_file or f'spec {spec.name!r}'}"
    if lat is None:
        return (f"{scene.path}: pixel size {x:.6g} x {y:.6g} m ({scene.crs}) differs from the {setting} by more "
                f"than {tolerance:.0%}")
    t = scene.transform
    return (f"{scene.path}: the grid is in degrees ({scene.crs}): pixels of {abs(t.a):.6g} x {abs(t.e):.6g} deg "
            f"span {x:.4g} x {y:.4g} m at latitude {lat:.2f}, which differs from the {setting} by more than "
            f"{tolerance:.0%} (reproject the files to a projected CRS such as UTM, or set grid_resolution_m)")


def wavelength_problem(m: Modality, meta: BandMeta, path) -> str | None:
    """The files' band centres against the spec's ``wavelengths_nm``: a band differs when its centres lie
    further apart than half its width (the spec's ``bandwidths_nm``, else the file's ``fwhm``), at least
    :data:`MIN_WAVELENGTH_TOLERANCE_NM`; names the first such band and counts the others."""
    if m.wavelengths_nm is None or meta.wavelengths_nm is None:
        return None
    widths = m.bandwidths_nm or meta.fwhm_nm or (0.0,) * m.bands
    tolerances = [max(MIN_WAVELENGTH_TOLERANCE_NM, w / 2) for w in widths]
    off = [i for i, (f, s, tol) in enumerate(zip(meta.wavelengths_nm, m.wavelengths_nm, tolerances))
           if abs(f - s) > tol]
    if not off:
        return None
    i = off[0]
    more = f"; {len(off) - 1} other band(s) differ too" if len(off) > 1 else ""
    return (f"{path}: modality '{m.name}', {m.file_band_label(i)}: the file's centre {meta.wavelengths_nm[i]:g} nm "
            f"differs from the spec's wavelengths_nm {m.wavelengths_nm[i]:g} nm by more than {tolerances[i]:g} nm"
            f"{more} (`c2seg data inspect` prints the files' wavelengths)")


def scene_problems(spec: DatasetSpec, scene: Scene) -> list[str]:
    """Every grid and band-centre problem of one scene, one line each."""
    problems = [grid_problem(spec, scene)]
    problems += [wavelength_problem(spec.modality(name), meta, scene.file_of(name))
                 for name, meta in scene.band_meta.items()]
    return [p for p in problems if p]


def require_matching(spec: DatasetSpec, scenes: list[Scene]) -> None:
    """Raise :class:`SceneError` with the first problem of :func:`scene_problems` among ``scenes``."""
    for scene in scenes:
        problems = scene_problems(spec, scene)
        if problems:
            raise SceneError(problems[0])
