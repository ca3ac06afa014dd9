"""Which dies are alike enough to compare (:mod:`scanner.inspection.dietodie`).

Thumbnail correlation against the other dies: an unexposed field, a test die or another
product is neither compared nor a reference (:func:`alike_dies`); an edge die is compared
only where its usable part looks like the same part of the anchor die
(:func:`alike_partial_dies`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

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
