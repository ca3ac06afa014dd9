"""Cell-to-cell comparison: a repeat finer than a die, compared with itself a few periods away.

A memory array, a field of vias or contacts, a grating: a layout that repeats every few
micrometres holds no die that die-to-die could align and compare (dies under
:data:`scanner.diegrid.MIN_DIE_PX` pixels), and the pretrained features, sampled every 8 pixels,
see such a period at another phase in every window (a 12 um via array: 5 of 23 painted defects
found; a golden image of it cannot be placed, any period off fits as well). Fab tools inspect
arrays in "array mode", each cell against the cells a period or a few away in the same image;
so does this:

1. The lattice is the repeat found in the mosaic (:func:`scanner.diegrid.estimate_grid`) or
   given by the recipe; the axes whose period is at most half :attr:`CellToCell.reach_px` are
   compared (a grating's lines: one axis).
2. Tile by tile of the mosaic (memory stays flat), the tile's copies a few periods away along
   each direction of those axes are read (multiples spread over ``reach_px``, each moved to
   the whole pixel that matches best within ``search_px``: the period is known to a fraction
   of a pixel, and stitching moves tiles by a pixel or two).
3. The copies of one direction give one reference, their median: a defect lies in every copy
   a period away from itself, but in few of one pixel's copies unless it is wider than the
   reach. A direction with no usable copy (the part's border) takes the others' median.
4. The tile is scored against those references as a die against its neighbours
   (:func:`scanner.inspection.dietodie.band_z`: the intensity z outside the references'
   envelope over +-``tolerance_px``, and the texture z), with the z thresholds calibrated on the
   user's good scan (:func:`largest_cell_z`), put on the anomaly map's scale as die-to-die's
   are (:func:`scanner.inspection.dietodie_maps.map_patch`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from scanner.diegrid import MIN_DIE_PX, DieGrid
from scanner.inspection.dietodie import DieToDie, _context_px, band_z
from scanner.inspection.dietodie_geometry import MosaicGrid, UsableArea, _read
from scanner.inspection.dietodie_maps import Patch, map_patch, pair_opening
from scanner.inspection.dietodie_maths import median_of


@dataclass(frozen=True)
class CellToCell:
    """Settings of the cell-to-cell comparison.

    Attributes
    ----------
    z_threshold, texture_z_threshold : float
        As :class:`scanner.inspection.dietodie.DieToDie`'s.
    reach_px : int
        The farthest copy compared (mosaic pixels): a defect narrower than about this is
        found whole; axes with a period over half of it are not compared.
    per_direction : int
        Copies read along each direction (their median is that direction's reference).
    tile_px : int
        Side of the tiles scored at a time.
    block_px : int
        Side of the blocks each copy is aligned by.
    search_px : int
        How far (pixels) past half a period a copy is moved to match best.
    tolerance_px : int
        Local misalignment tolerated (the references' envelope, see
        :func:`scanner.inspection.dietodie_maths.difference_z`).
    """

    z_threshold: float = DieToDie().z_threshold
    texture_z_threshold: float = DieToDie().texture_z_threshold
    reach_px: int = 96
    per_direction: int = 6
    tile_px: int = 256
    block_px: int = 64
    search_px: int = 2
    tolerance_px: int = 1

    def scoring(self) -> DieToDie:
        """The die-to-die settings the tiles are scored with."""
        return DieToDie(z_threshold=self.z_threshold,
                        texture_z_threshold=self.texture_z_threshold,
                        tolerance_px=self.tolerance_px)


def fine_axes(grid: DieGrid, pixel_um: float, settings: CellToCell = CellToCell()
              ) -> list[np.ndarray]:
    """The lattice's axes compared cell to cell, as ``(rows, cols)`` vectors of mosaic
    pixels; none when the repeat is a die die-to-die compares (no period under
    :data:`MIN_DIE_PX`), or no period is under half the reach."""
    periods = [p / pixel_um for p, flat in zip(grid.pitch_um, grid.uniform_axes, strict=True)
               if not flat]
    if not periods or min(periods) >= MIN_DIE_PX:
        return []
    # along an axis the layout does not change along (a grating's lines), copies are read
    # as a period would space them
    periods = [settings.reach_px / settings.per_direction if flat else p / pixel_um
               for p, flat in zip(grid.pitch_um, grid.uniform_axes, strict=True)]
    t = math.radians(grid.rotation_deg)
    c, s = math.cos(t), math.sin(t)
    # the grid's x axis turned from +x towards +y, its y axis likewise (DieGrid)
    axes = [np.array([periods[0] * s, periods[0] * c]), np.array([periods[1] * c,
                                                                  -periods[1] * s])]
    return [a for a, p in zip(axes, periods, strict=True) if p <= settings.reach_px / 2]


def copy_shifts(axes: list[np.ndarray], settings: CellToCell = CellToCell()
                ) -> list[list[np.ndarray]]:
    """Per direction (each axis, both ways), the shifts (rows, cols) of the copies read:
    multiples of the period spread up to the reach, each a different whole multiple."""
    groups = []
    for a in axes:
        p = float(np.hypot(*a))
        n = max(1, min(settings.per_direction, int(settings.reach_px // p)))
        multiples = sorted({max(1, round(k * settings.reach_px / (n * p))) for k in
                            range(1, n + 1)})
        for sign in (1, -1):
            groups.append([sign * m * a for m in multiples])
    return groups


@dataclass
class CellComparison:
    """A cell-to-cell pass over a mosaic: its geometry, copies and usable area."""

    mosaic: MosaicGrid
    axes: list[np.ndarray]
    usable: UsableArea
    settings: CellToCell = field(default_factory=CellToCell)

    def __post_init__(self) -> None:
        self.groups = copy_shifts(self.axes, self.settings)
        self.periods_px = [float(np.hypot(*a)) for a in self.axes]
        # how far a copy's block may be moved: onto the lattice (half the coarsest period
        # compared) and the stitching's pixel or two
        self.search = int(math.ceil(max(self.periods_px) / 2)) + self.settings.search_px

    def margin(self) -> int:
        """Pixels read around a window: the farthest copy, its search and the context."""
        far = max(float(np.abs(s).max()) for g in self.groups for s in g)
        return int(math.ceil(far)) + self.search + _context_px(self.settings.scoring())

    def window(self, level0: Any, r0: int, c0: int, h: int, w: int
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """The test window ``[r0, r0+h) x [c0, c0+w)`` (float32), its references
        ``(directions, h, w)`` and the pixels compared (usable, scanned, with a copy); None
        when none is."""
        m = self.margin()
        win = _read(level0, r0 - m, c0 - m, h + 2 * m, w + 2 * m)
        ok = self.usable(r0 - m, c0 - m, h + 2 * m, w + 2 * m) & (win != 0)
        core = (slice(m, m + h), slice(m, m + w))
        test, mask = win[core], ok[core]
        if not mask.any():
            return None
        # the test's blocks, transformed once for every copy's phase correlation
        b = int(self.settings.block_px)
        tb = _blocks(np.where(mask, test, 0.0), b)
        spectra = np.fft.rfft2(tb - tb.mean(axis=(-2, -1), keepdims=True))
        refs = np.stack([_nanmedian(np.stack([self._copy(win, ok, m, h, w, shift, spectra)
                                              for shift in group]))
                         for group in self.groups]).astype(np.float32)
        others = _nanmedian(refs)
        have = np.isfinite(others)
        refs = np.where(np.isfinite(refs), refs, np.where(have, others, test))
        mask &= have
        if not mask.any():
            return None
        return test, _arbitrated(test, refs), mask

    def _copy(self, win: np.ndarray, ok: np.ndarray, m: int, h: int, w: int,
              shift: np.ndarray, spectra: np.ndarray) -> np.ndarray:
        """The copy of the test window ``shift`` away (NaN where it is not usable), each
        block of :attr:`CellToCell.block_px` moved onto the test's lattice.

        A stitched mosaic places its tiles a pixel or two apart, and tiles that a periodic
        overlap left to the stage's own placing (no registration can tell one period from the
        next) lie a fraction of a period apart: a copy read across such a seam shows the
        cells at another phase. Each block's offset is the peak of its phase correlation
        with the test's block, taken to the nearest lattice position (any period fits as
        well) and kept where it matches better than the nominal shift. ``spectra``: the
        Fourier transforms of the test's mean-removed blocks (:func:`_blocks`).
        """
        b = int(self.settings.block_px)
        base = np.array([int(round(float(shift[0]))), int(round(float(shift[1])))])
        nominal = (slice(m + base[0], m + base[0] + h), slice(m + base[1], m + base[1] + w))
        test, t_ok = win[m:m + h, m:m + w], ok[m:m + h, m:m + w]
        cb = _blocks(np.where(ok[nominal], win[nominal], 0.0), b)
        cb -= cb.mean(axis=(-2, -1), keepdims=True)
        cross = spectra * np.conj(np.fft.rfft2(cb))
        corr = np.fft.irfft2(cross / (np.abs(cross) + 1e-9), s=(b, b))
        nr, nc = spectra.shape[:2]
        peak = np.argmax(corr.reshape(nr, nc, -1), axis=-1)
        d = np.stack(np.unravel_index(peak, (b, b)), axis=-1)
        d = np.where(d >= b // 2, d - b, d).astype(np.float64)  # test(x) ~ copy(x - d)
        d = self._on_lattice(d)
        out = np.full((h, w), np.nan, dtype=np.float32)
        for i in range(nr):
            for j in range(nc):
                r, c = i * b, j * b
                bh, bw = min(b, h - r), min(b, w - c)
                t = test[r:r + bh, c:c + bw]
                tk = t_ok[r:r + bh, c:c + bw]
                best, pick = math.inf, None
                for off in {tuple(base), tuple(base - d[i, j].astype(int))}:
                    if max(abs(off[0] - base[0]), abs(off[1] - base[1])) > self.search:
                        continue
                    at = (slice(m + off[0] + r, m + off[0] + r + bh),
                          slice(m + off[1] + c, m + off[1] + c + bw))
                    both = tk & ok[at]
                    if np.count_nonzero(both) < 16:
                        continue
                    cost = float(np.abs(t[both] - win[at][both]).mean())
                    if cost < best:
                        best, pick = cost, at
                if pick is not None:
                    out[r:r + bh, c:c + bw] = np.where(ok[pick], win[pick], np.nan)
        return out

    def _on_lattice(self, d: np.ndarray) -> np.ndarray:
        """Offsets ``(..., 2)`` (rows, cols) taken to the nearest of their lattice
        translations (whole pixels)."""
        best = np.rint(d)
        for a in self.axes:
            for _ in range(2):  # the second pass settles offsets near half a period
                k = np.rint((best @ a) / float(a @ a))
                best = np.rint(best - k[..., None] * a)
        return best

    def z(self, level0: Any, r0: int, c0: int, h: int, w: int, separate: bool = False
          ) -> np.ndarray | None:
        """The z-scores of a window (:func:`scanner.inspection.dietodie.band_z`; with
        ``separate`` the intensity and texture z stacked); None: nothing compared."""
        ctx = _context_px(self.settings.scoring())
        got = self.window(level0, r0 - ctx, c0 - ctx, h + 2 * ctx, w + 2 * ctx)
        if got is None:
            return None
        test, refs, mask = got
        z = band_z(test, refs, self.settings.scoring(), mask, separate)
        return z[..., ctx:ctx + h, ctx:ctx + w]

    def difference(self, level0: Any, r0: int, c0: int, h: int, w: int
                   ) -> tuple[np.ndarray, np.ndarray] | None:
        """The window minus its references' median (float32, the mosaic's units; 0 where
        nothing is compared) and its z-scores, as
        :meth:`scanner.inspection.dietodie.Comparison.difference` gives them for a die."""
        # read wide enough that the levels matched are the surroundings', not a stain's own
        pad = max(_context_px(self.settings.scoring()) + 4, h, w)
        got = self.window(level0, r0 - pad, c0 - pad, h + 2 * pad, w + 2 * pad)
        if got is None:
            return None
        test, refs, mask = got
        z = band_z(test, refs, self.settings.scoring(), mask)
        diff = np.where(mask, test - median_of(refs), 0.0).astype(np.float32)
        core = (slice(pad, pad + h), slice(pad, pad + w))
        return diff[core], z[core]

    def tiles(self, polygon: Any) -> list[tuple[int, int, int, int]]:
        """The tiles ``(r0, c0, h, w)`` of the mosaic over the usable polygon's bounds."""
        rows, cols = self.mosaic.shape
        x0, y0, x1, y1 = polygon.bounds
        (ra, ca), (rb, cb) = self.mosaic.to_px(x0, y0), self.mosaic.to_px(x1, y1)
        ra, ca = max(0, int(math.floor(ra))), max(0, int(math.floor(ca)))
        rb, cb = min(rows, int(math.ceil(rb)) + 1), min(cols, int(math.ceil(cb)) + 1)
        t = int(self.settings.tile_px)
        return [(r, c, min(t, rb - r), min(t, cb - c)) for r in range(ra, rb, t)
                for c in range(ca, cb, t)]

    def scored(self, level0: Any, polygon: Any, separate: bool = False
               ) -> Iterator[tuple[int, int, np.ndarray]]:
        """``(r0, c0, z)`` of every tile with pixels compared, scored by two worker threads
        (numpy and scipy release the GIL for most of it)."""
        from concurrent.futures import ThreadPoolExecutor

        def one(tile: tuple[int, int, int, int]) -> tuple[int, int, np.ndarray | None]:
            return tile[0], tile[1], self.z(level0, *tile, separate=separate)

        with ThreadPoolExecutor(max_workers=2) as pool:
            for r0, c0, z in pool.map(one, self.tiles(polygon)):
                if z is not None:
                    yield r0, c0, z


def cell_comparison(mosaic: MosaicGrid, grid: DieGrid, polygon: Any,
                    settings: CellToCell = CellToCell()) -> CellComparison | None:
    """The cell-to-cell comparison of a lattice over a mosaic; None when the grid is no
    fine repeat (:func:`fine_axes`)."""
    axes = fine_axes(grid, mosaic.pixel_size_um, settings)
    if not axes:
        return None
    # the part's border is no cell: a pattern cut there, on tiles the stage placed a whole
    # period apart (as it may, see scanner.stitching.registration.lattice), ends a row of
    # cells apart (a via array's good scan: z 13 along it, 3 inside)
    edge = math.ceil(max(float(np.hypot(*a)) for a in axes)) + 2
    return CellComparison(mosaic, axes, UsableArea(polygon, mosaic, edge), settings)


@dataclass
class CellToCellStats:
    """What a cell-to-cell pass did (for the defect list's header)."""

    period_px: list[float]
    tiles: int = 0
    z_threshold: float = 0.0
    seconds: float = 0.0
    pixels_over: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (beside die-to-die's: ``dies`` 0)."""
        return {"mode": "cell to cell", "dies": 0, "period_px": self.period_px,
                "tiles": self.tiles, "z_threshold": self.z_threshold,
                "seconds": round(self.seconds, 3), "map_pixels_over_threshold": self.pixels_over}


def cell_to_cell_patches(
    map_origin_um: tuple[float, float], map_pixel_um: float, level0: Any,
    comparison: CellComparison, polygon: Any, threshold: float,
) -> tuple[list[Patch], CellToCellStats]:
    """The cell-to-cell evidence of the usable area as blocks of anomaly-map scores (see
    :func:`scanner.inspection.dietodie.die_to_die_patches`)."""
    t0 = time.perf_counter()
    s = comparison.settings
    stats = CellToCellStats([round(p, 3) for p in comparison.periods_px],
                            z_threshold=s.z_threshold)
    patches: list[Patch] = []
    for r0, c0, z in comparison.scored(level0, polygon):
        stats.tiles += 1
        patch = map_patch(z, r0, c0, comparison.mosaic, map_origin_um, map_pixel_um,
                          s.z_threshold, threshold)
        if patch is not None:
            stats.pixels_over += int(np.count_nonzero(patch[2] >= threshold))
            patches.append(patch)
    stats.seconds = time.perf_counter() - t0
    return patches, stats


def largest_cell_z(level0: Any, comparison: CellComparison, polygon: Any
                   ) -> tuple[float, float, int] | None:
    """The largest intensity and texture z-scores (after the pair opening the map applies)
    over the usable area, and how many tiles were compared (None: none): on a good scan,
    what the comparison's noise reaches (:func:`scanner.inspection.dietodie.
    calibrated_z_threshold`)."""
    best, tiles = [0.0, 0.0], 0
    for _, _, z in comparison.scored(level0, polygon, separate=True):
        tiles += 1
        for k in range(2):
            best[k] = max(best[k], float(pair_opening(z[k]).max()) if z[k].size else 0.0)
    return (best[0], best[1], tiles) if tiles else None


def _nanmedian(a: np.ndarray) -> np.ndarray:
    """The median over the first axis of what is not NaN; NaN where all is (without the
    warning ``np.nanmedian`` gives there, which a warnings filter cannot silence in threads)."""
    empty = np.isnan(a).all(axis=0)
    if empty.any():
        a = a.copy()
        a[0][empty] = 0.0
    out = np.nanmedian(a, axis=0)
    out[empty] = np.nan
    return out


def _blocks(a: np.ndarray, b: int) -> np.ndarray:
    """The ``b x b`` blocks of an image ``(rows, cols, b, b)`` (float64; the last ones padded
    with zeros)."""
    h, w = a.shape
    padded = np.pad(a.astype(np.float64), ((0, -h % b), (0, -w % b)))
    return padded.reshape(padded.shape[0] // b, b, padded.shape[1] // b, b).swapaxes(1, 2)


#: a direction whose reference fits the test this many times worse than the second best
#: direction's, around a pixel, is left out there (:func:`_arbitrated`)
MISFIT_RATIO = 2.0


def _arbitrated(test: np.ndarray, refs: np.ndarray) -> np.ndarray:
    """The references with those that fit the test far worse than the others around a pixel
    replaced there by the median of the rest.

    A defect in the test differs from every direction's reference alike; a reference that
    alone differs around a pixel crossed into another part of the mosaic (a seam where two
    tiles lie a fraction of a period apart, the blend of an overlap): its values would widen
    the envelope the test is compared with, and hide a defect there (a dark 40 px spot on a
    via array scored z 0.6 beside such a seam, 7 without the reference that crossed it).
    """
    if refs.shape[0] <= 2:
        return refs
    from scipy import ndimage

    fit = np.stack([ndimage.uniform_filter(np.abs(test - r), 9) for r in refs])
    second = np.sort(fit, axis=0)[1]
    floor = np.float32(1e-3) * max(float(np.abs(test).mean()), 1.0)
    keep = fit <= MISFIT_RATIO * second + floor  # the best two at least
    kept = np.nanmedian(np.where(keep, refs, np.nan), axis=0)
    return np.where(keep, refs, kept).astype(np.float32)
