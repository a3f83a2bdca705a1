"""Radiometric augmentation: random sensor and atmosphere changes per tile, the part of a cross-city
shift that no flip or rotation covers. Applied to normalised batches, it acts as the change in the raw
units would:

- optical modalities (bands with ``wavelengths_nm``): an illumination gain with a spectral tilt,
  ``raw * gain * (1 + tilt * (lambda - 1000 nm) / 1000 nm)``, plus a haze offset falling as
  ``(lambda / 450 nm) ** -4`` (path radiance, strongest in the blue);
- modalities in dB (SAR): a calibration offset added to every band.

In normalised units ``x = (raw - mean) / std`` this is ``x * g + ((g - 1) * mean + offset) / std`` per
band; nodata pixels (0 in every band) stay 0."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import torch

from c2seg.spec import DatasetSpec
from c2seg.train.config import RadiometricConfig


class RadiometricJitter:
    """Draws and applies :mod:`train.augment`'s changes to every tile of a batch with chance ``cfg.prob``."""

    def __init__(self, spec: DatasetSpec, stats: dict[str, dict[str, list[float]]], cfg: RadiometricConfig) -> None:
        self.cfg = cfg
        self.optical: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.db: dict[str, torch.Tensor] = {}
        for m in spec.modalities:
            mean = torch.tensor(stats[m.name]["mean"], dtype=torch.float32)
            std = torch.tensor(stats[m.name]["std"], dtype=torch.float32).clamp_min(1e-6)
            if m.kept_wavelengths_nm is not None:
                wl = torch.tensor(m.kept_wavelengths_nm, dtype=torch.float32)
                self.optical[m.name] = (mean / std, (wl - 1000.0) / 1000.0, (wl / 450.0) ** -4 / std, 1.0 / std)
            elif m.unit.lower() == "db":
                self.db[m.name] = 1.0 / std

    def __call__(self, batch: dict[str, torch.Tensor], gen: torch.Generator) -> dict[str, torch.Tensor]:
        """``batch`` with the modality tensors (B, C, H, W) changed; draws from ``gen`` only."""
        c = self.cfg
        n = batch["city_id"].shape[0]
        on = (torch.rand(n, generator=gen) < c.prob).float()

        def uniform(lo: float, hi: float) -> torch.Tensor:
            return lo + (hi - lo) * torch.rand(n, generator=gen)

        gain = 1 + on * (uniform(*c.gain) - 1)
        tilt = on * uniform(-c.tilt_per_1000nm, c.tilt_per_1000nm)
        haze = on * uniform(0.0, c.haze_450nm)
        db = on * uniform(-c.db_offset, c.db_offset)
        out = dict(batch)
        for name, (mean_over_std, slope, haze_per_unit, inv_std) in self.optical.items():
            if name in batch:
                g = gain[:, None] * (1 + tilt[:, None] * slope)  # (B, C)
                offset = haze[:, None] * haze_per_unit
                if c.band_gain > 0 or c.band_offset > 0:  # each band its own calibration (no draw when off)
                    bands = (n, len(inv_std))
                    g = g * (1 + on[:, None] * c.band_gain * (2 * torch.rand(bands, generator=gen) - 1))
                    offset = offset + on[:, None] * c.band_offset * (2 * torch.rand(bands, generator=gen) - 1) * inv_std
                shift = (g - 1) * mean_over_std + offset
                out[name] = affine_bands(batch[name], g, shift)
        for name, inv_std in self.db.items():
            if name in batch:
                out[name] = affine_bands(batch[name], torch.ones(n, len(inv_std)), db[:, None] * inv_std)
        return out


def affine_bands(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``x * scale + shift`` per tile and band for normalised (B, C, H, W) ``x`` with (B, C) ``scale`` and
    ``shift``; nodata pixels (0 in every band) stay 0."""
    nodata = (x == 0).all(1, keepdim=True)
    y = x * scale[:, :, None, None].to(x.dtype) + shift[:, :, None, None].to(x.dtype)
    return y.masked_fill_(nodata, 0.0)


def jittered(batches: Iterable[dict[str, torch.Tensor]], jitter: RadiometricJitter,
             seed: list[int]) -> Iterator[dict[str, torch.Tensor]]:
    """``batches`` through ``jitter`` with a generator seeded by ``seed`` (e.g. seed, epoch, rank): the
    same loader position always gets the same change, so a resumed run sees the same data."""
    gen = torch.Generator().manual_seed(int(np.random.SeedSequence(seed).generate_state(1)[0]))
    for batch in batches:
        yield jitter(batch, gen)
