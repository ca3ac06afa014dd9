"""Where a focus map measures: focus points spread over the sample, and the order that
visits them with the least stage travel.

The fits of what they measure are in :mod:`scanner.acquisition.focus.surface`.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np

__all__ = ["focus_map_points", "focus_points_layout", "inside_tiles", "tour_order"]


def focus_points_layout(
    polygon_xy: np.ndarray,
    n_points: int,
    layout: Literal["grid", "rings"] = "grid",
    margin_um: float = 0.0,
) -> np.ndarray:
    """Spread about ``n_points`` focus points over a polygon, all strictly inside it.

    Parameters
    ----------
    polygon_xy : ndarray, shape (K, 2)
        Vertices of the region (µm), e.g. the usable region of a wafer.
    n_points : int
        Wanted number of points (>= 1). "grid" gives the count closest to it that a square
        grid achieves; "rings" gives exactly it on a round region.
    layout : {"grid", "rings"}
        "grid": a square grid of cell centres clipped to the polygon, in serpentine order
        (short travel). "rings": the centroid plus concentric rings with points in
        proportion to their circumference (uniform density on wafers); ring points that
        fall outside a non-round polygon are dropped.
    margin_um : float
        Keep the points this far inside the boundary (edge exclusion, wafer bevel).

    Returns
    -------
    ndarray, shape (n, 2)
        Focus point positions (µm).

    Raises
    ------
    ValueError
        Too few vertices, ``n_points < 1``, an unknown layout, or a polygon with nothing
        left inside the margin.
    """
    poly = _region(polygon_xy, n_points, layout, margin_um)
    c = _inner_centre(poly)
    if n_points == 1:
        return c[None, :]
    if layout == "rings":
        return _ring_points(poly, c, n_points)
    best = _grid_points(poly, n_points)
    if len(best) == 0:
        return c[None, :]
    return best


def focus_map_points(region: Any, fov_um: float, n_points: int,
                     layout: Literal["grid", "rings"] = "grid") -> np.ndarray:
    """A focus map's points over a scan's region (a shapely polygon, µm): half a field
    (``fov_um``, the field's shorter side) inside it, so that each field sees the sample. On a
    sample hardly larger than a field nothing is left that far inside, and the fields reach
    past its edge instead (see :func:`focus_points_layout`)."""
    margin = fov_um / 2
    while margin > 1.0 and region.buffer(-margin).is_empty:
        margin /= 2
    return focus_points_layout(np.asarray(region.exterior.coords)[:-1], n_points, layout,
                               margin_um=margin if margin > 1.0 else 0.0)


def inside_tiles(points: np.ndarray, tiles_xy: np.ndarray) -> np.ndarray:
    """Focus points moved into the box of the scan's tile centres (``tiles_xy``, (n, 2) µm).

    The tiles were checked against the stage's travel before the first move, and the travel
    is a box, so every point of their box is reachable. A point of the region itself need
    not be: on a region narrower than a field the tile grid sits flush with the region's
    corner, its centre up to half a field away from the region's, and a focus point at the
    region's centre lay outside the travel that the tiles kept inside (the serial driver
    refused the move; a C++ adapter without limits of its own would have driven there).
    Points that land on one place are kept once.
    """
    p = np.asarray(points, dtype=float).reshape(-1, 2)
    t = np.asarray(tiles_xy, dtype=float).reshape(-1, 2)
    if not len(t):
        return p
    q = np.clip(p, t.min(axis=0), t.max(axis=0))
    # points moved onto one place are measured there once, in their first one's turn
    _, first = np.unique(np.round(q, 3), axis=0, return_index=True)
    return q[np.sort(first)]


def _region(polygon_xy: np.ndarray, n_points: int, layout: str, margin_um: float) -> Any:
    """The arguments checked, and the polygon (made valid) shrunk by the margin."""
    from shapely.geometry import Polygon

    verts = np.asarray(polygon_xy, dtype=float)
    if verts.ndim != 2 or verts.shape[1] != 2 or verts.shape[0] < 3:
        raise ValueError(f"polygon_xy must be (K >= 3, 2), got {verts.shape}")
    if n_points < 1:
        raise ValueError(f"n_points must be >= 1, got {n_points}")
    if layout not in ("grid", "rings"):
        raise ValueError(f"unknown layout {layout!r}")
    poly = Polygon(verts)
    if not poly.is_valid:
        poly = poly.buffer(0)
    if margin_um > 0:
        poly = poly.buffer(-margin_um)
    if poly.is_empty or poly.area <= 0:
        raise ValueError("no area left inside the polygon after the margin")
    return poly


def _inner_centre(poly: Any) -> np.ndarray:
    """The polygon's centroid, or a point inside it where the centroid is not (a crescent)."""
    centre = poly.centroid
    c = np.array([centre.x, centre.y])
    if not poly.contains(centre):
        rp = poly.representative_point()
        c = np.array([rp.x, rp.y])
    return c


def _inside(poly: Any, p: np.ndarray) -> np.ndarray:
    """The points of ``p`` inside the polygon, in their order."""
    from shapely import contains_xy

    return p[contains_xy(poly, p[:, 0], p[:, 1])] if len(p) else p


def _ring_points(poly: Any, c: np.ndarray, n_points: int) -> np.ndarray:
    """The centre plus concentric rings, points in proportion to each ring's radius."""
    xs, ys = np.asarray(poly.exterior.coords).T
    radius = float(np.max(np.hypot(xs - c[0], ys - c[1])))
    n_rings = max(1, round((-3 + math.sqrt(9 + 12 * (n_points - 1))) / 6))
    # points per ring in proportion to its radius (largest remainders), summing to n - 1
    share = (n_points - 1) * np.arange(1, n_rings + 1) / np.sum(np.arange(1, n_rings + 1))
    counts = np.floor(share).astype(int)
    counts[np.argsort(share - counts)[::-1][: n_points - 1 - counts.sum()]] += 1
    pts = [c]
    for k, m in enumerate(counts, start=1):
        if m == 0:
            continue
        # the outer ring close to the edge: a fit extrapolates badly beyond its points
        r = radius * k / (n_rings + 0.15)
        phase = (0.5 if k % 2 else 0.0) * 2 * math.pi / m  # stagger successive rings
        ang = phase + 2 * math.pi * np.arange(m) / m
        pts.extend(np.stack([c[0] + r * np.cos(ang), c[1] + r * np.sin(ang)], axis=1))
    return _inside(poly, np.asarray(pts))


def _grid_points(poly: Any, n_points: int) -> np.ndarray:
    """The square grid (serpentine order) whose count inside the polygon comes closest to
    ``n_points`` (empty when none falls inside)."""
    minx, miny, maxx, maxy = poly.bounds

    def grid(step: float) -> np.ndarray:
        # cell centres, the lattice centred on the bounding box
        nx = max(1, int(math.floor((maxx - minx) / step)) + 1)
        ny = max(1, int(math.floor((maxy - miny) / step)) + 1)
        gx = (minx + maxx) / 2 + (np.arange(nx) - (nx - 1) / 2) * step
        gy = (miny + maxy) / 2 + (np.arange(ny) - (ny - 1) / 2) * step
        rows = [np.stack([gx if j % 2 == 0 else gx[::-1], np.full(nx, yy)], axis=1)
                for j, yy in enumerate(gy)]  # serpentine
        return _inside(poly, np.concatenate(rows))

    step = math.sqrt(poly.area / n_points)
    best = cand = grid(step)
    for _ in range(30):  # the count goes as 1 / step**2: rescale the step towards n_points
        if len(best) == n_points:
            break
        step *= math.sqrt(max(len(cand), 0.5) / n_points) * (1 + 0.01 * _)  # 0.01: no 2-cycles
        cand = grid(step)
        if abs(len(cand) - n_points) < abs(len(best) - n_points):
            best = cand
    return best


def tour_order(
    points_xy: np.ndarray, start_xy: tuple[float, float], end_xy: tuple[float, float]
) -> np.ndarray:
    """Visiting order of focus points for a short stage path from ``start_xy`` to ``end_xy``.

    Both stage axes move at once, so a move costs about its longer axis (Chebyshev distance).
    Nearest neighbour from the start, then 2-opt improvement of the open path whose ends are
    pinned to the current stage position and the scan's first tile (written here: no
    dependency of the project solves this small open-path problem, and a few hundred points
    take milliseconds).

    Parameters
    ----------
    points_xy : ndarray, shape (n, 2)
        Focus points (µm).
    start_xy, end_xy : (float, float)
        Where the stage is, and where it goes after the last point.

    Returns
    -------
    ndarray of int
        A permutation of ``range(n)``.
    """
    pts = np.asarray(points_xy, dtype=float).reshape(-1, 2)
    n = len(pts)
    if n <= 1:
        return np.arange(n)
    nodes = np.vstack([np.asarray(start_xy, float), pts, np.asarray(end_xy, float)])
    d = np.max(np.abs(nodes[:, None, :] - nodes[None, :, :]), axis=2)
    path = [0]
    left = set(range(1, n + 1))
    while left:
        nxt = min(left, key=lambda j: d[path[-1], j])
        path.append(nxt)
        left.remove(nxt)
    path.append(n + 1)
    improved = True
    while improved:  # 2-opt: reverse a segment when that shortens the path
        improved = False
        for i in range(1, len(path) - 2):
            for k in range(i + 1, len(path) - 1):
                a, b, c, e = path[i - 1], path[i], path[k], path[k + 1]
                if d[a, c] + d[b, e] < d[a, b] + d[c, e] - 1e-9:
                    path[i : k + 1] = path[i : k + 1][::-1]
                    improved = True
    return np.array(path[1:-1]) - 1
