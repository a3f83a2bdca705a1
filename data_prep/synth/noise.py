"""Coordinate-hashed noise: the same pixel gets the same value whatever window it is computed in, so
a city of any size is generated window by window with no seams.
"""

from __future__ import annotations

import numpy as np

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_PRIMES = (np.uint64(0x9E3779B97F4A7C15), np.uint64(0xC2B2AE3D27D4EB4F), np.uint64(0x165667B19E3779F9),
           np.uint64(0x27D4EB2F165667C5))


def hash_uniform(seed: int, *coords: np.ndarray) -> np.ndarray:
    """Uniform [0, 1) values from integer coordinates (splitmix64 mixing), broadcast together."""
    with np.errstate(over="ignore"):
        h = np.uint64(seed & 0xFFFFFFFFFFFFFFFF) * _PRIMES[0] + np.uint64(1)
        for i, c in enumerate(coords):
            h = h ^ (np.asarray(c).astype(np.int64).astype(np.uint64) * _PRIMES[(i + 1) % 4])
            h = (h ^ (h >> np.uint64(30))) * _M1
            h = (h ^ (h >> np.uint64(27))) * _M2
            h = h ^ (h >> np.uint64(31))
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def value_noise(seed: int, rows: np.ndarray, cols: np.ndarray, scale: float, octaves: int = 1) -> np.ndarray:
    """Smooth noise in [0, 1) at feature size ``scale`` px over global pixel ``rows`` (h,) x ``cols`` (w,)."""
    total = np.zeros((rows.size, cols.size))
    weight_sum = 0.0
    for o in range(octaves):
        s, weight = scale / 2 ** o, 0.5 ** o
        y, x = (rows + 0.5) / s, (cols + 0.5) / s
        y0, x0 = np.floor(y).astype(np.int64), np.floor(x).astype(np.int64)
        ly = np.arange(y0.min(), y0.max() + 2)
        lx = np.arange(x0.min(), x0.max() + 2)
        lattice = hash_uniform(seed * 31 + o, ly[:, None], lx[None, :])
        fy, fx = y - y0, x - x0
        fy, fx = fy * fy * (3 - 2 * fy), fx * fx * (3 - 2 * fx)
        iy, ix = (y0 - ly[0])[:, None], (x0 - lx[0])[None, :]
        top = lattice[iy, ix] * (1 - fx) + lattice[iy, ix + 1] * fx
        bottom = lattice[iy + 1, ix] * (1 - fx) + lattice[iy + 1, ix + 1] * fx
        total += weight * (top * (1 - fy[:, None]) + bottom * fy[:, None])
        weight_sum += weight
    return total / weight_sum


def voronoi(seed: int, rows: np.ndarray, cols: np.ndarray, cell: tuple[float, float],
            jitter: float = 0.7) -> tuple[np.ndarray, np.ndarray]:
    """Jittered-grid Voronoi cells of size ``cell`` (rows, cols) px: (cell id (h, w) int64, edge distance
    (h, w) in px, half the gap between the nearest and second-nearest seed, small on cell borders)."""
    ch, cw = cell
    pr, pc = np.floor(rows / ch).astype(np.int64), np.floor(cols / cw).astype(np.int64)
    best = np.full((rows.size, cols.size), np.inf)
    second = np.full_like(best, np.inf)
    best_id = np.zeros(best.shape, dtype=np.int64)
    lo = (1 - jitter) / 2
    ly = np.arange(pr.min() - 1, pr.max() + 2)[:, None]
    lx = np.arange(pc.min() - 1, pc.max() + 2)[None, :]
    seed_y = (ly + lo + jitter * hash_uniform(seed, ly, lx, 0)) * ch
    seed_x = (lx + lo + jitter * hash_uniform(seed, ly, lx, 1)) * cw
    y, x = rows[:, None] + 0.5, cols[None, :] + 0.5
    for dy in (-1, 0, 1):
        iy = (pr + dy - ly[0, 0])[:, None]
        for dx in (-1, 0, 1):
            ix = (pc + dx - lx[0, 0])[None, :]
            d = np.hypot(y - seed_y[iy, ix], x - seed_x[iy, ix])
            closer = d < best
            second = np.where(closer, best, np.minimum(second, d))
            best_id = np.where(closer, (iy + ly[0, 0]) * 1_000_003 + ix + lx[0, 0], best_id)
            best = np.where(closer, d, best)
    return best_id, (second - best) / 2
