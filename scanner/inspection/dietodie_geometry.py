"""Where the dies of a die-to-die comparison lie on the mosaic, and reading them.

The mosaic's geometry (:class:`MosaicGrid`), the full dies inside the usable area and their
nearest neighbours, each die's corner in mosaic pixels, the usable area as a mask
(:class:`UsableArea`), and reading dies from the mosaic: whole dies cached, windows beyond the
mosaic's border, windows moved by a sub-pixel shift (:mod:`scanner.inspection.dietodie`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from scanner.diegrid import DieGrid

Cell = tuple[int, int]


@dataclass
class MosaicGrid:
    """Where mosaic pixels lie on the stage: ``origin_um`` is the centre of pixel ``(0, 0)``."""

    origin_um: tuple[float, float]
    pixel_size_um: float
    shape: tuple[int, int]

    def to_px(self, x_um: float, y_um: float) -> tuple[float, float]:
        """``(row, col)`` (fractional) of a stage point."""
        return ((y_um - self.origin_um[1]) / self.pixel_size_um,
                (x_um - self.origin_um[0]) / self.pixel_size_um)

    def outline(self) -> Any:
        """The stage area the pixels cover (a shapely box, µm: pixel edges, not centres)."""
        from shapely.geometry import box

        (x0, y0), p, (rows, cols) = self.origin_um, self.pixel_size_um, self.shape
        return box(x0 - 0.5 * p, y0 - 0.5 * p, x0 + (cols - 0.5) * p, y0 + (rows - 0.5) * p)


def die_shape_px(grid: DieGrid, mosaic: MosaicGrid) -> tuple[int, int]:
    """``(rows, cols)`` of mosaic pixels compared per die: whole pixels of the die pitch."""
    p = mosaic.pixel_size_um
    return int(math.floor(grid.pitch_um[1] / p)), int(math.floor(grid.pitch_um[0] / p))


def full_dies(grid: DieGrid, polygon: Any, mosaic: MosaicGrid, margin_px: int = 0) -> list[Cell]:
    """Die cells wholly inside the usable area and inside the mosaic (with a margin)."""
    return [cell for cell, pad in _pads_needed(grid, polygon, mosaic, margin_px) if pad <= 0]


def room_px(grid: DieGrid, polygon: Any, mosaic: MosaicGrid, margin_px: int) -> int:
    """Padding (pixels, on each side of the mosaic) after which every die wholly inside the
    usable area is a full die (:func:`full_dies`) with ``margin_px``: at least
    ``margin_px + 1``.

    A die found a few micrometres off (the grid's precision) reaches past the image, where
    the scan may end: padded by the margin alone, a grass texture's dies found 4 um low left
    the lower row 2 px short of room, and no die was compared. Only what is needed is added:
    the dies' alignment reads the padding around them, so padding more moved the z-scores of
    products that already had room (a brick's good scan: largest z 5.7 -> 6.9).
    """
    pads = [pad for _, pad in _pads_needed(grid, polygon, mosaic, margin_px)]
    return max([margin_px + 1, *pads])


def _pads_needed(grid: DieGrid, polygon: Any, mosaic: MosaicGrid, margin_px: int
                 ) -> list[tuple[Cell, int]]:
    """Each die cell wholly inside ``polygon`` and the least padding of the mosaic (pixels,
    on each side) that leaves ``margin_px`` around it, with its far side before the last row
    and column (<= 0: it has that room unpadded)."""
    rows, cols = mosaic.shape
    out = []
    for col, row, full in grid.cells_in(polygon):
        if full:
            x0, y0, x1, y1 = grid.cell_box(col, row)
            r0, c0 = mosaic.to_px(x0, y0)
            r1, c1 = mosaic.to_px(x1, y1)
            # padded by p: r0 + p - margin >= 0 and r1 + p + margin < rows + 2 p - 1
            near = math.ceil(margin_px - min(r0, c0))
            far = math.floor(max(r1 - rows, c1 - cols) + margin_px + 1) + 1
            out.append(((col, row), max(near, far)))
    return out


def nearest_dies(cells: list[Cell], k: int, among: list[Cell] | None = None
                 ) -> dict[Cell, list[Cell]]:
    """Up to ``k`` nearest other dies of each die (grid distance; ties in a fixed order),
    taken from ``among`` (default: ``cells`` themselves)."""
    from scipy.spatial import cKDTree

    among = cells if among is None else among
    if not cells or not among or (among is cells and len(cells) < 2):
        return {c: [] for c in cells}
    tree = cKDTree(np.array(among, dtype=float))
    # a few more than k, then ties ordered by (distance, row, column)
    _, idx = tree.query(np.array(cells, dtype=float), k=min(len(among), k + 9))
    out = {}
    for i, c in enumerate(cells):
        others = sorted((among[j] for j in np.atleast_1d(idx[i])
                         if j < len(among) and among[j] != c),
                        key=lambda o, c=c: (math.hypot(o[0] - c[0], o[1] - c[1]), o[1], o[0]))
        out[c] = others[:k]
    return out


class _DieCache:
    """Read-through cache of whole die cells of a mosaic (with a margin), least recently used.

    Alignment and comparison read each die many times in small pieces (blocks, bands, as test
    and as reference); Zarr decompresses whole chunks for every piece. Whole dies are read
    once while at least three fit in ``budget_bytes``; otherwise reads go to the mosaic.
    When the box around all the dies fits in ``budget_bytes`` it is read once, whole: the
    dies' margins overlap their neighbours' chunks, so die by die most chunks were decoded
    two to four times (demo wafer, 48 dies: 1.3 s of decoding against 0.6 s).
    """

    def __init__(self, level0: Any, boxes: dict[Cell, tuple[int, int, int, int]],
                 capacity: int, budget_bytes: int = 512 * 2**20) -> None:
        from collections import OrderedDict

        self.level0 = level0
        self.shape = tuple(level0.shape)
        self.boxes = boxes
        size = max(((b[2] - b[0]) * (b[3] - b[1]) for b in boxes.values()), default=0)
        per_die = size * np.dtype(level0.dtype).itemsize
        self.capacity = max(capacity, budget_bytes // max(per_die, 1)) \
            if 3 * per_die <= budget_bytes else 0
        self._dies: OrderedDict[Cell, np.ndarray] = OrderedDict()
        #: the box around every die, when it fits in the budget (read whole at the first read)
        self.union: tuple[int, int, int, int] | None = None
        self._union: np.ndarray | None = None
        if boxes:
            r0, c0 = (min(b[k] for b in boxes.values()) for k in (0, 1))
            r1, c1 = (max(b[k] for b in boxes.values()) for k in (2, 3))
            if (r1 - r0) * (c1 - c0) * np.dtype(level0.dtype).itemsize <= budget_bytes:
                self.union = (r0, c0, r1, c1)

    def __getitem__(self, key: tuple[slice, slice]) -> np.ndarray:
        rs, cs = key
        if self.union is not None:
            r0, c0, r1, c1 = self.union
            if r0 <= rs.start and rs.stop <= r1 and c0 <= cs.start and cs.stop <= c1:
                return self._whole()[rs.start - r0:rs.stop - r0:rs.step,
                                     cs.start - c0:cs.stop - c0:cs.step]
        if self.capacity >= 3:
            for cell, (r0, c0, r1, c1) in self.boxes.items():
                if r0 <= rs.start and rs.stop <= r1 and c0 <= cs.start and cs.stop <= c1:
                    return self._die(cell)[rs.start - r0:rs.stop - r0:rs.step,
                                           cs.start - c0:cs.stop - c0:cs.step]
        return np.asarray(self.level0[rs, cs])

    def _whole(self) -> np.ndarray:
        if self._union is None:
            r0, c0, r1, c1 = self.union
            self._union = np.asarray(self.level0[r0:r1, c0:c1])
        return self._union

    def _die(self, cell: Cell) -> np.ndarray:
        if cell in self._dies:
            self._dies.move_to_end(cell)
            return self._dies[cell]
        r0, c0, r1, c1 = self.boxes[cell]
        self._dies[cell] = np.asarray(self.level0[r0:r1, c0:c1])
        while len(self._dies) > self.capacity:
            self._dies.popitem(last=False)
        return self._dies[cell]


def _read(arr: Any, r0: int, c0: int, h: int, w: int) -> np.ndarray:
    """``arr[r0:r0+h, c0:c0+w]`` as float32; pixels beyond ``arr`` read as 0 (a die cut by
    the mosaic's border: they are never compared)."""
    rows, cols = arr.shape[-2:]
    if r0 >= 0 and c0 >= 0 and r0 + h <= rows and c0 + w <= cols:
        return np.asarray(arr[r0:r0 + h, c0:c0 + w], dtype=np.float32)
    out = np.zeros((h, w), dtype=np.float32)
    a0, a1, b0, b1 = max(r0, 0), min(r0 + h, rows), max(c0, 0), min(c0 + w, cols)
    if a1 > a0 and b1 > b0:
        out[a0 - r0:a1 - r0, b0 - c0:b1 - c0] = np.asarray(arr[a0:a1, b0:b1])
    return out


def _shifted(a: np.ndarray, y: int, x: int, h: int, w: int, shift: np.ndarray, margin: int
             ) -> np.ndarray:
    """``a[y:y+h, x:x+w]`` moved by ``shift`` (``a`` holds ``margin`` extra pixels around).

    Bilinear, as ``scipy.ndimage.shift(order=1)``, written as four weighted slices: the
    same values at a third of the cost for the many small blocks aligned here.
    """
    sy, sx = float(shift[0]), float(shift[1])
    ny, nx = math.floor(sy), math.floor(sx)
    fy, fx = sy - ny, sx - nx
    r, c = y + margin - ny, x + margin - nx
    if not (1 <= r and r + h <= a.shape[0] and 1 <= c and c + w <= a.shape[1]):
        raise ValueError(f"shift {shift} exceeds the margin of {margin} pixels")
    return ((1 - fy) * (1 - fx) * a[r:r + h, c:c + w]
            + fy * (1 - fx) * a[r - 1:r - 1 + h, c:c + w]
            + (1 - fy) * fx * a[r:r + h, c - 1:c - 1 + w]
            + fy * fx * a[r - 1:r - 1 + h, c - 1:c - 1 + w]).astype(np.float32)


def die_origin_px(grid: DieGrid, mosaic: MosaicGrid, cell: Cell) -> tuple[int, int, np.ndarray]:
    """Integer mosaic ``(row, col)`` of a die cell's corner and the fractional remainder."""
    x0, y0, _, _ = grid.cell_box(*cell)
    r, c = mosaic.to_px(x0, y0)
    ri, ci = int(round(r)), int(round(c))
    return ri, ci, np.array([r - ri, c - ci])


def _blocks(n: int, b: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of blocks of ``b`` covering ``n``; a remainder under ``b / 2`` joins
    the last block (a strip a few dozen pixels high aligns on whatever edge crosses it: the
    39 px left under a brick die's last block row chose a shift 1.5 px off the die's, and
    the mortar line there scored z 43 on a good scan). Index ``min(i // b, count - 1)``."""
    starts = list(range(0, n, b))
    if len(starts) > 1 and n - starts[-1] < b / 2:
        starts.pop()
    return [(i, starts[k + 1] if k + 1 < len(starts) else n) for k, i in enumerate(starts)]


class UsableArea:
    """Which mosaic pixels of edge dies may be compared: inside the usable polygon shrunk by
    ``edge_px`` (the alignment tolerance) and inside the mosaic.

    Masks are made window by window (``area(r0, c0, h, w)``), so no die-sized mask is held:
    a 20 mm die at 2 um would be a 100 MB mask per edge die.
    """

    def __init__(self, polygon: Any, mosaic: MosaicGrid, edge_px: float) -> None:
        from scanner.inspection.maps import polygon_mask

        p = mosaic.pixel_size_um
        self.polygon = polygon.buffer(-edge_px * p) if edge_px > 0 else polygon
        self.mosaic = mosaic
        self._inside = polygon_mask(self.polygon, mosaic.origin_um, p)

    def __call__(self, r0: int, c0: int, h: int, w: int, step: int = 1) -> np.ndarray:
        """Usable pixels ``[r0, r0+h) x [c0, c0+w)``; with ``step`` > 1, whether each
        ``step x step`` block of them is wholly usable (``h`` and ``w`` multiples of it)."""
        rows, cols = self.mosaic.shape
        if step > 1:
            from scanner.inspection.maps import polygon_mask

            # block centres, in a polygon shrunk by half a block's diagonal
            p = self.mosaic.pixel_size_um
            ox = self.mosaic.origin_um[0] + (c0 + (step - 1) / 2) * p
            oy = self.mosaic.origin_um[1] + (r0 + (step - 1) / 2) * p
            coarse = polygon_mask(self.polygon, (ox, oy), step * p, edge_um=0.71 * step * p)
            m = coarse(0, 0, h // step, w // step)
            r = r0 + step * np.arange(h // step)
            c = c0 + step * np.arange(w // step)
            fits_r, fits_c = (r >= 0) & (r + step <= rows), (c >= 0) & (c + step <= cols)
        else:
            m = self._inside(r0, c0, h, w)
            r, c = r0 + np.arange(h), c0 + np.arange(w)
            fits_r, fits_c = (r >= 0) & (r < rows), (c >= 0) & (c < cols)
        if m is None:
            return np.zeros((len(fits_r), len(fits_c)), dtype=bool)
        return m & fits_r[:, None] & fits_c[None, :]
