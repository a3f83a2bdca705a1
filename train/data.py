"""Training data from a ``c2seg data prep`` folder (through data_prep's loaders; nothing is read
from GeoTIFFs here), and resumable batch streams with a fixed number of batches per epoch."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from c2seg.spec import DatasetSpec, load_spec
from c2seg.train.augment import RadiometricJitter, affine_bands, jittered
from c2seg.train.config import DataConfig, RadiometricConfig
from c2seg.io import file_sha256


class CityStandardizer:
    """Re-maps batches normalised with the pooled statistics (what the loaders give) to per-city
    standardisation, ``x * scale[city] + shift[city]`` per band (exact: see
    :meth:`data_prep.manifest.Manifest.city_remap`); nodata pixels (0 in every band) stay 0."""

    def __init__(self, manifest) -> None:
        self.remap = {m: (torch.from_numpy(a), torch.from_numpy(b)) for m, (a, b) in manifest.city_remap().items()}

    def __call__(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        ids = batch["city_id"]
        out = dict(batch)
        for m, (scale, shift) in self.remap.items():
            if m in batch:
                out[m] = affine_bands(batch[m], scale[ids], shift[ids])
        return out


class _Batches:
    """A loader's batches through the radiometric jitter (if any), then per-city standardisation (if
    any); keeps ``len``."""

    def __init__(self, loader: Iterable, jitter: RadiometricJitter | None, seed: list[int],
                 standardizer: CityStandardizer | None) -> None:
        self.loader, self.jitter, self.seed, self.standardizer = loader, jitter, seed, standardizer

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        batches: Iterable[dict[str, torch.Tensor]] = self.loader
        if self.jitter is not None:
            batches = jittered(batches, self.jitter, self.seed)
        if self.standardizer is not None:
            batches = map(self.standardizer, batches)
        return iter(batches)


@dataclass(frozen=True)
class CitySelection:
    """The cities a training run reads: ``sources`` (train split, labelled), ``targets`` (train split, adapted
    to) and ``val`` (val split, scored). Never a test city."""

    sources: tuple[str, ...]
    targets: tuple[str, ...]
    val: tuple[str, ...]


def select_cities(spec: DatasetSpec, cfg: DataConfig, manifest) -> CitySelection:
    """The run's cities from ``cfg`` (``source_cities``, ``target_cities``, ``val_cities``), else the spec's
    roles; validation defaults to the labelled targets, else the sources whose val split in ``manifest`` holds
    tiles. A config that names a test city fails (:meth:`c2seg.spec.DatasetSpec.training_cities`)."""
    sources = spec.training_cities("source", cfg.source_cities or None, "data.source_cities")
    targets = spec.training_cities("target", cfg.target_cities or None, "data.target_cities")
    if cfg.val_cities is not None:
        val = spec.training_cities("target", cfg.val_cities, "data.val_cities")
    else:
        val = tuple(c for c in targets if spec.city(c).labelled) or tuple(
            c for c in sources if manifest.cities[c]["splits"]["val"]["tiles"])
    return CitySelection(sources, targets, val)


class PreparedData:
    """The prep output folder seen by training: its dataset spec, normalisation and loaders.
    ``normalization`` ``per_city`` standardises every tile with its own city's statistics."""

    def __init__(self, prep_dir: str | Path, spec_path: str | None = None, normalization: str = "pooled") -> None:
        from c2seg.data_prep.manifest import load_manifest

        self.prep_dir = Path(prep_dir)
        self.manifest = load_manifest(self.prep_dir)
        self.spec: DatasetSpec = load_spec(spec_path) if spec_path else self.manifest.spec
        self.tile_size: int = self.manifest.tile_size
        self.manifest_hash = file_sha256(self.prep_dir / "manifest.json")  # the manifest was loaded: it is there
        self.normalization = self.manifest.normalizer().as_dict()
        if normalization not in ("pooled", "per_city"):
            raise ValueError(f"normalization must be 'pooled' or 'per_city', got {normalization!r}")
        self.normalization_mode = normalization
        self.standardizer = CityStandardizer(self.manifest) if normalization == "per_city" else None

    def normalization_meta(self) -> dict[str, Any]:
        """What an exported model needs to normalise like training: the mode and, for ``per_city``, the
        statistics of every prepared city."""
        meta: dict[str, Any] = {"normalization_mode": self.normalization_mode}
        if self.normalization_mode == "per_city":
            meta["city_normalization"] = self.manifest.city_normalization()
        return meta

    def loader(self, split: str, cities: Iterable[str], radiometric: RadiometricConfig | None = None,
               **kwargs: Any) -> Iterable[dict[str, torch.Tensor]]:
        """``data_prep.loaders.make_wds_loader`` (``kwargs``) of ``split``; tiles get the radiometric
        augmentation ``radiometric`` (when its ``prob`` > 0), then this run's normalisation. A batch's
        tensors may be reused by the loader two batches later (data_prep/loaders.py's module doc): the
        tasks use each batch within its micro-step, backward included, before drawing the next."""
        from c2seg.data_prep.loaders import make_wds_loader

        loader = make_wds_loader(self.prep_dir, split, cities=list(cities), **kwargs)
        jitter = None
        if radiometric is not None and radiometric.prob > 0:
            jitter = RadiometricJitter(self.spec, self.normalization, radiometric)
        if jitter is None and self.standardizer is None:
            return loader
        seed = [kwargs.get("seed", 0), kwargs.get("epoch", 0), kwargs.get("rank", 0), 1]
        return _Batches(loader, jitter, seed, self.standardizer)

    def each_tile_once(self, split: str, cities: Iterable[str], batch_size: int, rank: int = 0,
                       world_size: int = 1, max_batches: int | None = None,
                       equal_batches: bool = False) -> Iterator[dict[str, torch.Tensor]]:
        """Batches holding every tile of ``split`` in ``cities`` exactly once over all ranks (rank r reads
        tiles r, r + W, ...: random access to the Zarr store), normalised as in training; for validation,
        where the shard loaders repeat tiles so that every rank gets as many batches. ``max_batches``: at
        most this many per rank. ``equal_batches``: every rank yields as many batches as rank 0 (which has
        the most), the surplus ones marked ``batch["padding"] = True`` (a repeat, not to be counted), for
        callers whose forward is collective (ZeRO-3 gathers parameters in every forward)."""
        from torch.utils.data import DataLoader, Subset

        from c2seg.data_prep.loaders import ZarrTileDataset, collate_views

        tiles = ZarrTileDataset(self.prep_dir, split, cities=list(cities))
        rounds = math.ceil(len(range(0, len(tiles), world_size)) / batch_size)  # rank 0's: the most
        if max_batches is not None:
            rounds = min(rounds, max_batches)
        loader = DataLoader(Subset(tiles, range(rank, len(tiles), world_size)), batch_size=batch_size,
                            collate_fn=collate_views)
        batch, done = None, 0
        for batch in itertools.islice(loader, rounds):
            batch = self._standardized(batch)
            done += 1
            yield batch
        if equal_batches and done < rounds:
            filler = batch if batch is not None else self._standardized(collate_views([tiles[0]]))
            for _ in range(rounds - done):
                yield {**filler, "padding": True}

    def _standardized(self, batch: dict[str, Any]) -> dict[str, Any]:
        return self.standardizer(batch) if self.standardizer is not None else batch


def batch_stream(make_loader: Callable[[int], Iterable], batches_per_epoch: int,
                 start: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    """Endless batches, epoch after epoch (``make_loader(epoch)``), starting at global batch ``start``:
    the loader is re-created at the saved epoch and the first batches of that epoch are skipped."""
    epoch, offset = divmod(start, batches_per_epoch)
    while True:
        for i, batch in enumerate(make_loader(epoch)):
            if i >= batches_per_epoch:
                break
            if i >= offset:
                yield batch
        offset = 0
        epoch += 1


def model_inputs(batch: dict[str, Any], modalities: Iterable[str], dtype: torch.dtype,
                 device: torch.device) -> dict[str, torch.Tensor]:
    """The modality tensors of a batch, on the engine's device and dtype."""
    return {m: batch[m].to(device=device, dtype=dtype) for m in modalities if m in batch}
