"""Write a generated city in a release format, block by block.

GeoTIFF, MATLAB v7.3 (HDF5) and tile folders are written window by window, so memory stays bounded
(one block of 256 px x all bands, plus, for tiles, two rows of blocks). MATLAB v5 cannot be written by
parts: the whole city is assembled in memory, and a v5 variable cannot exceed 2 GiB (e.g. 242 float32
bands: about 1500 x 1500 px); larger cities need mat_v73 or geotiff. Every file is written under a
temporary name and renamed when complete (``c2seg.io``), so an interrupted run never leaves a file that looks
done.
"""

from __future__ import annotations

import math
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine
from tqdm import tqdm

from c2seg.errors import C2SegError
from c2seg.io import atomic_dir, atomic_path
from c2seg.spec import DatasetSpec
from c2seg.raster import Window
from c2seg.data_prep.synth.city import CitySynth
from c2seg.data_prep.tiling import tile_origins

MAT_V5_MAX_BYTES = 2**31 - 1
DEFAULT_CRS = "EPSG:32632"


def label_codes(spec: DatasetSpec, labels: np.ndarray) -> np.ndarray:
    """Labels as stored: class ids, or the spec's raw codes when it has a ``label_remap`` (the release
    then stores raw codes; nodata codes stand for ``ignore_id``)."""
    remap = spec.label_remap
    if remap is None:
        return labels
    lut = np.zeros(256, dtype=np.int16)
    lut[spec.ignore_id] = remap.nodata_codes[0] if remap.nodata_codes else spec.ignore_id
    for raw, cid in sorted(remap.codes.items(), reverse=True):
        lut[cid] = raw
    return lut[labels]


def city_transform(spec: DatasetSpec, synth: CitySynth) -> tuple[Affine, str]:
    """Grid transform and CRS of a generated city: its ``crs`` / ``origin`` when the spec gives them."""
    x0, y0 = synth.city.origin or (500000.0 + 200000.0 * synth.city_index, 5400000.0)
    res = spec.grid_resolution_m
    return Affine(res, 0.0, x0, 0.0, -res, y0), synth.city.crs or DEFAULT_CRS


def _in_place(path: Path) -> Path:
    """``path``, with its folder created."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def write_geotiff(synth: CitySynth, files: dict[str, Path]) -> None:
    """One tiled GeoTIFF per modality (coarse modalities at their resolution) plus the label; every file is
    renamed into place once all are written."""
    spec = synth.spec
    keys = [m.name for m in spec.modalities] + (["label"] if "label" in files else [])
    with ExitStack() as renames:
        tmps = {key: renames.enter_context(atomic_path(_in_place(files[key]))) for key in keys}
        with ExitStack() as datasets:
            outputs = {key: datasets.enter_context(_open_geotiff(synth, key, tmps[key])) for key in keys}
            _write_geotiff_blocks(synth, outputs)


def _open_geotiff(synth: CitySynth, key: str, path: Path):
    spec = synth.spec
    transform, crs = city_transform(spec, synth)
    if key == "label":
        dtype = "int16" if spec.label_remap else "uint8"
        return rasterio.open(path, "w", driver="GTiff", height=synth.height, width=synth.width, count=1,
                             dtype=dtype, crs=crs, transform=transform, tiled=True, blockxsize=256, blockysize=256)
    m = spec.modality(key)
    h, w = synth.native_shape(key)
    return rasterio.open(path, "w", driver="GTiff", height=h, width=w, count=m.bands, dtype=m.dtype, crs=crs,
                         transform=transform @ Affine.scale(synth.factors[key]), tiled=True, blockxsize=256,
                         blockysize=256, interleave="pixel", BIGTIFF="IF_SAFER", nodata=m.nodata)


def _write_geotiff_blocks(synth: CitySynth, outputs: dict) -> None:
    spec = synth.spec
    blocks = synth.blocks()
    for b in tqdm(blocks, desc=f"generate {synth.city.name} (geotiff)", unit="block", leave=False):
        data = synth.block(b)
        for key, ds in outputs.items():
            f = 1 if key == "label" else synth.factors[key]
            arr = label_codes(spec, data["label"])[None] if key == "label" else data[key]
            win = rasterio.windows.Window(b.col // f, b.row // f, arr.shape[2], arr.shape[1])
            ds.write(arr.astype(ds.dtypes[0], copy=False), window=win)


def write_mat_v5(synth: CitySynth, path: Path, with_label: bool) -> None:
    """One MATLAB v5 file (H x W x C arrays under each modality's mat key, plus ``label``)."""
    from scipy.io import savemat

    spec = synth.spec
    for m in spec.modalities:
        h, w = synth.native_shape(m.name)
        size = h * w * m.bands * np.dtype(m.dtype).itemsize
        if size > MAT_V5_MAX_BYTES:
            raise C2SegError(f"{path}: modality '{m.name}' would be {size / 2**30:.1f} GiB, over MATLAB v5's 2 GiB "
                             f"per variable; generate this size as mat_v73 or geotiff (--format)")
    arrays = {m.key_in_mat: np.zeros((*synth.native_shape(m.name), m.bands), dtype=m.dtype) for m in spec.modalities}
    label = np.zeros((synth.height, synth.width), np.int16 if spec.label_remap else np.uint8)
    for b in tqdm(synth.blocks(), desc=f"generate {synth.city.name} (mat_v5)", unit="block", leave=False):
        data = synth.block(b)
        label[b.slices] = label_codes(spec, data["label"])
        for m in spec.modalities:
            f, arr = synth.factors[m.name], data[m.name]
            arrays[m.key_in_mat][b.row // f:b.row // f + arr.shape[1], b.col // f:b.col // f + arr.shape[2]] = \
                arr.transpose(1, 2, 0)
    if with_label:
        arrays["label"] = label
    with atomic_path(_in_place(path)) as tmp:
        savemat(tmp, arrays, do_compression=False, appendmat=False)


def _mat73_file(path: Path):
    """An HDF5 file with MATLAB's 512-byte v7.3 header in its user block."""
    import h5py

    return h5py.File(path, "w", userblock_size=512)


def _mat73_header(path: Path) -> None:
    text = f"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: {time.strftime('%a %b %d %H:%M:%S %Y')} " \
           "HDF5 schema 1.00 ."
    header = text.encode().ljust(116, b" ") + b"\x00" * 8 + b"\x00\x02" + b"IM"
    with open(path, "r+b") as fh:
        fh.write(header)


def write_mat_v73(synth: CitySynth, scene_path: Path, label_path: Path | None) -> None:
    """A MATLAB v7.3 scene file and a separate label file; arrays stored transposed (C x W x H) as
    MATLAB does, chunked, written block by block."""
    spec = synth.spec
    with ExitStack() as renames:
        tmp_scene = renames.enter_context(atomic_path(_in_place(scene_path)))
        tmp_label = renames.enter_context(atomic_path(_in_place(label_path))) if label_path else None
        with ExitStack() as files:
            h5 = files.enter_context(_mat73_file(tmp_scene))
            datasets = {}
            for m in spec.modalities:
                h, w = synth.native_shape(m.name)
                ds = h5.create_dataset(m.key_in_mat, shape=(m.bands, w, h), dtype=m.dtype,
                                       chunks=(min(m.bands, 16), min(w, 128), min(h, 128)))
                ds.attrs["MATLAB_class"] = np.bytes_("single" if m.dtype == "float32" else "double")
                datasets[m.name] = ds
            if tmp_label is not None:
                label_file = files.enter_context(_mat73_file(tmp_label))
                datasets["label"] = label_file.create_dataset(
                    "label", shape=(synth.width, synth.height), chunks=(min(synth.width, 256), min(synth.height, 256)),
                    dtype="float64" if spec.label_remap else "uint8")
                datasets["label"].attrs["MATLAB_class"] = np.bytes_("double" if spec.label_remap else "uint8")
            for b in tqdm(synth.blocks(), desc=f"generate {synth.city.name} (mat_v73)", unit="block", leave=False):
                data = synth.block(b)
                for key, ds in datasets.items():
                    if key == "label":
                        ds[b.col:b.col + b.width, b.row:b.row + b.height] = label_codes(spec, data["label"]).T
                        continue
                    f, arr = synth.factors[key], data[key]
                    ds[:, b.col // f:b.col // f + arr.shape[2], b.row // f:b.row // f + arr.shape[1]] = \
                        arr.transpose(0, 2, 1)
        for tmp in (tmp_scene, tmp_label):
            if tmp is not None:
                _mat73_header(tmp)


def tile_windows(height: int, width: int, size: int, stride: int) -> list[Window]:
    """Tiles of ``size`` px every ``stride`` px, row-major, the last row / column flush with the edge (prep's
    tile origins; one tile at 0 on an axis shorter than ``size``)."""
    rows, cols = tile_origins(height, size, stride) or [0], tile_origins(width, size, stride) or [0]
    return [Window(r, c, min(size, height), min(size, width)) for r in rows for c in cols]


def city_tiles(synth: CitySynth) -> list[Window]:
    """The tile grid of a generated tile city: overlapping (spec stride) for sources like the challenge's
    train folder, edge to edge for targets like its test folder. Tile ``N`` is the N-th (from 1)."""
    size = synth.spec.tiling.size
    stride = synth.spec.tiling.stride if synth.city.role == "source" else size
    return tile_windows(synth.height, synth.width, size, stride)


def tile_cache_blocks(width: int, block_px: int) -> int:
    """Blocks to cache while cutting tiles row by row: two rows of blocks."""
    return 2 * math.ceil(width / block_px) + 2


def write_tiles(synth: CitySynth, root: Path, with_label: bool) -> None:
    """The challenge layout ``root/{modality,label}/N.tiff``; every modality on the grid. Give
    ``synth`` a block cache of two block rows (:func:`tile_cache_blocks`) or blocks are recomputed."""
    spec = synth.spec
    transform, crs = city_transform(spec, synth)
    keys = [m.name for m in spec.modalities] + (["label"] if with_label else [])
    folders = {m.name: m.folder_in_tiles for m in spec.modalities} | {"label": "label"}
    with atomic_dir(_in_place(root)) as tmp:
        for key in keys:
            (tmp / folders[key]).mkdir()
        for n, t in enumerate(tqdm(city_tiles(synth), desc=f"generate {synth.city.name} (tiles)", unit="tile",
                                   leave=False), start=1):
            data = synth.render(t)
            for key in keys:
                arr = label_codes(spec, data["label"])[None] if key == "label" else data[key]
                dtype = ("int16" if spec.label_remap else "uint8") if key == "label" else spec.modality(key).dtype
                with rasterio.open(tmp / folders[key] / f"{n}.tiff", "w", driver="GTiff", height=t.height,
                                   width=t.width, count=arr.shape[0], dtype=dtype, crs=crs,
                                   transform=transform @ Affine.translation(t.col, t.row)) as ds:
                    ds.write(arr.astype(dtype, copy=False))
