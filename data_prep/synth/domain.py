"""The look of each generated city, and with it the cross-city domain shift (docs/demo-data.md).

The first source city is the reference (shift 0). Other source cities get a mild shift (0.35), target
cities the full one (1.0): illumination gain and spectral tilt, atmospheric haze (a Rayleigh-like
offset strongest in the blue), another season for vegetation (red edge and NIR plateau), brighter
soils, a SAR calibration offset, more urban area, other class proportions, elongated parcels and a
rougher texture. Every draw comes from a generator seeded by (seed, city index).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from c2seg.spec import City, DatasetSpec


@dataclass(frozen=True)
class CityStyle:
    """Parameters of one generated city."""

    seed: int  # seeds the city's land-cover layout
    shift: float  # 0 = reference city, 1 = full target shift
    gain: float  # illumination gain (all optical bands)
    tilt: float  # extra gain per 1000 nm (spectral slope of the illumination/atmosphere)
    haze: float  # path-radiance offset at 450 nm, reflectance x 1e4, falls as lambda^-4
    sar_offset_db: float
    red_edge_nm: float
    nir_level: float
    soil_brightness: float
    parcel_px: tuple[float, float]  # parcel cell size (rows, cols)
    texture: float  # amplitude of fine multiplicative texture
    urban_level: float  # urban zones where their noise exceeds this (lower = more urban)
    forest_level: float
    lake_level: float
    pool_seed: int  # seeds the class proportions inside each layer

    def optical_gain(self, wavelengths: np.ndarray) -> np.ndarray:
        return self.gain * (1 + self.tilt * (wavelengths - 1000.0) / 1000.0)

    def optical_offset(self, wavelengths: np.ndarray) -> np.ndarray:
        return self.haze * (wavelengths / 450.0) ** -4

    def proportions(self, class_ids: list[int], layer: str) -> np.ndarray:
        """Probabilities of ``class_ids`` for the parcels of ``layer`` in this city."""
        rng = np.random.default_rng([self.pool_seed, sum(map(ord, layer))])
        return rng.dirichlet(np.full(len(class_ids), 1.5))


def city_style(spec: DatasetSpec, city: City, seed: int) -> CityStyle:
    """The style of ``city``: the first source city is the reference; see the module docstring."""
    index = [c.name for c in spec.cities].index(city.name)
    first_source = spec.cities_with_role("source")[0].name == city.name
    shift = 0.0 if first_source else 0.35 if city.role == "source" else 1.0
    rng = np.random.default_rng([seed, index, 7])
    stretch = rng.uniform(0.4, 0.7)
    return CityStyle(
        seed=int(rng.integers(1 << 31)),
        shift=shift,
        gain=1.0 - shift * rng.uniform(0.12, 0.22),
        tilt=shift * rng.choice([-1, 1]) * rng.uniform(0.08, 0.15),
        haze=40.0 + shift * rng.uniform(250, 400),
        sar_offset_db=shift * rng.choice([-1, 1]) * rng.uniform(2.0, 3.0),
        red_edge_nm=715.0 + shift * rng.uniform(8, 15),
        nir_level=0.45 - shift * rng.uniform(0.06, 0.1),
        soil_brightness=1.0 + shift * rng.uniform(0.2, 0.35),
        parcel_px=(22.0 * (1 - shift * stretch * 0.5), 22.0 * (1 + shift * stretch)),
        texture=0.05 + 0.07 * shift,
        urban_level=0.6 - shift * rng.uniform(0.04, 0.07),
        forest_level=0.62 + shift * rng.uniform(-0.03, 0.03),
        lake_level=0.7 - shift * rng.uniform(0.0, 0.03),
        pool_seed=int(rng.integers(1 << 31)) if shift else seed * 7919 + 1,
    )
