"""The challenge tile release: ``root/{msi,hsi,sar[,label]}/N.tiff``, one scene per tile named ``N``.

Each tile is a small GeoTIFF stack read by :class:`~data_prep.readers.geotiff.GeoTiffScene`. Every
modality folder must hold the same tile names; a label folder is required when the city is labelled.
"""

from __future__ import annotations

from pathlib import Path

from c2seg.spec import City, DatasetSpec
from c2seg.data_prep.readers.base import SceneError
from c2seg.data_prep.readers.geotiff import GeoTiffScene

TILE_SUFFIXES = (".tiff", ".tif")


def _tile_files(folder: Path) -> dict[str, Path]:
    if folder.is_file():
        raise SceneError(f"{folder}: is a file, expected a folder of tiles (N.tiff)")
    if not folder.is_dir():
        raise SceneError(f"{folder}: tile folder not found")
    return {p.stem: p for p in folder.iterdir() if p.suffix.lower() in TILE_SUFFIXES}


def _tile_order(name: str) -> tuple:
    return (0, int(name), "") if name.isdigit() else (1, 0, name)


def open_tile_city(spec: DatasetSpec, city: City) -> list[GeoTiffScene]:
    """One scene per tile of ``root``, in numeric order of the tile names."""
    root = spec.resolve(city, "root")
    folders = {m.name: root / m.folder_in_tiles for m in spec.modalities}
    if city.labelled:
        folders["label"] = root / "label"
    tiles = {key: _tile_files(folder) for key, folder in folders.items()}
    names = set().union(*(set(t) for t in tiles.values()))
    for key, found in tiles.items():
        missing = sorted(names - set(found), key=_tile_order)
        if missing:
            raise SceneError(f"{folders[key]}: tiles {missing[:10]}{' ...' if len(missing) > 10 else ''} are missing "
                             f"here but present in other folders of {root}")
    if not names:
        raise SceneError(f"{root}: no tiles (*.tiff) in {sorted(str(f) for f in folders.values())}")
    return [GeoTiffScene(spec, city, name, {key: tiles[key][name] for key in tiles})
            for name in sorted(names, key=_tile_order)]
