"""Where each tile lands on a mosaic's level-0 grid and what it adds there.

A tile's footprint is whole mosaic pixels; what is left of its offset (a fraction of a pixel)
or the camera's rotation is taken up by resampling the tile (Lanczos-3; a cubic spline when
rotated) onto the grid. Each prepared tile is pre-multiplied by its feather weights (a tent
that falls to ~0 at the tile's borders), so that :mod:`scanner.stitching.mosaic` blends
overlaps by summing. Conventions as in :mod:`scanner.stitching.mosaic`.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

#: Fractional offsets closer than this (in pixels) to a whole number are snapped to it.
_SNAP_PX = 1e-6

# --------------------------------------------------------------------------- geometry


def _check_positions(positions_um: np.ndarray, pixel_size_um: float) -> np.ndarray:
    """Return ``positions_um`` as a float64 ``(N, 2)`` array, or raise ``ValueError``."""
    pos = np.asarray(positions_um, dtype=np.float64)
    if pos.ndim != 2 or pos.shape[1] != 2 or pos.shape[0] == 0:
        raise ValueError(f"positions_um must have shape (N, 2) with N >= 1, got {pos.shape}")
    if not np.all(np.isfinite(pos)):
        raise ValueError("positions_um contains non-finite values")
    if not (math.isfinite(pixel_size_um) and pixel_size_um > 0):
        raise ValueError(f"pixel_size_um must be a positive number, got {pixel_size_um}")
    return pos


def _split_offset(offset_px: float) -> tuple[int, float]:
    """Split an offset in pixels into ``(whole, fraction)`` with ``0 <= fraction < 1``.

    Offsets within :data:`_SNAP_PX` of a whole number are snapped to it, so that round-off in
    ``(x - x0) / p`` does not turn an exact placement into a 0.9999999-pixel shift.
    """
    whole = math.floor(offset_px + _SNAP_PX)
    frac = offset_px - whole
    if frac < _SNAP_PX:
        frac = 0.0
    return whole, frac


def mosaic_geometry(
    positions_um: np.ndarray, tile_shape: tuple[int, int], pixel_size_um: float
) -> tuple[tuple[float, float], tuple[int, int]]:
    """Compute the level-0 grid of a mosaic that covers all tiles.

    Parameters
    ----------
    positions_um : np.ndarray
        ``(N, 2)`` stage ``(x_um, y_um)`` of the centre of each tile's pixel ``(0, 0)``.
    tile_shape : tuple[int, int]
        Tile shape ``(rows, cols)``.
    pixel_size_um : float
        Pixel size in µm (tiles and level 0 of the mosaic share it).

    Returns
    -------
    origin_um : tuple[float, float]
        Stage ``(x_um, y_um)`` of the centre of mosaic pixel ``(0, 0)``: the smallest tile x and
        the smallest tile y.
    shape : tuple[int, int]
        Level-0 shape ``(rows, cols)``: every mosaic pixel centre up to the last one that still
        lies within some tile's pixel-centre extent.
    """
    pos = _check_positions(positions_um, pixel_size_um)
    h, w = (int(s) for s in tile_shape)
    if h < 1 or w < 1:
        raise ValueError(f"tile_shape must be positive, got {tile_shape}")
    x0 = float(pos[:, 0].min())
    y0 = float(pos[:, 1].min())
    off_x = (pos[:, 0] - x0) / pixel_size_um
    off_y = (pos[:, 1] - y0) / pixel_size_um
    cols = math.floor(float(off_x.max()) + (w - 1) + _SNAP_PX) + 1
    rows = math.floor(float(off_y.max()) + (h - 1) + _SNAP_PX) + 1
    return (x0, y0), (rows, cols)


@dataclass(frozen=True)
class _Placement:
    """Where tiles land on the level-0 grid (one entry per tile, all arrays of length N)."""

    row0: np.ndarray  # first mosaic row covered by the resampled tile
    col0: np.ndarray  # first mosaic column covered
    row1: np.ndarray  # one past the last mosaic row covered
    col1: np.ndarray  # one past the last mosaic column covered
    frac_y: np.ndarray  # fractional shift (pixels) applied along rows, in [0, 1)
    frac_x: np.ndarray  # fractional shift (pixels) applied along columns, in [0, 1)


def _placements(
    pos: np.ndarray, origin: tuple[float, float], tile_shape: tuple[int, int], p: float
) -> _Placement:
    """Integer footprint and fractional shift of each tile on the level-0 grid."""
    h, w = tile_shape
    n = pos.shape[0]
    row0 = np.empty(n, dtype=np.int64)
    col0 = np.empty(n, dtype=np.int64)
    fy = np.empty(n, dtype=np.float64)
    fx = np.empty(n, dtype=np.float64)
    for i in range(n):
        iy, fy[i] = _split_offset((pos[i, 1] - origin[1]) / p)
        ix, fx[i] = _split_offset((pos[i, 0] - origin[0]) / p)
        # A fractional shift f > 0 moves the samples of the tile off the grid: mosaic pixel
        # ix + k + 1 samples tile column k + 1 - f, so the tile covers ix + 1 .. ix + w - 1.
        row0[i] = iy + (1 if fy[i] > 0 else 0)
        col0[i] = ix + (1 if fx[i] > 0 else 0)
    row1 = row0 + np.where(fy > 0, h - 1, h)
    col1 = col0 + np.where(fx > 0, w - 1, w)
    return _Placement(row0, col0, row1, col1, fy, fx)


# --------------------------------------------------------------------------- tile preparation


def _ramp(n: int, frac: float) -> np.ndarray:
    """Feather weights along one axis of a tile resampled by ``frac`` pixels.

    The weight of a sample at tile coordinate ``u`` (``0 <= u <= n - 1``) is a tent,
    ``(min(u, n - 1 - u) + 1) / ((n + 1) / 2)``: about 1 at the tile centre, falling linearly to
    ~0 at both borders, and never exactly 0 so that a pixel seen by one tile only keeps its value.
    """
    u = np.arange(n, dtype=np.float64) if frac == 0 else np.arange(1, n) - frac
    d = np.minimum(u, (n - 1) - u) + 1.0
    return np.clip(d / ((n + 1) / 2.0), 1e-6, 1.0).astype(np.float32)


#: Half-width (taps each side) of the Lanczos kernel that resamples tiles onto the grid.
_LANCZOS_A = 3


def _lanczos_weights(t: float, a: int = _LANCZOS_A) -> np.ndarray:
    """The ``2a`` Lanczos weights of the samples at offsets ``-a + 1 .. a`` from the sample
    below a point ``t`` (``0 <= t < 1``) past it, normalised to sum 1."""
    x = t - np.arange(-a + 1, a + 1, dtype=np.float64)
    w = np.sinc(x) * np.sinc(x / a)
    return (w / w.sum()).astype(np.float32)


def _shift_subpixel(tile: np.ndarray, frac: float, axis: int) -> np.ndarray:
    """Resampling of ``tile`` by ``frac`` pixels along ``axis`` (Lanczos-3; float32 result).

    Output sample ``k`` is the tile value at coordinate ``k + 1 - frac``; the output is one
    sample shorter than the input along ``axis`` when ``frac > 0`` (the first sample would need
    data from outside the tile; the kernel's reach beyond the tile reads its edge pixels).
    Not bilinear: linear interpolation by half a pixel halves a texture's detail at a quarter
    of the sampling frequency, so each tile of a mosaic came out as sharp as its stage
    position's fraction of a pixel allowed, and die-to-die read the difference between two
    tiles' dies as a loss of texture (a false "stain" on a good scan). Lanczos-3 keeps 97-100 %
    of that detail at any fraction. Six shifted multiply-adds rather than
    ``ndimage.shift(order=3)`` (a spline prefilter and 4 x 4 taps: 14 ms a 512 px tile) or
    ``ndimage.correlate1d`` (15 ms a 1024 px tile, against 9 ms here, and numpy's large
    array operations let the other fusion thread run).
    """
    if frac == 0:
        return tile
    n = tile.shape[axis] - 1
    pad = [(0, 0), (0, 0)]
    pad[axis] = (_LANCZOS_A - 1, _LANCZOS_A)  # taps k - 2 .. k + 3 around sample k
    padded = np.pad(tile, pad, mode="edge")

    def taps(k: int) -> np.ndarray:
        cut = [slice(None), slice(None)]
        cut[axis] = slice(k, k + n)
        return padded[tuple(cut)]

    w = _lanczos_weights(1.0 - frac)
    out = taps(0) * w[0]
    for k in range(1, len(w)):
        out += taps(k) * w[k]
    return out


@dataclass
class _Prepared:
    """A tile resampled onto the mosaic grid, pre-multiplied by its feather weights."""

    data: np.ndarray  # float32 (rows, cols): resampled tile * wy[:, None] * wx[None, :]
    wy: np.ndarray  # float32 (rows,) weights along rows
    wx: np.ndarray  # float32 (cols,) weights along columns
    row0: int
    col0: int
    weight: np.ndarray | None = None  # float32 (rows, cols) when not separable (rotated tile)


def _prepare_tile(
    tiles: Any, i: int, place: _Placement, flatfield: np.ndarray | None = None
) -> _Prepared:
    """Read tile ``i``, flatten it (divide by the flat-field) and resample / weight it."""
    raw = np.asarray(tiles[i])
    if raw.ndim != 2:
        raise ValueError(f"tile {i} has shape {raw.shape}, expected 2-D")
    h, w = raw.shape
    fy = float(place.frac_y[i])
    fx = float(place.frac_x[i])
    data = raw.astype(np.float32)
    if flatfield is not None:
        data /= flatfield
    data = _shift_subpixel(data, fy, axis=0)
    data = _shift_subpixel(data, fx, axis=1)  # a fresh float32 array in every case
    wy = _ramp(h, fy)
    wx = _ramp(w, fx)
    data *= wy[:, None]
    data *= wx[None, :]
    return _Prepared(data, wy, wx, int(place.row0[i]), int(place.col0[i]))


def _tent(u: np.ndarray, n: int) -> np.ndarray:
    """The feather weight of :func:`_ramp` at (fractional) tile coordinates ``u``."""
    d = np.minimum(u, (n - 1) - u) + 1.0
    return np.clip(d / ((n + 1) / 2.0), 1e-6, 1.0).astype(np.float32)


def _rotation(rotation_deg: float) -> np.ndarray:
    """``R`` with tile pixel ``(c, r)`` at stage ``pos + R @ (c, r) * p``."""
    th = math.radians(rotation_deg)
    return np.array([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]])


def _rotated_corners(pos: np.ndarray, tile_shape: tuple[int, int], p: float,
                     rotation_deg: float) -> np.ndarray:
    """``(N, 4, 2)`` stage positions of the corner pixel centres of rotated tiles."""
    h, w = tile_shape
    corners = np.array([(0, 0), (w - 1, 0), (0, h - 1), (w - 1, h - 1)], dtype=float) * p
    return pos[:, None, :] + corners @ _rotation(rotation_deg).T


def _rotated_placements(
    pos: np.ndarray, origin: tuple[float, float], tile_shape: tuple[int, int], p: float,
    rotation_deg: float,
) -> _Placement:
    """Footprints (mosaic pixels inside each rotated tile's bounding box) of rotated tiles."""
    corners = _rotated_corners(pos, tile_shape, p, rotation_deg)
    lo = (corners.min(axis=1) - origin) / p
    hi = (corners.max(axis=1) - origin) / p
    col0 = np.ceil(lo[:, 0] - _SNAP_PX).astype(np.int64)
    row0 = np.ceil(lo[:, 1] - _SNAP_PX).astype(np.int64)
    col1 = np.floor(hi[:, 0] + _SNAP_PX).astype(np.int64) + 1
    row1 = np.floor(hi[:, 1] + _SNAP_PX).astype(np.int64) + 1
    zero = np.zeros(len(pos))
    return _Placement(row0, col0, row1, col1, zero, zero)


def _prepare_rotated(
    tiles: Any, i: int, place: _Placement, flatfield: np.ndarray | None, pos: np.ndarray,
    origin: tuple[float, float], p: float, rotation_deg: float,
) -> _Prepared:
    """Read tile ``i``, flatten it and resample it (cubic spline) onto its mosaic footprint.

    Mosaic pixel ``(R, C)`` at stage ``X`` samples the tile at ``R^T (X - pos) / p``; pixels
    outside the tile get weight 0, the others the tile's feather tent at that point.
    """
    raw = np.asarray(tiles[i])
    if raw.ndim != 2:
        raise ValueError(f"tile {i} has shape {raw.shape}, expected 2-D")
    h, w = raw.shape
    data = raw.astype(np.float32)
    if flatfield is not None:
        data /= flatfield
    r0, r1, c0, c1 = (int(place.row0[i]), int(place.row1[i]), int(place.col0[i]),
                      int(place.col1[i]))
    dx = (origin[0] + np.arange(c0, c1) * p - pos[i, 0]) / p
    dy = (origin[1] + np.arange(r0, r1) * p - pos[i, 1]) / p
    rot = _rotation(rotation_deg)
    u = rot[0, 0] * dx[None, :] + rot[1, 0] * dy[:, None]  # tile column
    v = rot[0, 1] * dx[None, :] + rot[1, 1] * dy[:, None]  # tile row
    eps = _SNAP_PX
    inside = (u >= -eps) & (u <= w - 1 + eps) & (v >= -eps) & (v <= h - 1 + eps)
    # cubic spline, not bilinear: a tile's detail must not depend on where its pixels fall
    # (see :func:`_shift_subpixel`)
    out = ndimage.map_coordinates(data, [v, u], order=3, mode="nearest").astype(np.float32)
    weight = _tent(np.clip(u, 0, w - 1), w) * _tent(np.clip(v, 0, h - 1), h)
    weight = np.where(inside, weight, 0.0).astype(np.float32)
    out *= weight
    return _Prepared(out, np.ones(r1 - r0, np.float32), np.ones(c1 - c0, np.float32), r0, c0,
                     weight)


class _TileCache:
    """Thread-safe LRU cache of prepared tiles.

    Two threads asking for the same missing tile do not both prepare it: the second waits for
    the first.
    """

    def __init__(self, loader: Callable[[int], _Prepared], capacity: int) -> None:
        self._loader = loader
        self._capacity = max(1, capacity)
        self._data: OrderedDict[int, _Prepared] = OrderedDict()
        self._pending: dict[int, threading.Event] = {}
        self._lock = threading.Lock()
        self.loads = 0

    def get(self, i: int) -> _Prepared:
        """Return prepared tile ``i``, loading it if it is not cached."""
        with self._lock:
            entry = self._data.get(i)
            if entry is not None:
                self._data.move_to_end(i)
                return entry
            event = self._pending.get(i)
            owner = event is None
            if owner:
                event = threading.Event()
                self._pending[i] = event
        if not owner:
            event.wait()
            with self._lock:
                entry = self._data.get(i)
            if entry is not None:
                return entry
            return self._loader(i)  # evicted already, or the owner failed: load it ourselves
        try:
            entry = self._loader(i)
            with self._lock:
                self.loads += 1
                self._data[i] = entry
                while len(self._data) > self._capacity:
                    self._data.popitem(last=False)
            return entry
        finally:
            with self._lock:
                del self._pending[i]
            event.set()
