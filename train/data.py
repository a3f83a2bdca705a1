"""Training data from a ``c2seg data prep`` folder (through data_prep's loaders; nothing is read
from GeoTIFFs here), and resumable batch streams with a fixed number of batches per epoch."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from c2seg.spec import DatasetSpec, load_spec
from train.tracking import file_hash


class PreparedData:
    """The prep output folder seen by training: its dataset spec, normalisation and loaders."""

    def __init__(self, prep_dir: str | Path, spec_path: str | None = None) -> None:
        from data_prep.manifest import load_manifest

        self.prep_dir = Path(prep_dir)
        self.manifest = load_manifest(self.prep_dir)
        self.spec: DatasetSpec = load_spec(spec_path) if spec_path else self.manifest.spec
        self.tile_size: int = self.manifest.tile_size
        self.manifest_hash = file_hash(self.prep_dir / "manifest.json")
        self.normalization = self.manifest.normalizer().as_dict()

    def loader(self, split: str, cities: Iterable[str], **kwargs: Any) -> Iterable[dict[str, torch.Tensor]]:
        from data_prep.loaders import make_wds_loader

        return make_wds_loader(self.prep_dir, split, cities=list(cities), **kwargs)


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
