"""The recipe's die grid in stage coordinates, and which dies a wafer scan tested.

Convention (the same as the simulator's, ``simulators/samples/wafer.py``): the grid has pitch
``die_pitch_mm`` and a die-cell corner at ``die_origin_mm`` from the wafer centre. Die
``(col, row) = (0, 0)`` is the cell whose *lower* corner (smallest stage x and y) is that
corner; ``col`` grows with stage x and ``row`` with stage y (downwards in the mosaic). Each
cell is a die plus half a scribe lane on each side.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import shapely
from shapely.geometry import Polygon


@dataclass(frozen=True)
class DieGrid:
    """A die grid in stage micrometres.

    Attributes
    ----------
    pitch_um : (float, float)
        Die pitch along x and y.
    origin_um : (float, float)
        Stage position of the lower corner (smallest x and y) of die ``(0, 0)``.
    """

    pitch_um: tuple[float, float]
    origin_um: tuple[float, float]

    @classmethod
    def from_sample(cls, sample: dict[str, Any]) -> DieGrid:
        """The grid of a wafer recipe's ``sample`` section (as stored in ``scan.json``)."""
        px, py = (float(v) * 1000.0 for v in sample["die_pitch_mm"])
        cx, cy = (float(v) for v in sample.get("center_um", (0.0, 0.0)))
        ox, oy = (float(v) * 1000.0 for v in sample.get("die_origin_mm", (0.0, 0.0)))
        return cls((px, py), (cx + ox, cy + oy))

    def index(self, x_um: float, y_um: float) -> tuple[int, int]:
        """``(col, row)`` of the die cell that contains a stage point."""
        return (math.floor((x_um - self.origin_um[0]) / self.pitch_um[0]),
                math.floor((y_um - self.origin_um[1]) / self.pitch_um[1]))

    def in_die(self, x_um: float, y_um: float) -> tuple[float, float]:
        """Position of a stage point inside its die cell, from the cell's lower corner (µm)."""
        col, row = self.index(x_um, y_um)
        x0, y0, _, _ = self.cell_box(col, row)
        return x_um - x0, y_um - y0

    def cell_box(self, col: int, row: int) -> tuple[float, float, float, float]:
        """``(xmin, ymin, xmax, ymax)`` of a die cell in stage µm."""
        x0 = self.origin_um[0] + col * self.pitch_um[0]
        y0 = self.origin_um[1] + row * self.pitch_um[1]
        return x0, y0, x0 + self.pitch_um[0], y0 + self.pitch_um[1]

    def cells_in(self, region: Polygon, min_fraction: float = 1e-6) -> list[tuple[int, int, bool]]:
        """Die cells that lie fully or partly inside a region.

        Parameters
        ----------
        region : shapely Polygon
            Usable area in stage µm (a wafer minus its edge exclusion).
        min_fraction : float
            Smallest fraction of a cell's area that must be inside for it to count (drops
            cells that only touch the region along an edge).

        Returns
        -------
        list of (col, row, full)
            Sorted by row then column; ``full`` is True when the whole cell is inside.
        """
        xmin, ymin, xmax, ymax = region.bounds
        c0, r0 = self.index(xmin, ymin)
        c1, r1 = self.index(xmax, ymax)
        rows, cols = np.mgrid[r0:r1 + 1, c0:c1 + 1]
        cols, rows = cols.ravel(), rows.ravel()
        x0 = self.origin_um[0] + cols * self.pitch_um[0]
        y0 = self.origin_um[1] + rows * self.pitch_um[1]
        cells = shapely.box(x0, y0, x0 + self.pitch_um[0], y0 + self.pitch_um[1])
        shapely.prepare(region)
        inside = shapely.area(shapely.intersection(cells, region)) / (
            self.pitch_um[0] * self.pitch_um[1])
        keep = inside > min_fraction
        return [(int(c), int(r), bool(f >= 1.0 - 1e-9))
                for c, r, f in zip(cols[keep], rows[keep], inside[keep], strict=True)]
