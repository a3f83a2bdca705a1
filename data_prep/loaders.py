"""The loaders training uses: a WebDataset pipeline over the tar shards and a Zarr random-access
dataset. Both yield normalised float32 tensors per modality, ``label`` (int64, ignore id where there
is no label), ``has_label`` and ``city_id`` (index of the city in the spec).

Splitting across ranks and workers is done on sample ranges rather than whole shards: each epoch
the shard list is shuffled (seeded by ``seed`` and ``epoch``), cut into pieces and laid end to end,
and rank r's worker w reads the slot ``r * workers + w`` of equal length (a multiple of the batch
size). So every rank gets the same number of batches, slots are disjoint, the epoch covers every
sample (the last slot is padded by wrapping around), and no rank ever waits on a shard it lacks,
whatever the shard count. With ``city_weights`` each city fills a share of the epoch in proportion to
its weight (its shards cycled, reshuffled each round); with ``batches_per_epoch`` the epoch holds
exactly that many batches per rank.

How long a batch lives. Filling new memory costs about as much as normalising into it (every page
faults on first touch), so the WebDataset loader reuses its batch memory: with 0 workers it writes
batch k's float tensors (the modalities) into the memory of batch k - ``ring_size`` (default 2). So a
batch stays valid until the loader yields the ``ring_size``-th batch after it: the consumer may hold the
current batch and the ``ring_size - 1`` before it. Training reads one batch per stream per micro-step
and is done with it (backward included) before it asks for the next, so the default covers it with a
batch to spare. Copy (``.clone()``) what you keep longer, or pass ``ring_size=0`` (new memory for every
batch, as ``list(loader)`` needs). With workers the same contract holds: each worker keeps a ring of
``ring_size + PREFETCH`` batches of shared memory (a worker may run PREFETCH batches ahead of the consumer, and
every worker yields the same number of batches, so its batch k's memory is rewritten only after the loader
has yielded ``ring_size`` batches after it). New shared memory per batch cost a worker more than the
normalisation (tmpfs pages are faulted and zeroed 4 KiB at a time: 63 ms per 130 MB batch, against about 17 ms to
normalise it) and held the loader at 69 tiles/s with one worker (benchmarks/bench_loaders.py --sweep). In
``ZarrTileDataset`` (random access: callers keep items as long as they like) every batch gets new memory.
``label``, ``has_label`` and ``city_id`` are always new.

webdataset: its ``shuffle`` (the buffered sample shuffle within a slot) is the only thing the loaders
run from it; reading the tar shards is done here, from memory maps (data_prep/shards.py). The
dependency stays: WebDataset is the shard format's reference implementation, users read the shards
with it, and the tests read shards back through it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from c2seg.errors import C2SegError
from c2seg.data_prep.manifest import Manifest, ShardInfo, load_manifest
from c2seg.data_prep.shards import decode_npy, iter_samples
from c2seg.data_prep.stats import fill_as

Piece = tuple[int, int, int]  # (shard index, first sample, stop)
RING_SIZE = 2  # batches of float memory the WebDataset loader uses in turn (see the module doc)
PREFETCH = 2  # batches each DataLoader worker may run ahead of the consumer (torch's prefetch_factor)


def plan_epoch(shards: list[ShardInfo], *, slots: int, batch_size: int, city_weights: dict[str, float] | None = None,
               batches_per_slot: int | None = None, seed: int = 0, epoch: int = 0) -> list[list[Piece]]:
    """Sample ranges read by each of ``slots`` (= ranks x workers) in one epoch; see the module doc."""
    total = sum(s.samples for s in shards)
    if total == 0:
        raise C2SegError("no samples in the selected shards")
    if batches_per_slot is None:
        batches_per_slot = math.ceil(total / (slots * batch_size))
    per_slot = batches_per_slot * batch_size
    need = per_slot * slots
    rng = np.random.default_rng([seed, epoch])
    if city_weights:
        cities = sorted({s.city for s in shards})
        unknown = sorted(set(city_weights) - set(cities))
        if unknown:
            raise C2SegError(f"city_weights names cities {unknown} that are not among the loaded ones {cities}")
        weights = np.array([max(float(city_weights.get(c, 0.0)), 0.0) for c in cities])
        if weights.sum() <= 0:
            raise C2SegError(f"city_weights {city_weights} give no city a positive weight")
        quotas = np.floor(need * weights / weights.sum()).astype(int)
        quotas[np.argmax(weights)] += need - quotas.sum()
        pieces = []
        for city, quota in zip(cities, quotas):
            pieces += _cycle([i for i, s in enumerate(shards) if s.city == city], shards, int(quota), rng)
        pieces = [pieces[i] for i in rng.permutation(len(pieces))]
    else:
        pieces = _cycle(list(range(len(shards))), shards, need, rng)
    out, it = [], iter(pieces)
    current = next(it, None)
    for _ in range(slots):
        slot, left = [], per_slot
        while left:
            i, a, b = current
            take = min(left, b - a)
            slot.append((i, a, a + take))
            left -= take
            current = (i, a + take, b) if a + take < b else next(it, None)
        out.append(slot)
    return out


def _cycle(indices: list[int], shards: list[ShardInfo], count: int, rng: np.random.Generator) -> list[Piece]:
    """Whole shards of ``indices`` in shuffled rounds until ``count`` samples (the last one cut)."""
    pieces: list[Piece] = []
    indices = [i for i in indices if shards[i].samples]
    while count > 0 and indices:
        for i in rng.permutation(indices):
            n = min(shards[i].samples, count)
            pieces.append((int(i), 0, n))
            count -= n
            if not count:
                break
    return pieces


def _move(x: np.ndarray, k: int, flip: bool) -> np.ndarray:
    """``x`` rotated by ``k`` x 90 degrees and optionally flipped left-right, as a view."""
    x = np.rot90(x, k, axes=(-2, -1)) if k else x
    return x[..., ::-1] if flip else x


# stored dtypes torch has no rot90 / flip kernels for (store_dtypes uint16), moved as the signed type of the
# same width: a move only copies bits
_MOVED_AS = {torch.uint16: torch.int16}


def _move_tensor(x: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    """``x`` rotated by ``k`` x 90 degrees and optionally flipped left-right (a copy when moved), any dtype."""
    if not k and not flip:
        return x
    same_width = _MOVED_AS.get(x.dtype, x.dtype)
    y = x.view(same_width)
    y = torch.rot90(y, k, (-2, -1)) if k else y
    y = y.flip(-1) if flip else y
    return y.view(x.dtype)


@contextmanager
def _one_thread():
    """Run torch element-wise ops single-threaded: on cache-sized chunks threads only add overhead."""
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _new_batch_tensor(shape: tuple[int, ...]) -> torch.Tensor:
    """New float32 memory: in a DataLoader worker shared memory (a batch sent to the main process is moved
    there anyway: filling it there saves that copy); elsewhere numpy's, which asks the kernel for transparent
    huge pages on large arrays (madvise), so filling a batch faults once per 2 MiB instead of once per 4 KiB
    page (torch.empty: 4 KiB); that first touch was about as slow as the normalisation itself."""
    if get_worker_info() is not None:
        return torch.empty(shape).share_memory_()
    return torch.from_numpy(np.empty(shape, np.float32))


def _batch_tensor(memory: dict[str, torch.Tensor] | None, modality: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Float32 memory for one modality of a batch: ``memory``'s tensor when it has ``shape`` (else a new
    one kept there), or, with no ``memory``, a new tensor."""
    if memory is None:
        return _new_batch_tensor(shape)
    if modality not in memory or memory[modality].shape != shape:
        memory[modality] = _new_batch_tensor(shape)
    return memory[modality]


StoredTile = tuple[dict[str, np.ndarray], "np.ndarray | None", int]  # (arrays per modality, label, city id)


class BatchAssembler:
    """Stored tiles -> one batch: normalised float32 tensors per modality (nodata -> 0), ``label``
    (int64, ignore id where there is no label), ``has_label``, ``city_id``; optionally the same random
    rot90 / flip per tile for every modality and the label.

    Each tile is cast and normalised straight into the batch tensor in cache-sized band chunks (one
    pass over memory), so no per-tile float32 copies or stacking are made."""

    CHUNK_BYTES = 2 << 20

    def __init__(self, manifest: Manifest) -> None:
        spec = manifest.spec
        norm = manifest.normalizer()
        self.modalities = spec.modality_names
        self.scale = {m: torch.from_numpy(1.0 / norm.std[m]).reshape(-1, 1, 1) for m in self.modalities}
        self.shift = {m: torch.from_numpy(-norm.mean[m] / norm.std[m]).reshape(-1, 1, 1) for m in self.modalities}
        self.fill = norm.fill
        self.city_ids = {c.name: i for i, c in enumerate(spec.cities)}
        self.tile, self.ignore_id = manifest.tile_size, spec.ignore_id

    def __call__(self, tiles: list[StoredTile], rng: np.random.Generator | None,
                 memory: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The batch of ``tiles``; its float tensors are written into ``memory`` (modality -> tensor, filled
        on first use and reused after) when given, else into new memory."""
        n, t = len(tiles), self.tile
        moves = [(int(rng.integers(4)), bool(rng.integers(2))) for _ in tiles] if rng is not None else [(0, False)] * n
        out: dict[str, torch.Tensor] = {}
        with _one_thread():
            for m in self.modalities:
                first = tiles[0][0][m]
                batch = _batch_tensor(memory, m, (n, first.shape[0], t, t))
                for i, ((arrays, _, _), move) in enumerate(zip(tiles, moves)):
                    self._normalise_into(batch[i], arrays[m], m, *move)
                out[m] = batch
        label = np.full((n, t, t), self.ignore_id, np.int64)
        for i, ((_, lab, _), mv) in enumerate(zip(tiles, moves)):
            if lab is not None:
                label[i] = _move(lab, *mv)
        out["label"] = torch.from_numpy(label)
        out["has_label"] = torch.tensor([lab is not None for _, lab, _ in tiles])
        out["city_id"] = torch.tensor([c for _, _, c in tiles], dtype=torch.int64)
        return out

    def _normalise_into(self, dest: torch.Tensor, values: np.ndarray, modality: str, k: int, flip: bool) -> None:
        """Cast, move (rot90 ``k``, flip) and normalise one stored tile into ``dest``, band chunk by chunk."""
        scale, shift = self.scale[modality], self.shift[modality]
        values = np.ascontiguousarray(values)
        src = torch.from_numpy(values)
        step = max(1, self.CHUNK_BYTES // (4 * values.shape[-1] * values.shape[-2]))
        for c0 in range(0, values.shape[0], step):
            part = dest[c0:c0 + step]
            part.copy_(_move_tensor(src[c0:c0 + step], k, flip))
            part.mul_(scale[c0:c0 + step]).add_(shift[c0:c0 + step])
        fill = fill_as(self.fill[modality], values.dtype)
        if fill is not None and (values[0] == fill).any():  # cheap first-band test before the full nodata check
            nodata = np.all(values == fill, axis=0)
            if nodata.any():
                dest[:, torch.from_numpy(np.ascontiguousarray(_move(nodata, k, flip)))] = 0.0


class WdsTiles(IterableDataset):
    """Batches of one rank from the WebDataset shards (see the module doc for the split and for how long
    a batch stays valid)."""

    def __init__(self, prep_dir: str | Path, split: str, *, cities: list[str] | None, batch_size: int,
                 num_workers: int, rank: int, world_size: int, city_weights: dict[str, float] | None,
                 augment: bool, batches_per_epoch: int | None, seed: int, epoch: int,
                 shuffle_buffer: int = 64, ring_size: int = RING_SIZE) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
        self.manifest = load_manifest(prep_dir)
        self.shards = [s for s in self.manifest.shards(split, cities) if s.samples]
        self.assemble = BatchAssembler(self.manifest)
        self.batch_size, self.workers = batch_size, max(num_workers, 1)
        self.rank, self.world_size = rank, world_size
        self.city_weights, self.augment, self.seed, self.epoch = city_weights, augment, seed, epoch
        self.shuffle_buffer, self.ring_size = shuffle_buffer, ring_size
        total = sum(s.samples for s in self.shards)
        if batches_per_epoch is None:
            self.per_slot = math.ceil(total / (world_size * self.workers * batch_size))
        else:
            self.per_slot = math.ceil(batches_per_epoch / self.workers)
        self.pieces = plan_epoch(self.shards, slots=world_size * self.workers, batch_size=batch_size,
                                 city_weights=city_weights, batches_per_slot=self.per_slot, seed=seed, epoch=epoch)

    def __len__(self) -> int:
        """Batches this rank yields per epoch (the same on every rank)."""
        return self.per_slot * self.workers

    def _tiles(self, pieces: list[Piece]) -> Iterator[StoredTile]:
        """The stored tiles of ``pieces``: zero-copy views into the memory-mapped shards."""
        modalities = self.assemble.modalities
        for i, a, b in pieces:
            shard = self.shards[i]
            city_id = self.assemble.city_ids[shard.city]
            for key, entries in iter_samples(shard.path, a, b):
                try:
                    arrays = {m: decode_npy(entries[f"{m}.npy"]) for m in modalities}
                    label = decode_npy(entries["label.npy"]) if "label.npy" in entries else None
                except (KeyError, ValueError) as exc:
                    raise C2SegError(f"{shard.path}: sample '{key}' is not a valid tile ({exc!r}); "
                                     f"run `c2seg data verify`") from exc
                yield arrays, label, city_id

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        slot = self.rank * self.workers + worker
        seed = [self.seed, self.epoch, slot]
        rng = np.random.default_rng(seed) if self.augment else None
        tiles = self._tiles(self.pieces[slot])
        if self.shuffle_buffer > 1:
            tiles = wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer,
                                seed=int(np.random.default_rng(seed).integers(2**31)))(tiles)
        # the ring: batch k is written into the memory of batch k - ring_size (in a worker, of its own batch
        # k - ring_size - PREFETCH: see the module doc)
        size = self.ring_size if info is None or not self.ring_size else self.ring_size + PREFETCH
        ring: list[dict[str, torch.Tensor]] = [{} for _ in range(size)]
        batch: list[StoredTile] = []
        for tile in tiles:
            batch.append(tile)
            if len(batch) == self.batch_size:
                yield self.assemble(batch, rng, ring[0] if ring else None)
                ring = ring[1:] + ring[:1]
                batch = []


def collate_views(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Collate for ``DataLoader(ZarrTileDataset, batch_size=..., collate_fn=collate_views)``: items that
    are the rows, in order, of one batch (as ``__getitems__`` returns them) give that batch back without
    copying; other items are stacked like ``default_collate`` does."""
    out = {}
    for key in items[0]:
        rows = [it[key] for it in items]
        first = rows[0]
        storage, size = first.untyped_storage().data_ptr(), first.numel()
        consecutive = all(r.is_contiguous() and r.shape == first.shape and r.dtype == first.dtype
                          and r.untyped_storage().data_ptr() == storage
                          and r.storage_offset() == first.storage_offset() + j * size for j, r in enumerate(rows))
        out[key] = (first.as_strided((len(rows), *first.shape), (size, *first.stride()), first.storage_offset())
                    if consecutive else torch.stack(rows))
    return out


def make_wds_loader(prep_dir: str | Path, split: str, *, cities: list[str] | None = None, batch_size: int,
                    num_workers: int = 0, rank: int = 0, world_size: int = 1,
                    city_weights: dict[str, float] | None = None, augment: bool = False,
                    batches_per_epoch: int | None = None, seed: int = 0, epoch: int = 0,
                    ring_size: int = RING_SIZE) -> DataLoader:
    """A DataLoader over the shards of ``split`` for this rank: the same number of batches on every
    rank (``len(loader)``), normalised tensors, optional flips / rot90 and per-city weights. With 0
    workers a batch's float tensors stay valid until the loader yields the ``ring_size``-th batch after it
    (0: never reused); see the module doc."""
    dataset = WdsTiles(prep_dir, split, cities=cities, batch_size=batch_size, num_workers=num_workers,
                       rank=rank, world_size=world_size, city_weights=city_weights, augment=augment,
                       batches_per_epoch=batches_per_epoch, seed=seed, epoch=epoch, ring_size=ring_size)
    return DataLoader(dataset, batch_size=None, num_workers=num_workers, prefetch_factor=PREFETCH if num_workers else None,
                      multiprocessing_context="spawn" if num_workers else None)


class ZarrTileDataset(Dataset):
    """Random access to the kept tiles of ``split`` in ``dataset.zarr`` (same sample dict as the shards,
    without the batch dimension); ``augment`` draws a random rot90 / flip per item.

    ``__getitems__`` (used by DataLoader's batch sampler) reads a batch with one zarr request per city
    (:func:`~c2seg.data_prep.zarr_store.read_slots`: every chunk of the batch's tiles decoded concurrently),
    and normalises it at once."""

    def __init__(self, prep_dir: str | Path, split: str, cities: list[str] | None = None,
                 augment: bool = False) -> None:
        import zarr

        self.manifest = load_manifest(prep_dir)
        self.assemble = BatchAssembler(self.manifest)
        self.augment = augment
        self.index: list[tuple[str, int]] = []
        self.labelled: dict[str, bool] = {}
        for city in self.manifest.city_names(cities):
            rec = self.manifest.cities[city]["splits"][split]
            kept = zarr.open_array(Path(prep_dir) / rec["zarr"] / "kept", mode="r")[:]
            self.index += [(city, int(s)) for s in kept]
            self.labelled[city] = rec["labelled"]
        self.root = Path(prep_dir)
        self.split = split
        self._arrays: dict[str, dict[str, object]] = {}

    def __len__(self) -> int:
        return len(self.index)

    def _city_arrays(self, city: str) -> dict[str, object]:
        if city not in self._arrays:  # opened lazily, so that each DataLoader worker has its own handles
            import zarr

            g = zarr.open_group(self.root / self.manifest.cities[city]["splits"][self.split]["zarr"], mode="r")
            names = self.assemble.modalities + (("label",) if self.labelled[city] else ())
            self._arrays[city] = {name: g[name] for name in names}
        return self._arrays[city]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.__getitems__([i])[0]

    def __getitems__(self, indices: list[int]) -> list[dict[str, torch.Tensor]]:
        """The items at ``indices``, read and normalised as one batch."""
        from c2seg.data_prep.zarr_store import read_slots  # zarr loads only where this is used

        by_city: dict[str, list[int]] = {}
        for i in indices:
            city, slot = self.index[i]
            by_city.setdefault(city, []).append(slot)
        stored: dict[tuple[str, int], StoredTile] = {}
        for city, slots in by_city.items():
            slots = np.unique(slots).tolist()
            data = read_slots(self._city_arrays(city), slots)
            for j, slot in enumerate(slots):
                stored[city, slot] = ({m: data[m][j] for m in self.assemble.modalities},
                                      data["label"][j] if "label" in data else None,
                                      self.assemble.city_ids[city])
        rng = np.random.default_rng(torch.randint(2**31, ()).item()) if self.augment else None
        batch = self.assemble([stored[self.index[i]] for i in indices], rng)
        return [{k: v[j] for k, v in batch.items()} for j in range(len(indices))]
