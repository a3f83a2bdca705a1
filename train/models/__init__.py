"""Model zoo: the fusion segmenter and its masked-reconstruction pretrainer (no DeepSpeed import)."""

from c2seg.train.models.backbone import FusionBackbone
from c2seg.train.models.pretrainer import MaskedPretrainer
from c2seg.train.models.segmenter import FusionSegmenter

__all__ = ["FusionBackbone", "FusionSegmenter", "MaskedPretrainer"]
