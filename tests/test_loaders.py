"""Training loaders: WebDataset pipeline split over ranks and workers, city weights, augmentation,
and the Zarr random-access dataset."""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from c2seg.errors import C2SegError
from c2seg.data_prep.loaders import ZarrTileDataset, make_wds_loader, plan_epoch
from c2seg.data_prep.manifest import ShardInfo, load_manifest


def _shards(counts: dict[str, list[int]]) -> list[ShardInfo]:
    return [ShardInfo(Path(f"{c}-{i}.tar"), c, "train", n, 0, "") for c, ns in counts.items() for i, n in enumerate(ns)]


def _ids(pieces):
    return [(i, j) for slot in pieces for i, a, b in slot for j in range(a, b)]


def test_plan_epoch_exact_cover_when_divisible():
    shards = _shards({"a": [5, 7, 3], "b": [9, 0, 4]})  # 28 samples
    pieces = plan_epoch(shards, slots=4, batch_size=7, seed=1, epoch=3)
    per_slot = [sum(b - a for _, a, b in s) for s in pieces]
    assert per_slot == [7, 7, 7, 7]
    ids = _ids(pieces)
    assert len(set(ids)) == len(ids) == 28
    assert plan_epoch(shards, slots=4, batch_size=7, seed=1, epoch=4) != pieces  # reshuffled per epoch


def test_plan_epoch_city_weights_set_shares():
    shards = _shards({"a": [10] * 4, "b": [10] * 4})
    pieces = plan_epoch(shards, slots=2, batch_size=8, city_weights={"a": 3, "b": 1}, batches_per_slot=10)
    by_city = Counter(shards[i].city for i, _ in _ids(pieces))
    assert by_city == {"a": 120, "b": 40}
    with pytest.raises(C2SegError, match="not among the loaded"):
        plan_epoch(shards, slots=2, batch_size=8, city_weights={"paris": 1})


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha1(t.numpy().tobytes()).hexdigest()


@pytest.mark.slow
def test_two_ranks_two_workers_cover_an_epoch(tiny_prepared):
    ds = ZarrTileDataset(tiny_prepared, "train")
    everything = Counter(_digest(ds[i]["msi"]) for i in range(len(ds)))
    assert len(everything) == len(ds)
    seen, lengths = [], []
    for rank in range(2):
        loader = make_wds_loader(tiny_prepared, "train", batch_size=2, num_workers=2, rank=rank, world_size=2,
                                 seed=5, epoch=1, ring_size=0)  # list() keeps every batch
        batches = list(loader)
        assert len(batches) == len(loader)
        lengths.append(len(batches))
        for b in batches:
            assert b["msi"].shape[0] == 2 and b["msi"].dtype == torch.float32
            seen += [_digest(x) for x in b["msi"]]
    assert lengths[0] == lengths[1]
    padded = lengths[0] * 2 * 2 - len(ds)  # slots are whole batches: the last one wraps around
    assert 0 <= padded < 2 * 2 * 2
    assert set(seen) == set(everything), "every tile is read in the epoch"
    assert len(seen) - len(set(seen)) == padded, "no tile is read twice except the padding"


def test_batches_normalised_labelled_and_equal_per_rank(tiny_prepared):
    m = load_manifest(tiny_prepared)
    lens = [len(make_wds_loader(tiny_prepared, "train", batch_size=3, rank=r, world_size=3, batches_per_epoch=5,
                                city_weights={"synth_source": 1, "synth_target": 1})) for r in range(3)]
    assert lens == [5, 5, 5]
    batches = list(make_wds_loader(tiny_prepared, "train", batch_size=4, rank=1, world_size=3, batches_per_epoch=6,
                                   city_weights={"synth_source": 1, "synth_target": 1}, ring_size=0))
    assert len(batches) == 6
    b = torch.utils.data.default_collate(batches)  # (6, 4, ...)
    assert b["hsi"].shape == (6, 4, 32, 32, 32) and b["label"].dtype == torch.int64
    target = b["city_id"] == 1
    assert target.any() and (~target).any()
    assert not b["has_label"][target].any() and (b["label"][target] == 0).all()
    assert b["has_label"][~target].all() and (b["label"][~target] > 0).any()
    # normalised with the pooled stats: near zero mean, unit std over the epoch
    x = b["msi"].transpose(0, 2).reshape(4, -1)
    assert x.mean(dim=1).abs().max() < 0.5 and ((x.std(dim=1) - 1).abs() < 0.5).all()
    assert set(m.normalizer().as_dict()) == {"hsi", "msi", "sar"}


def _hold_each_batch(loader, expected: list[dict]) -> list[dict]:
    """Every batch of ``loader``, checked as it comes against ``expected`` (fresh copies), and the batch before it
    checked to be intact (the lifetime contract of ring size 2)."""
    held: list[dict] = []
    for k, batch in enumerate(loader):
        held.append(batch)
        for key in batch:
            assert torch.equal(batch[key], expected[k][key]), key
            if k >= 1:
                assert torch.equal(held[k - 1][key], expected[k - 1][key]), key
    return held


def test_a_batch_is_kept_for_ring_size_batches_then_its_memory_is_reused(tiny_prepared):
    """The lifetime contract (module doc): with ring size 2, batch k keeps its values while batch k + 1 is
    made, and batch k + 2 is written into its memory; ring size 0 gives every batch new memory."""
    kwargs = dict(batch_size=2, batches_per_epoch=4, seed=3)
    expected = [{k: v.clone() for k, v in b.items()} for b in make_wds_loader(tiny_prepared, "train", **kwargs)]
    assert not torch.equal(expected[0]["hsi"], expected[2]["hsi"])  # so an overwrite would show
    held = _hold_each_batch(make_wds_loader(tiny_prepared, "train", ring_size=2, **kwargs), expected)
    assert len(held) == 4
    for k in (2, 3):  # the batch two back now holds batch k's modalities, in the same memory
        for m in ("hsi", "msi", "sar"):
            assert held[k - 2][m].data_ptr() == held[k][m].data_ptr()
            assert torch.equal(held[k - 2][m], expected[k][m])
        assert torch.equal(held[k - 2]["label"], expected[k - 2]["label"])  # labels are never reused
    fresh = list(make_wds_loader(tiny_prepared, "train", ring_size=0, **kwargs))
    assert len({b["hsi"].data_ptr() for b in fresh}) == 4
    for b, e in zip(fresh, expected, strict=True):
        for key in b:
            assert torch.equal(b[key], e[key]), key


def _shm_inode(t: torch.Tensor) -> int:
    """The shared-memory file behind a tensor a DataLoader worker sent."""
    return os.fstat(t.untyped_storage()._share_fd_cpu_()[0]).st_ino


def test_workers_keep_the_lifetime_contract_with_a_ring_of_shared_memory(tiny_prepared):
    """With 2 workers, batch k keeps its values while batch k + 1 is made (ring size 2), and each worker
    rewrites the shared memory of its batch k - 4 (ring_size + PREFETCH): 8 memory blocks for 12 batches,
    where ring size 0 gives 12."""
    kwargs = dict(batch_size=2, batches_per_epoch=12, seed=3, num_workers=2)
    expected = [{k: v.clone() for k, v in b.items()} for b in make_wds_loader(tiny_prepared, "train", ring_size=0,
                                                                              **kwargs)]
    held = _hold_each_batch(make_wds_loader(tiny_prepared, "train", ring_size=2, **kwargs), expected)
    blocks = [_shm_inode(b["hsi"]) for b in held]
    assert len(set(blocks)) == 8
    assert all(blocks[k] == blocks[k - 8] for k in range(8, 12))
    fresh = make_wds_loader(tiny_prepared, "train", ring_size=0, **kwargs)
    assert len({_shm_inode(b["hsi"]) for b in list(fresh)}) == 12


def test_zarr_dataset_and_same_augmentation_for_all(tiny_prepared):
    m = load_manifest(tiny_prepared)
    plain = ZarrTileDataset(tiny_prepared, "val", cities=["synth_source"])
    assert len(plain) == m.cities["synth_source"]["splits"]["val"]["tiles"]
    item = plain[0]
    import zarr

    g = zarr.open_group(tiny_prepared / m.cities["synth_source"]["splits"]["val"]["zarr"], mode="r")
    slot = int(g["kept"][0])
    stats = m.stats["sar"]
    expect = (g["sar"][slot].astype(np.float32) - np.array(stats["mean"], np.float32)[:, None, None]) \
        / np.array(stats["std"], np.float32)[:, None, None]
    np.testing.assert_allclose(item["sar"].numpy(), expect, rtol=1e-5, atol=1e-5)
    aug = ZarrTileDataset(tiny_prepared, "val", cities=["synth_source"], augment=True)
    torch.manual_seed(0)
    moved = 0
    for i in range(len(aug)):
        a, p = aug[i], plain[i]
        transforms = [(k, f) for k in range(4) for f in (False, True)]

        def apply(x, k, f):
            x = torch.rot90(x, k, dims=(-2, -1))
            return x.flip(-1) if f else x

        match = [t for t in transforms if torch.equal(apply(p["hsi"], *t), a["hsi"])]
        assert match, "augmented tile is not a rot90 / flip of the tile"
        k, f = match[0]
        assert torch.equal(apply(p["label"], k, f), a["label"]) and torch.equal(apply(p["sar"], k, f), a["sar"])
        moved += (k, f) != (0, False)
    assert moved > 0
    with pytest.raises(C2SegError, match="no city"):
        ZarrTileDataset(tiny_prepared, "val", cities=["paris"])


def test_augmented_wds_batches_move_every_modality_and_label_together(tiny_prepared):
    kwargs = dict(batch_size=4, batches_per_epoch=4, seed=3, ring_size=0)  # list() keeps every batch
    plain = list(make_wds_loader(tiny_prepared, "train", **kwargs))
    moved = list(make_wds_loader(tiny_prepared, "train", augment=True, **kwargs))
    transforms = [(k, f) for k in range(4) for f in (False, True)]
    used = set()
    for p, a in zip(plain, moved, strict=True):
        assert torch.equal(p["city_id"], a["city_id"]) and torch.equal(p["has_label"], a["has_label"])
        for i in range(4):
            def apply(x, k, f):
                x = torch.rot90(x, k, dims=(-2, -1))
                return x.flip(-1) if f else x

            match = [t for t in transforms if torch.equal(apply(p["hsi"][i], *t), a["hsi"][i])]
            assert match, "augmented tile is not a rot90 / flip of the same tile"
            k, f = match[0]
            for key in ("msi", "sar", "label"):
                assert torch.equal(apply(p[key][i], k, f), a[key][i]), key
            used.add((k, f))
    assert len(used) > 1


def test_batch_assembler_zeroes_nodata_and_matches_the_normalizer(tiny_prepared):
    from c2seg.data_prep.loaders import BatchAssembler

    m = load_manifest(tiny_prepared)
    norm, t = m.normalizer(), m.tile_size
    rng = np.random.default_rng(0)
    tiles = []
    for j in range(3):
        arrays = {mod.name: (rng.random((mod.bands, t, t)) * 100 + 1).astype(np.float16) for mod in m.spec.modalities}
        arrays["sar"][:, :5, :7] = 0  # every band at the fill value: nodata
        arrays["msi"][0, 10, 10] = 0  # one band only: valid
        tiles.append((arrays, None if j else np.full((t, t), 3, np.uint8), j % 2))
    batch = BatchAssembler(m)(tiles, None)
    for j, (arrays, label, city) in enumerate(tiles):
        for name, values in arrays.items():
            np.testing.assert_allclose(batch[name][j].numpy(), norm(name, values), rtol=1e-5, atol=1e-5)
        assert int(batch["city_id"][j]) == city and bool(batch["has_label"][j]) == (label is not None)
    assert (batch["sar"][:, :, :5, :7] == 0).all() and batch["msi"][0, 0, 10, 10] != 0
    assert (batch["label"][0] == 3).all() and (batch["label"][1:] == m.spec.ignore_id).all()


def test_zarr_batches_equal_items_and_collate_without_copy(tiny_prepared):
    from c2seg.data_prep.loaders import collate_views

    ds = ZarrTileDataset(tiny_prepared, "train")
    order = [5, 1, 2, 3, len(ds) - 1]  # a run of consecutive slots, and tiles of both cities
    items = ds.__getitems__(order)
    for i, item in zip(order, items):
        single = ds[i]
        assert item.keys() == single.keys()
        for key in single:
            assert torch.equal(item[key], single[key]), key
    batch = collate_views(items)
    assert batch["hsi"].data_ptr() == items[0]["hsi"].data_ptr() and batch["hsi"].shape[0] == len(order)
    assert torch.equal(batch["label"], torch.stack([it["label"] for it in items]))
    loader = torch.utils.data.DataLoader(ds, batch_size=4, shuffle=True, collate_fn=collate_views)
    seen = [_digest(x) for b in loader for x in b["msi"]]
    assert sorted(seen) == sorted(_digest(ds[i]["msi"]) for i in range(len(ds)))


def test_zarr_batch_is_one_zarr_request_per_city_and_reads_the_stored_tiles(tiny_prepared, monkeypatch):
    """``__getitems__`` reads a shuffled batch with one zarr request per city (``read_slots``: every run of
    consecutive slots of every array gathered), not one per tile and array; the tiles are ``arr[slot]``."""
    import zarr

    from c2seg.data_prep import zarr_store

    ds = ZarrTileDataset(tiny_prepared, "train")
    requests = []
    monkeypatch.setattr(zarr_store, "sync", lambda coro: requests.append(coro) or zarr.core.sync.sync(coro))
    order = [7, 2, len(ds) - 1, 0, 3, len(ds) - 2]  # both cities; runs 0, 2-3, 7 of the first
    ds.__getitems__(order)
    assert len(requests) == 2
    arrays = ds._city_arrays("synth_source")
    tiles = zarr_store.read_slots(arrays, [0, 2, 3, 7])
    assert len(requests) == 3 and list(tiles) == ["hsi", "msi", "sar", "label"]
    for name, arr in arrays.items():
        assert [t.shape for t in tiles[name]] == [arr.shape[1:]] * 4
        for slot, tile in zip([0, 2, 3, 7], tiles[name], strict=True):
            np.testing.assert_array_equal(tile, arr[slot])


@pytest.mark.parametrize("extra_ranks", [0, 1])
def test_each_tile_once_with_equal_batches_pads_the_ranks_that_have_fewer(tiny_prepared, extra_ranks):
    """Under ZeRO-3 every rank must run as many forwards: the ranks with fewer val batches repeat one,
    marked ``padding``; the unmarked batches still hold every tile exactly once. With one rank more than
    tiles, the last rank has no tile at all and pads with tile 0."""
    from c2seg.train.data import PreparedData

    data = PreparedData(tiny_prepared)
    n = len(list(data.each_tile_once("val", ["synth_target"], 1)))
    world = n + extra_ranks if extra_ranks else 2
    per_rank = [list(data.each_tile_once("val", ["synth_target"], 1, r, world, equal_batches=True))
                for r in range(world)]
    assert {len(b) for b in per_rank} == {-(-n // world)}  # as many batches as rank 0 on every rank
    counted = [b for batches in per_rank for b in batches if not b.get("padding")]
    padded = [b for batches in per_rank for b in batches if b.get("padding")]
    assert len(counted) == n and len(padded) == world * -(-n // world) - n


# ---- every documented storage dtype (PrepConfig.store_dtypes) trains with augmentation and verifies --------
def _moved(x: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    x = torch.rot90(x, k, dims=(-2, -1))
    return x.flip(-1) if flip else x


@pytest.fixture(scope="module")
def prepared_by_msi_dtype(tiny_spec, tmp_path_factory):
    """``dtype -> prep folder`` of the tiny cities with MSI rounded to integers (reflectance x 1e4 as sensors
    deliver it, which uint16 stores losslessly) and stored as ``dtype``; each prepared once."""
    import shutil
    from dataclasses import replace

    import rasterio

    from c2seg.data_prep.manifest import finalize
    from c2seg.data_prep.prep import run_prep
    from tests.fixtures_prep import TINY_PREP

    root = tmp_path_factory.mktemp("integer_msi")
    shutil.copytree(tiny_spec.data_root, root / "data")
    spec = tiny_spec.with_data_root(root / "data")
    for city in spec.cities:
        with rasterio.open(spec.resolve(city, "msi"), "r+") as ds:
            ds.write(np.round(ds.read()))
    done: dict[str, Path] = {}

    def prepared(dtype: str) -> Path:
        if dtype not in done:
            done[dtype] = root / dtype
            run_prep(spec, replace(TINY_PREP, store_dtypes={"msi": dtype}), done[dtype])
            finalize(done[dtype])
        return done[dtype]

    return prepared


@pytest.mark.parametrize("dtype", ["float32", "float16", "uint16"])
def test_every_store_dtype_trains_with_augmentation_and_verifies(prepared_by_msi_dtype, dtype):
    from typing import get_args

    import zarr

    from c2seg.data_prep.loaders import collate_views
    from c2seg.data_prep.prep_config import StoreDtype
    from c2seg.data_prep.verify import verify

    assert dtype in get_args(StoreDtype) and len(get_args(StoreDtype)) == 3  # every documented dtype is tested
    out, reference = prepared_by_msi_dtype(dtype), prepared_by_msi_dtype("float32")
    assert verify(out) == []
    m = load_manifest(out)
    split = m.cities["synth_source"]["splits"]["train"]
    assert zarr.open_group(out / split["zarr"], mode="r")["msi"].dtype == np.dtype(dtype)
    kwargs = dict(batch_size=4, batches_per_epoch=3, seed=1, ring_size=0)  # list() keeps every batch
    plain = list(make_wds_loader(out, "train", **kwargs))
    moved = list(make_wds_loader(out, "train", augment=True, **kwargs))
    # the same normalised MSI as stored in float32: exactly for uint16, within float16's 2**-11 of |raw| < 1e4
    atol = 0.0 if dtype != "float16" else 1e4 * 2**-11 / min(m.stats["msi"]["std"])
    for p, r in zip(plain, make_wds_loader(reference, "train", **kwargs), strict=True):
        assert p["msi"].dtype == torch.float32
        torch.testing.assert_close(p["msi"], r["msi"], rtol=0.0, atol=atol)
    transforms = [(k, f) for k in range(4) for f in (False, True)]
    used = set()
    for p, a in zip(plain, moved, strict=True):
        for i in range(len(p["msi"])):
            match = [t for t in transforms if torch.equal(_moved(p["msi"][i], *t), a["msi"][i])]
            assert match, "augmented MSI is not a rot90 / flip of the same tile"
            assert torch.equal(_moved(p["label"][i], *match[0]), a["label"][i])
            used.add(match[0])
    assert len(used) > 1
    items = ZarrTileDataset(out, "train", augment=True)
    batch = collate_views(items.__getitems__(list(range(4))))
    assert batch["msi"].shape == (4, 4, m.tile_size, m.tile_size) and torch.isfinite(batch["msi"]).all()


def test_a_fill_value_the_stored_dtype_cannot_hold_marks_no_pixel_nodata(tiny_prepared):
    """A spec nodata of -32768 (EnMAP's) with MSI stored as uint16: no stored value can be it, so batches are
    normalised with no nodata pixel instead of failing on the cast."""
    from c2seg.data_prep.loaders import BatchAssembler
    from c2seg.data_prep.stats import fill_as, nodata_mask

    assert fill_as(-32768, np.uint16) is None and fill_as(0.5, np.uint16) is None and fill_as(1e6, np.float16) is None
    assert fill_as(0, np.uint16) == 0 and fill_as(-9999, np.float16) == np.float16(-10000)
    assert not nodata_mask(np.zeros((2, 3, 3), np.uint16), -32768.0).any()
    m = load_manifest(tiny_prepared)
    assemble = BatchAssembler(m)
    assemble.fill = {**assemble.fill, "msi": -32768.0}
    t = m.tile_size
    arrays = {mod.name: np.full((mod.bands, t, t), 7, np.uint16 if mod.name == "msi" else np.float16)
              for mod in m.spec.modalities}
    batch = assemble([(arrays, None, 0)], np.random.default_rng(0))
    stats = m.stats["msi"]
    expected = (7 - np.array(stats["mean"], np.float32)) / np.array(stats["std"], np.float32)
    np.testing.assert_allclose(batch["msi"][0, :, 0, 0].numpy(), expected, rtol=1e-6)
