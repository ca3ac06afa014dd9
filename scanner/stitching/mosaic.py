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

Placement is sub-pixel: each tile is resampled (Lanczos-3) by the fractional part of its offset
in mosaic pixels, on the tile only. Overlaps are blended with feathered weights (a linear ramp
that falls to ~0 at each tile border, the product of the x and y ramps), so there are no seams.

Where each tile lands and its resampling live in :mod:`scanner.stitching.tileplace`, the multiscale
OME-NGFF writing and reading in :mod:`scanner.ngff` (its public names are importable here too).
"""

from __future__ import annotations

import math
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from scanner.ngff import (
    _WORKERS,
    _chunk_order,
    _level_shapes,
    _run,
    build_pyramid,
    check_complete,
    create_multiscale,
    finish_multiscale,
    mosaic_region,
    open_mosaic,
)
from scanner.stitching.tileplace import (
    _check_positions,
    _Placement,
    _placements,
    _prepare_rotated,
    _prepare_tile,
    _rotated_corners,
    _rotated_placements,
    _TileCache,
    mosaic_geometry,
)

__all__ = [
    "MosaicInfo", "build_pyramid", "create_multiscale", "finish_multiscale", "fuse_mosaic",
    "check_complete", "mosaic_geometry", "mosaic_region", "open_mosaic",
]

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

# --------------------------------------------------------------------------- chunk helpers


def _cast(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Cast float values to ``dtype``: round and clip for integers, plain cast for floats."""
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        np.rint(values, out=values)
        np.clip(values, info.min, info.max, out=values)
    return values.astype(dtype)

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
        # 0 means "no tile landed here" to everything downstream (inspection leaves such
        # pixels out): a covered pixel of a black part (a camera reading 0 counts) is kept
        # just above it, at 1 count (the least positive value of a float mosaic)
        least = 1.0 if np.issubdtype(self.dtype, np.integer) else float(np.finfo(self.dtype).tiny)
        np.maximum(acc, least, out=acc, where=wsum > 0)
        level0[r0:r1, c0:c1] = _cast(acc, self.dtype)


def fuse_block(fusion: _Fusion, level0: Any, chunks: list[tuple[int, int]]) -> int:
    """Fuse ``chunks`` (one dask task) with a cache of its own; returns how many."""
    cache = fusion.cache()
    for ij in chunks:
        fusion.fuse_chunk(ij, cache, level0)
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
        numbers of pixels: tiles are placed with sub-pixel accuracy (Lanczos-3 resampling).
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
        tiles are resampled (a cubic spline) onto the stage-aligned mosaic grid; the mosaic then
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
    fusion, shapes, band = _plan_fusion(tiles, positions_um, pixel_size_um, chunk,
                                        min_level_size, flatfield, rotation_deg)
    total = sum(math.ceil(r / chunk) * math.ceil(c / chunk) for r, c in shapes)
    tmp, arrays = create_multiscale(out_path, fusion.shape, chunk=chunk, dtype=fusion.dtype,
                                    min_level_size=min_level_size)
    try:
        _fill_levels(fusion, arrays, band, cluster, _ticker(progress, total))
    except BaseException:  # stopped or refused: the half-written store goes, the mosaic stays
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finish_multiscale(tmp, out_path, len(shapes), fusion.p, fusion.origin, name)
    return MosaicInfo(
        path=out_path,
        shape=fusion.shape,
        pixel_size_um=fusion.p,
        origin_um=(float(fusion.origin[0]), float(fusion.origin[1])),
        n_levels=len(shapes),
    )


def _plan_fusion(tiles: Any, positions_um: np.ndarray, pixel_size_um: float, chunk: int,
                 min_level_size: int, flatfield: np.ndarray | None, rotation_deg: float
                 ) -> tuple[_Fusion, list[tuple[int, int]], int]:
    """Check :func:`fuse_mosaic`'s inputs and lay the tiles out: the fusion, the pyramid's
    level shapes and the height (in chunk rows) of the bands the chunks are walked in."""
    pos = _check_positions(positions_um, pixel_size_um)
    tile_hw, dtype = _check_tiles(tiles, pos, chunk, min_level_size)
    p = float(pixel_size_um)
    rotated = abs(float(rotation_deg)) > 1e-9
    origin, shape, place = _layout(pos, tile_hw, p, float(rotation_deg), rotated)
    shapes = _level_shapes(shape, min_level_size)
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
    return fusion, shapes, band


def _check_tiles(tiles: Any, pos: np.ndarray, chunk: int, min_level_size: int
                 ) -> tuple[tuple[int, int], np.dtype]:
    """The tiles' ``(rows, cols)`` and dtype, or ``ValueError`` where they or the chunking
    do not fit :func:`fuse_mosaic`'s contract."""
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
    return (t_shape[1], t_shape[2]), dtype


def _layout(pos: np.ndarray, tile_hw: tuple[int, int], p: float, rotation_deg: float,
            rotated: bool) -> tuple[tuple[float, float], tuple[int, int], _Placement]:
    """The mosaic's origin and level-0 shape, and each tile's footprint on it; rotated
    tiles: the bounding box of all their footprints."""
    if rotated:
        corners = _rotated_corners(pos, tile_hw, p, rotation_deg).reshape(-1, 2)
        origin, shape = mosaic_geometry(corners, (1, 1), p)
        place = _rotated_placements(pos, origin, tile_hw, p, rotation_deg)
    else:
        origin, shape = mosaic_geometry(pos, tile_hw, p)
        place = _placements(pos, origin, tile_hw, p)
    return origin, shape, place


def _ticker(progress: Callable[[int, int], None] | None, total: int) -> Callable[[], None]:
    """A thread-safe count of chunks written that reports ``progress(done, total)``."""
    done = 0
    lock = threading.Lock()

    def tick() -> None:
        nonlocal done
        with lock:
            done += 1
            if progress is not None:
                progress(done, total)

    return tick


def _fill_levels(fusion: _Fusion, arrays: list[Any], band: int, cluster: Any,
                 tick: Callable[[], None]) -> None:
    """Fuse level 0 chunk by chunk and build the pyramid above it: on the cluster's dask
    workers, else on this process's threads (the same mosaic, bit for bit)."""
    chunk, shape = fusion.chunk, fusion.shape
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
