"""The sliding-window grid over a scene, the blocks that split it across ranks, and blend weights.

Windows are square (``window`` px) and spaced by ``stride = round(window * (1 - overlap))``; the last
window of each axis is shifted inward so it ends at the scene edge. A scene axis shorter than the
window gets one window starting at 0, whose input is reflect-padded to the window size.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

import numpy as np

from c2seg.raster import Window, iter_windows
from c2seg.data_prep.tiling import tile_origins

Blend = Literal["gaussian", "cosine"]
MIN_WEIGHT = 1e-3  # weights are clamped here so edge pixels of every window still count


def stride_of(window: int, overlap: float) -> int:
    """Spacing of windows for a fractional ``overlap`` in [0, 1)."""
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    return max(1, round(window * (1.0 - overlap)))


def axis_starts(length: int, window: int, stride: int) -> list[int]:
    """Window starts along one axis: every ``stride``, the last one shifted inward to end at ``length`` (the
    prep tiling's origins; one window at 0 for an axis shorter than the window)."""
    return tile_origins(length, window, stride) or [0]


def window_grid(height: int, width: int, window: int, overlap: float) -> list[Window]:
    """Every window of the scene, row-major; sizes are clipped to the scene (padding fills the rest)."""
    stride = stride_of(window, overlap)
    return [Window(r, c, min(window, height - r), min(window, width - c))
            for r in axis_starts(height, window, stride) for c in axis_starts(width, window, stride)]


def block_grid(height: int, width: int, block: int) -> list[Window]:
    """Output blocks (row-major), aligned to the accumulator's zarr chunks."""
    return iter_windows(height, width, block)


def windows_touching(windows: list[Window], block: Window) -> list[Window]:
    """The windows that overlap ``block`` (each contributes to some of its pixels)."""
    r1, c1 = block.row + block.height, block.col + block.width
    return [w for w in windows if w.row < r1 and w.row + w.height > block.row
            and w.col < c1 and w.col + w.width > block.col]


@lru_cache(maxsize=8)
def blend_weights(window: int, mode: Blend = "gaussian") -> np.ndarray:
    """``(window, window)`` float32 importance map, peak 1, clamped at :data:`MIN_WEIGHT`.

    gaussian: sigma = 0.125 * window around the centre (as MONAI); cosine: a raised-cosine (Hann)
    window in each axis (as terratorch)."""
    centre = (window - 1) / 2.0
    x = np.arange(window, dtype=np.float64) - centre
    if mode == "gaussian":
        sigma = 0.125 * window
        profile = np.exp(-0.5 * (x / sigma) ** 2)
    elif mode == "cosine":
        profile = 0.5 * (1.0 + np.cos(np.pi * x / (window / 2.0)))
    else:
        raise ValueError(f"blend must be 'gaussian' or 'cosine', got {mode!r}")
    weights = np.outer(profile, profile)
    weights = np.maximum(weights / weights.max(), MIN_WEIGHT).astype(np.float32)
    weights.setflags(write=False)
    return weights
