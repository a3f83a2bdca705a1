"""The output-space domain critic of adversarial adaptation (AdaptSegNet; HighDAN's output alignment).

A fully convolutional discriminator reads a segmenter's softmax map (the scored classes) and says, per cell
of a coarse grid, whether it came from the source or the target city. The segmenter is trained to make its
target maps look like source maps to it. Self-training cannot find a class its teacher never predicts on
the target; this alignment can, because it pushes the whole class layout of target predictions towards the
source's (on the demo cities: the target's pastures, which no self-trained model ever predicted).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

SOURCE, TARGET = 1.0, 0.0  # the critic's labels


class OutputCritic(nn.Sequential):
    """Four 4x4 stride-2 convolutions (``width`` x 1, 2, 4, 8 channels) with leaky ReLU 0.2, then a 4x4
    stride-2 convolution to one source-vs-target logit per cell: (B, K, H, W) -> (B, 1, H/32, W/32)."""

    def __init__(self, num_classes: int, width: int = 64) -> None:
        chans = [num_classes, width, 2 * width, 4 * width, 8 * width]
        layers: list[nn.Module] = []
        for c_in, c_out in zip(chans, chans[1:]):
            layers += [nn.Conv2d(c_in, c_out, 4, stride=2, padding=1), nn.LeakyReLU(0.2, inplace=True)]
        super().__init__(*layers, nn.Conv2d(chans[-1], 1, 4, stride=2, padding=1))


def domain_loss(critic_logits: torch.Tensor, label: float) -> torch.Tensor:
    """Binary cross-entropy of every cell against ``label`` (SOURCE or TARGET)."""
    return F.binary_cross_entropy_with_logits(critic_logits, torch.full_like(critic_logits, label))
