"""Physical-looking surface spectra, band integration and per-class material / radar profiles.

Surfaces are linear mixtures of a few endmembers (green vegetation, dry vegetation, soil, water,
asphalt, concrete, roof tiles) defined as smooth reflectance curves over 350-2600 nm. A band's value is
the curve integrated against a Gaussian response (centre = wavelength, FWHM = bandwidth), so MSI bands
are consistent with the HSI bands of the same pixel. Classes are matched to profiles by keywords in
their names, so any spec (new datasets included) gets sensible materials; unknown names get a random,
seed-determined mixture.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from c2seg.spec import Modality

ENDMEMBERS = ("veg", "dry", "soil", "water", "asphalt", "concrete", "roof")
_LAMBDA = np.arange(350.0, 2601.0, 2.0)


def _g(lam: np.ndarray, centre: float, width: float) -> np.ndarray:
    return np.exp(-0.5 * ((lam - centre) / width) ** 2)


def _s(lam: np.ndarray, centre: float, width: float) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-(lam - centre) / width))


def endmember_curves(lam: np.ndarray, red_edge_nm: float = 715.0, nir_level: float = 0.45,
                     soil_brightness: float = 1.0) -> np.ndarray:
    """Reflectance (0..1) of each endmember at wavelengths ``lam``: (len(ENDMEMBERS), len(lam)).
    ``red_edge_nm`` / ``nir_level`` shift vegetation (phenology), ``soil_brightness`` scales soil."""
    water_dips = (1 - 0.55 * _g(lam, 1450, 55)) * (1 - 0.75 * _g(lam, 1940, 70)) * (1 - 0.4 * _s(lam, 2450, 40))
    veg = (0.03 + 0.05 * _g(lam, 550, 35) + nir_level * _s(lam, red_edge_nm, 13)
           * (1 - 0.45 * _s(lam, 1330, 90)) - 0.015 * _g(lam, 670, 25)) * water_dips
    dry = (0.07 + 0.28 * _s(lam, 690, 70) - 0.06 * _g(lam, 2100, 50)) * (1 - 0.25 * _g(lam, 1940, 70))
    soil = soil_brightness * (0.07 + 0.28 * (1 - np.exp(-(lam - 350) / 650))) * \
        (1 - 0.15 * _g(lam, 1420, 40)) * (1 - 0.25 * _g(lam, 1920, 50)) * (1 - 0.12 * _g(lam, 2200, 30))
    water = 0.08 * np.exp(-(lam - 420) / 200) + 0.01 * _g(lam, 560, 40) + 0.004
    asphalt = 0.07 + 0.05 * (lam - 350) / 2250
    concrete = (0.2 + 0.08 * _s(lam, 500, 60)) * (1 - 0.1 * _g(lam, 1940, 70))
    roof = 0.05 + 0.22 * _s(lam, 590, 25) - 0.05 * _s(lam, 1500, 200)
    return np.clip(np.stack([veg, dry, soil, water, asphalt, concrete, roof]), 0.001, 1.0)


def band_matrix(wavelengths: tuple[float, ...], bandwidths: tuple[float, ...] | None,
                **curve_args) -> np.ndarray:
    """Endmember reflectance integrated over each band's Gaussian response: (n_endmembers, bands)."""
    centres = np.asarray(wavelengths, dtype=float)
    if bandwidths is None:
        step = np.diff(centres).mean() if centres.size > 1 else 50.0
        widths = np.full(centres.size, max(abs(step), 5.0))
    else:
        widths = np.asarray(bandwidths, dtype=float)
    curves = endmember_curves(_LAMBDA, **curve_args)
    response = np.exp(-4 * np.log(2) * ((_LAMBDA[None, :] - centres[:, None]) / widths[:, None]) ** 2)
    response /= response.sum(axis=1, keepdims=True).clip(1e-12)
    return curves @ response.T


def optical_wavelengths(modality: Modality) -> tuple[float, ...]:
    """The modality's band centres; when the spec gives none, evenly spaced over 400-2500 nm."""
    if modality.wavelengths_nm is not None:
        return modality.wavelengths_nm
    return tuple(np.linspace(400, 2500, modality.bands).round(1)) if modality.bands > 1 else (650.0,)


def modality_kind(modality: Modality) -> str:
    """'optical' (spectra), 'sar' (dB backscatter) or 'generic'."""
    if modality.wavelengths_nm is not None or modality.name in ("hsi", "msi") or "reflectance" in modality.unit:
        return "optical"
    if modality.unit.strip().lower() == "db" or modality.name == "sar":
        return "sar"
    return "generic"


@dataclass(frozen=True)
class ClassProfile:
    """What a class looks like: layer it is drawn in, endmember mixture, radar backscatter and
    brightness. ``layer``: water, road, urban (blocks), forest (forest zones) or rural (parcels)."""

    layer: str
    weights: tuple[float, ...]  # over ENDMEMBERS
    copol_db: float
    brightness: float = 1.0
    variability: float = 0.25  # per-parcel jitter of the mixture


def _w(**kw: float) -> tuple[float, ...]:
    return tuple(kw.get(e, 0.0) for e in ENDMEMBERS)


# (keywords in the class name, profile); the first profile with a matching keyword wins.
PROFILES: tuple[tuple[tuple[str, ...], ClassProfile], ...] = (
    (("water", "flood", "river", "lake", "sea"), ClassProfile("water", _w(water=0.96, veg=0.02, soil=0.02), -18.0,
                                                              variability=0.1)),
    (("wetland", "marsh", "swamp"), ClassProfile("rural", _w(veg=0.5, water=0.4, soil=0.1), -13.0)),
    (("street", "road"), ClassProfile("road", _w(asphalt=0.8, concrete=0.1, veg=0.1), -14.0, variability=0.1)),
    (("industrial", "commercial", "transport"), ClassProfile("urban", _w(concrete=0.5, asphalt=0.3, roof=0.1,
                                                                         soil=0.1), -5.0, 1.1)),
    (("mine", "dump", "construction"), ClassProfile("urban", _w(soil=0.7, concrete=0.2, dry=0.1), -10.0, 1.15)),
    (("artificial", "park", "green urban"), ClassProfile("urban", _w(veg=0.75, dry=0.1, soil=0.05, concrete=0.1),
                                                         -9.0)),
    (("urban", "built", "residential", "settlement"), ClassProfile("urban", _w(roof=0.35, concrete=0.25,
                                                                                  asphalt=0.15, veg=0.25), -4.0)),
    (("permanent", "orchard", "vineyard"), ClassProfile("rural", _w(veg=0.6, soil=0.3, dry=0.1), -9.0)),
    (("arable", "crop", "agric", "farm"), ClassProfile("rural", _w(soil=0.5, veg=0.4, dry=0.1), -11.0,
                                                       variability=0.6)),
    (("pasture", "grass", "meadow"), ClassProfile("rural", _w(veg=0.7, dry=0.25, soil=0.05), -10.0)),
    (("forest", "tree", "wood"), ClassProfile("forest", _w(veg=0.95, dry=0.05), -7.0, 0.8, 0.1)),
    (("shrub", "scrub", "bush"), ClassProfile("forest", _w(veg=0.5, dry=0.35, soil=0.15), -9.0)),
    (("open", "bare", "barren", "no vegetation", "sand", "rock"), ClassProfile("rural", _w(soil=0.6, dry=0.3,
                                                                                          concrete=0.1), -12.0)),
)


def class_profile(name: str, class_id: int) -> ClassProfile:
    """The profile of a class, from keywords in its name, else a random one fixed by its id."""
    lower = name.lower()
    for keywords, profile in PROFILES:
        if any(k in lower for k in keywords):
            return profile
    rng = np.random.default_rng(1000 + class_id)
    weights = rng.dirichlet(np.full(len(ENDMEMBERS), 0.5))
    return ClassProfile("rural", tuple(weights.round(4)), float(rng.uniform(-18, -6)))


def sar_band_offsets(modality: Modality) -> np.ndarray:
    """dB offset of each SAR band from the co-polarised level: cross-pol bands (VH, HV) lie ~7 dB lower."""
    names = modality.band_names or tuple(f"b{i}" for i in range(modality.bands))
    out = []
    for i, n in enumerate(names):
        n = n.upper()
        out.append(-7.0 if n in ("VH", "HV") else 0.0 if n in ("VV", "HH") else -3.0 * i)
    return np.asarray(out)
