"""Small geometric helpers shared by the samples: pixel grids, anti-aliased coverage, polygons."""

from __future__ import annotations

import numpy as np


def pixel_axes(
    x0_um: float, y0_um: float, shape: tuple[int, int], pixel_size_um: float
) -> tuple[np.ndarray, np.ndarray]:
    """Stage coordinates of the pixel columns and rows of a tile.

    Returns
    -------
    xs, ys : ndarray of float64
        ``xs[c] = x0 + c * p`` and ``ys[r] = y0 + r * p`` (pixel centres).
    """
    rows, cols = (int(v) for v in shape)
    p = float(pixel_size_um)
    xs = float(x0_um) + np.arange(cols, dtype=np.float64) * p
    ys = float(y0_um) + np.arange(rows, dtype=np.float64) * p
    return xs, ys


def pixel_window(
    x0_um: float,
    y0_um: float,
    shape: tuple[int, int],
    pixel_size_um: float,
    bbox_um: tuple[float, float, float, float],
) -> tuple[int, int, int, int]:
    """Index range ``(r0, r1, c0, c1)`` of the tile pixels whose centres lie in a stage box.

    The range may be empty (``r0 >= r1`` or ``c0 >= c1``).
    """
    rows, cols = shape
    p = pixel_size_um
    xmin, ymin, xmax, ymax = bbox_um
    c0 = max(int(np.ceil((xmin - x0_um) / p)), 0)
    c1 = min(int(np.floor((xmax - x0_um) / p)) + 1, cols)
    r0 = max(int(np.ceil((ymin - y0_um) / p)), 0)
    r1 = min(int(np.floor((ymax - y0_um) / p)) + 1, rows)
    return r0, r1, c0, c1


def interval_coverage(coords: np.ndarray, lo: float, hi: float, pixel_size_um: float) -> np.ndarray:
    """Fraction of each pixel footprint ``[c - p/2, c + p/2]`` that lies inside ``[lo, hi]``.

    This is the box-filtered (anti-aliased) indicator of an interval, exact for a square pixel.
    """
    half = 0.5 * pixel_size_um
    overlap = np.minimum(coords + half, hi) - np.maximum(coords - half, lo)
    return (np.clip(overlap, 0.0, pixel_size_um) / pixel_size_um).astype(np.float32)


def periodic_coverage(
    coords: np.ndarray, period: float, offset: float, width: float, pixel_size_um: float
) -> np.ndarray:
    """Box-filtered indicator of the intervals ``[offset + k P, offset + k P + width]``.

    Uses the antiderivative of the periodic indicator, so lines narrower than a pixel keep
    their average darkness instead of flickering in and out (no aliasing).
    """

    def antiderivative(t: np.ndarray) -> np.ndarray:
        u = t - offset
        k = np.floor(u / period)
        return k * width + np.clip(u - k * period, 0.0, width)

    half = 0.5 * pixel_size_um
    cov = (antiderivative(coords + half) - antiderivative(coords - half)) / pixel_size_um
    return np.clip(cov, 0.0, 1.0).astype(np.float32)


def edge_coverage(signed_distance: np.ndarray, pixel_size_um: float) -> np.ndarray:
    """Approximate pixel coverage from a signed distance to an edge (positive inside)."""
    return np.clip(0.5 + signed_distance / pixel_size_um, 0.0, 1.0).astype(np.float32)


def rect_polygon(xmin: float, ymin: float, xmax: float, ymax: float) -> np.ndarray:
    """(4, 2) vertices of an axis-aligned rectangle."""
    return np.array([[xmin, ymin], [xmax, ymin], [xmax, ymax], [xmin, ymax]], dtype=np.float64)


def points_in_polygon(x: np.ndarray, y: np.ndarray, polygon: np.ndarray) -> np.ndarray:
    """Even-odd (ray casting) point-in-polygon test, vectorised over the points.

    Parameters
    ----------
    x, y : ndarray
        Point coordinates (same shape).
    polygon : ndarray, shape (K, 2)
        Vertices, not repeated at the end.

    Returns
    -------
    ndarray of bool, same shape as ``x``
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    px, py = polygon[:, 0], polygon[:, 1]
    qx, qy = np.roll(px, -1), np.roll(py, -1)
    inside = np.zeros(np.broadcast(x, y).shape, dtype=bool)
    for ax, ay, bx, by in zip(px, py, qx, qy, strict=True):
        if ay == by:
            continue  # a horizontal edge never crosses a horizontal ray
        crosses = (ay > y) != (by > y)
        xi = ax + (y - ay) * (bx - ax) / (by - ay)
        inside ^= crosses & (x < xi)
    return inside
