"""Which dies are alike enough to compare (:mod:`scanner.inspection.dietodie`).

Thumbnail correlation against the other dies: an unexposed field, a test die or another
product is neither compared nor a reference (:func:`alike_dies`); an edge die is compared
only where its usable part looks like the same part of the anchor die
(:func:`alike_partial_dies`).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
from scipy import ndimage

from scanner.diegrid import DieGrid
from scanner.inspection.dietodie_geometry import (
    Cell,
    MosaicGrid,
    UsableArea,
    _read,
    die_origin_px,
    die_shape_px,
)
from scanner.inspection.dietodie_maths import _mean_pool

#: a cell whose thumbnail varies less than this share of what the upper quarter of the cells'
#: do is bare: no die the others are correlated with (:func:`alike_dies`)
BARE_SPREAD = 0.1
#: dies each die is correlated with at most (:func:`alike_dies`): the median over a sample
MAX_COMPARED = 512


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
    thumbs, spread = [], []
    for cell in cells:
        r0, c0, _ = die_origin_px(grid, mosaic, cell)
        t = _thumbnail(level0, None, r0, c0, h_die, w_die, f)
        t = t - t.mean()
        spread.append(float(t.std()))
        thumbs.append((t.ravel() / (np.linalg.norm(t) + 1e-12)).astype(np.float32))
    thumbs = np.array(thumbs)
    # bare cells (a part's plain surround, a wafer's bare edge dies) correlate with nothing:
    # the median is over the cells that show structure, or a part scanned with a surround
    # holding as many bare cells as dies had every die's median correlation near 0 and kept
    # none (a camera-photo grid of 25 dies among 49 cells; probe P21)
    spread = np.array(spread)
    shown = np.flatnonzero(spread >= BARE_SPREAD * np.percentile(spread, 75))
    if len(shown) < 3:
        return [], None
    others = shown[_compared_with(len(shown))]
    corr = thumbs @ thumbs[others].T
    corr[others, np.arange(len(others))] = np.nan  # a die against itself
    typical = np.nanmedian(corr, axis=1)
    keep = [c for c, v in zip(cells, typical, strict=True) if v >= min_correlation]
    if len(keep) < 3:
        return [], None
    # the anchor: the kept die nearest the middle of the kept ones (every die is aligned to
    # it, so a central one keeps the offsets small)
    return keep, _nearest_middle(keep, keep)


def _compared_with(n: int) -> np.ndarray:
    """The dies each of ``n`` dies is correlated with: all of them, or a fixed sample of
    :data:`MAX_COMPARED` when there are many (a repeat of 8 px found in a 1 mm image made
    32,000 "dies": an n x n matrix of 4 GB)."""
    if n <= MAX_COMPARED:
        return np.arange(n)
    return np.sort(np.random.default_rng(0).choice(n, MAX_COMPARED, replace=False))


def _nearest_middle(candidates: list[Cell], dies: list[Cell]) -> Cell:
    """The candidate die nearest the middle of ``dies`` (ties: by row, then column)."""
    centre = np.mean(np.array(dies, dtype=float), axis=0)
    return min(candidates, key=lambda c: (math.hypot(c[0] - centre[0], c[1] - centre[1]),
                                          c[1], c[0]))


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


def _whole_blocks(r0: int, c0: int, shape: tuple[int, int], f: int, mosaic_shape: tuple[int, int]
                  ) -> np.ndarray:
    """Which ``f x f`` blocks of a thumbnail read at ``(r0, c0)`` lie wholly in the mosaic."""
    rows = r0 + f * np.arange(shape[0])
    cols = c0 + f * np.arange(shape[1])
    in_rows = (rows >= 0) & (rows + f <= mosaic_shape[0])
    in_cols = (cols >= 0) & (cols + f <= mosaic_shape[1])
    return in_rows[:, None] & in_cols[None, :]


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


#: a thumbnail pixel this many robust spreads from the dies' median shows no die there
UNLIKE_Z = 8.0


def on_part(level0: Any, mosaic: MosaicGrid, grid: DieGrid, polygon: Any,
            pyramid: list[Any] | None = None, side_px: int = 64) -> Any:
    """The usable ``polygon`` less what it shows of the part's surround (a chuck).

    A part laid down by hand a degree or two turned, scanned with its surround, cuts its edge
    dies at a slant: the surround fills a sliver of dies that still correlate with the others
    as a whole (:func:`alike_dies`), and compared there the sliver is a defect on every good
    scan (a camera-photo die grid turned 2 deg: good dies reached z 805, so the layout was
    judged no repeat; compared anyway, 7 false defects along the part's edge). Here the
    dies' thumbnails are compared with their median die: a region of thumbnail pixels far
    from it (:data:`UNLIKE_Z` robust spreads of the dies there) that reaches the outside of
    the usable area or of the mosaic is surround, and the dies it cuts become edge dies,
    compared only on the part (:func:`alike_partial_dies`). A defect inside the part is no
    such region unless it touches the surround (then the detector's own map still judges it).

    Returns the polygon unchanged when no surround is seen, or fewer than three dies agree.
    """
    from shapely.geometry import box
    from shapely.ops import unary_union

    from scanner.inspection.dietodie_geometry import full_dies
    from scanner.inspection.polygonmask import polygon_mask

    kept, anchor = alike_dies(level0, mosaic, grid, full_dies(grid, polygon, mosaic))
    if anchor is None:
        return polygon
    h_die, w_die = die_shape_px(grid, mosaic)
    f = _thumbnail_factor(h_die, w_die, side_px)
    th, tw = h_die // f, w_die // f
    k = f.bit_length() - 1
    if pyramid is not None and 0 < k < len(pyramid) and math.prod(pyramid[k].shape) <= 2**24:
        pyramid = [*pyramid[:k], np.asarray(pyramid[k][...], dtype=np.float32)]  # read once

    def thumb(cell: Cell) -> tuple[int, int, np.ndarray]:
        r0, c0, _ = die_origin_px(grid, mosaic, cell)
        return r0, c0, _thumbnail(level0, pyramid, r0, c0, th * f, tw * f, f)[:th, :tw]

    dies = np.stack([thumb(c)[2] for c in kept])
    median = np.median(dies, axis=0)
    spread = 1.4826 * np.median(np.abs(dies - median), axis=0)
    spread = np.maximum(spread, max(float(np.median(spread)), 1e-6))
    rows, cols = mosaic.shape
    shape = (-(-rows // f), -(-cols // f))
    unlike = np.zeros(shape, dtype=bool)
    p = mosaic.pixel_size_um
    centre = (mosaic.origin_um[0] + (f - 1) / 2 * p, mosaic.origin_um[1] + (f - 1) / 2 * p)
    inside = polygon_mask(polygon, centre, f * p)(0, 0, *shape)
    outside = np.ones(shape, dtype=bool) if inside is None else ~inside
    for col, row, _ in grid.cells_in(polygon):
        r0, c0, t = thumb((col, row))
        i0, j0 = int(round(r0 / f)), int(round(c0 / f))
        a0, a1, b0, b1 = max(i0, 0), min(i0 + th, shape[0]), max(j0, 0), min(j0 + tw, shape[1])
        if a1 > a0 and b1 > b0:
            # a block that the mosaic's border cuts reads part zeros (never compared): not far
            far = (np.abs(t - median) > UNLIKE_Z * spread) & _whole_blocks(r0, c0, t.shape, f,
                                                                          mosaic.shape)
            unlike[a0:a1, b0:b1] |= far[a0 - i0:a1 - i0, b0 - j0:b1 - j0]
    # a turned grid's stage-aligned die windows leave slivers between them: bridge them; and
    # beyond the mosaic is outside too (a frame of one pixel)
    bridged = np.pad(ndimage.binary_dilation(unlike, iterations=2) | outside, 1,
                     constant_values=True)
    labels, _ = ndimage.label(bridged, structure=np.ones((3, 3)))
    touching = np.unique(labels[np.pad(outside, 1, constant_values=True)])
    surround = unlike & np.isin(labels[1:-1, 1:-1], touching[touching > 0]) & ~outside
    if not surround.any():
        return polygon
    boxes = []
    for i in np.flatnonzero(surround.any(axis=1)):
        runs = np.flatnonzero(np.diff(np.r_[0, surround[i].astype(np.int8), 0]))
        for j0, j1 in zip(runs[::2], runs[1::2], strict=True):
            x0 = mosaic.origin_um[0] + (j0 * f - 0.5) * p
            y0 = mosaic.origin_um[1] + (i * f - 0.5) * p
            boxes.append(box(x0, y0, x0 + (j1 - j0) * f * p, y0 + f * p))
    # a thumbnail pixel's blur of the surround's edge, beyond what was measured far
    seen = unary_union(boxes).buffer(f * p, join_style="mitre").simplify(0.5 * f * p)
    return polygon.difference(seen)


#: a partial die joins a group of alike partial dies when the group's anchor is usable over
#: this share of its usable part (:func:`partial_die_groups`)
COVER = 0.9


def partial_footprints(mosaic: MosaicGrid, grid: DieGrid, cells: list[Cell],
                       usable: UsableArea, side_px: int = 64) -> tuple[dict[Cell, np.ndarray],
                                                                         int]:
    """Which thumbnail pixels of each die are wholly usable (in-die coordinates, the
    thumbnail factor of :func:`alike_dies`), for the dies with a few of them (at least 16,
    as :func:`alike_partial_dies` asks), and the thumbnail factor."""
    h_die, w_die = die_shape_px(grid, mosaic)
    f = _thumbnail_factor(h_die, w_die, side_px)
    out = {}
    for cell in cells:
        r0, c0, _ = die_origin_px(grid, mosaic, cell)
        keep = usable(r0, c0, (h_die // f) * f, (w_die // f) * f, step=f)
        if keep.sum() >= 16:
            out[cell] = keep
    return out, f


def partial_die_groups(level0: Any, mosaic: MosaicGrid, grid: DieGrid, cells: list[Cell],
                       usable: UsableArea, min_correlation: float = 0.5, side_px: int = 64,
                       pyramid: list[Any] | None = None
                       ) -> tuple[list[tuple[list[Cell], Cell]], dict[Cell, np.ndarray], int]:
    """Groups of dies cut alike by the usable area, each to be compared within itself when too
    few full dies are there to compare them with (a band across a wafer narrower than a die:
    each die row is cut by it at the same in-die rows).

    Dies are taken by the size of their usable part (:func:`partial_footprints`), largest
    first; each joins the group whose first die is usable over at least :data:`COVER` of its
    own usable part (the most alike such footprint), or starts a group. Within a group the
    dies are correlated pair by pair as thumbnails on the usable part each pair shares, and
    those unlike the group's dies are left out (an unexposed field, a sliver of the surround
    beside the dies: :func:`_agreeing`). A group keeps at least three dies, and its anchor is
    the die with the group's largest footprint nearest the group's middle.

    Returns the groups as ``(dies, anchor)``, each die's footprint and the thumbnail factor.
    """
    keep, f = partial_footprints(mosaic, grid, cells, usable, side_px)
    size = {c: int(k.sum()) for c, k in keep.items()}
    groups: list[list[Cell]] = []
    for cell in sorted(keep, key=lambda c: (-size[c], c[1], c[0])):
        best, best_iou = None, 0.0
        for group in groups:
            first = keep[group[0]]
            common = int(np.count_nonzero(first & keep[cell]))
            if common >= COVER * size[cell]:
                iou = common / int(np.count_nonzero(first | keep[cell]))
                if iou > best_iou:
                    best, best_iou = group, iou
        if best is None:
            groups.append([cell])
        else:
            best.append(cell)
    h_die, w_die = die_shape_px(grid, mosaic)
    th, tw = h_die // f, w_die // f
    out = []
    for group in groups:
        if len(group) < 3:
            continue
        masks = np.stack([keep[c].ravel() for c in group]).astype(np.float32)
        thumbs = []
        for cell in group:
            r0, c0, _ = die_origin_px(grid, mosaic, cell)
            thumbs.append(_thumbnail(level0, pyramid, r0, c0, th * f, tw * f, f)[:th, :tw]
                          .ravel())
        corr, others = _masked_correlations(np.array(thumbs, dtype=np.float32), masks)
        kept = _agreeing(group, corr, others, np.array([size[c] for c in group]),
                         min_correlation)
        if len(kept) < 3:
            continue
        largest = max(size[c] for c in kept)
        first = keep[group[0]]
        # the anchor: a die with the group's whole footprint (every die's blocks are
        # aligned on it), the nearest such to the middle of the group
        whole = [c for c in kept if size[c] >= 0.98 * largest
                 and np.count_nonzero(first & keep[c]) >= 0.98 * size[group[0]]] or kept
        out.append((kept, _nearest_middle(whole, kept)))
    return out, keep, f


def _agreeing(group: list[Cell], corr: np.ndarray, others: np.ndarray, size: np.ndarray,
              min_correlation: float) -> list[Cell]:
    """The dies of a group that look alike (``corr``: their correlations with the dies
    ``others``, NaN where unknown; ``size``: their usable thumbnail pixels).

    Two dies agree when they correlate by ``min_correlation`` and by three times the chance
    level of the pixels the smaller has (see :func:`alike_partial_dies`). The die that agrees
    with the most others and those that agree with it are the candidates (a band's die row
    holds slivers of the surround at its ends beside its dies: over the whole row of a short
    band, a die's median correlation was theirs); of them, those whose median correlation
    with the other candidates reaches the same bar are kept, as :func:`alike_dies` keeps
    full dies.
    """
    with np.errstate(invalid="ignore", divide="ignore"):
        bar = np.maximum(min_correlation, 3.0 / np.sqrt(np.minimum.outer(size, size[others])))
        agree = corr >= bar
    counts = agree[others].sum(axis=1)  # of the dies correlated with all the others
    if not counts.any():
        return []
    k = int(np.argmax(counts))  # (the first of the most agreeing: the largest footprint)
    candidates = np.flatnonzero(agree[:, k])
    candidates = np.union1d(candidates, [others[k]])
    cols = np.flatnonzero(np.isin(others, candidates))
    if len(candidates) < 3:
        return []
    with warnings.catch_warnings():  # a die sharing too little with the others: NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        typical = np.nanmedian(corr[np.ix_(candidates, cols)], axis=1)
    return [group[i] for i, v in zip(candidates, typical, strict=True)
            if np.isfinite(v) and v >= max(min_correlation, 3.0 / np.sqrt(size[i]))]


def _masked_correlations(thumbs: np.ndarray, masks: np.ndarray
                         ) -> tuple[np.ndarray, np.ndarray]:
    """Pearson correlation of every thumbnail ``(n, p)`` with the ``others`` over the pixels
    both masks ``(n, p)`` (0 or 1) keep, NaN for pairs sharing under 16 pixels or for a die
    with itself, and ``others``: all the dies, or a fixed sample of :data:`MAX_COMPARED`."""
    others = _compared_with(len(thumbs))
    a, ma = thumbs.astype(np.float64), masks.astype(np.float64)
    b, mb = a[others], ma[others]
    # sums over the common pixels, as matrix products (no n x n x p array)
    count = ma @ mb.T
    sa, sb = (a * ma) @ mb.T, ma @ (b * mb).T
    saa, sbb = (a * a * ma) @ mb.T, ma @ (b * b * mb).T
    sab = (a * ma) @ (b * mb).T
    with np.errstate(invalid="ignore", divide="ignore"):
        cov = sab - sa * sb / count
        var = (saa - sa ** 2 / count) * (sbb - sb ** 2 / count)
        corr = cov / (np.sqrt(np.maximum(var, 0.0)) + 1e-12)
    corr[count < 16] = np.nan
    corr[others, np.arange(len(others))] = np.nan
    return corr, others
