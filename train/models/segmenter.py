"""The fusion segmenter: ``model(inputs) -> logits (B, spec.num_logits, H, W)`` for a dict of
normalised (B, C, H, W) tensors, one per modality; any non-empty subset of the modalities works.
``decoder: light`` upsamples the transformer's features alone (SegDecoder); ``decoder: skip`` adds a
convolutional stem whose full-resolution features join the decoder at every scale (train/models/stem.py).
``pixel_head`` adds a per-pixel linear classifier of the input bands to the logits (each modality its own 1x1
convolution, zero at the start), the per-pixel model that hyperspectral users compare against;
``pixel_head_means`` lets it also read the bands' means over windows around each pixel (:func:`pixel_features`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from c2seg.spec import DatasetSpec
from c2seg.train.config import ModelConfig
from c2seg.train.models.backbone import FusionBackbone
from c2seg.train.models.decoder import SegDecoder
from c2seg.train.models.encoder import init_weights
from c2seg.train.models.stem import ConvStem, SkipDecoder


def pixel_features(bands: torch.Tensor, means: tuple[int, ...]) -> torch.Tensor:
    """What the per-pixel head reads of a (B, C, H, W) modality: its bands, then for each window side in
    ``means`` their mean over that window around the pixel (only pixels inside the tile counted): (B, C x
    (1 + len(means)), H, W)."""
    return torch.cat([bands, *(F.avg_pool2d(bands, k, stride=1, padding=k // 2, count_include_pad=False)
                               for k in means)], dim=1)


class FusionSegmenter(nn.Module):
    def __init__(self, spec: DatasetSpec, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = FusionBackbone(spec, cfg)
        if cfg.decoder == "skip":
            self.stem = ConvStem(spec, cfg.stem_dim, cfg.patch_size)
            self.head = SkipDecoder(cfg.embed_dim, cfg.decoder_dim, cfg.stem_dim, cfg.patch_size, spec.num_logits)
        else:
            self.head = SegDecoder(cfg.embed_dim, cfg.decoder_dim, cfg.patch_size, spec.num_logits)
        init_weights(self)
        if cfg.pixel_head:  # after init_weights: it starts at zero, so the model starts as without it
            width = 1 + len(cfg.pixel_head_means)
            self.pixel = nn.ModuleDict({m.name: nn.Conv2d(m.channels * width, spec.num_logits, 1)
                                        for m in spec.modalities})
            for conv in self.pixel.values():
                nn.init.zeros_(conv.weight)
                nn.init.zeros_(conv.bias)

    def forward(self, inputs: dict[str, torch.Tensor], drop: str | None = None) -> torch.Tensor:
        """Logits for ``inputs``; ``drop`` (modality dropout, chosen by the training task): a modality left
        out of the fusion, still computed with weight 0 so that every parameter is in the graph."""
        names = self.backbone.present(inputs)
        first = inputs[names[0]]
        h, w = first.shape[-2:]
        p = self.cfg.patch_size
        pad = (0, (-w) % p, 0, (-h) % p)
        padded = {m: F.pad(inputs[m], pad) if any(pad) else inputs[m] for m in names}
        features = self.backbone(padded, drop)
        if self.cfg.decoder == "skip":
            logits = self.head(features, self.stem(padded, names, drop))[..., :h, :w]
        else:
            logits = self.head(features)[..., :h, :w]
        if self.cfg.pixel_head:
            means = self.cfg.pixel_head_means
            logits = logits + sum(self.pixel[m](pixel_features(inputs[m], means)) * (0.0 if m == drop else 1.0)
                                  for m in names)
        return logits
