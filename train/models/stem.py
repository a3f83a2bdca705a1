"""A convolutional stem beside the transformer: full-resolution features for the decoder's skips.

The transformer sees one token per ``patch_size`` x ``patch_size`` patch, so thin structures (streets,
river banks) and class edges must be rebuilt from coarse features; a U-Net keeps them from its first
layer and learns far faster on the 64-128 px tiles of cross-city segmentation. The stem gives the
fusion model that path: each present modality's bands are projected to ``stem_dim`` channels by a
1x1 convolution (its own per modality, so any subset of modalities works) and summed, then a double
3x3 convolution at full resolution and one more per halving, down to 1/(patch_size/2):
skips of ``stem_dim * 2**k`` channels at 1/2**k, k = 0 .. log2(patch_size) - 1.

GroupNorm standardises each channel group over the whole tile, so a pixel's features depend on what else the
tile or inference window holds; inference therefore defaults to the training tile size (inference/config.py).
LayerNorm over each pixel's channels instead removed that dependence but also each pixel's brightness: on the
shift suite its chain won on the haze pair (95.4 against 94.8 % whole-city mIoU) and lost on gain (78.8 against
95.5 %) and material (55.5 against 63.7 %), so it was not kept (README, the peer benchmark).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from c2seg.spec import DatasetSpec


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm of 8 groups (1 when the channels do not divide): independent of the batch size per rank."""
    return nn.GroupNorm(8 if channels % 8 == 0 else 1, channels)


def double_conv(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    """Two 3x3 convolutions with GroupNorm and GELU; the first one strided by ``stride``."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1), group_norm(c_out), nn.GELU(),
                         nn.Conv2d(c_out, c_out, 3, padding=1), group_norm(c_out), nn.GELU())


def skip_channels(stem_dim: int, patch_size: int) -> list[int]:
    """Channels of the stem's skips, finest first."""
    return [stem_dim * 2 ** k for k in range(int(math.log2(patch_size)))]


class ConvStem(nn.Module):
    """Modality dict of (B, C, H, W) -> skips [(B, stem_dim, H, W), (B, 2 stem_dim, H/2, W/2), ...]."""

    def __init__(self, spec: DatasetSpec, stem_dim: int, patch_size: int) -> None:
        super().__init__()
        self.spectral = nn.ModuleDict({m.name: nn.Conv2d(m.channels, stem_dim, 1) for m in spec.modalities})
        chans = skip_channels(stem_dim, patch_size)
        self.levels = nn.ModuleList([double_conv(stem_dim, chans[0])] +
                                    [double_conv(a, b, stride=2) for a, b in zip(chans, chans[1:])])

    def forward(self, inputs: dict[str, torch.Tensor], names: list[str],
                drop: str | None = None) -> list[torch.Tensor]:
        """``drop``: a modality left out (computed, zero-weighted: every rank uses every parameter)."""
        x = sum(self.spectral[m](inputs[m]) * (0.0 if m == drop else 1.0) for m in names)
        skips = []
        for level in self.levels:
            x = level(x)
            skips.append(x)
        return skips


class SkipDecoder(nn.Module):
    """Fused tokens (B, D, H/p, W/p) and the stem's skips -> logits (B, K, H, W): at each halving from
    coarse to fine, x2 bilinear upsampling, concatenation with the skip, a double 3x3 convolution. A level
    has ``decoder_dim`` channels, or twice its skip's where that is fewer (a U-Net's narrow full-resolution
    end: with ``large``'s 256 decoder channels the full-resolution convolutions run at 64)."""

    def __init__(self, embed_dim: int, decoder_dim: int, stem_dim: int, patch_size: int,
                 num_logits: int) -> None:
        super().__init__()
        self.proj = nn.Sequential(nn.Conv2d(embed_dim, decoder_dim, 1), group_norm(decoder_dim), nn.GELU())
        self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        skips = list(reversed(skip_channels(stem_dim, patch_size)))  # coarsest first
        widths = [min(decoder_dim, 2 * c) for c in skips]
        self.fuse = nn.ModuleList([double_conv(c_in + skip, c_out)
                                   for c_in, skip, c_out in zip([decoder_dim, *widths], skips, widths)])
        self.classifier = nn.Conv2d(widths[-1], num_logits, 1)

    def forward(self, features: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        x = self.proj(features)
        for fuse, skip in zip(self.fuse, reversed(skips)):
            x = fuse(torch.cat([self.up(x), skip], dim=1))
        return self.classifier(x)
