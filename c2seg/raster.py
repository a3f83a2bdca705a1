"""Pixel windows of a raster grid: the unit in which every stage reads and writes scenes (prep reads them,
inference predicts and writes them, evaluation scores them)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Window:
    """A pixel window: ``row`` / ``col`` of the upper-left corner, then its size."""

    row: int
    col: int
    height: int
    width: int

    @property
    def slices(self) -> tuple[slice, slice]:
        return slice(self.row, self.row + self.height), slice(self.col, self.col + self.width)

    def clipped(self, height: int, width: int) -> Window:
        """The part of this window inside a ``height`` x ``width`` grid."""
        r0, c0 = max(self.row, 0), max(self.col, 0)
        r1, c1 = min(self.row + self.height, height), min(self.col + self.width, width)
        return Window(r0, c0, max(r1 - r0, 0), max(c1 - c0, 0))


def iter_windows(height: int, width: int, block: int) -> list[Window]:
    """Row-major blocks covering a grid (edge blocks are smaller)."""
    return [Window(r, c, min(block, height - r), min(block, width - c))
            for r in range(0, height, block) for c in range(0, width, block)]
