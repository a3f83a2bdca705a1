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
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from data_prep.manifest import Manifest, ShardInfo, load_manifest
from data_prep.shards import decode_npy

Piece = tuple[int, int, int]  # (shard index, first sample, stop)


def plan_epoch(shards: list[ShardInfo], *, slots: int, batch_size: int, city_weights: dict[str, float] | None = None,
               batches_per_slot: int | None = None, seed: int = 0, epoch: int = 0) -> list[list[Piece]]:
    """Sample ranges read by each of ``slots`` (= ranks x workers) in one epoch; see the module doc."""
    total = sum(s.samples for s in shards)
    if total == 0:
        raise ValueError("no samples in the selected shards")
    if batches_per_slot is None:
        batches_per_slot = math.ceil(total / (slots * batch_size))
    per_slot = batches_per_slot * batch_size
    need = per_slot * slots
    rng = np.random.default_rng([seed, epoch])
    if city_weights:
        cities = sorted({s.city for s in shards})
        unknown = sorted(set(city_weights) - set(cities))
        if unknown:
            raise KeyError(f"city_weights names cities {unknown} that are not among the loaded ones {cities}")
        weights = np.array([max(float(city_weights.get(c, 0.0)), 0.0) for c in cities])
        if weights.sum() <= 0:
            raise ValueError(f"city_weights {city_weights} give no city a positive weight")
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


class TileDecoder:
    """Raw stored tile entries -> normalised float32 arrays, label, has_label, city_id (+ augmentation)."""

    def __init__(self, manifest: Manifest) -> None:
        self.spec = manifest.spec
        self.norm = manifest.normalizer()
        self.city_ids = {c.name: i for i, c in enumerate(self.spec.cities)}
        self.tile = manifest.tile_size

    def __call__(self, arrays: dict[str, np.ndarray], label: np.ndarray | None, city: str,
                 rng: np.random.Generator | None) -> dict[str, np.ndarray]:
        out = {m: self.norm(m, arrays[m]) for m in self.spec.modality_names}
        has_label = label is not None
        out["label"] = (label if has_label else np.full((self.tile, self.tile), self.spec.ignore_id)).astype(np.int64)
        if rng is not None:  # same rot90 / flip for every modality and the label
            k, flip = int(rng.integers(4)), bool(rng.integers(2))
            for name, x in out.items():
                x = np.rot90(x, k, axes=(-2, -1))
                out[name] = np.ascontiguousarray(x[..., ::-1] if flip else x)
        out["has_label"] = np.bool_(has_label)
        out["city_id"] = np.int64(self.city_ids[city])
        return out


def collate(samples: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    """Stack sample dicts into a batch (webdataset's own ``__key__`` fields are left out)."""
    return {k: torch.from_numpy(np.stack([s[k] for s in samples])) for k in samples[0] if not k.startswith("__")}


class WdsTiles(IterableDataset):
    """Batches of one rank from the WebDataset shards (see the module doc for the split)."""

    def __init__(self, prep_dir: str | Path, split: str, *, cities: list[str] | None, batch_size: int,
                 num_workers: int, rank: int, world_size: int, city_weights: dict[str, float] | None,
                 augment: bool, batches_per_epoch: int | None, seed: int, epoch: int,
                 shuffle_buffer: int = 64) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
        self.manifest = load_manifest(prep_dir)
        self.shards = [s for s in self.manifest.shards(split, cities) if s.samples]
        self.decoder = TileDecoder(self.manifest)
        self.batch_size, self.workers = batch_size, max(num_workers, 1)
        self.rank, self.world_size = rank, world_size
        self.city_weights, self.augment, self.seed, self.epoch = city_weights, augment, seed, epoch
        self.shuffle_buffer = shuffle_buffer
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

    def _samples(self, src) -> Iterator[dict]:
        for piece in src:
            a, b = piece["start"], piece["stop"]
            for j, sample in enumerate(wds.tarfile_samples([{"url": piece["url"]}])):
                if j >= b:
                    break
                if j >= a:
                    yield sample

    def _decode(self, rng: np.random.Generator | None):
        modalities = self.manifest.spec.modality_names

        def decode(sample: dict) -> dict[str, np.ndarray]:
            arrays = {m: decode_npy(sample[f"{m}.npy"]) for m in modalities}
            label = decode_npy(sample["label.npy"]) if "label.npy" in sample else None
            return self.decoder(arrays, label, sample["__key__"].rsplit("-", 2)[0], rng)
        return decode

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        slot = self.rank * self.workers + worker
        src = [{"url": str(self.shards[i].path), "start": a, "stop": b} for i, a, b in self.pieces[slot]]
        seed = [self.seed, self.epoch, slot]
        rng = np.random.default_rng(seed) if self.augment else None
        stages = [lambda: iter(src), self._samples]
        if self.shuffle_buffer > 1:
            stages.append(wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer,
                                      seed=int(np.random.default_rng(seed).integers(2**31))))
        stages += [wds.map(self._decode(rng)), wds.batched(self.batch_size, collation_fn=collate, partial=False)]
        return iter(wds.DataPipeline(*stages))


def make_wds_loader(prep_dir: str | Path, split: str, *, cities: list[str] | None = None, batch_size: int,
                    num_workers: int = 0, rank: int = 0, world_size: int = 1,
                    city_weights: dict[str, float] | None = None, augment: bool = False,
                    batches_per_epoch: int | None = None, seed: int = 0, epoch: int = 0) -> DataLoader:
    """A DataLoader over the shards of ``split`` for this rank: the same number of batches on every
    rank (``len(loader)``), normalised tensors, optional flips / rot90 and per-city weights."""
    dataset = WdsTiles(prep_dir, split, cities=cities, batch_size=batch_size, num_workers=num_workers,
                       rank=rank, world_size=world_size, city_weights=city_weights, augment=augment,
                       batches_per_epoch=batches_per_epoch, seed=seed, epoch=epoch)
    return DataLoader(dataset, batch_size=None, num_workers=num_workers,
                      multiprocessing_context="spawn" if num_workers else None)


class ZarrTileDataset(Dataset):
    """Random access to the kept tiles of ``split`` in ``dataset.zarr`` (same sample dict as the shards,
    without the batch dimension); ``augment`` draws a random rot90 / flip per item."""

    def __init__(self, prep_dir: str | Path, split: str, cities: list[str] | None = None,
                 augment: bool = False) -> None:
        import zarr

        self.manifest = load_manifest(prep_dir)
        self.decoder = TileDecoder(self.manifest)
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
        self._groups: dict[str, object] = {}

    def __len__(self) -> int:
        return len(self.index)

    def _group(self, city: str):
        if city not in self._groups:  # opened lazily, so that each DataLoader worker has its own handles
            import zarr

            self._groups[city] = zarr.open_group(self.root / self.manifest.cities[city]["splits"][self.split]["zarr"],
                                                 mode="r")
        return self._groups[city]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        city, slot = self.index[i]
        g = self._group(city)
        arrays = {m: g[m][slot] for m in self.manifest.spec.modality_names}
        label = g["label"][slot] if self.labelled[city] else None
        rng = np.random.default_rng(torch.randint(2**31, ()).item()) if self.augment else None
        return {k: torch.from_numpy(np.asarray(v)) for k, v in self.decoder(arrays, label, city, rng).items()}
