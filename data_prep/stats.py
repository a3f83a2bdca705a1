"""Per-band statistics, computed by streaming over windows and merged across units, tasks and cities.

Mean and standard deviation are exact (per-window mean and sum of squared deviations, merged with
Chan's formula). Percentiles come from a seeded random sample of valid pixels (a fixed number per
statistics unit), pooled when merging. Nodata pixels (every band at the modality's fill value) are
left out. Values outside the modality's plausible bounds (``Modality.value_bounds``, from its unit) are
counted by :func:`count_out_of_bounds` (inspect) and refused by :func:`bounds_problem` (prep).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from threadpoolctl import threadpool_limits

from c2seg.spec import Modality

PERCENTILES = (1.0, 99.0)


def fill_value(modality: Modality) -> float:
    """The value readers put where a modality has no data: its ``nodata``, else 0."""
    return 0.0 if modality.nodata is None else float(modality.nodata)


def fill_as(fill: float, dtype: np.dtype) -> np.ndarray | None:
    """``fill`` as a value of ``dtype`` (rounded as a stored value is), or None when ``dtype`` cannot hold it:
    then no value of that dtype is nodata (a fill of -32768 in tiles stored as uint16)."""
    dtype = np.dtype(dtype)
    if dtype.kind in "ui":
        limits = np.iinfo(dtype)
        return np.asarray(fill, dtype) if limits.min <= fill <= limits.max and fill == round(fill) else None
    with np.errstate(over="ignore"):
        stored = np.asarray(fill, dtype)
    return stored if np.isfinite(stored) else None


def nodata_mask(values: np.ndarray, fill: float) -> np.ndarray:
    """``(h, w)`` True where every band of ``values`` ``(C, h, w)`` equals ``fill`` (``(B, h, w)`` for
    ``(B, C, h, w)``: the bands are axis -3)."""
    stored = fill_as(fill, values.dtype)
    if stored is None:
        return np.zeros(values.shape[:-3] + values.shape[-2:], bool)
    return np.all(values == stored, axis=-3)


def count_out_of_bounds(values: np.ndarray, modality: Modality) -> int:
    """How many of ``values`` lie outside the modality's value bounds (its fill value excepted; 0 if it has
    no bounds)."""
    if modality.value_bounds is None:
        return 0
    lo, hi = modality.value_bounds
    outside = (values < lo) | (values > hi)
    outside &= values != np.asarray(fill_value(modality), values.dtype)
    return int(np.count_nonzero(outside))


def bounds_problem(stats: BandStats, modality: Modality) -> str | None:
    """The first band whose minimum or maximum lies outside the modality's value bounds, as
    ``modality 'msi', band 3 (B4): max 1e+34 is outside [-10000, 100000] for unit 'reflectance x 1e4'``;
    None when every band is within them (or the modality has no bounds)."""
    if modality.value_bounds is None:
        return None
    lo, hi = modality.value_bounds
    bad = np.flatnonzero((stats.count > 0) & ((stats.minimum < lo) | (stats.maximum > hi)))
    if not len(bad):
        return None
    band = int(bad[0])
    which, value = ("min", stats.minimum[band]) if stats.minimum[band] < lo else ("max", stats.maximum[band])
    return (f"modality '{modality.name}', {modality.band_label(band)}: {which} {value:.6g} is outside "
            f"[{lo:g}, {hi:g}] for unit '{modality.unit}'")


DOT_HALVES_ABOVE = 10_000  # values: OpenBLAS's ddot splits longer vectors between its threads


def _dot_self(x: np.ndarray) -> np.float64:
    """``x . x`` summed in a fixed order by one-thread BLAS dots (call under a one-thread BLAS limit): the two
    halves of a vector longer than ``DOT_HALVES_ABOVE`` each, then added. That is the order a 2-thread
    OpenBLAS dot sums in, so the statistics of earlier preps on 2 cores stay bit for bit, and they no longer
    depend on the machine's core count. (A threaded dot hands every band to another thread: on busy cores
    that waited ~9 ms a band, nearly all of prep's statistics time.)"""
    if len(x) <= DOT_HALVES_ABOVE:
        return np.dot(x, x)
    half = (len(x) + 1) // 2
    return np.dot(x[:half], x[:half]) + np.dot(x[half:], x[half:])


@dataclass
class BandStats:
    """Mergeable per-band accumulator for one modality."""

    count: np.ndarray  # (C,) int64
    mean: np.ndarray  # (C,) float64
    m2: np.ndarray  # (C,) float64, sum of squared deviations
    minimum: np.ndarray
    maximum: np.ndarray
    sample: np.ndarray  # (k, C) float32, pixels kept for percentiles

    @classmethod
    def empty(cls, bands: int) -> BandStats:
        return cls(np.zeros(bands, np.int64), np.zeros(bands), np.zeros(bands), np.full(bands, np.inf),
                   np.full(bands, -np.inf), np.zeros((0, bands), np.float32))

    def add(self, values: np.ndarray, valid: np.ndarray, rng: np.random.Generator, keep: int) -> None:
        """Add the ``valid`` pixels of ``values`` ``(C, h, w)``; keep up to ``keep`` of them as a sample.
        Works band by band in float64 (exact like a whole-array float64 computation, without its memory)."""
        bands = values.shape[0]
        pixels = values.reshape(bands, -1) if valid.all() else values[:, valid]  # (C, n), a view when all valid
        n = pixels.shape[1]
        if n == 0:
            return
        mean, m2 = np.empty(bands), np.empty(bands)
        with threadpool_limits(1, user_api="blas"):
            for b in range(bands):
                x = pixels[b].astype(np.float64)
                mean[b] = x.mean()
                x -= mean[b]
                m2[b] = _dot_self(x)
        block = BandStats(np.full(bands, n, np.int64), mean, m2, pixels.min(axis=1).astype(np.float64),
                          pixels.max(axis=1).astype(np.float64),
                          pixels[:, rng.choice(n, size=min(keep, n), replace=False)].T.astype(np.float32))
        self.merge(block)

    def merge(self, other: BandStats) -> None:
        """Fold ``other`` into this accumulator (exact for mean and variance)."""
        n = self.count + other.count
        delta = other.mean - self.mean
        with np.errstate(invalid="ignore", divide="ignore"):
            w = np.where(n > 0, other.count / np.maximum(n, 1), 0.0)
        self.m2 = self.m2 + other.m2 + delta**2 * self.count * w
        self.mean = self.mean + delta * w
        self.count = n
        self.minimum = np.minimum(self.minimum, other.minimum)
        self.maximum = np.maximum(self.maximum, other.maximum)
        self.sample = np.concatenate([self.sample, other.sample])

    def summary(self) -> dict:
        """JSON-ready per-band lists: count, mean, std, min, max, p01, p99."""
        if self.sample.shape[0]:
            pct = np.percentile(self.sample, PERCENTILES, axis=0)
        else:
            pct = np.zeros((len(PERCENTILES), len(self.count)))
        std = np.sqrt(self.m2 / np.maximum(self.count, 1))
        empty = self.count == 0
        return {
            "count": self.count.tolist(),
            "mean": np.where(empty, 0.0, self.mean).tolist(),
            "std": np.where(empty, 1.0, std).tolist(),
            "min": np.where(empty, 0.0, self.minimum).tolist(),
            "max": np.where(empty, 0.0, self.maximum).tolist(),
            "p01": pct[0].tolist(),
            "p99": pct[1].tolist(),
        }

    def to_arrays(self, prefix: str) -> dict[str, np.ndarray]:
        return {f"{prefix}/{k}": getattr(self, k) for k in ("count", "mean", "m2", "minimum", "maximum", "sample")}

    @classmethod
    def from_arrays(cls, data, prefix: str) -> BandStats:
        return cls(*(np.asarray(data[f"{prefix}/{k}"]) for k in ("count", "mean", "m2", "minimum", "maximum",
                                                                  "sample")))
