"""Model zoo: the fusion segmenter and its masked-reconstruction pretrainer (no DeepSpeed import)."""

from train.models.backbone import FusionBackbone
from train.models.pretrainer import MaskedPretrainer
from train.models.segmenter import FusionSegmenter

__all__ = ["FusionBackbone", "FusionSegmenter", "MaskedPretrainer"]
