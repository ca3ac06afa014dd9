"""Die-to-die comparison: each die of a patterned wafer against the median of its neighbours.

The dies of a wafer are copies of one design, so the strongest evidence of a defect inside a
die is a difference from the other dies at the same in-die position: fab inspection tools
compare every die with its neighbours for this reason. The anomaly network judges a window on
its own; it cannot know that a patch of bare silicon inside a die is a *missing* structure, and
it must tolerate the design's own busy circuitry, which hides faint stains and thin scratches.

For every full die of the recipe's die grid inside the usable area and the mosaic:

1. dies unlike the others (an unexposed field, a test die, another product: thumbnail
   correlation) are neither compared nor used as references (:func:`alike_dies`);
2. every die is aligned to one anchor die, first as a whole at a coarse resolution (a recipe
   pitch a little off moves far dies by many pixels), then block by block (phase correlation,
   scikit-image), because a stitched mosaic has local offsets of a pixel or two at tile seams
   (:func:`shift_fields`); a reference's offset from a test die is the difference of the two;
3. band by band of the test die (memory stays flat whatever the die's size), its nearest dies
   (up to ``neighbours``) are moved onto it, block by block;
4. at each of a few scales (a thin scratch at the finest, a faint wide stain at the coarsest,
   coarse scales on block means) the smoothed test's distance outside the minimum-maximum
   envelope of the smoothed references over +-``tolerance_px`` is the difference, divided by
   the local die-to-die noise (how much the references differ from one another around the
   pixel): a z-score per pixel, the largest over the scales (:func:`difference_z`).

Edge dies cut by the usable area (or the mosaic's border) are compared too, on their usable
part, as fab tools inspect partial dies: aligned around a whole-die shift predicted from the
full dies (:func:`partial_fields`), referenced to their nearest full dies, and left out where
their usable part does not look like the same part of the other dies (an edge field that was
never exposed: :func:`alike_partial_dies`).

A z-score of :attr:`DieToDie.z_threshold` means "a defect" and is put on the anomaly map's
scale at the decision threshold (:func:`z_to_score`), so the two kinds of evidence join in one
anomaly map and one defect list (:func:`scanner.inspection.inspect_mosaic`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from .diegrid import DieGrid

Cell = tuple[int, int]

#: dies smaller than this (mosaic pixels a side) are not compared
MIN_DIE_PX = 32


@dataclass(frozen=True)
class DieToDie:
    """Settings of the die-to-die comparison.

    Attributes
    ----------
    z_threshold : float
        Difference (in noise standard deviations at its scale) that counts as a defect.
    neighbours : int
        Reference dies per die (the nearest full dies); at least two are needed.
    block_px : int
        Side of the blocks aligned one by one (mosaic pixels).
    band_px : int
        Rows of a die compared at a time (bounds memory).
    max_shift_px : float
        Largest misalignment of a die searched for (larger estimates are failures).
    max_global_px : int
        Largest offset of a whole die from where the recipe's grid puts it, relative to the
        anchor die (a die pitch a little off, stage drift); found at a coarse resolution
        before the blocks are aligned within ``max_shift_px`` of it.
    scales_px : tuple of float
        Gaussian sigmas (mosaic pixels) at which differences are scored.
    tolerance_px : int
        Local misalignment tolerated after alignment (see :func:`difference_z`).
    """

    z_threshold: float = 13.0
    neighbours: int = 4
    block_px: int = 256
    band_px: int = 1024
    max_shift_px: float = 4.0
    max_global_px: int = 16
    tolerance_px: int = 4
    scales_px: tuple[float, ...] = (1.0, 2.5, 6.0)


def _margin(settings: DieToDie) -> int:
    """Pixels read around a die: room for a reference's shift relative to a test die."""
    return 2 * (int(settings.max_global_px) + int(math.ceil(settings.max_shift_px))) + 4


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


def die_shape_px(grid: DieGrid, mosaic: MosaicGrid) -> tuple[int, int]:
    """``(rows, cols)`` of mosaic pixels compared per die: whole pixels of the die pitch."""
    p = mosaic.pixel_size_um
    return int(math.floor(grid.pitch_um[1] / p)), int(math.floor(grid.pitch_um[0] / p))


def full_dies(grid: DieGrid, polygon: Any, mosaic: MosaicGrid, margin_px: int = 0) -> list[Cell]:
    """Die cells wholly inside the usable area and inside the mosaic (with a margin)."""
    rows, cols = mosaic.shape
    out = []
    for col, row, full in grid.cells_in(polygon):
        if not full:
            continue
        x0, y0, x1, y1 = grid.cell_box(col, row)
        r0, c0 = mosaic.to_px(x0, y0)
        r1, c1 = mosaic.to_px(x1, y1)
        if r0 - margin_px >= 0 and c0 - margin_px >= 0 and r1 + margin_px < rows - 1 \
                and c1 + margin_px < cols - 1:
            out.append((col, row))
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


@functools.lru_cache(maxsize=8)
def _hann(shape: tuple[int, int]) -> np.ndarray:
    from skimage.filters import window

    return window("hann", shape)


def block_shift(fixed: np.ndarray, moving: np.ndarray, max_shift_px: float) -> np.ndarray | None:
    """Shift ``(dy, dx)`` that aligns ``moving`` onto ``fixed`` (None: no reliable estimate).

    Phase correlation with 1/10 pixel precision (``skimage.registration``) of the two blocks
    smoothed (Gaussian sigma 2 pixels): a grating finer than a few pixels, common in a die,
    matches itself one period off as well as at the true shift, while the coarser structure
    around it does not. A Hann window keeps the block's borders from biasing the estimate
    (0.3 pixel without it, under 0.1 with it, on a test pattern). Featureless blocks give no
    estimate.
    """
    # at half resolution (2 x 2 means, then sigma 1: the same smoothing as sigma 2 at full
    # resolution) for a quarter of the cost; the estimate is doubled back
    f = ndimage.gaussian_filter(_mean_pool(fixed.astype(np.float32), 2), 1.0)
    m = ndimage.gaussian_filter(_mean_pool(moving.astype(np.float32), 2), 1.0)
    shift = _correlate(f, m, upsample=20)
    if shift is None:
        return None
    shift = 2.0 * shift
    if not np.all(np.isfinite(shift)) or np.max(np.abs(shift)) > max_shift_px:
        return None
    return shift


def _correlate(fixed: np.ndarray, moving: np.ndarray, upsample: int) -> np.ndarray | None:
    """Phase-correlation shift of two equal images, Hann-windowed (None: one is featureless)."""
    from skimage.registration import phase_cross_correlation

    if fixed.std() < 1e-6 * (abs(fixed.mean()) + 1) or moving.std() < 1e-6 * (
            abs(moving.mean()) + 1):
        return None
    hann = _hann(fixed.shape)
    shift, _, _ = phase_cross_correlation((fixed - fixed.mean()) * hann,
                                          (moving - moving.mean()) * hann,
                                          upsample_factor=upsample, normalization=None)
    return np.asarray(shift, dtype=np.float64)


def _mean_pool(a: np.ndarray, f: int) -> np.ndarray:
    """``f x f`` block means over the last two axes, ``f`` a power of two (edges replicated).

    Done as repeated 2 x 2 means of four strided views: several times faster than a
    reshaped ``mean`` over two non-adjacent axes.
    """
    while f > 1:
        h, w = a.shape[-2:]
        if h % 2 or w % 2:
            a = np.pad(a, [(0, 0)] * (a.ndim - 2) + [(0, h % 2), (0, w % 2)], mode="edge")
        a = 0.25 * (a[..., ::2, ::2] + a[..., 1::2, ::2] + a[..., ::2, 1::2] + a[..., 1::2, 1::2])
        f //= 2
    return a


def match_levels(test: np.ndarray, refs: np.ndarray, mask: np.ndarray | None = None
                 ) -> tuple[float, np.ndarray]:
    """The test's level (median) and the references scaled to it (a float32 copy): the
    illumination drifts between dies.

    Each reference's gain is the median of the pixel ratios test / reference (every 4th
    pixel of ``mask``; all when None) over the pixels the other references show brightest
    (their median above its own median). Not the ratio of the images' medians: the median
    of a design of two levels (lines on a dark ground) jumps between them with the window
    (a window of 270 px on a circuit die: medians 5 % apart between dies whose pixels
    agreed within 0.5 %, and a particle's z fell from 13 to 4). Nor sums: a window that
    reaches where a reference shows something else (another die's edge, the wafer's rim)
    moves a sum, not a median (gains 8 % apart on one large window). The bright pixels
    are chosen by the other references, not by this one: chosen by its own noise they are
    those where it reads high, and the gain is biased low (1 % on bare silicon). The
    median is taken again without the ratios far from it (a tenth of a window on the chuck
    moved it 0.4 %). A reference or test of level <= 0 is left as it is.
    """
    sample = (slice(None, None, 4), slice(None, None, 4))
    inside = mask[sample] if mask is not None else np.ones(test[sample].shape, dtype=bool)
    refs = refs.astype(np.float32)
    if not inside.any():
        return 0.0, refs
    t = test[sample][inside]
    level_t = float(np.median(t))
    if level_t <= 0:
        return level_t, refs
    sampled = np.stack([r[sample][inside] for r in refs])
    k = len(refs)
    for i in range(k):
        r = sampled[i]
        others = np.median(np.delete(sampled, i, axis=0), axis=0) if k > 1 else t
        pick = (others > np.median(others)) & (r > 0)
        if np.count_nonzero(pick) < 8:
            pick = r > 0
        if np.count_nonzero(pick) >= 8:
            ratio = t[pick] / r[pick]
            centre = np.median(ratio)
            spread = 1.4826 * np.median(np.abs(ratio - centre))
            if spread > 0:  # again without outliers: a defect, another die's edge, the chuck
                ratio = ratio[np.abs(ratio - centre) <= 3.0 * spread]
            refs[i] *= np.float32(np.median(ratio))
    return level_t, refs


def difference_z(test: np.ndarray, refs: np.ndarray, scales_px: tuple[float, ...],
                 tolerance_px: int = 4, mask: np.ndarray | None = None) -> np.ndarray:
    """Z-score of the test image's difference from aligned references.

    Parameters
    ----------
    test : ndarray, shape (h, w)
        The die region under test.
    refs : ndarray, shape (k, h, w)
        The same region of ``k >= 2`` reference dies, aligned to ``test``.
    scales_px : tuple of float
        Gaussian sigmas of the smoothing scales (pixels of ``test``).
    tolerance_px : int
        Local misalignment tolerated (pixels): the half-width of the references' envelope.
    mask : ndarray of bool, shape (h, w), optional
        The test pixels to compare (a die cut by the wafer's edge): elsewhere the references'
        median stands in for the test, so nothing there differs, and z is 0.

    Returns
    -------
    ndarray, shape (h, w), float32
        The largest ``|excess| / noise`` over the scales, where the excess is how far the
        smoothed test lies outside the envelope of the smoothed references (0 inside).
    """
    test = test.astype(np.float32)
    k = refs.shape[0]
    level_t, refs = match_levels(test, refs, mask)
    if mask is not None:
        test = np.where(mask, test, np.median(refs, axis=0))
    floor = 1e-3 * max(abs(level_t), 1.0)  # noiseless (synthetic) images
    z = np.zeros(test.shape, dtype=np.float32)
    for s in scales_px:
        # coarse scales are computed on block means (2 x 2 from sigma 1.5, 4 x 4 from 3.5):
        # the same smoothing at a quarter or a sixteenth of the cost
        f = 1 if s < 1.5 else 2 if s < 3.5 else 4
        tp, rp = _mean_pool(test, f), _mean_pool(refs, f)
        # compared at each scale after smoothing all images alike: a faint wide stain is a
        # mean shift that shows at a coarse scale, while a fine grating that differs from
        # die to die only in its sampling (or focus) averages out there
        t = ndimage.gaussian_filter(tp, s / f, truncate=2.5)
        r = np.stack([ndimage.gaussian_filter(rp[i], s / f, truncate=2.5) for i in range(k)])
        # the envelope of every reference's neighbourhood: a pixel differs only when it lies
        # outside what all the references show nearby (arbitration over the neighbours;
        # tolerates residual misalignment, e.g. stitching offsets where tiles overlap on
        # featureless areas and registration could not correct the stage)
        size = 2 * int(math.ceil(tolerance_px / f)) + 1
        lo = ndimage.minimum_filter(r.min(axis=0), size)
        hi = ndimage.maximum_filter(r.max(axis=0), size)
        excess = t - np.clip(t, lo, hi)
        # the local noise at this scale: how much the references differ from one another
        # around each pixel (unbiased variance over the k references, averaged over a
        # neighbourhood). Surface texture, grain and residual misalignment vary across a
        # die, so one noise level per die would flag every textured area; a defect in the
        # test die does not raise its own noise estimate, as the references lack it
        var = ((r - r.mean(axis=0)) ** 2).sum(axis=0) / (k - 1)
        var = ndimage.uniform_filter(var, 2 * int(round(max(4.0, 3.0 * s) / f)) + 1)
        # test minus median-of-k has about (1 + pi / (2k)) times the variance of one die
        noise = np.sqrt(var * (1.0 + math.pi / (2 * k))) + floor
        zs = np.abs(excess) / noise
        if f > 1:
            zs = np.repeat(np.repeat(zs, f, axis=0), f, axis=1)[:test.shape[0], :test.shape[1]]
        np.maximum(z, zs, out=z)
    if mask is not None:
        z[~mask] = 0.0
    return z


class _DieCache:
    """Read-through cache of whole die cells of a mosaic (with a margin), least recently used.

    Alignment and comparison read each die many times in small pieces (blocks, bands, as test
    and as reference); Zarr decompresses whole chunks for every piece. Whole dies are read
    once while at least three fit in ``budget_bytes``; otherwise reads go to the mosaic.
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

    def __getitem__(self, key: tuple[slice, slice]) -> np.ndarray:
        rs, cs = key
        if self.capacity >= 3:
            for cell, (r0, c0, r1, c1) in self.boxes.items():
                if r0 <= rs.start and rs.stop <= r1 and c0 <= cs.start and cs.stop <= c1:
                    return self._die(cell)[rs.start - r0:rs.stop - r0:rs.step,
                                           cs.start - c0:cs.stop - c0:cs.step]
        return np.asarray(self.level0[rs, cs])

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
    return [(i, min(i + b, n)) for i in range(0, n, b)]


def coarse_die(die: np.ndarray) -> tuple[np.ndarray, int]:
    """A whole die reduced to about 128-256 pixels a side for :func:`global_shift`, and the
    reduction factor.

    Each halving is preceded by a Gaussian of 1.5 pixels (a Gaussian pyramid): plain 2 x 2
    means alias a grating finer than the reduced grid into a moiré that phase correlation
    locks onto (a die of 8.5 px line gratings at 6 um pixels: whole dies 8-13 px off, every
    pad and border a false defect).
    """
    a = np.asarray(die, dtype=np.float32)
    f = 1
    while min(die.shape) // (2 * f) >= 128:
        a = _mean_pool(ndimage.gaussian_filter(a, 1.5), 2)
        f *= 2
    return a, f


def global_shift(fixed: np.ndarray, moving: np.ndarray, max_px: float,
                 fixed_coarse: tuple[np.ndarray, int] | None = None) -> np.ndarray:
    """Whole-pixel shift ``(dy, dx)`` aligning a whole die onto another (0 if beyond ``max_px``).

    Phase correlation of the two dies reduced to about 128-256 pixels a side
    (:func:`coarse_die`; ``fixed_coarse`` when already reduced), so an offset of many pixels
    is found in one step from the die's coarse structure; blocks are then aligned around it.
    """
    fc, f = fixed_coarse if fixed_coarse is not None else coarse_die(fixed)
    mc, _ = coarse_die(moving)
    # sub-sampled precision (1 / f of a coarse pixel), so the estimate is good to a full
    # resolution pixel rather than a step of f
    shift = _correlate(fc, mc, upsample=2 * f)
    if shift is None:
        return np.zeros(2)
    shift = np.round(shift * f)
    return shift if np.all(np.abs(shift) <= max_px) else np.zeros(2)


def shift_fields(
    level0: Any, mosaic: MosaicGrid, grid: DieGrid, cells: list[Cell], anchor: Cell,
    settings: DieToDie
) -> dict[Cell, np.ndarray]:
    """Per-block shift of every die onto one anchor die, shape ``(block rows, block cols, 2)``.

    Aligning a reference onto a test die is then ``field[ref] - field[test]``: one phase
    correlation per block and die rather than one per block, die and reference.

    Phase correlation fails on featureless blocks and may lock a period off on a fine grating,
    so each block keeps whichever of three candidates leaves the smallest squared difference
    to the anchor: its own estimate, the median of its neighbours' estimates, and the median
    of the die's (stitching leaves smooth offsets of a pixel or two between tiles).
    """
    h_die, w_die = die_shape_px(grid, mosaic)
    ar, ac, _ = die_origin_px(grid, mosaic, anchor)
    anchor_die = _read(level0, ar, ac, h_die, w_die)
    anchor_coarse = coarse_die(anchor_die)
    fields: dict[Cell, np.ndarray] = {}
    for cell in cells:
        if cell == anchor:
            fields[cell] = _die_field(level0, mosaic, grid, cell, anchor, None, settings)
            continue
        r0, c0, _ = die_origin_px(grid, mosaic, cell)
        # the whole die first (a pitch a little off moves far dies by many pixels), then
        # each block within max_shift_px of that
        die = _read(level0, r0, c0, h_die, w_die)
        g = global_shift(anchor_die, die, settings.max_global_px, anchor_coarse)
        if np.any(g != 0):
            # kept only when it matches the anchor better than the grid's position does: a
            # moiré of a grating finer than the pixels differs from die to die (it follows
            # the die's sub-pixel phase) and can still mislead the coarse correlation
            # (3.5 um pixels: one die 11 px off, every edge of it a false defect)
            moved = _read(level0, r0 - int(g[0]), c0 - int(g[1]), h_die, w_die)
            if _mean_square(anchor_die - moved) >= _mean_square(anchor_die - die):
                g = np.zeros(2)
        fields[cell] = _die_field(level0, mosaic, grid, cell, anchor, g, settings)
    return fields


class UsableArea:
    """Which mosaic pixels of edge dies may be compared: inside the usable polygon shrunk by
    ``edge_px`` (the alignment tolerance) and inside the mosaic.

    Masks are made window by window (``area(r0, c0, h, w)``), so no die-sized mask is held:
    a 20 mm die at 2 um would be a 100 MB mask per edge die.
    """

    def __init__(self, polygon: Any, mosaic: MosaicGrid, edge_px: float) -> None:
        from .inspect import polygon_mask

        p = mosaic.pixel_size_um
        self.polygon = polygon.buffer(-edge_px * p) if edge_px > 0 else polygon
        self.mosaic = mosaic
        self._inside = polygon_mask(self.polygon, mosaic.origin_um, p)

    def __call__(self, r0: int, c0: int, h: int, w: int, step: int = 1) -> np.ndarray:
        """Usable pixels ``[r0, r0+h) x [c0, c0+w)``; with ``step`` > 1, whether each
        ``step x step`` block of them is wholly usable (``h`` and ``w`` multiples of it)."""
        rows, cols = self.mosaic.shape
        if step > 1:
            from .inspect import polygon_mask

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


def _mean_square(a: np.ndarray) -> float:
    return float(np.mean(np.square(a[::2, ::2], dtype=np.float64)))


def partial_fields(
    level0: Any, mosaic: MosaicGrid, grid: DieGrid, cells: list[Cell], anchor: Cell,
    fields: dict[Cell, np.ndarray], usable: UsableArea, settings: DieToDie
) -> dict[Cell, np.ndarray]:
    """Per-block shifts of partial dies onto the anchor, as :func:`shift_fields`.

    A die cut by the wafer's edge cannot be aligned as a whole (the chuck is in it), so its
    whole-die shift is predicted from the full dies' ``fields``: a plane over the grid (a die
    pitch a little off moves dies in proportion to their index), and only its blocks that lie
    in the ``usable`` area are aligned on their own.
    """
    if not fields:
        return {}
    idx = np.array([(1.0, c, r) for c, r in fields])
    typical = np.array([np.median(f.reshape(-1, 2), axis=0) for f in fields.values()])
    coef, *_ = np.linalg.lstsq(idx, typical, rcond=None)
    b = int(settings.block_px)
    h_die, w_die = die_shape_px(grid, mosaic)
    out = {}
    for cell in cells:
        g = np.round(np.array([1.0, cell[0], cell[1]]) @ coef)
        g = np.clip(g, -settings.max_global_px, settings.max_global_px)
        r0, c0, _ = die_origin_px(grid, mosaic, cell)
        share = np.array([[usable(r0 + y0, c0 + x0, y1 - y0, x1 - x0).mean()
                           for x0, x1 in _blocks(w_die, b)] for y0, y1 in _blocks(h_die, b)])
        out[cell] = _die_field(level0, mosaic, grid, cell, anchor, g, settings,
                               aligned_blocks=share >= 0.9)
    return out


def _die_field(level0: Any, mosaic: MosaicGrid, grid: DieGrid, cell: Cell, anchor: Cell,
               g: np.ndarray | None, settings: DieToDie,
               aligned_blocks: np.ndarray | None = None) -> np.ndarray:
    """Block shifts of one die onto the anchor around its whole-die shift ``g`` (see
    :func:`shift_fields`; ``None``: the anchor itself). Only ``aligned_blocks`` (all when
    None) are estimated and judged on their own; the others take their neighbours' median."""
    h_die, w_die = die_shape_px(grid, mosaic)
    b = int(settings.block_px)
    m = int(math.ceil(settings.max_shift_px)) + 2
    rows, cols = _blocks(h_die, b), _blocks(w_die, b)
    field = np.zeros((len(rows), len(cols), 2))
    if g is None:
        return field
    if aligned_blocks is None:
        aligned_blocks = np.ones(field.shape[:2], dtype=bool)
    ar, ac, _ = die_origin_px(grid, mosaic, anchor)
    r0, c0, _ = die_origin_px(grid, mosaic, cell)
    gy, gx = int(g[0]), int(g[1])
    r0, c0 = r0 - gy, c0 - gx  # blocks of the die are read offset by the whole-die shift
    own = np.full_like(field, np.nan)
    # each block row of the anchor and of the die (with a margin), read once for both passes
    pairs = [(_read(level0, ar + y0, ac, y1 - y0, w_die),
              _read(level0, r0 + y0 - m, c0 - m, y1 - y0 + 2 * m, w_die + 2 * m))
             for y0, y1 in rows]
    for i, (fixed, moving) in enumerate(pairs):
        for j, (x0, x1) in enumerate(cols):
            if not aligned_blocks[i, j]:
                continue
            est = block_shift(fixed[:, x0:x1], moving[m:-m, m + x0:m + x1],
                              settings.max_shift_px)
            if est is not None:
                own[i, j] = est
    valid = np.isfinite(own[..., 0])
    typical = np.median(own[valid], axis=0) if valid.any() else np.zeros(2)
    # the field holds the whole shift: the global part plus the block's
    for i, ((y0, y1), (fixed, moving)) in enumerate(zip(rows, pairs, strict=True)):
        for j, (x0, x1) in enumerate(cols):
            near = own[max(i - 1, 0):i + 2, max(j - 1, 0):j + 2].reshape(-1, 2)
            near = near[np.isfinite(near[:, 0])]
            if not aligned_blocks[i, j]:  # mostly outside the usable area: nothing to judge by
                field[i, j] = g + (np.median(near, axis=0) if len(near) else typical)
                continue
            candidates = [typical] + ([np.median(near, axis=0)] if len(near) else []) \
                + ([own[i, j]] if valid[i, j] else [])
            distinct = [c for k, c in enumerate(candidates)
                        if all(np.abs(c - o).max() > 0.2 for o in candidates[:k])]
            if len(distinct) == 1:
                field[i, j] = g + distinct[0]
                continue
            target = fixed[m:y1 - y0 - m, x0 + m:x1 - m]  # away from the block's border
            best, best_err = typical, math.inf
            for c in distinct:
                moved = _shifted(moving, 0, x0, y1 - y0, x1 - x0, c, m)[m:-m, m:-m]
                err = float(np.mean((moved - target) ** 2)) if target.size else 0.0
                if err < best_err - 1e-9:
                    best, best_err = c, err
            field[i, j] = g + best
    return field


def alike_dies(level0: Any, mosaic: MosaicGrid, grid: DieGrid, cells: list[Cell],
               min_correlation: float = 0.5, side_px: int = 64) -> tuple[list[Cell], Cell | None]:
    """The dies that look like the majority, and the one nearest their middle (the anchor).

    A die that differs from its neighbours everywhere is not a copy of their design (an
    unexposed or partial field, a test-structure die, another product): comparing it would
    call the whole die a defect, and as a reference it would spoil its neighbours' medians.
    Dies are compared as thumbnails of about ``side_px`` pixels (Pearson correlation); a die
    whose median correlation with the others is below ``min_correlation`` is left out.
    """
    if len(cells) < 3:
        return [], None
    h_die, w_die = die_shape_px(grid, mosaic)
    f = _thumbnail_factor(h_die, w_die, side_px)
    thumbs = []
    for cell in cells:
        r0, c0, _ = die_origin_px(grid, mosaic, cell)
        t = _thumbnail(level0, None, r0, c0, h_die, w_die, f)
        t = t - t.mean()
        thumbs.append((t.ravel() / (np.linalg.norm(t) + 1e-12)).astype(np.float32))
    corr = np.array(thumbs) @ np.array(thumbs).T  # n x n: small thumbnails keep it cheap
    np.fill_diagonal(corr, np.nan)
    typical = np.nanmedian(corr, axis=1)
    keep = [c for c, v in zip(cells, typical, strict=True) if v >= min_correlation]
    if len(keep) < 3:
        return [], None
    # the anchor: the kept die nearest the middle of the kept ones (every die is aligned to
    # it, so a central one keeps the offsets small)
    centre = np.mean(np.array(keep, dtype=float), axis=0)
    return keep, min(keep, key=lambda c: (math.hypot(c[0] - centre[0], c[1] - centre[1]),
                                          c[1], c[0]))


@dataclass
class Comparison:
    """The dies a die-to-die pass compared, their references and alignment.

    Attributes
    ----------
    mosaic, grid, settings
        As given to :func:`compare_dies`.
    fields : dict
        Per-block shift of each compared die onto the anchor (:func:`shift_fields`).
    refs_of : dict
        The reference dies of each compared die.
    partial : set
        The partial (edge) dies compared, on their ``usable`` pixels only.
    usable : UsableArea or None
    """

    mosaic: MosaicGrid
    grid: DieGrid
    settings: DieToDie
    fields: dict[Cell, np.ndarray]
    refs_of: dict[Cell, list[Cell]]
    partial: set[Cell]
    usable: UsableArea | None

    def difference(self, level0: Any, r0: int, c0: int, h: int, w: int
                   ) -> tuple[np.ndarray, np.ndarray] | None:
        """The test die minus the median of its aligned references over mosaic pixels
        ``[r0, r0+h) x [c0, c0+w)`` (float32, the mosaic's units), and the z-scores of
        :func:`difference_z` there.

        What a defect looks like without the design around it: a particle on circuitry is a
        blob, missing pattern a patch of the design's own structure with both signs; z under
        a few means the neighbouring dies show the same. None unless the window lies inside
        one compared die; 0 outside a partial die's usable part. The references are moved
        by the shift of the block at the window's centre.
        """
        h_die, w_die = die_shape_px(self.grid, self.mosaic)
        p = self.mosaic.pixel_size_um
        cell = self.grid.index(self.mosaic.origin_um[0] + (c0 + w / 2) * p,
                               self.mosaic.origin_um[1] + (r0 + h / 2) * p)
        refs = self.refs_of.get(cell, [])
        if cell not in self.fields or len(refs) < 2:
            return None
        tr, tc, _ = die_origin_px(self.grid, self.mosaic, cell)
        dr, dc = r0 - tr, c0 - tc
        if dr < 0 or dc < 0 or dr + h > h_die or dc + w > w_die:
            return None
        b = int(self.settings.block_px)
        field = self.fields[cell]
        i = min((dr + h // 2) // b, field.shape[0] - 1)
        j = min((dc + w // 2) // b, field.shape[1] - 1)
        m = _margin(self.settings)
        # read with room for the smoothing of the z-scores, then cropped; and wide enough
        # that the levels matched between dies (medians) are the surroundings' more than a
        # large faint stain's own (else its difference is normalised away)
        pad = max(int(math.ceil(3 * max(self.settings.scales_px))) + 4, h, w)
        test = _read(level0, r0 - pad, c0 - pad, h + 2 * pad, w + 2 * pad)
        aligned = []
        for ref in refs:
            rr, rc, _ = die_origin_px(self.grid, self.mosaic, ref)
            window = _read(level0, rr + dr - pad - m, rc + dc - pad - m, h + 2 * (pad + m),
                           w + 2 * (pad + m))
            aligned.append(_shifted(window, 0, 0, h + 2 * pad, w + 2 * pad,
                                    self.fields[ref][i, j] - field[i, j], m))
        mask = None
        if cell in self.partial and self.usable is not None:
            mask = self.usable(r0 - pad, c0 - pad, h + 2 * pad, w + 2 * pad)
        # levels matched here as difference_z matches them (there it is then a no-op)
        _, refs_img = match_levels(test, np.stack(aligned), mask)
        z = difference_z(test, refs_img, self.settings.scales_px, self.settings.tolerance_px,
                         mask)
        diff = test - np.median(refs_img, axis=0)
        if mask is not None:
            diff[~mask] = 0.0
        core = (slice(pad, pad + h), slice(pad, pad + w))
        return diff[core].astype(np.float32), z[core]


def compare_dies(
    level0: Any,
    mosaic: MosaicGrid,
    grid: DieGrid,
    cells: list[Cell],
    settings: DieToDie = DieToDie(),
    partial: list[Cell] | None = None,
    polygon: Any = None,
    pyramid: list[Any] | None = None,
    plans: list[Comparison] | None = None,
) -> Iterator[tuple[Cell, int, int, np.ndarray]]:
    """Z-score maps of every die against its neighbours, band by band.

    Only the dies alike enough to be compared (:func:`alike_dies`) are; ``cells`` are all the
    full dies. ``partial`` dies (cut by the usable ``polygon`` or the mosaic's border: the
    edge dies of a wafer) are compared on their usable part against their nearest full
    dies, when that part looks like the same part of the anchor die (an edge field left
    unexposed is not a defect; ``pyramid``: the mosaic's levels, for
    :func:`alike_partial_dies`).
    The dies compared and their alignment are appended to ``plans`` as a :class:`Comparison`
    (for difference images of the defects found).

    Yields
    ------
    cell, r0, c0, z
        A die, the mosaic pixel of the band's top-left corner and the band's z-score map.
    """
    h_die, w_die = die_shape_px(grid, mosaic)
    margin = _margin(settings)
    boxes = {}
    for cell in cells:
        r0, c0, _ = die_origin_px(grid, mosaic, cell)
        box = (r0 - margin, c0 - margin, r0 + h_die + margin, c0 + w_die + margin)
        if box[0] >= 0 and box[1] >= 0 and box[2] <= mosaic.shape[0] \
                and box[3] <= mosaic.shape[1]:  # room to align it: else not compared
            boxes[cell] = box
    cells = [c for c in cells if c in boxes]
    level0 = _DieCache(level0, boxes, capacity=settings.neighbours + 2)  # more while they fit
    cells, anchor = alike_dies(level0, mosaic, grid, cells)
    if anchor is None:
        return  # fewer than three comparable dies: two cannot tell which one differs
    # bands are scored with this many rows of the die above and below, so the smoothing
    # does not see a band's border
    overlap = int(math.ceil(3 * max(settings.scales_px))) + 4
    b = int(settings.block_px)
    cols = _blocks(w_die, b)
    fields = shift_fields(level0, mosaic, grid, cells, anchor, settings)
    refs_of = nearest_dies(cells, settings.neighbours)
    usable, edge = None, []
    if partial and polygon is not None:
        usable = UsableArea(polygon, mosaic, settings.tolerance_px)
        edge = alike_partial_dies(level0, mosaic, grid, partial, anchor, usable, pyramid=pyramid)
        fields.update(partial_fields(level0, mosaic, grid, edge, anchor, fields, usable,
                                     settings))
        refs_of.update(nearest_dies(edge, settings.neighbours, among=cells))
    if plans is not None:
        plans.append(Comparison(mosaic, grid, settings, fields, refs_of, set(edge), usable))

    def bands() -> Iterator[tuple[Cell, int, int, slice, np.ndarray, np.ndarray,
                                  np.ndarray | None]]:
        for cell in [*cells, *edge]:
            tr, tc, _ = die_origin_px(grid, mosaic, cell)
            refs = refs_of[cell]
            if len(refs) < 2:
                continue
            for br in range(0, h_die, settings.band_px):
                bh = min(settings.band_px, h_die - br)
                top, bottom = min(overlap, br), min(overlap, h_die - br - bh)
                d0, h = br - top, bh + top + bottom  # die rows [d0, d0 + h)
                # a partial die: only the columns around its usable part of this band
                x_lo, x_hi, mask = 0, w_die, None
                if usable is not None and cell in edge:
                    mask = usable(tr + d0, tc, h, w_die)
                    used = np.flatnonzero(mask[top:top + bh].any(axis=0))
                    if not len(used):
                        continue
                    x_lo, x_hi = max(0, used[0] - overlap), min(w_die, used[-1] + 1 + overlap)
                    mask = mask[:, x_lo:x_hi]
                test = _read(level0, tr + d0, tc + x_lo, h, x_hi - x_lo)
                aligned = np.empty((len(refs), h, w_die), dtype=np.float32)
                for k, ref in enumerate(refs):
                    rr, rc, _ = die_origin_px(grid, mosaic, ref)
                    shifts = fields[ref] - fields[cell]
                    band = _read(level0, rr + d0 - margin, rc - margin,
                                 h + 2 * margin, w_die + 2 * margin)
                    y = 0
                    while y < h:  # rows of the band, cut where the block rows change
                        i = (d0 + y) // b
                        y1 = min(h, (i + 1) * b - d0)
                        for j, (x0, x1) in enumerate(cols):
                            if x1 <= x_lo or x0 >= x_hi:
                                continue
                            aligned[k, y:y1, x0:x1] = _shifted(band, y, x0, y1 - y, x1 - x0,
                                                               shifts[i, j], margin)
                        y = y1
                yield (cell, tr + br, tc + x_lo, slice(top, top + bh), test,
                       aligned[:, :, x_lo:x_hi], mask)

    def score(job: tuple[Cell, int, int, slice, np.ndarray, np.ndarray, np.ndarray | None]
              ) -> tuple[Cell, int, int, np.ndarray]:
        cell, r0, c0, rows, test, aligned, mask = job
        z = difference_z(test, aligned, settings.scales_px, settings.tolerance_px, mask)
        return cell, r0, c0, z[rows]

    # two worker threads score bands while the next is read and aligned (numpy and scipy
    # release the GIL for much of the scoring: demo wafer, 49 dies, 9.9 s with one worker,
    # 7.0 s with two on 2 cores); at most three bands wait, so memory stays that of a few bands
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=2) as pool:
        pending = []
        for job in bands():
            pending.append(pool.submit(score, job))
            if len(pending) > 2:
                yield pending.pop(0).result()
        for f in pending:
            yield f.result()


def _thumbnail_factor(h: int, w: int, side_px: int) -> int:
    """The power of two ``f`` whose ``f x f`` block means make a die of ``h x w`` pixels a
    thumbnail of about ``side_px`` pixels a side (at least)."""
    f = 1
    while min(h, w) // (2 * f) >= side_px:
        f *= 2
    return f


def _thumbnail(level0: Any, pyramid: list[Any] | None, r0: int, c0: int, h: int, w: int,
               f: int) -> np.ndarray:
    """``f x f`` means of ``level0[r0:r0+h, c0:c0+w]`` (``f`` a power of two), from the
    pyramid's level ``log2(f)`` when there is one (to within half a block of position)."""
    k = f.bit_length() - 1
    shape = (-(-h // f), -(-w // f))
    if pyramid is not None and 0 < k < len(pyramid):
        return _read(pyramid[k], int(round(r0 / f)), int(round(c0 / f)), *shape)
    return _mean_pool(_read(level0, r0, c0, h, w), f)[:shape[0], :shape[1]]


def alike_partial_dies(level0: Any, mosaic: MosaicGrid, grid: DieGrid, cells: list[Cell],
                       anchor: Cell, usable: UsableArea, min_correlation: float = 0.5,
                       side_px: int = 64, pyramid: list[Any] | None = None) -> list[Cell]:
    """The partial dies worth comparing on their ``usable`` part.

    A die is kept when its usable part holds a few thumbnail pixels of :func:`alike_dies`
    and correlates there with the anchor die as the full dies must (an edge field left
    unexposed is bare: not compared). ``pyramid``: the mosaic's levels (each a 2 x 2 mean of
    the one before), where the thumbnails are read without decoding whole dies.
    """
    h_die, w_die = die_shape_px(grid, mosaic)
    f = _thumbnail_factor(h_die, w_die, side_px)
    ar, ac, _ = die_origin_px(grid, mosaic, anchor)
    anchor_thumb = _thumbnail(level0, pyramid, ar, ac, h_die, w_die, f)
    out = []
    for cell in cells:
        r0, c0, _ = die_origin_px(grid, mosaic, cell)
        keep = np.zeros(anchor_thumb.shape, dtype=bool)
        whole = usable(r0, c0, (h_die // f) * f, (w_die // f) * f, step=f)
        keep[:whole.shape[0], :whole.shape[1]] = whole
        if keep.sum() < 16:
            continue
        # only the thumbnail rows and columns with usable pixels are read
        ti, tj = np.flatnonzero(keep.any(axis=1)), np.flatnonzero(keep.any(axis=0))
        i0, i1, j0, j1 = ti[0], ti[-1] + 1, tj[0], tj[-1] + 1
        h, w = min(i1 * f, h_die) - i0 * f, min(j1 * f, w_die) - j0 * f
        thumb = _thumbnail(level0, pyramid, r0 + i0 * f, c0 + j0 * f, h, w, f)
        keep, at = keep[i0:i1, j0:j1], anchor_thumb[i0:i1, j0:j1]
        a, t = at[keep] - at[keep].mean(), thumb[keep] - thumb[keep].mean()
        corr = float(a @ t) / (float(np.linalg.norm(a) * np.linalg.norm(t)) + 1e-12)
        # a sliver of a few thumbnail pixels correlates by chance: two unrelated images of n
        # pixels correlate within about 1/sqrt(n), so ask for three times that as well
        if corr >= max(min_correlation, 3.0 / np.sqrt(keep.sum())):
            out.append(cell)
    return out


def z_to_score(z: np.ndarray, z_threshold: float, threshold: float) -> np.ndarray:
    """Die-to-die z-scores on the anomaly map's scale: ``z_threshold`` maps to ``threshold``.

    ``threshold * sqrt(z / z_threshold)`` below the threshold and ``threshold + (top -
    threshold)(1 - z_threshold / z)`` above it, approaching ``top`` for strong differences
    (:func:`score_ceiling`: 1 on a probability map, twice the threshold on a distance map). The
    square root puts the extent threshold of defect extraction (about two thirds of the
    decision threshold on a patterned wafer) near z = 7, well above the noise, so a scratch
    that is faint where it crosses busy circuitry still grows into one defect.
    """
    z = np.maximum(np.asarray(z, dtype=np.float32), 0.0)
    below = threshold * np.sqrt(z / z_threshold)
    from .defects import score_ceiling

    above = threshold + (score_ceiling(threshold) - threshold) * (
        1.0 - z_threshold / np.maximum(z, 1e-6))
    return np.where(z <= z_threshold, below, above).astype(np.float32)


@dataclass
class DieToDieStats:
    """What a die-to-die pass did (for the defect list's header)."""

    dies: int = 0
    partial_dies: int = 0
    z_threshold: float = 0.0
    seconds: float = 0.0
    pixels_over: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {"dies": self.dies, "partial_dies": self.partial_dies,
                "z_threshold": self.z_threshold,
                "seconds": round(self.seconds, 3), "map_pixels_over_threshold": self.pixels_over}


#: a block of die-to-die scores on the anomaly map: its first map row and column, and values
Patch = tuple[int, int, np.ndarray]


def die_to_die_patches(
    map_origin_um: tuple[float, float],
    map_pixel_um: float,
    level0: Any,
    mosaic: MosaicGrid,
    grid: DieGrid,
    polygon: Any,
    threshold: float,
    settings: DieToDie = DieToDie(),
    pyramid: list[Any] | None = None,
) -> tuple[list[Patch], DieToDieStats, Comparison | None]:
    """Die-to-die evidence of every die as blocks of anomaly-map scores, and the comparison
    made (None when no dies were compared: :meth:`Comparison.difference` images).

    Needs only the mosaic and the map's geometry, not the map; :func:`apply_patches` then
    raises the map to them.

    Parameters
    ----------
    map_origin_um, map_pixel_um
        Stage ``(x, y)`` of the centre of map pixel ``(0, 0)`` and the map pixel size.
    level0 : array-like
        Level 0 of the mosaic.
    mosaic : MosaicGrid
        The mosaic's geometry.
    grid : DieGrid
        The recipe's die grid.
    polygon : shapely Polygon
        The usable area: dies wholly inside it are compared with each other, and the edge
        dies it cuts on their part inside it (see :func:`compare_dies`).
    threshold : float
        The decision threshold the z-scores are put on (:func:`z_to_score`).
    settings : DieToDie
        Comparison settings.
    pyramid : list of array-like, optional
        The mosaic's levels (level 0 first), to screen edge dies cheaply.
    """
    import time

    t0 = time.perf_counter()
    stats = DieToDieStats(z_threshold=settings.z_threshold)
    patches: list[Patch] = []
    if min(grid.pitch_um) / mosaic.pixel_size_um < MIN_DIE_PX:
        return patches, stats, None  # dies of a few pixels: nothing to align or compare
    cells = full_dies(grid, polygon, mosaic, margin_px=_margin(settings))
    if len(cells) < 3:
        return patches, stats, None
    stats.dies = len(cells)
    partial = [(c, r) for c, r, _ in grid.cells_in(polygon) if (c, r) not in set(cells)]
    compared = set()
    plans: list[Comparison] = []
    for cell, r0, c0, z in compare_dies(level0, mosaic, grid, cells, settings, partial,
                                        polygon, pyramid, plans):
        compared.add(cell)
        patch = map_patch(z, r0, c0, mosaic, map_origin_um, map_pixel_um, settings.z_threshold,
                          threshold)
        if patch is not None:
            stats.pixels_over += int(np.count_nonzero(patch[2] >= threshold))
            patches.append(patch)
    stats.partial_dies = len(compared.intersection(partial))
    stats.seconds = time.perf_counter() - t0
    return patches, stats, plans[0] if plans else None


def map_patch(z: np.ndarray, r0: int, c0: int, mosaic: MosaicGrid,
              map_origin_um: tuple[float, float], map_pixel_um: float, z_threshold: float,
              threshold: float) -> Patch | None:
    """A z-score map of mosaic pixels ``[r0:, c0:]`` as anomaly-map scores (None: no overlap).

    The map pixels whose centres fall on ``z`` are sampled from it after a grey opening
    (evidence must span 2 x 2 mosaic pixels, so a lone noisy pixel does not become a whole
    map pixel and pass the minimum defect area) and a max-filter of one map pixel (a defect
    narrower than a map pixel is kept).
    """
    p = mosaic.pixel_size_um
    size = max(1, int(math.ceil(map_pixel_um / p)))
    y0 = mosaic.origin_um[1] + r0 * p
    x0 = mosaic.origin_um[0] + c0 * p
    i0 = max(0, int(math.ceil((y0 - map_origin_um[1]) / map_pixel_um)))
    j0 = max(0, int(math.ceil((x0 - map_origin_um[0]) / map_pixel_um)))
    i1 = int(math.floor((y0 + (z.shape[0] - 1) * p - map_origin_um[1]) / map_pixel_um)) + 1
    j1 = int(math.floor((x0 + (z.shape[1] - 1) * p - map_origin_um[0]) / map_pixel_um)) + 1
    if i1 <= i0 or j1 <= j0:
        return None
    rows = np.rint((map_origin_um[1] + np.arange(i0, i1) * map_pixel_um - y0) / p
                   ).astype(int).clip(0, z.shape[0] - 1)
    cols = np.rint((map_origin_um[0] + np.arange(j0, j1) * map_pixel_um - x0) / p
                   ).astype(int).clip(0, z.shape[1] - 1)
    return i0, j0, z_to_score(opened_max_at(z, rows, cols, size), z_threshold, threshold)


def opened_max_at(z: np.ndarray, rows: np.ndarray, cols: np.ndarray, size: int) -> np.ndarray:
    """``maximum_filter(grey_opening(z, 2 x 2), size)[np.ix_(rows, cols)]`` (scipy's
    filters, borders included), computed at the sampled pixels only.

    The opening is a dilation of a 2 x 2 erosion, so the whole is the maximum of the erosion
    over a window one pixel wider than ``size``: gathered at the map pixels (a sixteenth of
    the mosaic's at a 4 px map pixel) instead of filtering every mosaic pixel twice, which
    took a second of the die-dense wafer's die-to-die pass.
    """
    h, w = z.shape
    zp = np.pad(z, ((1, 0), (1, 0)), mode="edge")
    eroded = np.minimum(np.minimum(zp[:-1, :-1], zp[1:, :-1]), np.minimum(zp[:-1, 1:], zp[1:, 1:]))
    lo, hi = -(size // 2), (size - 1) // 2 + 1
    band = np.max([eroded[np.clip(rows + d, 0, h - 1)] for d in range(lo, hi + 1)], axis=0)
    return np.max([band[:, np.clip(cols + d, 0, w - 1)] for d in range(lo, hi + 1)], axis=0)


def apply_patches(anomaly: Any, patches: list[Patch], band_rows: int = 1024) -> None:
    """Raise ``anomaly`` (numpy or Zarr, writable) to the patches' scores, in place.

    Band by band of ``band_rows`` map rows, each read and written once: writing patch by
    patch into a Zarr array re-encodes its chunks once per patch (1.4 s for the 49 dies of the
    benchmark's die-dense wafer).
    """
    mr, mc = anomaly.shape
    if not patches:
        return
    top = min(i0 for i0, _, _ in patches)
    bottom = min(mr, max(i0 + sc.shape[0] for i0, _, sc in patches))
    for b0 in range(top, bottom, band_rows):
        b1 = min(b0 + band_rows, bottom)
        inside = [(i0, j0, sc) for i0, j0, sc in patches
                  if i0 < b1 and i0 + sc.shape[0] > b0 and j0 < mc]
        if not inside:
            continue
        band = np.asarray(anomaly[b0:b1], dtype=np.float32).copy()
        for i0, j0, sc in inside:
            r0, r1 = max(i0, b0), min(i0 + sc.shape[0], b1)
            w = min(sc.shape[1], mc - j0)
            view = band[r0 - b0:r1 - b0, j0:j0 + w]
            np.maximum(view, sc[r0 - i0:r1 - i0, :w], out=view)
        anomaly[b0:b1] = band
