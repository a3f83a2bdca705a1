"""The on-disk output of one scene: a Zarr group whose arrays are chunked by output block, plus one
marker file per finished block.

``classes`` (H, W) uint8 and, optionally, ``probs`` (K, H, W) float32 (blended probabilities of the
scored classes) use one chunk per block, so ranks and array tasks that own different blocks write
disjoint chunks (zarr 3 has no cross-process locking; chunk-aligned writes are safe). A block is
marked done (``done/r<row>_c<col>``) only after its chunks are written, so a killed run resumes by
skipping marked blocks. The group's attributes record the settings it was made with; reopening it
with other settings is refused rather than mixing two runs.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from c2seg.errors import C2SegError
from c2seg.io import write_text_atomic
from c2seg.raster import Window

log = logging.getLogger("c2seg.infer")
READY = "READY"


class AccumulatorError(C2SegError):
    """An existing output store does not match this run, or other ranks never finished."""


class BlockStore:
    """Zarr-backed per-block output of a scene (see the module docstring)."""

    def __init__(self, path: Path, group: zarr.Group) -> None:
        self.path, self.group = Path(path), group
        self.classes = group["classes"]
        self.probs = group["probs"] if "probs" in group else None
        self.block = int(group.attrs["block"])

    @classmethod
    def open(cls, path: str | Path, height: int, width: int, block: int, class_ids: tuple[int, ...],
             settings: dict, save_probs: bool, rank: int = 0, timeout_s: float = 600.0) -> BlockStore:
        """Create the store (rank 0) or open it (other ranks wait for rank 0 to create it)."""
        path = Path(path)
        attrs = {"height": height, "width": width, "block": block, "class_ids": list(class_ids),
                 "settings": settings, "save_probs": save_probs}
        if rank == 0 and not (path / READY).is_file():
            root = zarr.open_group(path, mode="w")
            codec = BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle")
            root.create_array("classes", shape=(height, width), chunks=(block, block), dtype="uint8",
                              fill_value=0, compressors=codec)
            if save_probs:
                root.create_array("probs", shape=(len(class_ids), height, width),
                                  chunks=(len(class_ids), block, block), dtype="float32", fill_value=0.0,
                                  compressors=BloscCodec(cname="zstd", clevel=1, shuffle="shuffle"))
            root.attrs.update(attrs)
            (path / "done").mkdir(exist_ok=True)
            write_text_atomic(path / READY, json.dumps(attrs, sort_keys=True))  # other ranks read it once it exists
        else:
            _wait_for(lambda: (path / READY).is_file(), timeout_s, f"{path}: rank 0 never created the store")
        found = json.loads((path / READY).read_text())
        if found != json.loads(json.dumps(attrs, sort_keys=True)):
            diff = sorted(k for k in attrs if found.get(k) != json.loads(json.dumps(attrs[k])))
            raise AccumulatorError(f"{path}: existing output was made with other settings ({', '.join(diff)}); "
                                   "delete it or run with --overwrite")
        return cls(path, zarr.open_group(path, mode="r+"))

    def _marker(self, block: Window) -> Path:
        return self.path / "done" / f"r{block.row}_c{block.col}"

    def is_done(self, block: Window) -> bool:
        return self._marker(block).is_file()

    def write(self, block: Window, classes: np.ndarray, probs: np.ndarray | None) -> None:
        """Write a finished block's chunks, then mark it done."""
        rows, cols = block.slices
        self.classes[rows, cols] = classes
        if self.probs is not None and probs is not None:
            self.probs[:, rows, cols] = probs
        write_text_atomic(self._marker(block), "")

    def wait_all(self, blocks: list[Window], timeout_s: float) -> None:
        """Block until every block is marked done (by any rank); fails naming the missing ones."""
        def missing() -> list[Window]:
            return [b for b in blocks if not self.is_done(b)]
        try:
            _wait_for(lambda: not missing(), timeout_s, "")
        except AccumulatorError:
            left = missing()
            raise AccumulatorError(f"{self.path}: {len(left)} of {len(blocks)} blocks were not finished by the "
                                   f"other ranks within {timeout_s:.0f} s (e.g. {self._marker(left[0]).name}); "
                                   "rerun to resume") from None


def _wait_for(ready, timeout_s: float, message: str) -> None:
    deadline = time.monotonic() + timeout_s
    delay = 0.05
    while not ready():
        if time.monotonic() > deadline:
            raise AccumulatorError(message or "timeout")
        time.sleep(delay)
        delay = min(delay * 1.5, 2.0)
