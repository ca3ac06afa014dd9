"""Fuse acquired tiles into a stitched, multiscale OME-NGFF (v0.5, zarr v3) mosaic.

The fusion streams: it walks over the *output* chunks of level 0, reads only the tiles that
intersect each chunk (a cheap bounding-box test on the stage positions), blends them and writes
the chunk. Memory is bounded by a small LRU cache of prepared tiles plus one accumulator per
worker thread; it does not grow with the number of tiles or with the size of the mosaic.

Conventions
-----------
* A stage position ``(x_um, y_um)`` is the stage coordinate of the **centre** of a tile's pixel
  ``(0, 0)``. Stage x grows with the image column, stage y with the image row: tile pixel
  ``(r, c)`` lies at stage ``(x + c * p, y + r * p)`` with ``p`` the pixel size in µm.
* Mosaic pixel ``(R, C)`` of level 0 lies at stage ``(x0 + C * p, y0 + R * p)`` where
  ``(x0, y0)`` is the mosaic origin (see :func:`mosaic_geometry`).
* Level ``k`` has pixels of size ``p * 2**k``; its pixel ``(0, 0)`` is the 2**k x 2**k block of
  level-0 pixels at the origin, so its centre lies at ``origin + (2**k - 1) / 2 * p``. This is
  the ``translation`` stored in the OME-NGFF metadata (in ``[y, x]`` order, as the axes).

Placement is sub-pixel: each tile is resampled (bilinear) by the fractional part of its offset
in mosaic pixels, on the tile only. Overlaps are blended with feathered weights (a linear ramp
that falls to ~0 at each tile border, the product of the x and y ramps), so there are no seams.
"""

from __future__ import annotations

import itertools
import math
import shutil
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from scipy import ndimage

from .errors import UserError

__all__ = [
    "MosaicInfo", "build_pyramid", "create_multiscale", "finish_multiscale", "fuse_mosaic",
    "check_complete", "mosaic_geometry", "mosaic_region", "open_mosaic",
]

#: Fractional offsets closer than this (in pixels) to a whole number are snapped to it.
_SNAP_PX = 1e-6
#: Worker threads used for fusion and pyramid building (numpy and the codecs release the GIL).
_WORKERS = 2
#: Bounds on the number of prepared tiles kept in the LRU cache.
_MIN_CACHE_TILES = 4
_MAX_CACHE_TILES = 32


@dataclass(frozen=True)
class MosaicInfo:
    """Summary of a mosaic written by :func:`fuse_mosaic`.

    Attributes
    ----------
    path : Path
        The zarr v3 group holding the mosaic.
    shape : tuple[int, int]
        Level-0 shape ``(rows, cols)``.
    pixel_size_um : float
        Level-0 pixel size in µm.
    origin_um : tuple[float, float]
        Stage ``(x_um, y_um)`` of the centre of level-0 pixel ``(0, 0)``.
    n_levels : int
        Number of pyramid levels (level 0 included).
    """

    path: Path
    shape: tuple[int, int]
    pixel_size_um: float
    origin_um: tuple[float, float]
    n_levels: int


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


def _shift_linear(tile: np.ndarray, frac: float, axis: int) -> np.ndarray:
    """Bilinear resampling of ``tile`` by ``frac`` pixels along ``axis`` (float32 result).

    Output sample ``k`` is the tile value at coordinate ``k + 1 - frac``; the output is one
    sample shorter than the input along ``axis`` when ``frac > 0`` (the first sample would need
    data from outside the tile).
    """
    if frac == 0:
        return tile
    lo = [slice(None)] * 2
    hi = [slice(None)] * 2
    lo[axis] = slice(None, -1)
    hi[axis] = slice(1, None)
    out = tile[tuple(hi)] * np.float32(1.0 - frac)
    out += tile[tuple(lo)] * np.float32(frac)
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
    data = _shift_linear(data, fy, axis=0)
    data = _shift_linear(data, fx, axis=1)  # a fresh float32 array in every case
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
    """Read tile ``i``, flatten it and resample it (bilinear) onto its mosaic footprint.

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
    out = ndimage.map_coordinates(data, [v, u], order=1, mode="nearest").astype(np.float32)
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


# --------------------------------------------------------------------------- chunk helpers


def _cast(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Cast float values to ``dtype``: round and clip for integers, plain cast for floats."""
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        np.rint(values, out=values)
        np.clip(values, info.min, info.max, out=values)
    return values.astype(dtype)


def _chunk_order(n_rows: int, n_cols: int, band: int) -> Iterator[tuple[int, int]]:
    """Chunk indices in bands of ``band`` chunk rows, column by column inside each band.

    Consecutive chunks then share most of their tiles, which keeps the LRU cache small.
    """
    for b0 in range(0, n_rows, band):
        for j in range(n_cols):
            for i in range(b0, min(b0 + band, n_rows)):
                yield i, j


def _run(
    fn: Callable[[tuple[int, int]], None],
    items: Iterator[tuple[int, int]],
    workers: int,
    on_done: Callable[[], None],
) -> None:
    """Apply ``fn`` to every item, on ``workers`` threads, keeping few items in flight."""
    if workers <= 1:
        for item in items:
            fn(item)
            on_done()
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        in_flight = []
        for item in items:
            in_flight.append(pool.submit(fn, item))
            if len(in_flight) >= 2 * workers:
                in_flight.pop(0).result()
                on_done()
        for fut in in_flight:
            fut.result()
            on_done()


def _ome_attrs(name: str, n_levels: int, p: float, origin: tuple[float, float]) -> dict[str, Any]:
    """The OME-NGFF 0.5 ``ome`` attributes of a mosaic with ``n_levels`` levels."""
    datasets = []
    for k in range(n_levels):
        scale = p * 2**k
        shift = (2**k - 1) / 2.0 * p
        datasets.append(
            {
                "path": str(k),
                "coordinateTransformations": [
                    {"type": "scale", "scale": [scale, scale]},
                    {"type": "translation", "translation": [origin[1] + shift, origin[0] + shift]},
                ],
            }
        )
    return {
        "version": "0.5",
        "multiscales": [
            {
                "name": name,
                "axes": [
                    {"name": "y", "type": "space", "unit": "micrometer"},
                    {"name": "x", "type": "space", "unit": "micrometer"},
                ],
                "datasets": datasets,
            }
        ],
    }


def _level_shapes(shape: tuple[int, int], min_level_size: int) -> list[tuple[int, int]]:
    """Shapes of all pyramid levels: halve (rounding up) while the last is > min_level_size."""
    shapes = [shape]
    while max(shapes[-1]) > min_level_size and max(shapes[-1]) > 1:
        r, c = shapes[-1]
        shapes.append(((r + 1) // 2, (c + 1) // 2))
    return shapes


def _downsample2(block: np.ndarray) -> np.ndarray:
    """2 x 2 mean of ``block`` (odd edges padded by repeating the last row / column), rounded."""
    r, c = block.shape
    if r % 2 or c % 2:
        block = np.pad(block, ((0, r % 2), (0, c % 2)), mode="edge")
    dtype = block.dtype
    if np.issubdtype(dtype, np.integer):
        acc_t = np.uint32 if dtype in (np.uint8, np.uint16) else np.int64
        acc = block[0::2, 0::2].astype(acc_t)
        acc += block[1::2, 0::2]
        acc += block[0::2, 1::2]
        acc += block[1::2, 1::2]
        acc += 2  # round half up; the mean of in-range values stays in range
        acc //= 4
        return acc.astype(dtype)
    acc = block[0::2, 0::2].astype(np.float64)
    acc += block[1::2, 0::2]
    acc += block[0::2, 1::2]
    acc += block[1::2, 1::2]
    acc *= 0.25
    return acc.astype(dtype)


def _replace_dir(tmp: Path, dest: Path) -> None:
    """Move ``tmp`` to ``dest``, replacing whatever ``dest`` was, losing it only at the end."""
    old = None
    if dest.exists() or dest.is_symlink():
        old = dest.with_name(dest.name + ".old")
        _remove(old)
        dest.rename(old)
    tmp.rename(dest)
    if old is not None:
        _remove(old)


def _remove(path: Path) -> None:
    """Delete a file or folder tree if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _tmp_path(out_path: Path) -> Path:
    """Sibling of ``out_path`` where the mosaic is written before being renamed over it."""
    stem = out_path.name[: -len(out_path.suffix)] if out_path.suffix else out_path.name
    return out_path.with_name(stem + ".tmp.zarr")


@dataclass
class _Fusion:
    """Everything needed to fuse chunks of level 0: a dask task receives it whole (pickled)."""

    tiles: Any
    place: _Placement
    pos: np.ndarray
    origin: tuple[float, float]
    p: float
    rotation_deg: float
    rotated: bool
    flatfield: np.ndarray | None
    shape: tuple[int, int]
    chunk: int
    dtype: np.dtype
    capacity: int

    def cache(self) -> _TileCache:
        """An empty LRU cache of this fusion's prepared tiles."""
        if self.rotated:
            return _TileCache(lambda i: _prepare_rotated(
                self.tiles, i, self.place, self.flatfield, self.pos, self.origin, self.p,
                self.rotation_deg), self.capacity)
        return _TileCache(lambda i: _prepare_tile(self.tiles, i, self.place, self.flatfield),
                          self.capacity)

    def fuse_chunk(self, ij: tuple[int, int], cache: _TileCache, level0: Any) -> None:
        """Blend the tiles that meet chunk ``ij`` and write it (unscanned: not written)."""
        chunk, shape, place = self.chunk, self.shape, self.place
        r0, c0 = ij[0] * chunk, ij[1] * chunk
        r1, c1 = min(r0 + chunk, shape[0]), min(c0 + chunk, shape[1])
        hit = np.flatnonzero(
            (place.row0 < r1) & (place.row1 > r0) & (place.col0 < c1) & (place.col1 > c0)
        )
        if hit.size == 0:
            # unscanned, but stored all the same: a missing chunk is damage (check_complete)
            level0[r0:r1, c0:c1] = np.zeros((r1 - r0, c1 - c0), dtype=self.dtype)
            return
        acc = np.zeros((r1 - r0, c1 - c0), dtype=np.float32)
        wsum = np.zeros_like(acc)
        for i in hit:
            t = cache.get(int(i))
            a0, a1 = max(r0, t.row0), min(r1, t.row0 + t.data.shape[0])
            b0, b1 = max(c0, t.col0), min(c1, t.col0 + t.data.shape[1])
            dst = (slice(a0 - r0, a1 - r0), slice(b0 - c0, b1 - c0))
            acc[dst] += t.data[a0 - t.row0 : a1 - t.row0, b0 - t.col0 : b1 - t.col0]
            if t.weight is not None:
                wsum[dst] += t.weight[a0 - t.row0 : a1 - t.row0, b0 - t.col0 : b1 - t.col0]
            else:
                wsum[dst] += np.multiply.outer(
                    t.wy[a0 - t.row0 : a1 - t.row0], t.wx[b0 - t.col0 : b1 - t.col0]
                )
        np.divide(acc, wsum, out=acc, where=wsum > 0)  # acc is 0 where no tile has weight
        level0[r0:r1, c0:c1] = _cast(acc, self.dtype)


def fuse_block(fusion: _Fusion, level0: Any, chunks: list[tuple[int, int]]) -> int:
    """Fuse ``chunks`` (one dask task) with a cache of its own; returns how many."""
    cache = fusion.cache()
    for ij in chunks:
        fusion.fuse_chunk(ij, cache, level0)
    return len(chunks)


def downsample_block(src: Any, dst: Any, chunk: int, chunks: list[tuple[int, int]]) -> int:
    """Fill ``chunks`` of a pyramid level from the level below (one dask task)."""
    for ij in chunks:
        _down_chunk(ij, src, dst, chunk)
    return len(chunks)


def _chunk_blocks(n_rows: int, n_cols: int, band: int, want: int) -> list[list[tuple[int, int]]]:
    """:func:`_chunk_order` cut into about ``want`` blocks, each a run of columns of a band."""
    n_bands = math.ceil(n_rows / band)
    per_band = max(1, math.ceil(want / n_bands))
    width = max(1, math.ceil(n_cols / per_band))
    blocks = []
    for b0 in range(0, n_rows, band):
        for j0 in range(0, n_cols, width):
            blocks.append([(i, j) for j in range(j0, min(j0 + width, n_cols))
                           for i in range(b0, min(b0 + band, n_rows))])
    return blocks


# --------------------------------------------------------------------------- public API


def fuse_mosaic(
    tiles: Any,
    positions_um: np.ndarray,
    pixel_size_um: float,
    out_path: Path,
    *,
    chunk: int = 1024,
    min_level_size: int = 256,
    progress: Callable[[int, int], None] | None = None,
    name: str = "mosaic",
    flatfield: np.ndarray | None = None,
    rotation_deg: float = 0.0,
    cluster: Any = None,
) -> MosaicInfo:
    """Fuse tiles into a multiscale OME-NGFF 0.5 mosaic, streaming chunk by chunk.

    Parameters
    ----------
    tiles : array-like
        ``(N, H, W)`` tiles (a ``zarr.Array``, a numpy array or anything that has ``shape``,
        ``dtype`` and returns one tile for ``tiles[i]``); only ``tiles[i]`` is ever read, one
        tile at a time. Integer dtypes (uint8, uint16, ...) are rounded and clipped; float
        dtypes are kept as they are.
    positions_um : np.ndarray
        ``(N, 2)`` stage ``(x_um, y_um)`` of the centre of each tile's pixel ``(0, 0)``. Stage x
        grows with the image column, stage y with the image row. Positions need not be whole
        numbers of pixels: tiles are placed with sub-pixel accuracy (bilinear resampling).
    pixel_size_um : float
        Pixel size of the tiles (and of mosaic level 0) in µm.
    out_path : Path
        Where to write the zarr v3 group. An existing mosaic there is replaced only once the new
        one is complete (it is written to a ``*.tmp.zarr`` sibling first, then renamed).
    chunk : int, optional
        Chunk edge in pixels of every level (default 1024).
    min_level_size : int, optional
        Levels are added (each a 2 x 2 mean of the previous) while ``max(rows, cols)`` of the last
        level is larger than this (default 256).
    progress : callable, optional
        Called as ``progress(done, total)`` after each chunk written, ``total`` being the number
        of chunks over all levels.
    name : str, optional
        Name of the multiscale image in the metadata (default ``"mosaic"``).
    flatfield : np.ndarray, optional
        ``(H, W)`` relative illumination of the sensor (mean about 1); each tile is divided by
        it before blending (vignetting correction).
    rotation_deg : float, optional
        Rotation of the camera against the stage axes (from a calibration): tile pixel
        ``(r, c)`` lies at stage ``position + R(rotation) @ (c, r) * pixel_size_um``. Rotated
        tiles are resampled (bilinear) onto the stage-aligned mosaic grid; the mosaic then
        covers the bounding box of all rotated footprints.
    cluster : scanner.cluster.Cluster, optional
        Fuse blocks of chunks and build the pyramid as dask tasks (``tiles`` must pickle, as
        a ``zarr.Array`` does: by its path). The mosaic is the same, bit for bit.

    Returns
    -------
    MosaicInfo
        Path, level-0 shape, pixel size, origin and number of levels of the mosaic.

    Raises
    ------
    ValueError
        If ``tiles`` and ``positions_um`` do not match, or a parameter is out of range.
    """
    out_path = Path(out_path)
    pos = _check_positions(positions_um, pixel_size_um)
    t_shape = tuple(int(s) for s in tiles.shape)
    if len(t_shape) != 3:
        raise ValueError(f"tiles must have shape (N, H, W), got {t_shape}")
    if t_shape[0] != pos.shape[0]:
        raise ValueError(f"{t_shape[0]} tiles but {pos.shape[0]} positions")
    dtype = np.dtype(tiles.dtype)
    if not (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)):
        raise ValueError(f"tiles must have an integer or float dtype, got {dtype}")
    if chunk < 1 or min_level_size < 1:
        raise ValueError("chunk and min_level_size must be >= 1")
    tile_hw = (t_shape[1], t_shape[2])
    p = float(pixel_size_um)

    rotated = abs(float(rotation_deg)) > 1e-9
    if rotated:
        corners = _rotated_corners(pos, tile_hw, p, float(rotation_deg)).reshape(-1, 2)
        origin, shape = mosaic_geometry(corners, (1, 1), p)
        place = _rotated_placements(pos, origin, tile_hw, p, float(rotation_deg))
    else:
        origin, shape = mosaic_geometry(pos, tile_hw, p)
        place = _placements(pos, origin, tile_hw, p)
    shapes = _level_shapes(shape, min_level_size)
    n_chunks = [math.ceil(r / chunk) * math.ceil(c / chunk) for r, c in shapes]
    total = sum(n_chunks)

    # Bands of chunk rows about two tiles high: the tiles met in one column of a band, plus those
    # of the next column, must fit in the cache (they are bounded by the geometry, not by N).
    band = max(1, math.ceil(2 * tile_hw[0] / chunk))
    capacity = _cache_capacity(place, shape, chunk, band)
    if flatfield is not None:
        flatfield = np.asarray(flatfield, dtype=np.float32)
        if flatfield.shape != tile_hw or not np.all(flatfield > 0):
            raise ValueError(f"flatfield must be positive with shape {tile_hw}")
    fusion = _Fusion(tiles, place, pos, origin, p, float(rotation_deg), rotated, flatfield,
                     (int(shape[0]), int(shape[1])), chunk, dtype, capacity)

    tmp, arrays = create_multiscale(out_path, shape, chunk=chunk, dtype=dtype,
                                    min_level_size=min_level_size)

    done = 0
    lock = threading.Lock()

    def tick() -> None:
        nonlocal done
        with lock:
            done += 1
            if progress is not None:
                progress(done, total)

    n_r, n_c = math.ceil(shape[0] / chunk), math.ceil(shape[1] / chunk)
    if cluster is not None:
        cluster.fuse(fusion, arrays[0], _chunk_blocks(n_r, n_c, band, 4 * cluster.n_workers),
                     tick)
        cluster.pyramid(arrays, chunk, tick)
    else:
        cache = fusion.cache()
        _run(lambda ij: fusion.fuse_chunk(ij, cache, arrays[0]), _chunk_order(n_r, n_c, band),
             _WORKERS, tick)
        build_pyramid(arrays, chunk, tick)

    finish_multiscale(tmp, out_path, len(shapes), p, origin, name)
    return MosaicInfo(
        path=out_path,
        shape=(int(shape[0]), int(shape[1])),
        pixel_size_um=p,
        origin_um=(float(origin[0]), float(origin[1])),
        n_levels=len(shapes),
    )


def _cache_capacity(place: _Placement, shape: tuple[int, int], chunk: int, band: int) -> int:
    """LRU size: twice the largest number of tiles met in one band column (bounded)."""
    height = band * chunk
    most = 0
    for r0 in range(0, shape[0], height):
        r1 = r0 + height
        in_band = (place.row0 < r1) & (place.row1 > r0)
        if not in_band.any():
            continue
        c0s, c1s = place.col0[in_band], place.col1[in_band]
        for c0 in range(0, shape[1], chunk):
            most = max(most, int(np.count_nonzero((c0s < c0 + chunk) & (c1s > c0))))
    return int(np.clip(2 * most, _MIN_CACHE_TILES, _MAX_CACHE_TILES))


def open_mosaic(path: Path) -> tuple[list[zarr.Array], list[dict]]:
    """Open a mosaic written by :func:`fuse_mosaic`.

    Parameters
    ----------
    path : Path
        The mosaic's zarr group.

    Returns
    -------
    levels : list[zarr.Array]
        The level arrays, finest (level 0) first, opened read-only.
    transforms : list[dict]
        Each level's ``coordinateTransformations`` list as stored (a ``scale`` then a
        ``translation`` entry, in ``[y, x]`` order).

    Raises
    ------
    ValueError
        If the group has no OME-NGFF multiscales metadata.
    """
    root = zarr.open_group(str(path), mode="r")
    ome = root.attrs.get("ome")
    if not isinstance(ome, dict) or not ome.get("multiscales"):
        raise ValueError(f"{path} is not an OME-NGFF multiscale image (no 'ome' attributes)")
    datasets = ome["multiscales"][0]["datasets"]
    levels = [root[d["path"]] for d in datasets]
    return levels, [d["coordinateTransformations"] for d in datasets]


def level_transform(transforms: list[dict], level: int = 0
                    ) -> tuple[list[float], list[float]]:
    """A level's ``scale`` and ``translation`` (``[y, x]``), from :func:`open_mosaic`'s list."""
    entries = transforms[level]
    scale = next(t["scale"] for t in entries if t["type"] == "scale")
    trans = next(t["translation"] for t in entries if t["type"] == "translation")
    return scale, trans


def mosaic_region(
    path: Path, x_um: float, y_um: float, shape: tuple[int, int], level: int = 0
) -> np.ndarray:
    """Read a window of a mosaic by stage coordinates.

    Parameters
    ----------
    path : Path
        The mosaic's zarr group.
    x_um, y_um : float
        Stage position; the window's pixel ``(0, 0)`` is the level pixel whose centre is nearest.
    shape : tuple[int, int]
        Window shape ``(rows, cols)`` in pixels of ``level``.
    level : int, optional
        Pyramid level (default 0, full resolution).

    Returns
    -------
    np.ndarray
        The window, in the mosaic's dtype; pixels outside the mosaic are 0.
    """
    levels, transforms = open_mosaic(path)
    if not 0 <= level < len(levels):
        raise ValueError(f"level must be in 0..{len(levels) - 1}, got {level}")
    arr = levels[level]
    scale, trans = level_transform(transforms, level)
    row = round((y_um - trans[0]) / scale[0])
    col = round((x_um - trans[1]) / scale[1])
    h, w = (int(s) for s in shape)
    out = np.zeros((h, w), dtype=arr.dtype)
    a0, a1 = max(row, 0), min(row + h, arr.shape[0])
    b0, b1 = max(col, 0), min(col + w, arr.shape[1])
    if a0 < a1 and b0 < b1:
        out[a0 - row : a1 - row, b0 - col : b1 - col] = arr[a0:a1, b0:b1]
    return out


# ----------------------------------------------------------------------- shared OME-NGFF writing


def create_multiscale(
    out_path: Path,
    shape: tuple[int, int],
    *,
    chunk: int,
    dtype: Any,
    fill_value: float = 0,
    min_level_size: int = 256,
) -> tuple[Path, list[zarr.Array]]:
    """Create the empty levels of a multiscale image in the ``*.tmp.zarr`` sibling of ``out_path``.

    Fill level 0, then call :func:`build_pyramid` and :func:`finish_multiscale`, which renames
    the temporary group over ``out_path``: an earlier image there survives until the new one is
    complete.

    Returns
    -------
    tmp : Path
        The temporary group being written.
    arrays : list of zarr.Array
        One array per level, level 0 first.
    """
    out_path = Path(out_path)
    shapes = _level_shapes((int(shape[0]), int(shape[1])), min_level_size)
    tmp = _tmp_path(out_path)
    _remove(tmp)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    root = zarr.open_group(str(tmp), mode="w", zarr_format=3)
    arrays = [
        root.create_array(
            str(k),
            shape=s,
            chunks=(chunk, chunk),
            dtype=dtype,
            fill_value=fill_value,
            compressors=zarr.codecs.ZstdCodec(level=3),
            dimension_names=["y", "x"],
            # every chunk is stored, background included, so that a missing chunk is damage
            # that can be found (zarr would read it back as fill value, i.e. black)
            config={"write_empty_chunks": True},
        )
        for k, s in enumerate(shapes)
    ]
    return tmp, arrays


def check_complete(array: zarr.Array, what: str) -> None:
    """Refuse an image with a missing chunk: zarr would read it as fill value (black).

    Raises
    ------
    UserError
        Naming the first missing chunk (its pixel rows and columns).
    """
    if array.nchunks_initialized == array.nchunks:
        return
    root = Path(str(array.store_path.store.root)) / array.store_path.path
    grid = [range(-(-n // c)) for n, c in zip(array.shape, array.chunks, strict=True)]
    for ij in itertools.product(*grid):
        if not (root / array.metadata.encode_chunk_key(ij)).is_file():
            r, c = (i * n for i, n in zip(ij, array.chunks, strict=True))
            raise UserError(f"{what}: chunk {ij} (rows {r}.., cols {c}..) is missing; "
                            "the image is damaged (re-run `waferscope stitch`)")


def build_pyramid(
    arrays: list[zarr.Array], chunk: int, tick: Callable[[], None] | None = None
) -> None:
    """Fill levels 1.. of a multiscale image chunk-wise, each the 2 x 2 mean of the level below.

    Chunks of the level below that hold only zeros (unscanned) are not averaged: zeros are
    stored.
    """
    for k in range(1, len(arrays)):
        src, dst_arr = arrays[k - 1], arrays[k]
        rows, cols = dst_arr.shape

        def down_chunk(ij: tuple[int, int], src: zarr.Array = src,
                       dst: zarr.Array = dst_arr) -> None:
            _down_chunk(ij, src, dst, chunk)

        n_r, n_c = math.ceil(rows / chunk), math.ceil(cols / chunk)
        _run(down_chunk, _chunk_order(n_r, n_c, 1), _WORKERS, tick or (lambda: None))


def _down_chunk(ij: tuple[int, int], src: Any, dst: Any, chunk: int) -> None:
    """Chunk ``ij`` of a pyramid level: the 2 x 2 mean of the level below (unscanned: skipped)."""
    rows, cols = dst.shape
    r0, c0 = ij[0] * chunk, ij[1] * chunk
    r1, c1 = min(r0 + chunk, rows), min(c0 + chunk, cols)
    block = src[2 * r0 : min(2 * r1, src.shape[0]), 2 * c0 : min(2 * c1, src.shape[1])]
    if not block.any():  # unscanned: zeros, stored (a missing chunk is damage)
        dst[r0:r1, c0:c1] = np.zeros((r1 - r0, c1 - c0), dtype=dst.dtype)
        return
    dst[r0:r1, c0:c1] = _downsample2(np.asarray(block))


def finish_multiscale(
    tmp: Path, out_path: Path, n_levels: int, pixel_size_um: float,
    origin_um: tuple[float, float], name: str,
) -> None:
    """Write the OME-NGFF 0.5 metadata of a multiscale image and rename it over ``out_path``.

    ``origin_um`` is the stage ``(x_um, y_um)`` of the centre of level-0 pixel ``(0, 0)`` and
    ``pixel_size_um`` the level-0 pixel size.
    """
    root = zarr.open_group(str(tmp), mode="r+")
    root.attrs["ome"] = _ome_attrs(name, n_levels, float(pixel_size_um), origin_um)
    _replace_dir(Path(tmp), Path(out_path))
