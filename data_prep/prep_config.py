"""Typed configuration of ``c2seg data prep`` (tiling, validation split, shards, storage)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from c2seg.errors import C2SegError
from c2seg.config import from_dict, load_config
from c2seg.spec import DatasetSpec

StoreDtype = Literal["float32", "float16", "uint16"]


@dataclass(frozen=True)
class PrepConfig:
    """How cities become tiles. ``tile_size`` / ``stride`` default to the spec's ``tiling``, except that a
    tile-folder city (``format: tiles``) whose tiles are smaller than the spec's tile size sets the tile size
    of the whole job to the side of its smallest tile (the release is cut already, and one tile size is
    trained on), the stride scaled in the spec's proportion: 64 px tiles under ``tiling: {size: 128, stride:
    64}`` give 64 / 32. A ``tile_size`` set here is kept, and a city with no scene or tile that large fails
    prep naming the city, both sizes and this setting.

    Every city must get train tiles (a source city's labels, a target city's tiles to adapt on), and a city
    that holds out validation blocks must get val tiles; else prep fails naming the city, the split and why.
    An unlabelled city holds out no blocks: its val split could score nothing.

    ``store_dtypes`` maps a modality to its stored dtype: ``float16`` (default; relative error
    <= 2**-11, the measured maximum is written to the manifest), ``uint16`` (lossless for
    reflectance x 1e4 integers; non-integer or out-of-range values are refused, so a negative ``nodata`` in
    a kept tile is too) or ``float32``. Each one trains (with augmentation) and verifies alike.
    """

    tile_size: int | None = None
    stride: int | None = None
    max_nodata_fraction: float = 0.5  # tiles with more nodata pixels are dropped (and counted)
    val_block_size: int | None = None  # side of the validation blocks in px; default 4 x tile size
    val_fraction: float = 0.2  # share of blocks held out for validation (in labelled cities that are not sources)
    # share of a *source* city's blocks held out. Source labels are what a cross-city model learns from: a
    # held-out block, and every tile straddling one, is lost to training (0.25 of the demo's 128 px blocks hid
    # a third of its source pixels and 56-71 % of its urban, industrial and mine pixels), and training scores
    # the target cities' val split only. None: val_fraction, as before this option existed.
    source_val_fraction: float | None = 0.0
    seed: int = 0  # picks the validation blocks
    shard_max_samples: int = 256
    shard_max_bytes: int = 256 * 2**20
    min_shards_per_split: int = 4  # per city and split, so that ranks x workers all get work
    store_dtypes: dict[str, StoreDtype] = field(default_factory=dict)
    zarr_codec: Literal["lz4", "zstd", "none"] = "lz4"  # zarr chunks: Blosc lz4 (fast), zstd (smaller), none
    zarr_clevel: int = 3  # Blosc compression level
    stats_block_rows: int = 256  # rows per statistics work unit
    stats_samples_per_block: int = 4096  # pixels sampled per statistics unit for percentiles

    def __post_init__(self) -> None:
        if self.tile_size is not None and self.tile_size < 8:
            raise C2SegError(f"tile_size must be >= 8, got {self.tile_size}")
        if self.stride is not None and self.stride < 1:
            raise C2SegError(f"stride must be >= 1, got {self.stride}")
        if not 0.0 <= self.max_nodata_fraction <= 1.0:
            raise C2SegError(f"max_nodata_fraction must be in [0, 1], got {self.max_nodata_fraction}")
        for key in ("val_fraction", "source_val_fraction"):
            value = getattr(self, key)
            if value is not None and not 0.0 <= value < 1.0:
                raise C2SegError(f"{key} must be in [0, 1), got {value}")
        if self.shard_max_samples < 1 or self.shard_max_bytes < 1 or self.min_shards_per_split < 1:
            raise C2SegError("shard_max_samples, shard_max_bytes and min_shards_per_split must be >= 1")
        if not 1 <= self.zarr_clevel <= 22:
            raise C2SegError(f"zarr_clevel must be in 1..22, got {self.zarr_clevel}")

    def resolved(self, spec: DatasetSpec, tile_sides: dict[str, int] | None = None) -> PrepConfig:
        """This config with tile size, stride, validation block and store dtypes filled in from ``spec`` and
        ``tile_sides``, the side of the smallest tile of each tile-folder city (see the class doc)."""
        size, stride = self._tiling(spec, tile_sides or {})
        if stride > size:
            raise C2SegError(f"stride {stride} is larger than tile_size {size}")
        unknown = sorted(set(self.store_dtypes) - set(spec.modality_names))
        if unknown:
            raise C2SegError(f"store_dtypes names modalities {unknown} that spec '{spec.name}' does not have")
        dtypes = {m: self.store_dtypes.get(m, "float16") for m in spec.modality_names}
        return PrepConfig(**{**self.__dict__, "tile_size": size, "stride": stride,
                             "val_block_size": self.val_block_size or 4 * size, "store_dtypes": dtypes})

    def _tiling(self, spec: DatasetSpec, tile_sides: dict[str, int]) -> tuple[int, int]:
        """Tile size and stride: this config's, else the spec's shrunk to the smallest tile of a tile folder."""
        if self.tile_size is not None:
            return self.tile_size, self.stride or self.tile_size // 2
        size, stride = spec.tiling.size, spec.tiling.stride
        smallest = min(tile_sides.values(), default=size)
        if smallest < size:
            size, stride = smallest, max(1, smallest * stride // size)
        return size, self.stride or stride


def load_prep_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> PrepConfig:
    """The prep config in ``path`` (defaults when None), with dotted ``overrides`` applied."""
    if path is None:
        data: dict[str, Any] = {}
        from c2seg.config import set_dotted

        for key, value in (overrides or {}).items():
            set_dotted(data, key, value)
        return from_dict(PrepConfig, data, source="<prep overrides>")
    return load_config(PrepConfig, path, overrides)
