"""A second stand-in generator for the benchmarks, built apart from the demo's (data_prep.synth.CitySynth), so that
an accuracy claim does not rest on one generator's habits.

Where CitySynth draws a city of rectangular blocks and roads with one spectral profile per class, FieldSynth draws
a landscape the way linear spectral-unmixing models one: land cover is a mix of materials that classes share.

- **Layout.** Voronoi fields of about ``field_px`` px, their borders warped by smooth noise; each field takes a
  class from imbalanced priors (a Dirichlet draw); ``unlabelled_share`` of the fields carry no label.
- **Materials.** A library of ``len(classes) + EXTRA_MATERIALS`` materials, each a smooth random reflectance
  curve of wavelength (the same curve for every optical sensor) and a backscatter per SAR band. Each class has
  a mean mix of them (a sparse Dirichlet draw), so classes share materials (soil in cropland and bare ground,
  vegetation in grassland, cropland and parks) and their pixels overlap.
- **Abundances.** A field draws its mix around its class's mean (concentration FIELD_CONCENTRATION), each
  pixel jitters the field's (PIXEL_CONCENTRATION). A pixel's reflectance is the abundance-weighted mean of
  the materials' (the linear mixing model).
- **Sensor.** Mixed pixels at field borders (a Gaussian point-spread function), a smooth illumination field
  (slopes), clouds over ``cloud_share`` of the scene in every optical modality, band noise ``noise`` (x4 in
  the water-vapour bands); optical values in reflectance x 1e4.
- **SAR** (a modality whose unit is dB): the abundance-weighted backscatter in linear units, a per-field
  roughness term and 4-look gamma speckle, written in dB.

Everything is drawn at construction from ``seed``; :meth:`FieldSynth.render` cuts windows, as CitySynth's does.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.ndimage import gaussian_filter

from c2seg.raster import Window
from c2seg.spec import DatasetSpec, Modality

LOOKS = 4  # SAR speckle: a 4-look gamma
WATER_VAPOUR_NM = ((1350.0, 1480.0), (1780.0, 1990.0))
EXTRA_MATERIALS = 2  # materials beyond one per class
CLASS_MIX_SPARSITY = 0.5  # Dirichlet parameter of a class's mean mix (lower: fewer materials per class)
FIELD_CONCENTRATION = 10.0  # how closely a field's mix follows its class's mean (higher: closer)
PIXEL_CONCENTRATION = 40.0  # how closely a pixel's mix follows its field's
ILLUMINATION = 0.15  # log-brightness spread of the illumination field
ROUGHNESS_DB = 1.5  # SAR: field-to-field spread of the backscatter (dB)


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Zero-mean, unit-variance spatial noise whose features are about ``sigma`` px across."""
    field = gaussian_filter(rng.standard_normal(shape), sigma, mode="wrap")
    return (field - field.mean()) / (field.std() + 1e-12)


def _smooth_curve(rng: np.random.Generator, wavelengths: np.ndarray, bumps: int, width_nm: float) -> np.ndarray:
    """A smooth random function of wavelength: a trend plus ``bumps`` Gaussian features of about ``width_nm``."""
    x = (wavelengths - 400.0) / 2100.0
    curve = rng.normal(0, 1) * x + rng.normal(0, 0.5) * x**2
    for centre, height in zip(rng.uniform(400, 2500, bumps), rng.normal(0, 1, bumps)):
        curve += height * np.exp(-0.5 * ((wavelengths - centre) / (width_nm * rng.uniform(0.5, 1.5))) ** 2)
    return curve


def _wavelengths(m: Modality) -> np.ndarray:
    """The modality's band centres in nm (evenly spread over 400-2500 nm where the spec gives none)."""
    if m.wavelengths_nm is not None:
        return np.asarray(m.wavelengths_nm, np.float64)
    return np.linspace(400.0, 2500.0, m.bands)


class FieldSynth:
    """A ``size`` x ``size`` px landscape for ``spec``'s classes and modalities (see the module docstring)."""

    def __init__(self, spec: DatasetSpec, size: int, seed: int = 0, field_px: float = 150.0,
                 unlabelled_share: float = 0.05, cloud_share: float = 0.08, noise: float = 0.01) -> None:
        self.spec, self.size, self.seed, self.noise = spec, size, seed, noise
        self.rng = np.random.default_rng([seed, 20261205])
        class_ids = np.array([c.id for c in spec.classes if c.id != spec.ignore_id])
        self.field = self._fields(field_px)
        n_fields = int(self.field.max()) + 1
        priors = self.rng.dirichlet(np.full(len(class_ids), 2.0))
        field_class = self.rng.choice(len(class_ids), n_fields, p=priors)
        unlabelled = self.rng.random(n_fields) < unlabelled_share
        self.label = np.where(unlabelled, spec.ignore_id, class_ids[field_class])[self.field].astype(np.uint8)
        class_mix = self.rng.dirichlet(np.full(len(class_ids) + EXTRA_MATERIALS, CLASS_MIX_SPARSITY),
                                       len(class_ids))
        self.abundances = self._abundances(class_mix[field_class])
        cloudiness = _smooth_field(self.rng, (size, size), 6.0)
        self.cloud = cloudiness > np.quantile(cloudiness, 1 - cloud_share) if cloud_share > 0 else None
        self.arrays = {m.name: (self._sar(m) if m.unit == "dB" else self._optical(m)).astype(np.float32)
                       for m in spec.modalities}

    # ---- layout -------------------------------------------------------------------------------------------------
    def _fields(self, field_px: float) -> np.ndarray:
        """(h, w) field ids: the nearest of random centres, measured on coordinates warped by smooth noise."""
        n = max(2, round(self.size * self.size / field_px))
        centres = self.rng.uniform(0, self.size, (n, 2))
        rows, cols = np.mgrid[0:self.size, 0:self.size].astype(np.float64)
        warp = math.sqrt(field_px) / 2
        rows += warp * _smooth_field(self.rng, rows.shape, 4.0)
        cols += warp * _smooth_field(self.rng, cols.shape, 4.0)
        best = np.full(rows.shape, np.inf)
        field = np.zeros(rows.shape, np.int64)
        for i, (r, c) in enumerate(centres):
            d = (rows - r) ** 2 + (cols - c) ** 2
            closer = d < best
            best[closer], field[closer] = d[closer], i
        return field

    def _abundances(self, field_mean_mix: np.ndarray) -> np.ndarray:
        """(h, w, materials): each field's mix drawn around its class's mean (``field_mean_mix``, one row per
        field), each pixel's around its field's."""
        per_field = self.rng.gamma(FIELD_CONCENTRATION * field_mean_mix + 1e-3)
        per_field /= per_field.sum(-1, keepdims=True)
        per_pixel = self.rng.gamma(PIXEL_CONCENTRATION * per_field[self.field] + 1e-3)
        return per_pixel / per_pixel.sum(-1, keepdims=True)

    def _material_rng(self, kind: str, material: int) -> np.random.Generator:
        """The same draws for a material in every modality of a kind (a curve of wavelength, or SAR)."""
        return np.random.default_rng([self.seed, 20261205, material, kind == "sar"])

    # ---- optical ------------------------------------------------------------------------------------------------
    def _optical(self, m: Modality) -> np.ndarray:
        wavelengths = _wavelengths(m)
        library = np.stack([0.65 / (1 + np.exp(1.5 - _smooth_curve(self._material_rng("optical", i), wavelengths,
                                                                    6, 150.0)))
                            for i in range(self.abundances.shape[-1])])  # (materials, bands) reflectances
        cube = np.einsum("hwk,kb->bhw", self.abundances, library)
        cube = gaussian_filter(cube, (0, 0.7, 0.7))  # the point-spread function: mixed border pixels
        cube *= np.exp(ILLUMINATION * _smooth_field(self.rng, cube.shape[1:], 8.0))  # illumination (slopes)
        if self.cloud is not None:
            cube[:, self.cloud] = 0.45 + 0.05 * self.rng.standard_normal((m.bands, 1)) + 0.03 * \
                self.rng.standard_normal((m.bands, int(self.cloud.sum())))
        vapour = np.any([(wavelengths > lo) & (wavelengths < hi) for lo, hi in WATER_VAPOUR_NM], axis=0)
        sigma = self.noise * np.where(vapour, 4.0, 1.0)[:, None, None]
        cube += sigma * self.rng.standard_normal(cube.shape)
        return np.clip(cube, 0.0, 1.0) * 1e4

    # ---- SAR ----------------------------------------------------------------------------------------------------
    def _sar(self, m: Modality) -> np.ndarray:
        """Backscatter in dB: the materials' (-22 to -4 dB per band) mixed in linear units, a field roughness
        term, 4-look speckle."""
        library = np.stack([10 ** (self._material_rng("sar", i).uniform(-22.0, -4.0, m.bands) / 10)
                            for i in range(self.abundances.shape[-1])])
        linear = np.einsum("hwk,kb->bhw", self.abundances, library)
        roughness = ROUGHNESS_DB * self.rng.standard_normal((int(self.field.max()) + 1, m.bands))[self.field]
        linear *= 10 ** (roughness.transpose(2, 0, 1) / 10)
        return 10 * np.log10(linear * self.rng.gamma(LOOKS, 1.0 / LOOKS, linear.shape))

    def render(self, window: Window | None = None) -> dict[str, np.ndarray]:
        """Modalities (C, h, w) float32 and ``label`` (h, w) uint8 class ids of ``window`` (all when None)."""
        window = window or Window(0, 0, self.size, self.size)
        rows, cols = slice(window.row, window.row + window.height), slice(window.col, window.col + window.width)
        return {"label": self.label[rows, cols].copy(),
                **{name: a[:, rows, cols].copy() for name, a in self.arrays.items()}}
