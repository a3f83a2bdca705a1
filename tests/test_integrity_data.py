"""Issue 18, "trust nothing on disk": hostile files (made here, real Zarr / GeoTIFF) fail with one line
naming the file, array or chunk: checksummed zarr chunks and ``data verify --all-chunks``; ``infer check-cog``
on truncated and damaged COGs, and COG writes that fail without leaving files."""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
import zarr
from affine import Affine
from zarr.codecs import Crc32cCodec

from c2seg.cli import main
from c2seg.data_prep.loaders import ZarrTileDataset
from c2seg.data_prep.manifest import load_manifest
from c2seg.data_prep.shards import iter_samples
from c2seg.data_prep.verify import verify
from c2seg.data_prep.zarr_store import ChunkError
from c2seg.inference.cog import write_class_cog
from c2seg.inference.windows import block_grid

CITY, SPLIT = "synth_source", "train"
ROOT = Path(__file__).resolve().parent.parent


# ---- zarr chunks carry checksums ------------------------------------------------------------------
def _groups(prep: Path) -> dict[Path, bool]:
    """Every zarr group of ``prep`` and whether it is labelled."""
    m = load_manifest(prep)
    return {prep / sp["zarr"]: sp["labelled"] for c in m.cities.values() for sp in c["splits"].values()}


def _train_group(prep: Path) -> Path:
    return prep / load_manifest(prep).cities[CITY]["splits"][SPLIT]["zarr"]


def _slots_in_shard_order(prep: Path) -> list[int]:
    """The tile slots of the first train shard of CITY, in stored order."""
    shard = load_manifest(prep).shards(SPLIT, [CITY])[0]
    return [int(key.rsplit("-", 1)[-1]) for key, _ in iter_samples(shard.path)]


def _flip_byte_in_chunk(group: Path, array: str, slot: int) -> str:
    """Flip the middle byte of the chunk file of tile ``slot``; its chunk key."""
    key = f"c/{slot}/0/0/0" if array != "label" else f"c/{slot}/0/0"
    chunk = group / array / key
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    return key


@pytest.fixture
def prep_copy(tiny_prepared, tmp_path) -> Path:
    out = tmp_path / "prep"
    shutil.copytree(tiny_prepared, out)
    return out


def test_prep_writes_a_crc32c_checksum_on_every_array(tiny_prepared):
    groups = _groups(tiny_prepared)
    assert list(groups.values()).count(False) == 1  # synth_target's train split has no labels
    for group, labelled in groups.items():
        g = zarr.open_group(group, mode="r")
        names = sorted(g.array_keys())
        assert names == ["hsi", "kept"] + ["label"] * labelled + ["msi", "sar", "scene", "windows"]
        for name in names:
            assert isinstance(g[name].compressors[-1], Crc32cCodec), f"{group}/{name}"


def test_verify_all_chunks_names_the_one_corrupt_chunk(prep_copy, capsys):
    group = _train_group(prep_copy)
    slot = _slots_in_shard_order(prep_copy)[-1]  # beyond the default sample of 2 per shard
    key = _flip_byte_in_chunk(group, "hsi", slot)
    problems = verify(prep_copy, all_chunks=True)
    expect = f"{group / 'hsi'}: chunk {key} is corrupt, it fails to decode (Stored and computed checksum do not match"
    assert len(problems) == 1 and problems[0].startswith(expect), problems
    assert main(["data", "verify", "--out", str(prep_copy), "--all-chunks"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"PROBLEM: {expect}") and out[1] == f"{prep_copy}: 1 problem(s)"


def test_verify_default_sample_names_a_corrupt_sampled_chunk(prep_copy):
    group = _train_group(prep_copy)
    key = _flip_byte_in_chunk(group, "label", _slots_in_shard_order(prep_copy)[0])
    problems = verify(prep_copy)
    assert len(problems) == 1 and problems[0].startswith(
        f"{group / 'label'}: chunk {key} is corrupt, it fails to decode (Stored and computed checksum"), problems


def test_training_read_of_a_corrupt_chunk_names_array_and_chunk(prep_copy):
    group = _train_group(prep_copy)
    slot = _slots_in_shard_order(prep_copy)[1]
    key = _flip_byte_in_chunk(group, "msi", slot)
    dataset = ZarrTileDataset(prep_copy, SPLIT, [CITY])
    item = dataset.index.index((CITY, slot))
    with pytest.raises(ChunkError, match=f"^{group / 'msi'}: chunk {key} is corrupt, it fails to decode"):
        dataset[item]


def test_batch_read_names_the_first_corrupt_chunk_run_by_run(prep_copy):
    """A batch read (one zarr request for all its tiles) fails on the first corrupt chunk in slot order (then
    array order), whatever the order of the batch: the same error as reading the tiles one run at a time."""
    group = _train_group(prep_copy)
    early, late = sorted(_slots_in_shard_order(prep_copy))[1:4:2]  # not adjacent: two runs
    key = _flip_byte_in_chunk(group, "msi", early)
    _flip_byte_in_chunk(group, "hsi", late)
    dataset = ZarrTileDataset(prep_copy, SPLIT, [CITY])
    batch = [dataset.index.index((CITY, slot)) for slot in (late, early)]
    with pytest.raises(ChunkError, match=f"^{group / 'msi'}: chunk {key} is corrupt, it fails to decode"):
        dataset.__getitems__(batch)


def _strip_checksums(group: Path) -> None:
    """Rewrite every array of ``group`` as a store written before the checksums (same values)."""
    g = zarr.open_group(group, mode="r+")
    for name in list(g.array_keys()):
        old = g[name]
        values = old[:]
        new = g.create_array(name, shape=old.shape, chunks=old.chunks, dtype=old.dtype, fill_value=old.fill_value,
                             compressors=[c for c in old.compressors if not isinstance(c, Crc32cCodec)],
                             dimension_names=old.metadata.dimension_names, overwrite=True)
        new[:] = values


def test_store_without_checksums_stays_readable_and_verify_says_so(tiny_prepared, prep_copy, caplog):
    for group in _groups(prep_copy):
        _strip_checksums(group)
    with caplog.at_level(logging.WARNING, logger="c2seg.prep"):
        assert verify(prep_copy, all_chunks=True) == []
    warned = [r.getMessage() for r in caplog.records if "carry no checksums" in r.getMessage()]
    assert warned == [f"{group}: arrays {['hsi', 'msi', 'sar'] + ['label'] * labelled + ['windows', 'scene', 'kept']} "
                      "carry no checksums (written before crc32c chunks): a corrupt chunk shows only where its "
                      "tile differs from the shards (--all-chunks compares every tile)"
                      for group, labelled in _groups(prep_copy).items()]
    old, new = ZarrTileDataset(prep_copy, SPLIT, [CITY])[3], ZarrTileDataset(tiny_prepared, SPLIT, [CITY])[3]
    assert old.keys() == new.keys() and all(np.array_equal(old[k], new[k]) for k in old)


# ---- COGs: validated by rio-cogeo plus a full read; written atomically ----------------------------
CMAP = np.random.default_rng(0).integers(0, 14, (300, 420)).astype(np.uint8)
GRID = (300, 420, "EPSG:32632", Affine(10, 0, 5e5, 0, -10, 5.4e6), block_grid(300, 420, 128))


def _cog(path: Path, spec, read_block=lambda b: CMAP[b.slices], blocksize: int = 128) -> Path:
    """A 300 x 420 px class-map COG with overviews at 1/2 and 1/4."""
    return write_class_cog(path, *GRID, read_block, spec, blocksize=blocksize)


def _check_cog_lines(capsys, *paths: Path) -> tuple[int, list[str]]:
    code = main(["infer", "check-cog", *map(str, paths)])
    return code, capsys.readouterr().out.splitlines()


def test_check_cog_fails_a_truncated_or_empty_file_with_one_line(tiny_spec, tmp_path, capsys):
    good = _cog(tmp_path / "good.tif", tiny_spec)
    cut, empty = tmp_path / "cut.tif", tmp_path / "empty.tif"
    cut.write_bytes(good.read_bytes()[:3000])
    empty.write_bytes(b"")
    code, lines = _check_cog_lines(capsys, good, cut, empty)
    assert code == 1 and len(lines) == 3, lines
    assert lines[0] == f"{good}: valid COG"
    assert lines[1].startswith(f"{cut}: NOT a valid COG: the data of the image cannot be read (truncated or "
                               "corrupt?): cut.tif, band 1: IReadBlock failed at X offset 0, Y offset 0")
    assert lines[2] == f"{empty}: NOT a valid COG: cannot be opened as a GeoTIFF ('{empty}' not recognized as " \
                       "being in a supported file format.)"


def test_check_cog_reads_the_overviews(tiny_spec, tmp_path, capsys):
    cog = _cog(tmp_path / "c.tif", tiny_spec)
    with rasterio.open(cog, overview_level=1) as ov:  # the 1/4 overview's first tile: zeroed
        offset, size = (int(ov.get_tag_item(f"BLOCK_{k}_0_0", "TIFF", bidx=1)) for k in ("OFFSET", "SIZE"))
    data = bytearray(cog.read_bytes())
    data[offset:offset + size] = bytes(size)
    cog.write_bytes(bytes(data))
    assert _check_cog_lines(capsys, cog) == (1, [
        f"{cog}: NOT a valid COG: the data of overview 1 cannot be read (truncated or corrupt?): IReadBlock failed "
        "at X offset 0, Y offset 0: TIFFReadEncodedTile() failed."])


def _fail_at_second_block(block):
    if block.row or block.col:
        raise RuntimeError("model failed")
    return CMAP[block.slices]


@pytest.mark.parametrize("stage, kwargs, error", [
    ("blocks", {"read_block": _fail_at_second_block}, "model failed"),
    ("COG copy", {"blocksize": 7}, 'Bad value 7 for "TileWidth" tag'),
])
def test_failed_cog_write_leaves_nothing_and_keeps_the_old_file(tiny_spec, tmp_path, stage, kwargs, error):
    old = _cog(tmp_path / "c.tif", tiny_spec)
    before = old.read_bytes()
    with pytest.raises(Exception, match=error):
        _cog(old, tiny_spec, **kwargs)
    assert [p.name for p in tmp_path.iterdir()] == ["c.tif"], stage
    assert old.read_bytes() == before


# ---- infer evaluate: hostile predictions and labels -------------------------------------------------
def _raster(path: Path, bands: np.ndarray, crs: str = GRID[2], transform: Affine = GRID[3]) -> Path:
    """A plain GeoTIFF of ``bands`` (C, H, W) in their dtype."""
    with rasterio.open(path, "w", driver="GTiff", height=bands.shape[1], width=bands.shape[2], count=len(bands),
                       dtype=bands.dtype, crs=crs, transform=transform) as ds:
        ds.write(bands)
    return path


def _truncate(path: Path) -> Path:
    path.write_bytes(path.read_bytes()[:3000])
    return path


def _outside_class_set(path: Path) -> Path:
    cmap = CMAP.copy()
    cmap[5, 7] = 200
    return _raster(path, cmap[None])


SHIFTED = Affine(10, 0, 5e5 + 10, 0, -10, 5.4e6)  # one pixel east of the truth's grid
HOSTILE = {  # name: (which file is hostile, how it is made, the problem after "<file>: ")
    "empty prediction": ("pred", lambda p, spec: p.write_bytes(b""),
                         "cannot be read as a raster (corrupt or truncated?): '{path}' not recognized as being in "
                         "a supported file format."),
    "truncated prediction": ("pred", lambda p, spec: _truncate(_cog(p, spec)),
                             "read failed at rows 0:300, cols 0:420 (corrupt or truncated?): c.tif, band 1: "
                             "IReadBlock failed at X offset 0, Y offset 0"),
    "empty labels": ("truth", lambda p, spec: p.write_bytes(b""),
                     "cannot be read as a raster (corrupt or truncated?): '{path}' not recognized as being in a "
                     "supported file format."),
    "truncated labels": ("truth", lambda p, spec: _truncate(_cog(p, spec)),
                         "read failed at rows 0:300, cols 0:420 (corrupt or truncated?): c.tif, band 1: "
                         "IReadBlock failed at X offset 0, Y offset 0"),
    "values outside the classes": ("pred", lambda p, spec: _outside_class_set(p),
                                   "prediction holds values outside the class set "
                                   "[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]: [200]"),
    "float prediction": ("pred", lambda p, spec: _raster(p, CMAP[None].astype(np.float32)),
                         "prediction raster holds float32 values, expected integer class ids (a class map, not "
                         "scores)"),
    "two bands": ("pred", lambda p, spec: _raster(p, np.stack([CMAP, CMAP])),
                  "prediction raster has 2 bands, expected 1 band of class ids"),
    "other transform": ("pred", lambda p, spec: _raster(p, CMAP[None], transform=SHIFTED),
                        "prediction grid differs from the labels of scene 'c' ({truth}), prediction vs labels: "
                        "transform (10.0, 0.0, 500010.0, 0.0, -10.0, 5400000.0) vs (10.0, 0.0, 500000.0, 0.0, "
                        "-10.0, 5400000.0)"),
    "other CRS": ("pred", lambda p, spec: _raster(p, CMAP[None], crs="EPSG:32633"),
                  "prediction grid differs from the labels of scene 'c' ({truth}), prediction vs labels: CRS "
                  "EPSG:32633 vs EPSG:32632"),
}


def _evaluate(spec, pred: Path, truth: Path) -> list[str]:
    return ["infer", "evaluate", "--pred", str(pred), "--truth", str(truth), "--spec", str(spec.source_file),
            "--data-root", str(spec.data_root)]


def test_evaluate_scores_a_sound_prediction(tiny_spec, tmp_path, capsys):
    pred, truth = _cog(tmp_path / "pred.tif", tiny_spec), _raster(tmp_path / "c.tif", CMAP[None])
    assert main(_evaluate(tiny_spec, pred, truth)) == 0
    assert capsys.readouterr().out.startswith("mIoU 100.00%  OA 100.00%")


@pytest.mark.parametrize("case", HOSTILE)
def test_evaluate_refuses_a_hostile_file_in_one_line(tiny_spec, tmp_path, capsys, case):
    (tmp_path / "pred").mkdir()
    (tmp_path / "truth").mkdir()
    pred, truth = tmp_path / "pred" / "c.tif", tmp_path / "truth" / "c.tif"
    hostile, make, problem = HOSTILE[case]
    _cog(pred, tiny_spec) if hostile == "truth" else _raster(truth, CMAP[None])
    path = pred if hostile == "pred" else truth
    make(path, tiny_spec)
    assert main(_evaluate(tiny_spec, pred, truth)) == 2
    err = capsys.readouterr().err.splitlines()
    expect = f"c2seg infer: error: {path}: {problem.format(path=path, truth=truth)}"
    assert len(err) == 1 and err[0].startswith(expect), err
    assert not (pred / "metrics.json").exists() and not pred.with_suffix(".metrics.json").exists()


def test_the_cli_prints_the_one_line_without_gdal_chatter(tiny_spec, tmp_path):
    pred, truth = _truncate(_cog(tmp_path / "pred.tif", tiny_spec)), _raster(tmp_path / "c.tif", CMAP[None])
    run = [sys.executable, "-m", "c2seg.cli"]
    ev = subprocess.run(run + _evaluate(tiny_spec, pred, truth), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert (ev.returncode, ev.stdout, len(ev.stderr.splitlines())) == (2, "", 1), ev.stderr
    assert ev.stderr.startswith(f"c2seg infer: error: {pred}: read failed at rows 0:300, cols 0:420")
    cog = subprocess.run(run + ["infer", "check-cog", str(pred)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert (cog.returncode, cog.stderr, len(cog.stdout.splitlines())) == (1, "", 1), cog.stderr
    assert cog.stdout.startswith(f"{pred}: NOT a valid COG: the data of the image cannot be read")
