"""A light segmentation decoder: fused tokens (B, D, H/p, W/p) -> logits (B, K, H, W) by log2(p)
stages of x2 bilinear upsampling + 3x3 convolution."""

from __future__ import annotations

import math

import torch
from torch import nn


class SegDecoder(nn.Module):
    def __init__(self, embed_dim: int, decoder_dim: int, patch_size: int, num_logits: int) -> None:
        super().__init__()
        self.proj = nn.Sequential(nn.Conv2d(embed_dim, decoder_dim, 1), nn.GroupNorm(8 if decoder_dim % 8 == 0 else 1,
                                                                                     decoder_dim), nn.GELU())
        stages = []
        for _ in range(int(math.log2(patch_size))):
            stages += [nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                       nn.Conv2d(decoder_dim, decoder_dim, 3, padding=1),
                       nn.GroupNorm(8 if decoder_dim % 8 == 0 else 1, decoder_dim), nn.GELU()]
        self.up = nn.Sequential(*stages)
        self.classifier = nn.Conv2d(decoder_dim, num_logits, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.up(self.proj(features)))
