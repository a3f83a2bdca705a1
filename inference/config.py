"""Settings of a sliding-window inference run (``configs/infer/*.yaml``; command-line flags override)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

from c2seg.errors import C2SegError
from c2seg.inference.predictor import Tta
from c2seg.inference.windows import Blend

log = logging.getLogger("c2seg.infer")


@dataclass(frozen=True)
class InferConfig:
    # window size in px; None: the tile size the model was trained on. The model's predictions depend on the
    # window: the stem's GroupNorm statistics and the attention span all of it (train/models/stem.py)
    window: int | None = None
    overlap: float = 0.5  # fraction of the window shared by neighbouring windows, in [0, 1)
    blend: Blend = "gaussian"
    tta: Tta = "none"
    batch_size: int = 8
    block: int = 2048  # output block (zarr chunk) size: the unit of work split across ranks
    save_probs: bool = False  # keep blended probabilities and write a per-class probability GeoTIFF
    # a model adapted with partial adaptation records the classes it found in its target city; the others
    # (absent there: their source pixels were left out while adapting) get probability 0, unless this is true
    predict_absent: bool = False
    quicklook: bool = True
    cog_blocksize: int = 512  # internal tile size of the class-map COG
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    wait_timeout_s: float = 3600.0  # how long rank 0 waits for the other ranks' blocks

    def __post_init__(self) -> None:
        if self.window is not None and self.window < 8:
            raise C2SegError(f"window must be >= 8 px, got {self.window}")
        if not 0.0 <= self.overlap < 1.0:
            raise C2SegError(f"overlap must be in [0, 1), got {self.overlap}")
        if self.batch_size < 1:
            raise C2SegError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.block < 16 or self.block % 16:
            raise C2SegError(f"block must be a multiple of 16 (>= 16), got {self.block}")
        if self.cog_blocksize < 128 or self.cog_blocksize % 16:
            raise C2SegError(f"cog_blocksize must be a multiple of 16 (>= 128), got {self.cog_blocksize}")

    def for_model(self, tile_size: int) -> InferConfig:
        """These settings for a model trained on ``tile_size`` px tiles: the window defaults to that size; a
        window of another size is kept, with a warning."""
        if self.window is None:
            return replace(self, window=tile_size)
        if self.window != tile_size:
            log.warning("window %d px, but the model was trained on %d px tiles: its predictions depend on the window "
                        "(leave --window out to use the tile size)", self.window, tile_size)
        return self

    def store_key(self) -> dict:
        """The settings that change the numbers: an existing output store must match them to resume."""
        return {"window": self.window, "overlap": self.overlap, "blend": self.blend, "tta": self.tta,
                "predict_absent": self.predict_absent}
