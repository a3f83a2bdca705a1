"""Scene outputs made from a finished :class:`~inference.accumulator.BlockStore`: the class-map COG,
the optional per-class probability GeoTIFF, the quicklook PNG and, for tile-folder cities, the
challenge submission tile (one uint8 ``N.tif`` per input tile). Every class map declares the spec's
``output_nodata`` (its ignore id) as nodata."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import rasterio
from rasterio.windows import Window as RioWindow

from c2seg.errors import C2SegError
from c2seg.spec import DatasetSpec
from c2seg.data_prep.readers.base import Scene
from c2seg.inference.accumulator import BlockStore
from c2seg.inference.cog import class_colormap, write_class_cog
from c2seg.inference.windows import block_grid

QUICKLOOK_PX = 1024


def write_class_map(store: BlockStore, scene: Scene, spec: DatasetSpec, path: Path, blocksize: int = 512) -> Path:
    """The scene's class map as a COG with the scene's CRS and transform."""
    blocks = block_grid(scene.height, scene.width, store.block)
    return write_class_cog(path, scene.height, scene.width, scene.crs, scene.transform, blocks,
                           lambda b: store.classes[b.slices], spec, blocksize)


def write_probabilities(store: BlockStore, scene: Scene, spec: DatasetSpec, path: Path) -> Path:
    """Blended probabilities (one float32 band per scored class) as a tiled GeoTIFF."""
    if store.probs is None:
        raise C2SegError(f"{store.path}: probabilities were not kept (run with --save-probs)")
    class_ids = store.group.attrs["class_ids"]
    profile = {"driver": "GTiff", "height": scene.height, "width": scene.width, "count": len(class_ids),
               "dtype": "float32", "crs": scene.crs, "transform": scene.transform, "tiled": True,
               "blockxsize": 256, "blockysize": 256, "compress": "deflate", "predictor": 3, "BIGTIFF": "IF_SAFER",
               "interleave": "band"}
    with rasterio.open(path, "w", **profile) as dst:
        for b in block_grid(scene.height, scene.width, store.block):
            rows, cols = b.slices
            dst.write(store.probs[:, rows, cols], window=RioWindow(b.col, b.row, b.width, b.height))
        for i, c in enumerate(class_ids, 1):
            dst.set_band_description(i, f"p({c}: {spec.class_name(c)})")
    return path


def write_quicklook(store: BlockStore, scene: Scene, spec: DatasetSpec, path: Path, max_px: int = QUICKLOOK_PX) -> Path:
    """A colour PNG of the class map, subsampled to at most ``max_px`` on its longest side."""
    import matplotlib.image

    step = max(1, -(-max(scene.height, scene.width) // max_px))
    small = store.classes[::step, ::step]  # zarr reads chunk by chunk: memory stays bounded
    lut = np.zeros((256, 4), np.uint8)
    for cid, rgba in class_colormap(spec).items():
        lut[cid] = rgba
    matplotlib.image.imsave(path, lut[small])
    return path


def write_submission_tile(store: BlockStore, scene: Scene, spec: DatasetSpec, folder: Path) -> Path:
    """``folder/<tile name>.tif``: the tile's class map, uint8, nodata the spec's ``output_nodata``, the tile's
    georeferencing."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{scene.name}.tif"
    profile = {"driver": "GTiff", "height": scene.height, "width": scene.width, "count": 1, "dtype": "uint8",
               "crs": scene.crs, "transform": scene.transform, "nodata": spec.output_nodata,
               "compress": "deflate"}
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(store.classes[:, :][None])
    return path

