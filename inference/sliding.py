"""Blended sliding-window prediction of one output block of a scene.

Every window touching the block is predicted (windows straddling two blocks are predicted by both
blocks' owners, which keeps blocks independent and the result deterministic); the windows' softmax
probabilities, weighted by the blend map, are summed over the block and divided by the summed
weights. Inputs are read one strip of windows at a time, so memory depends on the block and window
sizes, never on the scene size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from itertools import groupby

import numpy as np

from c2seg.raster import Window
from c2seg.data_prep.readers.base import Scene
from c2seg.data_prep.stats import fill_value, nodata_mask
from c2seg.inference.windows import blend_weights, windows_touching

Normalize = Callable[[str, np.ndarray], np.ndarray]
PredictFn = Callable[[dict[str, np.ndarray]], np.ndarray]


@dataclass
class BlockResult:
    classes: np.ndarray  # (h, w) uint8, the spec's output_nodata where every modality is nodata
    probs: np.ndarray  # (K, h, w) float32
    windows: int  # windows predicted for this block


def _pad_to(values: np.ndarray, height: int, width: int) -> np.ndarray:
    """Reflect-pad the last two axes of ``values`` up to ``height`` x ``width`` (edge for 1-px axes)."""
    ph, pw = height - values.shape[-2], width - values.shape[-1]
    if ph <= 0 and pw <= 0:
        return values
    pad = [(0, 0)] * (values.ndim - 2) + [(0, max(ph, 0)), (0, max(pw, 0))]
    mode = "reflect" if min(values.shape[-2:]) > 1 else "edge"
    return np.pad(values, pad, mode=mode)


def predict_block(scene: Scene, block: Window, grid: list[Window], window: int, predict: PredictFn,
                  normalize: Normalize, modalities: list[str], class_ids: tuple[int, ...],
                  blend: str = "gaussian", batch_size: int = 8) -> BlockResult:
    """Blended probabilities and the class map of ``block`` from the windows of ``grid`` touching it."""
    k = len(class_ids)
    acc = np.zeros((k, block.height, block.width), np.float32)
    wsum = np.zeros((block.height, block.width), np.float32)
    valid = np.zeros((block.height, block.width), bool)
    weights = blend_weights(window, blend)
    fills = {m: fill_value(scene.spec.modality(m)) for m in modalities}
    touching = windows_touching(grid, block)
    for row, strip_windows in groupby(touching, key=lambda w: w.row):
        strip_windows = list(strip_windows)
        c0 = strip_windows[0].col
        c1 = max(w.col + w.width for w in strip_windows)
        strip = Window(row, c0, strip_windows[0].height, c1 - c0)
        raw = {m: scene.read(m, strip) for m in modalities}
        _mark_valid(valid, block, strip, raw, fills)
        # padded to a full window: only an axis shorter than the window (one window at 0) needs it, so every
        # crop below is window x window
        strip_in = {m: _pad_to(normalize(m, v), window, max(window, v.shape[-1])) for m, v in raw.items()}
        for i in range(0, len(strip_windows), batch_size):
            batch = strip_windows[i:i + batch_size]
            inputs = {m: np.stack([v[:, :, w.col - c0:w.col - c0 + window] for w in batch])
                      for m, v in strip_in.items()}
            probs = predict(inputs)
            for w, p in zip(batch, probs):
                _accumulate(acc, wsum, block, w, p, weights)
    acc /= wsum[None]  # in place: the block's blended probabilities
    classes = np.asarray(class_ids, np.uint8)[np.argmax(acc, axis=0)]
    classes[~valid] = scene.spec.output_nodata
    return BlockResult(classes, acc, len(touching))


def _mark_valid(valid: np.ndarray, block: Window, strip: Window, raw: dict[str, np.ndarray],
                fills: dict[str, float]) -> None:
    """Set ``valid`` where the strip overlaps the block and some modality has data."""
    r0, r1 = max(block.row, strip.row), min(block.row + block.height, strip.row + strip.height)
    c0, c1 = max(block.col, strip.col), min(block.col + block.width, strip.col + strip.width)
    if r0 >= r1 or c0 >= c1:
        return
    has_data = np.zeros((r1 - r0, c1 - c0), bool)
    for m, v in raw.items():
        has_data |= ~nodata_mask(v[:, r0 - strip.row:r1 - strip.row, c0 - strip.col:c1 - strip.col], fills[m])
    valid[r0 - block.row:r1 - block.row, c0 - block.col:c1 - block.col] |= has_data


def _accumulate(acc: np.ndarray, wsum: np.ndarray, block: Window, w: Window, probs: np.ndarray,
                weights: np.ndarray) -> None:
    """Add a window's weighted probabilities to the part of the block it covers."""
    r0, r1 = max(block.row, w.row), min(block.row + block.height, w.row + w.height)
    c0, c1 = max(block.col, w.col), min(block.col + block.width, w.col + w.width)
    src = np.s_[r0 - w.row:r1 - w.row, c0 - w.col:c1 - w.col]
    dst = np.s_[r0 - block.row:r1 - block.row, c0 - block.col:c1 - block.col]
    wt = weights[src]
    acc[(slice(None),) + dst] += probs[(slice(None),) + src] * wt
    wsum[dst] += wt
