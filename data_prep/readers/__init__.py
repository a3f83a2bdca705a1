"""Scene readers for every release format, behind one interface (:class:`Scene`).

``open_city(spec, name)`` returns the scenes of a city: one for full-scene formats (GeoTIFF stacks,
MATLAB v5, MATLAB v7.3 / HDF5), one per tile for the challenge tile folders, one per chip for file lists.
Each scene's ``split`` is the split given for it: ``test`` for every scene of a test city, a filelist chip's
split file, else None (prep splits it by held-out blocks).
"""

from __future__ import annotations

from pathlib import Path

from c2seg.io import similar_files
from c2seg.spec import City, DatasetSpec
from c2seg.raster import Window, iter_windows
from c2seg.data_prep.readers.base import Scene, SceneError
from c2seg.data_prep.readers.filelist import open_filelist_city
from c2seg.data_prep.readers.geotiff import GeoTiffScene, open_geotiff_city
from c2seg.data_prep.readers.mat import MatV5Scene, MatV73Scene, open_mat_v5_city, open_mat_v73_city
from c2seg.data_prep.readers.tiles import open_tile_city

OPENERS = {
    "geotiff": open_geotiff_city,
    "mat_v5": open_mat_v5_city,
    "mat_v73": open_mat_v73_city,
    "tiles": open_tile_city,
    "filelist": open_filelist_city,
}


def open_city(spec: DatasetSpec, city_name: str, split: str | None = None) -> list[Scene]:
    """Open every scene of city ``city_name`` (those given ``split`` only, when not None), checked against
    ``spec``; raises :class:`SceneError`."""
    city = spec.city(city_name)
    if city.format != "filelist":  # a file list's patterns name no file; its reader checks each chip's
        for key in city.files:
            if key != "label" or city.labelled:  # an unlabelled city's label file is never read
                _require_entry(spec, city, key)
    scenes = OPENERS[city.format](spec, city)
    if city.role == "test":
        for scene in scenes:
            scene.split = "test"
    if split is None:
        return scenes
    chosen = [s for s in scenes if s.split == split]
    if not chosen:
        given = sorted({str(s.split) for s in scenes})
        raise SceneError(f"city '{city_name}' has no scene in split '{split}' (the splits given for its scenes: "
                         f"{', '.join(given)}; a split is given by a test city's role or a filelist's splits)")
    return chosen


def _require_entry(spec: DatasetSpec, city: City, key: str) -> None:
    """Raise :class:`SceneError` when the file (or tile folder) of ``city.files[key]`` does not exist, naming
    the similarly named files under the data root (:func:`c2seg.io.similar_files`) that no entry of the spec
    names: the file the entry may have meant."""
    path = spec.resolve(city, key)
    if path.exists():
        return
    root = Path(spec.data_root).resolve()
    what = "folder" if city.format == "tiles" else "file"
    if not root.is_dir():
        raise SceneError(f"{path}: {what} not found, and the data root {root} does not exist (set data_root in "
                         f"{spec.source_file or 'the spec'} or pass --data-root)")
    named = {spec.resolve(c, k) for c in spec.cities for k in c.files}  # files other entries already name
    found = similar_files(root, path.name, skip=named)[:3]
    if not found:
        raise SceneError(f"{path}: {what} not found")
    setting = f"cities.{city.name}.files.{key}"
    fix = f"set {setting}: {found[0]}" if len(found) == 1 else f"set {setting} to the right one"
    raise SceneError(f"{path}: {what} not found; the data root {root} holds {', '.join(found)}: {fix}"
                     f"{f' in {spec.source_file}' if spec.source_file else ''}")


__all__ = ["GeoTiffScene", "MatV5Scene", "MatV73Scene", "Scene", "SceneError", "Window", "iter_windows",
           "open_city"]
