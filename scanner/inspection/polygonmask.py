"""Which map pixels lie inside a sample's usable area (a shapely polygon in stage µm)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np


def polygon_pixels(polygon: Any, origin_um: tuple[float, float], pixel_um: float
                   ) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """``inside(rows, cols)``: which pixels of a grid (pixel ``(0, 0)`` centred at
    ``origin_um``) have their centre in a polygon (stage µm)."""
    import shapely

    def inside(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        x, y = np.meshgrid(origin_um[0] + cols * pixel_um, origin_um[1] + rows * pixel_um)
        return shapely.contains_xy(polygon, x, y)

    return inside


def polygon_mask(
    polygon: Any, origin_um: tuple[float, float], pixel_size_um: float, edge_um: float = 0.0
) -> Callable[[int, int, int, int], np.ndarray | None]:
    """Map-region mask function of a shapely polygon (see ``mask`` of :func:`run_tiled`).

    Parameters
    ----------
    polygon : shapely Polygon
        The sample's usable area in stage µm.
    origin_um, pixel_size_um
        Map geometry: stage ``(x, y)`` of map pixel ``(0, 0)`` and map pixel size.
    edge_um : float
        Erode the polygon by this much, so the sample's own border is not a defect.
    """
    from shapely.geometry import box

    poly = polygon.buffer(-edge_um) if edge_um > 0 else polygon
    x0, y0 = origin_um
    p = pixel_size_um
    rings = [np.asarray(r.coords) for part in getattr(poly, "geoms", [poly])
             for r in (part.exterior, *part.interiors)]
    # all edges of all rings in map pixel units (even-odd over them = exteriors minus holes)
    edges = np.concatenate([np.c_[(r[:-1, 0] - x0) / p, (r[:-1, 1] - y0) / p,
                                  (r[1:, 0] - x0) / p, (r[1:, 1] - y0) / p] for r in rings]) \
        if rings else np.zeros((0, 4))

    def mask(r0: int, c0: int, h: int, w: int) -> np.ndarray | None:
        if h <= 0 or w <= 0 or poly.is_empty:
            return None
        region = box(x0 + (c0 - 0.5) * p, y0 + (r0 - 0.5) * p,
                     x0 + (c0 + w - 0.5) * p, y0 + (r0 + h - 0.5) * p)
        if not poly.intersects(region):
            return None
        if poly.contains(region):
            return np.ones((h, w), dtype=bool)
        return _scanline_fill(edges, r0, c0, h, w)

    return mask


def _scanline_fill(edges: np.ndarray, r0: int, c0: int, h: int, w: int) -> np.ndarray:
    """Pixels ``[r0, r0+h) x [c0, c0+w)`` whose centres lie inside polygon ``edges`` (even-odd).

    ``edges`` is ``(n, 4)``: ``(xa, ya, xb, yb)`` in pixel units (x: column, y: row). Written
    here because ``skimage.draw.polygon`` tests every pixel against every vertex, which
    costs seconds per mosaic for a wafer's many-vertex circle; a scanline fill costs
    ``rows x edges`` crossings plus one pass over the pixels.
    """
    xa, ya, xb, yb = edges.T
    rows = r0 + np.arange(h, dtype=np.float64)
    lo, hi = np.minimum(ya, yb), np.maximum(ya, yb)
    near = (hi >= rows[0]) & (lo <= rows[-1]) & (ya != yb)  # edges that cross this band
    xa, ya, xb, yb, lo, hi = (v[near] for v in (xa, ya, xb, yb, lo, hi))
    # half-open rule: an edge crosses row y when lo <= y < hi (vertices counted once)
    cross = (rows[:, None] >= lo) & (rows[:, None] < hi)
    ri, ei = np.nonzero(cross)
    x = xa[ei] + (rows[ri] - ya[ei]) * (xb[ei] - xa[ei]) / (yb[ei] - ya[ei])
    # a crossing at x flips the inside/outside state of every pixel centre right of it
    col = np.clip(np.floor(x).astype(np.int64) + 1 - c0, 0, w)
    flips = np.zeros((h, w + 1), dtype=np.int32)
    np.add.at(flips, (ri, col), 1)
    return (np.cumsum(flips[:, :w], axis=1) & 1).astype(bool)
