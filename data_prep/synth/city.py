"""One generated city, computed block by block.

The land-cover layout depends only on global pixel coordinates (hashed noise), so any window is
seamless. Image noise (sensor noise, SAR speckle) is drawn per block of a fixed block grid from a
generator seeded by (seed, city, block), so a city is deterministic by seed at any size while only
one block (plus what a caller caches) is ever in memory.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from functools import cached_property

import numpy as np

from c2seg.spec import City, DatasetSpec, Modality
from c2seg.raster import Window, iter_windows
from c2seg.data_prep.readers.grid import grid_factor
from c2seg.data_prep.synth.domain import CityStyle, city_style
from c2seg.data_prep.synth.noise import hash_uniform, value_noise, voronoi
from c2seg.data_prep.synth.spectra import (ENDMEMBERS, band_matrix, class_profile, modality_kind, optical_wavelengths,
                                     sar_band_offsets)

BLOCK_PX = 256
REFLECTANCE_SCALE = 1e4
SAR_LOOKS = 4.4


class CitySynth:
    """Generated data of ``city`` at ``height`` x ``width`` px under domain-shift profile ``shift``
    (data_prep.synth.domain.SHIFT_PROFILES); see the module docstring."""

    def __init__(self, spec: DatasetSpec, city: City, height: int, width: int, seed: int = 0,
                 cache_blocks: int = 0, shift: str = "default") -> None:
        self.spec, self.city, self.height, self.width, self.seed = spec, city, height, width, seed
        self.style: CityStyle = city_style(spec, city, seed, shift)
        self.city_index = [c.name for c in spec.cities].index(city.name)
        self.factors = {m.name: grid_factor(spec, m) for m in spec.modalities}
        lcm = math.lcm(*self.factors.values())
        self.block_px = math.ceil(BLOCK_PX / lcm) * lcm
        self._cache: OrderedDict[tuple[int, int], dict] = OrderedDict()
        self._cache_blocks = cache_blocks
        self._profiles = {c.id: class_profile(c.name, c.id) for c in spec.classes if c.id != spec.ignore_id}

    # ---- layout -----------------------------------------------------------------------------
    def blocks(self, window: Window | None = None) -> list[Window]:
        """The fixed block grid, row-major (only the blocks touching ``window`` when given, found without
        scanning the grid); :meth:`block` takes these windows."""
        if window is None:
            return iter_windows(self.height, self.width, self.block_px)
        p = self.block_px
        return [Window(r, c, min(p, self.height - r), min(p, self.width - c))
                for r in range(window.row // p * p, window.row + window.height, p)
                for c in range(window.col // p * p, window.col + window.width, p)]

    def native_shape(self, modality: str) -> tuple[int, int]:
        f = self.factors[modality]
        return math.ceil(self.height / f), math.ceil(self.width / f)

    @cached_property
    def _pools(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Per layer: (class ids, cumulative probabilities) for parcels of that layer in this city."""
        by_layer: dict[str, list[int]] = {}
        for cid, p in self._profiles.items():
            by_layer.setdefault(p.layer, []).append(cid)
        fill = by_layer.get("rural") or by_layer.get("forest") or by_layer.get("urban") or list(self._profiles)
        pools = {}
        for layer in ("rural", "forest", "urban", "water", "road"):
            ids = by_layer.get(layer) or (fill if layer in ("rural", "forest", "urban") else [])
            ids = [i for i in ids if i not in self.style.absent_class_ids]
            if ids:
                probs = self.style.proportions(ids, layer) if layer in ("rural", "forest", "urban") else \
                    np.full(len(ids), 1 / len(ids))
                pools[layer] = (np.array(ids), np.cumsum(probs))
        return pools

    def _pick(self, layer: str, region: np.ndarray, salt: int) -> np.ndarray:
        ids, cum = self._pools[layer]
        u = hash_uniform(self.style.seed + salt, region)
        return ids[np.minimum(np.searchsorted(cum, u * cum[-1], side="right"), len(ids) - 1)]

    def land_cover(self, window: Window) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(surface class (h, w), label (h, w) uint8 with ignored parcels, region id (h, w)) in ``window``."""
        s = self.style
        rows = np.arange(window.row, window.row + window.height, dtype=np.float64)
        cols = np.arange(window.col, window.col + window.width, dtype=np.float64)
        parcel, _ = voronoi(s.seed + 5, rows, cols, s.parcel_px)
        block, block_edge = voronoi(s.seed + 6, rows, cols, (s.block_px, s.block_px), jitter=0.25)
        _, road_edge = voronoi(s.seed + 7, rows, cols, (130.0, 130.0), jitter=0.8)
        urban = value_noise(s.seed + 1, rows, cols, 200, 3) > s.urban_level
        forest = value_noise(s.seed + 2, rows, cols, 150, 3) > s.forest_level
        water = (value_noise(s.seed + 3, rows, cols, 90, 2) > s.lake_level) | \
            (np.abs(value_noise(s.seed + 4, rows, cols, 420, 2) - 0.5) < 0.01)
        surface = self._pick("rural", parcel, 11)
        region = parcel.copy()
        surface = np.where(forest, self._pick("forest", parcel, 12), surface)
        surface = np.where(urban, self._pick("urban", block, 13), surface)
        region = np.where(urban, block + (1 << 40), region)
        if "road" in self._pools:
            road_class = self._pools["road"][0][0]
            roads = (road_edge < s.road_px) | (urban & (block_edge < s.street_px))
            surface = np.where(roads, road_class, surface)
            region = np.where(roads, -1, region)
        if "water" in self._pools:
            surface = np.where(water, self._pools["water"][0][0], surface)
            region = np.where(water, -2, region)
        unlabelled = hash_uniform(s.seed + 9, region) < 0.03
        label = np.where(unlabelled & (region >= 0), self.spec.ignore_id, surface).astype(np.uint8)
        return surface, label, region

    # ---- images -------------------------------------------------------------------------------
    @cached_property
    def _tables(self) -> dict[str, np.ndarray]:
        n = max(self._profiles) + 1
        weights = np.zeros((n, len(ENDMEMBERS)))
        bright, var, copol = np.ones(n), np.zeros(n), np.full(n, -12.0)
        mix = self.style.material_mix  # other materials per class in shifted cities (roofs, soils, ...)
        for cid, p in self._profiles.items():
            other = np.random.default_rng([self.style.pool_seed, cid]).dirichlet(np.full(len(ENDMEMBERS), 0.7))
            weights[cid] = (1 - mix) * np.asarray(p.weights) + mix * other
            bright[cid], var[cid], copol[cid] = p.brightness, p.variability, p.copol_db
        return {"weights": weights, "brightness": bright, "variability": var, "copol": copol}

    def _abundances(self, surface: np.ndarray, region: np.ndarray, window: Window) -> np.ndarray:
        """Per-pixel endmember abundances times brightness: (h, w, n_endmembers)."""
        t, s = self._tables, self.style
        jitter = 2 * hash_uniform(s.seed + 20, region[..., None], np.arange(len(ENDMEMBERS))) - 1
        ab = t["weights"][surface] * (1 + t["variability"][surface][..., None] * jitter)
        ab /= ab.sum(-1, keepdims=True).clip(1e-6)
        rows = np.arange(window.row, window.row + window.height, dtype=np.float64)
        cols = np.arange(window.col, window.col + window.width, dtype=np.float64)
        texture = 1 + s.texture * (2 * value_noise(s.seed + 21, rows, cols, 2.5) - 1)
        parcel_b = 1 + 0.08 * (2 * hash_uniform(s.seed + 22, region) - 1)
        return ab * (t["brightness"][surface] * texture * parcel_b)[..., None]

    @cached_property
    def _band_tables(self) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Per optical modality: (endmember x band matrix x scale, gain, offset)."""
        s, out = self.style, {}
        for m in self.spec.modalities:
            if modality_kind(m) == "optical":
                lam = np.asarray(optical_wavelengths(m), dtype=float)
                bw = m.bandwidths_nm if m.wavelengths_nm is not None else None
                matrix = band_matrix(tuple(lam), bw, red_edge_nm=s.red_edge_nm, nir_level=s.nir_level,
                                     soil_brightness=s.soil_brightness) * REFLECTANCE_SCALE
                gain, offset = s.optical_gain(lam), s.optical_offset(lam)
                calibration = s.sensor_calibration(m.name, lam.size)
                if calibration is not None:
                    gain, offset = gain * calibration[0], offset + calibration[1]
                out[m.name] = (matrix, gain, offset)
        return out

    def _rng(self, window: Window, modality_index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.city_index, window.row, window.col, modality_index])

    def _modality(self, m: Modality, index: int, window: Window, surface: np.ndarray, region: np.ndarray,
                  abundances: np.ndarray) -> np.ndarray:
        """On-grid (C, h, w) float32 values of modality ``m`` in ``window``."""
        rng = self._rng(window, index)
        kind = modality_kind(m)
        shape = (m.bands, *surface.shape)
        if kind == "optical":
            matrix, gain, offset = self._band_tables[m.name]
            clean = np.tensordot(matrix.T.astype(np.float32), abundances.astype(np.float32), axes=(1, 2))
            clean = clean * gain[:, None, None].astype(np.float32) + offset[:, None, None].astype(np.float32)
            sigma = (15.0 + 0.01 * matrix.mean(0)).astype(np.float32)
            noisy = clean + rng.standard_normal(shape, dtype=np.float32) * sigma[:, None, None]
            return np.maximum(noisy, 0.0, out=noisy)
        if kind == "sar":
            db = self._tables["copol"][surface] + 1.5 * (2 * hash_uniform(self.style.seed + 30, region) - 1)
            db = db[None] + sar_band_offsets(m)[:, None, None] + self.style.sar_offset_db
            speckle = rng.gamma(SAR_LOOKS, 1 / SAR_LOOKS, size=shape)
            return (db + 10 * np.log10(speckle)).astype(np.float32)
        means = np.random.default_rng([index, 99]).uniform(100, 1000, size=(max(self._profiles) + 1, m.bands))
        total = abundances.sum(-1)
        values = means[surface].transpose(2, 0, 1) * total[None] * self.style.gain
        return (values * (1 + 0.02 * rng.standard_normal(shape))).astype(np.float32)

    def block(self, window: Window) -> dict[str, np.ndarray]:
        """Arrays of one block of :meth:`blocks`: each modality at its native resolution (C, h', w')
        float32 (coarse modalities averaged over whole coarse pixels) and ``label`` (h, w) uint8."""
        key = (window.row, window.col)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        surface, label, region = self.land_cover(window)
        abundances = self._abundances(surface, region, window)
        out: dict[str, np.ndarray] = {"label": label}
        for i, m in enumerate(self.spec.modalities):
            values = self._modality(m, i, window, surface, region, abundances)
            out[m.name] = _mean_pool(values, self.factors[m.name])
        if self._cache_blocks:
            self._cache[key] = out
            while len(self._cache) > self._cache_blocks:
                self._cache.popitem(last=False)
        return out

    def render(self, window: Window | None = None) -> dict[str, np.ndarray]:
        """On-grid arrays of any window, as a reader returns them: modalities (C, h, w) float32 (coarse
        ones replicated onto the grid) and ``label`` (h, w) uint8 class ids."""
        window = window or Window(0, 0, self.height, self.width)
        out = {"label": np.zeros((window.height, window.width), np.uint8)}
        for m in self.spec.modalities:
            out[m.name] = np.zeros((m.bands, window.height, window.width), np.float32)
        r1, c1 = window.row + window.height, window.col + window.width
        for b in self.blocks(window):
            data = self.block(b)
            r0, c0 = max(b.row, window.row), max(b.col, window.col)
            rr, cc = slice(r0 - b.row, min(r1, b.row + b.height) - b.row), slice(c0 - b.col, min(c1, b.col + b.width)
                                                                               - b.col)
            dst = (slice(r0 - window.row, rr.stop + b.row - window.row),
                   slice(c0 - window.col, cc.stop + b.col - window.col))
            out["label"][dst] = data["label"][rr, cc]
            for name, f in self.factors.items():
                grid = data[name] if f == 1 else np.repeat(np.repeat(data[name], f, 1), f, 2)
                out[name][(slice(None), *dst)] = grid[:, rr, cc]
        return out


def _mean_pool(values: np.ndarray, factor: int) -> np.ndarray:
    """Average ``factor`` x ``factor`` pixels; a partial edge cell is padded by edge replication."""
    if factor == 1:
        return values
    c, h, w = values.shape
    ph, pw = -h % factor, -w % factor
    if ph or pw:
        values = np.pad(values, ((0, 0), (0, ph), (0, pw)), mode="edge")
    return values.reshape(c, (h + ph) // factor, factor, (w + pw) // factor, factor).mean((2, 4), dtype=np.float32)
