"""Radiometric augmentation: in normalised units it is exactly the raw-unit change it models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from c2seg.config import ConfigError, from_dict
from c2seg.spec import load_spec
from c2seg.data_prep.manifest import Normalizer
from c2seg.train.augment import RadiometricJitter, jittered
from c2seg.train.config import RadiometricConfig

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def spec():
    return load_spec(ROOT / "configs/datasets/demo_tiny.yaml")


def _raw(spec, b=4, size=8):
    rng = np.random.default_rng(0)
    raw = {}
    for m in spec.modalities:
        if m.unit == "dB":
            raw[m.name] = rng.normal(-12, 4, (b, m.bands, size, size)).astype(np.float32)
        else:
            raw[m.name] = rng.uniform(200, 5000, (b, m.bands, size, size)).astype(np.float32)
        raw[m.name][:, :, 0, 0] = 0.0  # a nodata pixel (fill value 0 in every band)
    stats = {name: {"mean": a.mean((0, 2, 3)).tolist(), "std": a.std((0, 2, 3)).tolist()} for name, a in raw.items()}
    return raw, stats


@pytest.mark.parametrize("band_gain, band_offset", [(0.0, 0.0), (0.1, 100.0)])
def test_normalised_jitter_equals_the_raw_unit_change(spec, band_gain, band_offset):
    raw, stats = _raw(spec)
    norm = Normalizer(spec, stats)
    batch = {m: torch.from_numpy(norm(m, a)) for m, a in raw.items()}
    batch["city_id"] = torch.zeros(4, dtype=torch.long)
    cfg = RadiometricConfig(prob=1.0, band_gain=band_gain, band_offset=band_offset)
    jitter = RadiometricJitter(spec, stats, cfg)
    out = jitter(batch, torch.Generator().manual_seed(3))
    # replay the same draws in raw units
    gen = torch.Generator().manual_seed(3)
    torch.rand(4, generator=gen)  # the "on" draw
    draws = [torch.rand(4, generator=gen).numpy() for _ in range(4)]
    gain = cfg.gain[0] + (cfg.gain[1] - cfg.gain[0]) * draws[0]
    tilt = -cfg.tilt_per_1000nm + 2 * cfg.tilt_per_1000nm * draws[1]
    haze = cfg.haze_450nm * draws[2]
    db = -cfg.db_offset + 2 * cfg.db_offset * draws[3]
    for m in spec.modalities:
        x = raw[m.name].astype(np.float64)
        if m.wavelengths_nm is not None:
            wl = np.asarray(m.wavelengths_nm)[None, :, None, None]
            g = gain[:, None, None, None] * (1 + tilt[:, None, None, None] * (wl - 1000) / 1000)
            offset = haze[:, None, None, None] * (wl / 450) ** -4
            if band_gain:  # then each band's own gain and offset, drawn per modality in spec order
                per_band = [torch.rand(4, m.bands, generator=gen).numpy()[:, :, None, None] for _ in range(2)]
                g = g * (1 + band_gain * (2 * per_band[0] - 1))
                offset = offset + band_offset * (2 * per_band[1] - 1)
            changed = x * g + offset
        else:
            changed = x + db[:, None, None, None]
        changed[:, :, 0, 0] = 0.0
        expected = norm(m.name, changed.astype(np.float32))
        np.testing.assert_allclose(out[m.name].numpy(), expected, atol=2e-4, err_msg=m.name)
        assert (out[m.name][:, :, 0, 0] == 0).all(), "nodata pixels must stay 0"
    assert not torch.equal(out["hsi"], batch["hsi"])


def test_off_and_replayable(spec):
    raw, stats = _raw(spec)
    norm = Normalizer(spec, stats)
    batch = {m: torch.from_numpy(norm(m, a)) for m, a in raw.items()}
    batch["city_id"] = torch.zeros(4, dtype=torch.long)
    off = RadiometricJitter(spec, stats, RadiometricConfig(prob=0.0))(batch, torch.Generator().manual_seed(0))
    assert all(torch.equal(off[m], batch[m]) for m in spec.modality_names)
    on = RadiometricJitter(spec, stats, RadiometricConfig(prob=1.0))
    first = list(jittered([batch, batch], on, [0, 1, 2]))
    again = list(jittered([batch, batch], on, [0, 1, 2]))
    assert all(torch.equal(a["msi"], b["msi"]) for a, b in zip(first, again)), "same seed, same changes"
    assert not torch.equal(first[0]["msi"], first[1]["msi"]), "each batch gets new draws"


@pytest.mark.parametrize("bad", [{"prob": 1.5}, {"gain": [1.2, 0.8]}, {"haze": 3}])
def test_bad_radiometric_config_is_refused(bad):
    with pytest.raises(ConfigError, match="radiometric|haze|gain|prob"):
        from_dict(RadiometricConfig, bad, source="run.yaml", path="data.radiometric")
