"""Token embeddings: one spectral patch embedding per modality, 2D sin-cos positions.

A modality with many bands (HSI: 242 or 116) is cut into contiguous spectral groups of at most
``max_bands_per_token`` bands (zero-padded to equal size); each group gives one token per patch and
gets its own group embedding (SatMAE / Galileo). Patch weights are generated from each band's
wavelength by a small MLP (DOFA), so the same weights serve a sensor with another band set; a
modality without wavelengths (SAR) uses a learned convolution per group.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from c2seg.spec import Modality
from c2seg.train.config import ModelConfig


def _fourier(values: torch.Tensor, dim: int) -> torch.Tensor:
    """Sin-cos features of scalars ``values`` (N,) -> (N, dim)."""
    freqs = torch.exp(torch.arange(dim // 2, dtype=torch.float32) * (-math.log(1000.0) / (dim // 2)))
    angles = values.float()[:, None] * freqs[None] * 100.0
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_pos_embed(h: int, w: int, dim: int, device=None) -> torch.Tensor:
    """Fixed 2D sin-cos position embedding of an ``h x w`` token grid -> (h*w, dim); any grid size works,
    so inference windows need not match the training tile size."""
    rows, cols = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                                indexing="ij")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter)
    out = []
    for grid in (rows.reshape(-1), cols.reshape(-1)):
        angles = grid[:, None] * omega[None]
        out += [angles.sin(), angles.cos()]
    return torch.cat(out, dim=1).to(device)


class SpectralPatchEmbed(nn.Module):
    """(B, C, H, W) of one modality -> (B, G, N, D) tokens: G spectral groups, N = (H/p)(W/p) patches."""

    def __init__(self, modality: Modality, cfg: ModelConfig) -> None:
        super().__init__()
        bands = modality.channels
        self.groups = math.ceil(bands / cfg.max_bands_per_token)
        self.group_bands = math.ceil(bands / self.groups)
        self.bands, self.patch, self.dim = bands, cfg.patch_size, cfg.embed_dim
        padded = self.groups * self.group_bands
        valid = torch.zeros(padded, dtype=torch.bool)
        valid[:bands] = True
        self.register_buffer("band_valid", valid, persistent=False)
        self.use_wavelengths = cfg.spectral_embedding == "wavelength" and modality.kept_wavelengths_nm is not None
        if self.use_wavelengths:
            wl = torch.zeros(padded)
            wl[:bands] = torch.tensor(modality.kept_wavelengths_nm, dtype=torch.float32) / 1000.0  # micrometres
            hidden = cfg.wavelength_hidden
            # the generator's input: fixed Fourier features of each band's wavelength, a buffer so they move
            # with the model to its device
            self.register_buffer("wavelength_features", _fourier(wl, hidden), persistent=False)
            self.weight_generator = nn.Sequential(
                nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, self.dim * self.patch * self.patch))
            self.bias = nn.Parameter(torch.zeros(self.groups * self.dim))
        else:
            self.proj = nn.Conv2d(padded, self.groups * self.dim, self.patch, stride=self.patch, groups=self.groups)
        self.group_embed = nn.Parameter(torch.randn(self.groups, self.dim) * 0.02)

    def _weights(self, dtype: torch.dtype) -> torch.Tensor:
        w = self.weight_generator(self.wavelength_features.to(dtype))  # (G*S, D*p*p)
        w = w.view(self.groups, self.group_bands, self.dim, self.patch, self.patch).transpose(1, 2)
        return w.reshape(self.groups * self.dim, self.group_bands, self.patch, self.patch) / math.sqrt(
            self.group_bands * self.patch * self.patch)

    def pad_bands(self, x: torch.Tensor) -> torch.Tensor:
        """Zero-pad the band axis to G x S bands."""
        extra = self.groups * self.group_bands - x.shape[1]
        return F.pad(x, (0, 0, 0, 0, 0, extra)) if extra else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.bands:
            raise ValueError(f"expected {self.bands} bands, got {x.shape[1]}")
        x = self.pad_bands(x)
        if self.use_wavelengths:
            out = F.conv2d(x, self._weights(x.dtype), self.bias, stride=self.patch, groups=self.groups)
        else:
            out = self.proj(x)
        b, _, h, w = out.shape
        out = out.view(b, self.groups, self.dim, h * w).transpose(2, 3)
        return out + self.group_embed[None, :, None, :]
