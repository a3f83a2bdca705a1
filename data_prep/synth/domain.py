"""The look of each generated city, and with it the cross-city domain shift (docs/demo-data.md).

The first source city is the reference (shift 0). Other source cities get a mild shift (0.35), target
cities the full one (1.0): illumination gain and spectral tilt, atmospheric haze (a Rayleigh-like
offset strongest in the blue), another season for vegetation (red edge and NIR plateau), brighter
soils, a SAR calibration offset, more urban area, other class proportions, elongated parcels and a
rougher texture. Every draw comes from a generator seeded by (seed, city index).

A shift profile (:data:`SHIFT_PROFILES`) keeps one kind of shift and sets every other component to the
reference city's value: ``default`` is all of the above (the cities as generated before profiles
existed, byte for byte), ``none`` no shift at all (another layout only), and ``gain``, ``material``,
``haze``, ``sar``, ``prior`` and ``texture`` one kind each; ``gain``, ``prior`` and ``texture`` add
what the default shift lacks (per-band sensor calibration, classes missing on either side, block
sizes and road widths), drawn from generators of their own so the default draws stay as they were.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, replace

import numpy as np

from c2seg.errors import C2SegError
from c2seg.spec import City, DatasetSpec
from c2seg.data_prep.synth.spectra import class_profile

MATERIAL_SHIFT = 0.3  # share of each class's endmember mixture replaced by another in a fully shifted city

SHIFT_PROFILES: dict[str, str] = {
    "default": "all kinds at once, as before profiles existed (illumination, haze, season, materials, SAR, "
               "class proportions, layout)",
    "none": "no shift: the target is another layout drawn like the reference city",
    "gain": "sensor calibration: a random gain (x0.85-1.15) and offset (+-150, x1e4 reflectance) per optical band",
    "material": "class-conditional spectra: each class's endmember mixture 30 % replaced, brighter soils, "
                "another season (red edge, NIR plateau)",
    "haze": "illumination gain and spectral tilt plus atmospheric haze (lambda^-4 offset)",
    "sar": "SAR calibration: every SAR band offset by the same +-2-3 dB",
    "prior": "class priors: other class proportions and urban / forest / water areas; the target lacks the two "
             "highest-id classes of the rural layer, the sources lack the highest-id class of the urban layer "
             "(a class new in the target)",
    "texture": "layout scale: elongated parcels, rougher texture, urban blocks 30-60 % larger, wider streets "
               "and major roads",
}

# the CityStyle fields each profile takes from the drawn (default) style; the others stay at the reference
_DRAWN_FIELDS: dict[str, tuple[str, ...]] = {
    "gain": (),
    "material": ("red_edge_nm", "nir_level", "soil_brightness", "material_mix"),
    "haze": ("gain", "tilt", "haze"),
    "sar": ("sar_offset_db",),
    "prior": ("urban_level", "forest_level", "lake_level", "pool_seed"),
    "texture": ("parcel_px", "texture"),
}


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
    material_mix: float  # share of each class's endmember mixture replaced by another
    parcel_px: tuple[float, float]  # parcel cell size (rows, cols)
    texture: float  # amplitude of fine multiplicative texture
    urban_level: float  # urban zones where their noise exceeds this (lower = more urban)
    forest_level: float
    lake_level: float
    pool_seed: int  # seeds the class proportions inside each layer
    block_px: float = 18.0  # urban block cell size
    street_px: float = 0.8  # street half-width inside urban zones (distance to a block edge)
    road_px: float = 1.0  # major road half-width
    sensor_gain_spread: float = 0.0  # per optical band: gain 1 +- this
    sensor_offset: float = 0.0  # per optical band: offset +- this (reflectance x 1e4)
    absent_class_ids: tuple[int, ...] = ()  # classes never drawn in this city

    def optical_gain(self, wavelengths: np.ndarray) -> np.ndarray:
        return self.gain * (1 + self.tilt * (wavelengths - 1000.0) / 1000.0)

    def optical_offset(self, wavelengths: np.ndarray) -> np.ndarray:
        return self.haze * (wavelengths / 450.0) ** -4

    def sensor_calibration(self, modality: str, bands: int) -> tuple[np.ndarray, np.ndarray] | None:
        """Per-band (gain, offset) of this city's sensor for ``modality``; None for a calibrated sensor."""
        if not (self.sensor_gain_spread or self.sensor_offset):
            return None
        rng = np.random.default_rng([self.seed, zlib.crc32(modality.encode()), 13])
        return (1 + self.sensor_gain_spread * rng.uniform(-1, 1, bands),
                self.sensor_offset * rng.uniform(-1, 1, bands))

    def proportions(self, class_ids: list[int], layer: str) -> np.ndarray:
        """Probabilities of ``class_ids`` for the parcels of ``layer`` in this city."""
        rng = np.random.default_rng([self.pool_seed, sum(map(ord, layer))])
        return rng.dirichlet(np.full(len(class_ids), 1.5))


def city_style(spec: DatasetSpec, city: City, seed: int, profile: str = "default") -> CityStyle:
    """The style of ``city`` under shift ``profile`` (:data:`SHIFT_PROFILES`); see the module docstring."""
    if profile not in SHIFT_PROFILES:
        raise C2SegError(f"unknown shift profile {profile!r}; choose one of {', '.join(SHIFT_PROFILES)}")
    drawn = _drawn_style(spec, city, seed)
    if profile == "default":
        return drawn
    reference = _reference_of(drawn, seed)
    if profile == "none":
        return reference
    style = replace(reference, **{f: getattr(drawn, f) for f in _DRAWN_FIELDS[profile]})
    rng = np.random.default_rng([seed, [c.name for c in spec.cities].index(city.name), 17])
    s = drawn.shift
    if profile == "gain":
        return replace(style, sensor_gain_spread=0.15 * s, sensor_offset=150.0 * s)
    if profile == "texture":
        return replace(style, block_px=18.0 * (1 + s * rng.uniform(0.3, 0.6)),
                       street_px=0.8 + s * rng.uniform(0.4, 0.7), road_px=1.0 + s * rng.uniform(0.5, 1.0))
    if profile == "prior":
        return replace(style, absent_class_ids=prior_absent_classes(spec, city.role))
    return style


def prior_absent_classes(spec: DatasetSpec, role: str) -> tuple[int, ...]:
    """The classes the ``prior`` profile leaves out of a city of ``role``: for a target (or test) city, the two
    highest-id classes of the rural layer; for a source, the highest-id class of the urban layer (then new in
    the target). A layer always keeps at least one class."""
    layer, count = ("urban", 1) if role == "source" else ("rural", 2)
    ids = sorted(c.id for c in spec.classes if c.id != spec.ignore_id and class_profile(c.name, c.id).layer == layer)
    return tuple(ids[-count:]) if len(ids) > count else ()


def _reference_of(drawn: CityStyle, seed: int) -> CityStyle:
    """``drawn`` with every shifted component at the reference city's value (its layout seed kept)."""
    return replace(drawn, shift=0.0, gain=1.0, tilt=0.0, haze=40.0, sar_offset_db=0.0, red_edge_nm=715.0,
                   nir_level=0.45, soil_brightness=1.0, material_mix=0.0, parcel_px=(22.0, 22.0), texture=0.05,
                   urban_level=0.6, forest_level=0.62, lake_level=0.7, pool_seed=seed * 7919 + 1)


def _drawn_style(spec: DatasetSpec, city: City, seed: int) -> CityStyle:
    """The default style: the first source city is the reference, the others shifted by their role."""
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
        material_mix=MATERIAL_SHIFT * shift,
        parcel_px=(22.0 * (1 - shift * stretch * 0.5), 22.0 * (1 + shift * stretch)),
        texture=0.05 + 0.07 * shift,
        urban_level=0.6 - shift * rng.uniform(0.04, 0.07),
        forest_level=0.62 + shift * rng.uniform(-0.03, 0.03),
        lake_level=0.7 - shift * rng.uniform(0.0, 0.03),
        pool_seed=int(rng.integers(1 << 31)) if shift else seed * 7919 + 1,
    )
