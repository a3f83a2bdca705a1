"""Scene readers for every release format, behind one interface (:class:`Scene`).

``open_city(spec, name)`` returns the scenes of a city: one for full-scene formats (GeoTIFF stacks,
MATLAB v5, MATLAB v7.3 / HDF5), one per tile for the challenge tile folders.
"""

from __future__ import annotations

from c2seg.spec import DatasetSpec
from data_prep.readers.base import Scene, SceneError, Window, iter_windows
from data_prep.readers.geotiff import GeoTiffScene, open_geotiff_city
from data_prep.readers.mat import MatV5Scene, MatV73Scene, open_mat_v5_city, open_mat_v73_city
from data_prep.readers.tiles import open_tile_city

OPENERS = {
    "geotiff": open_geotiff_city,
    "mat_v5": open_mat_v5_city,
    "mat_v73": open_mat_v73_city,
    "tiles": open_tile_city,
}


def open_city(spec: DatasetSpec, city_name: str) -> list[Scene]:
    """Open every scene of city ``city_name``, checked against ``spec``; raises :class:`SceneError`."""
    city = spec.city(city_name)
    return OPENERS[city.format](spec, city)


__all__ = ["GeoTiffScene", "MatV5Scene", "MatV73Scene", "Scene", "SceneError", "Window", "iter_windows",
           "open_city"]
