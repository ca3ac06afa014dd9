"""Stitching: place the tiles of a scan folder into the OME-NGFF mosaic.

Until registration lands, tiles are placed at the stage positions read back from the core
(registered positions are used instead when ``tiles.csv`` has them).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from .errors import UserError
from .mosaic import MosaicInfo, fuse_mosaic
from .tilestore import TILES_CSV, open_tiles, read_tiles_csv

MOSAIC = "mosaic.ome.zarr"


def tile_origins_um(
    centres_um: np.ndarray, tile_shape: tuple[int, int], pixel_size_um: float
) -> np.ndarray:
    """Stage position of each tile's pixel (0, 0) centre from the tile centres (x, y)."""
    rows, cols = tile_shape
    half = np.array([(cols - 1) / 2, (rows - 1) / 2]) * pixel_size_um
    return np.asarray(centres_um, dtype=float) - half


def stitch(
    folder: Path,
    pixel_size_um: float,
    *,
    chunk: int = 1024,
    progress: Callable[[int, int], None] | None = None,
) -> MosaicInfo:
    """Fuse the tiles of a scan folder into ``mosaic.ome.zarr``.

    Parameters
    ----------
    folder : Path
        Scan folder with ``tiles.zarr`` and ``tiles.csv``.
    pixel_size_um : float
        Camera pixel size at the sample.
    chunk : int
        Chunk size of the mosaic (pixels).
    progress : callable, optional
        Called with (done, total) output chunks.
    """
    folder = Path(folder)
    if not (folder / TILES_CSV).is_file():
        raise UserError(f"{folder}: not a scan folder (no {TILES_CSV})")
    records = [r for r in read_tiles_csv(folder) if r.status == "ok"]
    if not records:
        raise UserError(f"{folder / TILES_CSV}: no acquired tiles to stitch")
    tiles = open_tiles(folder)
    centres = np.array(
        [
            (r.x_reg_um, r.y_reg_um) if np.isfinite(r.x_reg_um) else (r.x_um, r.y_um)
            for r in records
        ]
    )
    origins = tile_origins_um(centres, tiles.shape[1:], pixel_size_um)
    subset = _TileSubset(tiles, [r.index for r in records])
    return fuse_mosaic(subset, origins, pixel_size_um, folder / MOSAIC, chunk=chunk,
                       progress=progress, name=folder.name)


class _TileSubset:
    """The acquired tiles of a store, indexed 0..n-1 (lost tiles are left out)."""

    def __init__(self, tiles, indices: list[int]) -> None:
        self._tiles = tiles
        self._indices = indices
        self.shape = (len(indices), *tiles.shape[1:])
        self.dtype = tiles.dtype

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, i: int) -> np.ndarray:
        return np.asarray(self._tiles[self._indices[i]])
