"""Generated cities: a fair stand-in for the C2Seg data, in every release format.

``generate_dataset(spec, height, width, seed=0, fmt=None, shift="default")`` writes every city of
``spec`` under its data root, with the domain-shift profile ``shift`` (data_prep.synth.domain). The
land cover, spectra, radar and the domain shift between cities are described in docs/demo-data.md.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

from c2seg.errors import C2SegError
from c2seg.spec import City, DatasetSpec, SceneFormat
from c2seg.data_prep.synth.city import BLOCK_PX, CitySynth
from c2seg.data_prep.synth.writers import (city_tiles, tile_cache_blocks, write_geotiff, write_mat_v5, write_mat_v73,
                                     write_tiles)

log = logging.getLogger("c2seg.synth")


def default_files(spec: DatasetSpec, city: City, fmt: SceneFormat) -> dict[str, str]:
    """The file layout ``generate_dataset(..., fmt=...)`` uses for ``city``."""
    n = city.name
    if fmt == "geotiff":
        files = {m.name: f"{n}/{m.name}.tif" for m in spec.modalities}
        return files | ({"label": f"{n}/label.tif"} if city.labelled else {})
    if fmt == "mat_v5":
        return {"scene": f"{n}.mat"}
    if fmt == "mat_v73":
        return {"scene": f"{n}.mat"} | ({"label": f"{n}_label.mat"} if city.labelled else {})
    return {"root": n}


def with_format(spec: DatasetSpec, fmt: SceneFormat) -> DatasetSpec:
    """``spec`` with every city in format ``fmt`` and its default file layout."""
    cities = tuple(replace(c, format=fmt, files=default_files(spec, c, fmt), splits=None, columns=None)
                   for c in spec.cities)
    return replace(spec, cities=cities)


def _geotiff_keys(spec: DatasetSpec, city: City) -> list[str]:
    return [m.name for m in spec.modalities] + (["label"] if city.labelled else [])


def city_outputs(spec: DatasetSpec, city: City) -> list[Path]:
    """The files (or tile folder) a generated city consists of; a missing ``files`` entry is a KeyError
    naming it (:meth:`DatasetSpec.resolve`)."""
    if city.format == "geotiff":
        return [spec.resolve(city, k) for k in _geotiff_keys(spec, city)]
    if city.format == "tiles":
        return [spec.resolve(city, "root")]
    keys = ["scene"] + (["label"] if city.format == "mat_v73" and city.labelled else [])
    return [spec.resolve(city, k) for k in keys]


def generate_city(spec: DatasetSpec, city: City, height: int, width: int, seed: int = 0,
                  shift: str = "default") -> None:
    """Write one generated city in its format (files named by ``city.files``) under shift profile ``shift``."""
    cache = tile_cache_blocks(width, BLOCK_PX) if city.format == "tiles" else 0
    synth = CitySynth(spec, city, height, width, seed, cache_blocks=cache, shift=shift)
    if city.format == "geotiff":
        write_geotiff(synth, {k: spec.resolve(city, k) for k in _geotiff_keys(spec, city)})
    elif city.format == "mat_v5":
        write_mat_v5(synth, spec.resolve(city, "scene"), with_label=city.labelled)
    elif city.format == "mat_v73":
        write_mat_v73(synth, spec.resolve(city, "scene"), spec.resolve(city, "label") if city.labelled else None)
    else:
        write_tiles(synth, spec.resolve(city, "root"), with_label=city.labelled)
        log.info("%s: %d tiles of %d px", city.name, len(city_tiles(synth)), spec.tiling.size)


def generate_dataset(spec: DatasetSpec, height: int, width: int, seed: int = 0, fmt: SceneFormat | None = None,
                     overwrite: bool = False, shift: str = "default") -> DatasetSpec:
    """Write every city of ``spec`` under ``spec.data_root`` at ``height`` x ``width`` px, deterministic
    by ``seed``, with domain-shift profile ``shift``. ``fmt`` overrides the cities' format with
    :func:`default_files`; the spec that reads the result is returned. Cities whose files all exist are kept
    unless ``overwrite``."""
    if height < 16 or width < 16:
        raise C2SegError(f"generated cities need at least 16 x 16 px, got {height} x {width}")
    if fmt is not None:
        spec = with_format(spec, fmt)
    lists = [c.name for c in spec.cities if c.format == "filelist"]
    if lists:
        raise C2SegError(f"{spec.source_file or spec.name}: cities {lists} are file lists (format: filelist), which "
                         "are not generated: generate the spec's cities in a release format (--format tiles)")
    for city in spec.cities:
        outputs = city_outputs(spec, city)
        if not overwrite and all(p.exists() for p in outputs):
            log.info("%s: %s exists, kept (overwrite to regenerate)", city.name, outputs[0])
            continue
        log.info("%s (%s): generating %d x %d px as %s under %s", city.name, city.role, height, width, city.format,
                 spec.data_root)
        generate_city(spec, city, height, width, seed, shift)
    return spec


__all__ = ["CitySynth", "city_outputs", "default_files", "generate_city", "generate_dataset", "with_format"]
