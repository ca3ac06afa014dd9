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
   envelope of the smoothed references over +-``tolerance_px`` is the difference, divided by the
   local die-to-die noise (how much the references differ from one another around the pixel, and
   how much a peak may change with the sampling's sub-pixel phase): a z-score per pixel, the
   largest over the scales (:func:`difference_z`); beside it the energy of the fine detail, in
   log terms, against the references' (:func:`texture_z`): a patch of missing design or texture
   filled flat hides inside the references' envelope of intensities, not of energies. The
   texture z is put on the intensity z's scale by the ratio of their thresholds, each calibrated
   on the user's good scan (:func:`band_z`).

Edge dies cut by the usable area (or the mosaic's border) are compared too, on their usable
part, as fab tools inspect partial dies: aligned around a whole-die shift predicted from the
full dies (:func:`partial_fields`), referenced to their nearest full dies, and left out where
their usable part does not look like the same part of the other dies (an edge field that was
never exposed: :func:`alike_partial_dies`).

When the usable area holds fewer than three full dies (a band across a wafer narrower than a
die), the partial dies cut alike by it (a die row's dies, cut by the band at the same in-die
rows) are compared with each other as full dies are: grouped by their usable part, each
group's dies aligned onto one of them on the part they share (:func:`partial_group_fields`),
and each die compared with its nearest dies of the group on their common usable part
(:func:`compare_partial_dies`).

A z-score of :attr:`DieToDie.z_threshold` means "a defect" and is put on the anomaly map's
scale at the decision threshold (:func:`z_to_score`), so the two kinds of evidence join in one
anomaly map and one defect list (:func:`scanner.inspection.inspect.inspect_mosaic`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from scanner.diegrid import MIN_DIE_PX, DieGrid

# the comparison's parts live in sibling modules; their names stay importable from here
# (scanner.inspection.inspect and the tests import them from scanner.inspection.dietodie)
from scanner.inspection.dietodie_alike import (  # noqa: F401
    alike_dies,
    alike_partial_dies,
    partial_die_groups,
)
from scanner.inspection.dietodie_geometry import (  # noqa: F401
    Cell,
    MosaicGrid,
    UsableArea,
    _blocks,
    _DieCache,
    _read,
    _shifted,
    die_origin_px,
    die_shape_px,
    full_dies,
    nearest_dies,
    room_px,
)
from scanner.inspection.dietodie_maps import (  # noqa: F401
    Patch,
    apply_patches,
    map_patch,
    opened_max_at,
    pair_opening,
    repeated_mask,
    z_to_score,
)
from scanner.inspection.dietodie_maths import (  # noqa: F401
    _correlate,
    _difference_z,
    _texture_z,
    block_shift,
    coarse_die,
    difference_z,
    match_levels,
    matched,
    median_of,
    texture_z,
)


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
    arbitrate : bool
        Inside a die, leave out a reference that alone departs far from the others at a pixel
        (:func:`scanner.inspection.dietodie_maths._without_odd_reference`).
    texture_z_threshold : float
        Texture z-score (:func:`texture_z`) that counts as a defect.
    """

    z_threshold: float = 13.0
    texture_z_threshold: float = 13.0
    neighbours: int = 4
    block_px: int = 256
    band_px: int = 1024
    max_shift_px: float = 4.0
    max_global_px: int = 16
    tolerance_px: int = 4
    scales_px: tuple[float, ...] = (1.0, 2.5, 6.0)
    arbitrate: bool = True


def _margin(settings: DieToDie) -> int:
    """Pixels read around a die: room for a reference's shift relative to a test die."""
    return 2 * (int(settings.max_global_px) + int(math.ceil(settings.max_shift_px))) + 4


def scanned_mask(test: np.ndarray, mask: np.ndarray | None) -> np.ndarray | None:
    """``mask`` without the test pixels no tile covered (None: all compared).

    The mosaic is 0 where no tile landed (``scanner.stitching.mosaic``; the inspection's
    brightness level and empty windows read it so too). Such a strip can lie inside a die:
    an image sample's last rows when the stage landed the last tile row a few micrometres
    short. Compared as data, its zeros against the references' pattern were a line of
    false defects along the die (z about 25); left out, the references' median stands in
    for them (:func:`difference_z`) and they differ from nothing.
    """
    unscanned = test == 0
    if not unscanned.any():
        return mask
    return ~unscanned if mask is None else mask & ~unscanned


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
    # the plane is fitted to the shifts plus each die's rounding remainder (its corner's
    # distance from the whole pixel it is read from): a die's shift holds the grid's error,
    # smooth over the grid, and minus that remainder, which is not. A die whose corner falls
    # on the other side of a half pixel than the full dies' is read a whole pixel off them: a
    # grid found at a pixel's edge with a pitch a hair long rounded the corners of the
    # image's full dies up and those of the dies cut by its left border down, and the column
    # of partial dies along that border, compared a pixel off, scored z 29-34 on a good
    # texture (false defects 4-8 px from the border)
    remainder = {cell: die_origin_px(grid, mosaic, cell)[2] for cell in {*fields, *cells}}
    typical = np.array([np.median(f.reshape(-1, 2), axis=0) + remainder[cell]
                        for cell, f in fields.items()])
    coef, *_ = np.linalg.lstsq(idx, typical, rcond=None)
    b = int(settings.block_px)
    h_die, w_die = die_shape_px(grid, mosaic)
    out = {}
    for cell in cells:
        g = np.round(np.array([1.0, cell[0], cell[1]]) @ coef - remainder[cell])
        g = np.clip(g, -settings.max_global_px, settings.max_global_px)
        r0, c0, _ = die_origin_px(grid, mosaic, cell)
        share = np.array([[usable(r0 + y0, c0 + x0, y1 - y0, x1 - x0).mean()
                           for x0, x1 in _blocks(w_die, b)] for y0, y1 in _blocks(h_die, b)])
        out[cell] = _die_field(level0, mosaic, grid, cell, anchor, g, settings,
                               aligned_blocks=share >= 0.9)
    return out


def partial_group_fields(
    level0: Any, mosaic: MosaicGrid, grid: DieGrid, cells: list[Cell], anchor: Cell,
    footprints: dict[Cell, np.ndarray], f: int, usable: UsableArea, settings: DieToDie
) -> dict[Cell, np.ndarray]:
    """Per-block shifts of a group of partial dies onto one of them, ``anchor``, when no full
    dies predict their whole-die shift (:func:`partial_fields`).

    Each die's whole-die shift is found as :func:`shift_fields` finds a full die's, by the
    coarse correlation, but on the part of the die usable in both (``footprints``: the usable
    thumbnail pixels of ``f x f`` of each die, see
    :func:`scanner.inspection.dietodie_alike.partial_footprints`; elsewhere both are filled
    with their mean); then the blocks usable in both are aligned on their own.
    """
    b = int(settings.block_px)
    h_die, w_die = die_shape_px(grid, mosaic)

    def share(cell: Cell) -> np.ndarray:
        r0, c0, _ = die_origin_px(grid, mosaic, cell)
        return np.array([[usable(r0 + y0, c0 + x0, y1 - y0, x1 - x0).mean()
                          for x0, x1 in _blocks(w_die, b)] for y0, y1 in _blocks(h_die, b)])

    ar, ac, _ = die_origin_px(grid, mosaic, anchor)
    anchor_blocks = share(anchor) >= 0.9
    out = {anchor: _die_field(level0, mosaic, grid, anchor, anchor, None, settings)}
    for cell in cells:
        if cell == anchor:
            continue
        r0, c0, _ = die_origin_px(grid, mosaic, cell)
        common = footprints[cell] & footprints[anchor]
        g = np.zeros(2)
        if common.any():
            ti, tj = np.flatnonzero(common.any(axis=1)), np.flatnonzero(common.any(axis=0))
            y0, x0 = ti[0] * f, tj[0] * f
            inside = np.kron(common[ti[0]:ti[-1] + 1, tj[0]:tj[-1] + 1],
                             np.ones((f, f), dtype=bool))

            def part(r: int, c: int, inside: np.ndarray = inside, y0: int = y0,
                     x0: int = x0) -> np.ndarray:
                a = _read(level0, r + y0, c + x0, *inside.shape)
                return np.where(inside, a, np.float32(a[inside].mean()))

            fixed, moving = part(ar, ac), part(r0, c0)
            g = global_shift(fixed, moving, settings.max_global_px)
            # kept only when it matches the anchor better than the grid's position does
            # (see shift_fields)
            if np.any(g != 0) and _mean_square(fixed - part(r0 - int(g[0]), c0 - int(g[1]))) \
                    >= _mean_square(fixed - moving):
                g = np.zeros(2)
        out[cell] = _die_field(level0, mosaic, grid, cell, anchor, g, settings,
                               aligned_blocks=(share(cell) >= 0.9) & anchor_blocks)
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

    def compared_mask(self, origin_um: tuple[float, float], pixel_um: float,
                      shape: tuple[int, int]) -> np.ndarray:
        """Which pixels of a map (``origin_um``: stage ``(x, y)`` of pixel ``(0, 0)``'s
        centre) lie in a die this pass compared."""
        out = np.zeros(shape, dtype=bool)
        for cell in self.fields:
            x0, y0, x1, y1 = self.grid.cell_box(*cell)
            i0, i1 = (int(math.ceil((v - origin_um[1]) / pixel_um)) for v in (y0, y1))
            j0, j1 = (int(math.ceil((v - origin_um[0]) / pixel_um)) for v in (x0, x1))
            out[max(i0, 0):max(i1, 0), max(j0, 0):max(j1, 0)] = True
        return out

    def _other_dies(self, level0: Any, cell: Cell, r0: int, c0: int, diff: np.ndarray
                    ) -> None:
        """Fill in the difference of the parts of a window (mosaic pixels from ``r0, c0``,
        the shape of ``diff``) that lie in compared dies other than ``cell``, each against
        its own references (in place; their z-scores stay NaN, so what is decided about
        the window is decided on ``cell``'s part): a defect across a street (a stain over
        two dies) is then boxed whole, not as the part in the die of the window's centre
        (probe P22: a 239 um stain across a street was boxed over its right 106 um)."""
        h, w = diff.shape
        h_die, w_die = die_shape_px(self.grid, self.mosaic)
        p = self.mosaic.pixel_size_um
        ox, oy = self.mosaic.origin_um
        corners = [self.grid.index(ox + c * p, oy + r * p)
                   for r in (r0, r0 + h - 1) for c in (c0, c0 + w - 1)]
        for col in range(min(k[0] for k in corners), max(k[0] for k in corners) + 1):
            for row in range(min(k[1] for k in corners), max(k[1] for k in corners) + 1):
                other = (col, row)
                if other == cell or other not in self.fields:
                    continue
                tr, tc, _ = die_origin_px(self.grid, self.mosaic, other)
                a0, b0 = max(r0, tr), max(c0, tc)
                a1, b1 = min(r0 + h, tr + h_die), min(c0 + w, tc + w_die)
                if a1 - a0 < 8 or b1 - b0 < 8:
                    continue
                part = self.difference(level0, a0, b0, a1 - a0, b1 - b0)
                if part is not None:
                    diff[a0 - r0:a1 - r0, b0 - c0:b1 - c0] = part[0]

    def difference(self, level0: Any, r0: int, c0: int, h: int, w: int
                   ) -> tuple[np.ndarray, np.ndarray] | None:
        """The test die minus the median of its aligned references over mosaic pixels
        ``[r0, r0+h) x [c0, c0+w)`` (float32, the mosaic's units), and the z-scores of
        :func:`difference_z` there.

        What a defect looks like without the design around it: a particle on circuitry is a
        blob, missing pattern a patch of the design's own structure with both signs; z under
        a few means the neighbouring dies show the same. None unless the window's centre lies
        in a compared die (where the window reaches past that die, its z-scores are NaN and
        its difference that of the other compared dies there against their own references,
        :meth:`_other_dies`, else 0); 0 outside a partial die's usable part. The references
        are moved by the shift of the block at the window's centre.
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
            # a window reaching past the die's border: the die's part of it, NaN z-scores
            # beyond. Without a difference a defect near a die's edge was measured on the
            # image, where a missing pattern's surroundings (the design) stand out more than
            # the hole: a 32 px hole 12 px inside a photograph die's border was reported
            # 19 px off its centre, outside it, as a "particle"
            a0, b0 = max(dr, 0), max(dc, 0)
            a1, b1 = min(dr + h, h_die), min(dc + w, w_die)
            if a1 - a0 < 8 or b1 - b0 < 8:
                return None
            part = self.difference(level0, tr + a0, tc + b0, a1 - a0, b1 - b0)
            if part is None:
                return None
            diff = np.zeros((h, w), dtype=np.float32)
            z = np.full((h, w), np.nan, dtype=np.float32)
            inner = (slice(a0 - dr, a1 - dr), slice(b0 - dc, b1 - dc))
            diff[inner], z[inner] = part
            self._other_dies(level0, cell, r0, c0, diff)
            return diff, z
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
            mask &= _refs_usable(self, cell, refs, dr - pad, dc - pad, h + 2 * pad, w + 2 * pad)
        mask = scanned_mask(test, mask)
        # levels matched over the whole read (its surroundings), and then again as band_z
        # matches them (a no-op up to rounding, kept so that the scores are band_z's)
        _, refs_img = match_levels(test, np.stack(aligned), mask)
        level_t, refs_z = match_levels(test, refs_img, mask)
        core = (slice(pad, pad + h), slice(pad, pad + w))
        # the z-scores need only the core and the reach of band_z's filters around it: scored
        # over the whole read (``pad`` is as wide as the window), one window of 600 x 1,176
        # px of a 533-tile wafer took 5 s and 1 GB; the crop starts on the block-mean grid
        # (4 px), so the z-scores of the core are the same
        reach = 4 * _context_px(self.settings)
        lo = max(0, (pad - reach) // 4 * 4)  # (the read has ``pad`` on every side)
        zone = (slice(lo, pad + h + reach), slice(lo, pad + w + reach))
        t = np.asarray(test[zone], dtype=np.float32)
        r = refs_z[(slice(None), *zone)]
        m = None if mask is None else mask[zone]
        if m is not None:  # as band_z's `matched`
            t = np.where(m, t, median_of(r))
        z = _matched_band_z(t, r, level_t, self.settings, m)
        diff = test[core] - median_of(refs_img[(slice(None), *core)])
        if mask is not None:
            diff[~mask[core]] = 0.0
        inner = (slice(pad - lo, pad - lo + h), slice(pad - lo, pad - lo + w))
        return diff.astype(np.float32), z[inner]


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
    separate: bool = False,
) -> Iterator[tuple[Cell, int, int, np.ndarray]]:
    """Z-score maps of every die against its neighbours, band by band (:func:`band_z`; with
    ``separate``, the intensity and texture z-scores stacked).

    Only the dies alike enough to be compared (:func:`alike_dies`) are; ``cells`` are all the
    full dies. ``partial`` dies (cut by the usable ``polygon`` or the mosaic's border: the
    edge dies of a wafer) are compared on their usable part against their nearest full
    dies, when that part looks like the same part of the anchor die (an edge field left
    unexposed is not a defect; ``pyramid``: the mosaic's levels, for
    :func:`alike_partial_dies`). With fewer than three full dies, the partial dies and those
    full dies are compared with each other (:func:`compare_partial_dies`).
    The dies compared and their alignment are appended to ``plans`` as a :class:`Comparison`
    (for difference images of the defects found).

    Yields
    ------
    cell, r0, c0, z
        A die, the mosaic pixel of the band's top-left corner and the band's z-score map.
    """
    h_die, w_die = die_shape_px(grid, mosaic)
    if len(cells) < 3 and partial and polygon is not None:
        # too few full dies to compare anything with: the partial dies with each other
        yield from compare_partial_dies(level0, mosaic, grid, [*cells, *partial], settings,
                                        polygon, pyramid, plans, separate)
        return
    cells, level0 = _cached_dies(level0, mosaic, grid, cells, settings)
    cells, anchor = alike_dies(level0, mosaic, grid, cells)
    if anchor is None:
        return  # fewer than three comparable dies: two cannot tell which one differs
    fields = shift_fields(level0, mosaic, grid, cells, anchor, settings)
    refs_of = nearest_dies(cells, settings.neighbours)
    usable, edge = None, []
    if partial and polygon is not None:
        usable = UsableArea(polygon, mosaic, settings.tolerance_px)
        edge = alike_partial_dies(level0, mosaic, grid, partial, anchor, usable, pyramid=pyramid)
        fields.update(partial_fields(level0, mosaic, grid, edge, anchor, fields, usable,
                                     settings))
        refs_of.update(nearest_dies(edge, settings.neighbours, among=cells))
    plan = Comparison(mosaic, grid, settings, fields, refs_of, set(edge), usable)
    if plans is not None:
        plans.append(plan)
    yield from _scored(_bands(level0, plan, [*cells, *edge], (h_die, w_die)), settings,
                       separate)


def compare_partial_dies(
    level0: Any, mosaic: MosaicGrid, grid: DieGrid, dies: list[Cell], settings: DieToDie,
    polygon: Any, pyramid: list[Any] | None = None, plans: list[Comparison] | None = None,
    separate: bool = False,
) -> Iterator[tuple[Cell, int, int, np.ndarray]]:
    """:func:`compare_dies` of dies that are mostly partial: too few full dies lie in the
    usable ``polygon`` to compare the others with (a band across a wafer narrower than a die:
    every in-band defect was left to the network, missing patterns scored under its threshold
    and features repeated at the die pitch over it).

    The dies cut alike by the usable area are grouped
    (:func:`scanner.inspection.dietodie_alike.partial_die_groups`: a die row cut by a band at
    the same in-die rows), aligned within each group (:func:`partial_group_fields`), and each
    die is compared with its nearest dies of the group whose usable part covers its own
    (:data:`scanner.inspection.dietodie_alike.COVER`; any of the group when fewer than two
    do) on the usable part they share (:func:`_bands`). Band by band, as full dies are.
    """
    from scanner.inspection.dietodie_alike import COVER

    h_die, w_die = die_shape_px(grid, mosaic)
    usable = UsableArea(polygon, mosaic, settings.tolerance_px)
    groups, footprints, f = partial_die_groups(level0, mosaic, grid, dies, usable,
                                               pyramid=pyramid)
    if not groups:
        return
    level0 = _DieCache(level0, _die_boxes(mosaic, grid, [c for g, _ in groups for c in g],
                                          settings, clip=True),
                       capacity=settings.neighbours + 2)
    fields: dict[Cell, np.ndarray] = {}
    refs_of: dict[Cell, list[Cell]] = {}
    for members, anchor in groups:
        fields.update(partial_group_fields(level0, mosaic, grid, members, anchor, footprints,
                                           f, usable, settings))
        keep = np.stack([footprints[c].ravel() for c in members]).astype(np.float32)
        common = keep @ keep.T  # thumbnail pixels each pair of dies shares
        for i, cell in enumerate(members):
            covering = [o for j, o in enumerate(members)
                        if j != i and common[i, j] >= COVER * common[i, i]]
            among = covering if len(covering) >= 2 else members
            refs_of[cell] = nearest_dies([cell], settings.neighbours, among=among)[cell]
    compared = [c for g, _ in groups for c in g]
    plan = Comparison(mosaic, grid, settings, fields, refs_of, set(compared), usable)
    if plans is not None:
        plans.append(plan)
    yield from _scored(_bands(level0, plan, compared, (h_die, w_die)), settings, separate)


def _die_boxes(mosaic: MosaicGrid, grid: DieGrid, cells: list[Cell], settings: DieToDie,
               clip: bool = False) -> dict[Cell, tuple[int, int, int, int]]:
    """Mosaic pixels ``(r0, c0, r1, c1)`` of each die with room to align it and the context
    its bands are scored with; the dies without that room are left out (``clip``: cut at the
    mosaic's border instead, for partial dies read beyond it)."""
    h_die, w_die = die_shape_px(grid, mosaic)
    margin = _margin(settings)
    ctx = _context_px(settings)
    rows, cols = mosaic.shape
    boxes = {}
    for cell in cells:
        r0, c0, _ = die_origin_px(grid, mosaic, cell)
        box = (r0 - margin, c0 - margin, r0 + h_die + margin, c0 + w_die + margin)
        if clip or (box[0] >= 0 and box[1] >= 0 and box[2] <= rows and box[3] <= cols):
            boxes[cell] = (max(0, box[0] - ctx), max(0, box[1] - ctx),
                           min(rows, box[2] + ctx), min(cols, box[3] + ctx))
    return boxes


def _cached_dies(level0: Any, mosaic: MosaicGrid, grid: DieGrid, cells: list[Cell],
                 settings: DieToDie) -> tuple[list[Cell], _DieCache]:
    """The dies with room around them to be aligned (the others are not compared), and the
    mosaic read through a cache of their whole cells."""
    boxes = _die_boxes(mosaic, grid, cells, settings)
    cells = [c for c in cells if c in boxes]
    # more dies are kept while they fit
    return cells, _DieCache(level0, boxes, capacity=settings.neighbours + 2)


#: one band of a die to score: the die, the mosaic pixel of the band's top-left corner, the
#: band's rows and columns within the pixels read (the band and its context), the die's own
#: pixels among them, the test pixels, its aligned references and the usable mask
_Band = tuple[Cell, int, int, tuple[slice, slice], tuple[slice, slice], np.ndarray, np.ndarray,
              np.ndarray | None]


def _bands(level0: Any, plan: Comparison, dies: list[Cell], die_shape: tuple[int, int]
           ) -> Iterator[_Band]:
    """Every compared die band by band, read with the references moved onto it block by
    block (``plan``: the dies' shift fields, references and the usable area of edge dies).

    Each band is read with :func:`_context_px` pixels of the mosaic around it on every side,
    the die's neighbours included (see :func:`_band_z_in_context` for what they are for).
    """
    mosaic, grid, settings = plan.mosaic, plan.grid, plan.settings
    fields, usable = plan.fields, plan.usable
    h_die, w_die = die_shape
    margin = _margin(settings)
    ctx = _context_px(settings)
    b = int(settings.block_px)
    for cell in dies:
        tr, tc, _ = die_origin_px(grid, mosaic, cell)
        refs = plan.refs_of[cell]
        if len(refs) < 2:
            continue
        n_br, n_bc = fields[cell].shape[:2]
        for br in range(0, h_die, settings.band_px):
            bh = min(settings.band_px, h_die - br)
            d0, h = br - ctx, bh + 2 * ctx  # die rows [d0, d0 + h), the context included
            x_lo, x_hi, mask = 0, w_die, None
            if usable is not None:  # the context too may reach past the usable area
                mask = usable(tr + d0, tc - ctx, h, w_die + 2 * ctx)
                mask &= _refs_usable(plan, cell, refs, d0, -ctx, h, w_die + 2 * ctx)
                if cell in plan.partial:  # only the columns around its usable part
                    used = np.flatnonzero(mask[ctx:ctx + bh, ctx:ctx + w_die].any(axis=0))
                    if not len(used):
                        continue
                    x_lo, x_hi = int(used[0]), int(used[-1]) + 1
                mask = mask[:, x_lo:x_hi + 2 * ctx]
            e0, w = x_lo - ctx, x_hi - x_lo + 2 * ctx  # die columns [e0, e0 + w)
            test = _read(level0, tr + d0, tc + e0, h, w)
            unlike = _unlike_neighbours(plan, cell, refs, tr + d0, tc + e0, h, w)
            if unlike is not None:
                mask = ~unlike if mask is None else mask & ~unlike
            mask = scanned_mask(test, mask)
            # the block each row and column is aligned with (the context: the nearest block)
            rows = _runs(np.clip((d0 + np.arange(h)) // b, 0, n_br - 1))
            cols = _runs(np.clip((e0 + np.arange(w)) // b, 0, n_bc - 1))
            aligned = np.empty((len(refs), h, w), dtype=np.float32)
            for k, ref in enumerate(refs):
                rr, rc, _ = die_origin_px(grid, mosaic, ref)
                shifts = fields[ref] - fields[cell]
                band = _read(level0, rr + d0 - margin, rc + e0 - margin, h + 2 * margin,
                             w + 2 * margin)
                for y0, y1, i in rows:
                    for x0, x1, j in cols:
                        aligned[k, y0:y1, x0:x1] = _shifted(band, y0, x0, y1 - y0, x1 - x0,
                                                            shifts[i, j], margin)
            # the die's own pixels among those read (a band inside the die has die rows
            # around it, its first and last band and its sides the neighbours' pixels)
            own = (slice(max(0, -d0), h - max(0, d0 + h - h_die)),
                   slice(max(0, -e0), w - max(0, e0 + w - w_die)))
            yield (cell, tr + br, tc + x_lo, (slice(ctx, ctx + bh), slice(ctx, ctx + x_hi - x_lo)),
                   own, test, aligned, mask)


def _refs_usable(plan: Comparison, cell: Cell, refs: list[Cell], d0: int, e0: int, h: int,
                 w: int) -> np.ndarray | bool:
    """Where the partial references of a partial die are usable too, die pixels
    ``[d0, d0+h) x [e0, e0+w)`` (True: the references are full dies): partial dies compared
    with each other are compared on their common usable part only (:func:`compare_partial_dies`;
    the usable area is shrunk by ``tolerance_px``, room for their alignment)."""
    out: np.ndarray | bool = True
    if plan.usable is None or cell not in plan.partial:
        return out
    for ref in refs:
        if ref in plan.partial:
            rr, rc, _ = die_origin_px(plan.grid, plan.mosaic, ref)
            out = out & plan.usable(rr + d0, rc + e0, h, w)
    return out


def _unlike_neighbours(plan: Comparison, cell: Cell, refs: list[Cell], r0: int, c0: int,
                       h: int, w: int) -> np.ndarray | None:
    """Mosaic pixels ``[r0, r0+h) x [c0, c0+w)`` of a die's window that lie in a neighbouring
    die cell which, for the test or one of its references, is not a compared die (None: none).

    On a turned grid the stage-aligned window (:meth:`DieGrid.cell_box`) holds wedges of the
    neighbouring cells, up to the pitch times the turn's sine wide (61 um at 0.7 degrees on
    5 mm dies). Each die's wedge holds its own neighbour: beside a bare (unexposed, off-wafer
    or edge-excluded) edge die the test's wedge is bare where its references' are patterned,
    or the other way round, and the wedge scored z 27-100 along the die's border (five false
    "scratches" 1.0-1.7 mm long on a 50 mm wafer placed 0.7 degrees turned). Those pixels
    are not the test's to compare; between compared dies they stay compared as before.
    """
    grid, mosaic = plan.grid, plan.mosaic
    if not grid.rotation_deg:
        return None
    # the neighbouring cells that are not compared for the test or a reference: with none
    # (a die amid compared dies) no pixel is, and the window's coordinates are not computed
    # (float64 grids of the whole window for every band: 9 of the demo wafer's 167 s)
    missing = [(i, j) for i in (-1, 0, 1) for j in (-1, 0, 1) if (i, j) != (0, 0)
               and any((c[0] + i, c[1] + j) not in plan.fields for c in [cell, *refs])]
    if not missing:
        return None
    p = mosaic.pixel_size_um
    px, py = grid.pitch_um
    x = mosaic.origin_um[0] + (c0 + np.arange(w)) * p
    y = mosaic.origin_um[1] + (r0 + np.arange(h)) * p
    turn = math.radians(grid.rotation_deg)
    cs, sn = math.cos(turn), math.sin(turn)
    dx = x - grid.origin_um[0]
    dy = y - grid.origin_um[1]
    tol = p  # the corner's rounding to a whole pixel is not a neighbour's wedge
    ku, kv = cell[0] * px, cell[1] * py
    if cs <= 0:  # (a grid turned by a right angle or more: no die grid does that)
        return _unlike_cells(missing, cs * dx[None, :] + sn * dy[:, None] - ku,
                             -sn * dx[None, :] + cs * dy[:, None] - kv, px, py, tol)
    # the cell's coordinates u (along its rows) and v grow along a window row and column
    # (cs > 0): where each row leaves the cell is found by bisection on the same float
    # expressions, not computed for every pixel of the window
    rows, cols = np.arange(h), np.arange(w)

    def u_at(i: np.ndarray, j: np.ndarray) -> np.ndarray:
        return cs * dx[j] + sn * dy[i] - ku

    def v_at(j: np.ndarray, i: np.ndarray) -> np.ndarray:
        return -sn * dx[j] + cs * dy[i] - kv

    left = _first_reaching(u_at, rows, w, -tol)  # columns with u < -tol
    right = _first_reaching(u_at, rows, w, px + tol)  # u >= px + tol from it
    top = _first_reaching(v_at, cols, h, -tol)
    bottom = _first_reaching(v_at, cols, h, py + tol)
    if not (left.any() or (right < w).any() or top.any() or (bottom < h).any()):
        return None
    jj, ii = cols[None, :], rows[:, None]
    dc = {-1: jj < left[:, None], 1: jj >= right[:, None]}
    dr = {-1: ii < top[None, :], 1: ii >= bottom[None, :]}
    dc[0] = ~(dc[-1] | dc[1])
    dr[0] = ~(dr[-1] | dr[1])
    out = np.zeros((h, w), dtype=bool)
    for i, j in missing:
        out |= dc[i] & dr[j]
    return out if out.any() else None


def _first_reaching(value: Any, lines: np.ndarray, n: int, limit: float) -> np.ndarray:
    """For each of ``lines``, the first index ``k < n`` where ``value(lines, k)``, a
    non-decreasing function of ``k``, reaches ``limit`` (``n``: none does), by bisection on
    all the lines together."""
    lo = np.zeros(len(lines), dtype=np.intp)
    hi = np.full(len(lines), n, dtype=np.intp)
    while True:
        open_ = lo < hi
        if not open_.any():
            return lo
        mid = (lo + hi) // 2
        k = np.minimum(mid, n - 1)
        reached = value(lines, k) >= limit
        hi = np.where(open_ & reached, mid, hi)
        lo = np.where(open_ & ~reached, mid + 1, lo)


def _unlike_cells(missing: list[tuple[int, int]], u: np.ndarray, v: np.ndarray, px: float,
                  py: float, tol: float) -> np.ndarray | None:
    """:func:`_unlike_neighbours` from the cell coordinates ``u``, ``v`` of every pixel."""
    dc = np.where(u < -tol, -1, np.where(u >= px + tol, 1, 0))
    dr = np.where(v < -tol, -1, np.where(v >= py + tol, 1, 0))
    if not ((dc != 0) | (dr != 0)).any():
        return None
    out = np.zeros(u.shape, dtype=bool)
    for i, j in missing:
        out |= (dc == i) & (dr == j)
    return out if out.any() else None


def _context_px(settings: DieToDie) -> int:
    """Pixels of context scored around a band: the reach of the largest smoothing and of the
    references' envelope."""
    return int(math.ceil(3 * max(settings.scales_px))) + int(settings.tolerance_px)


def _runs(index: np.ndarray) -> list[tuple[int, int, int]]:
    """``(start, stop, value)`` of the runs of equal values of a 1-D integer array."""
    cuts = np.flatnonzero(np.diff(index)) + 1
    starts = np.concatenate([[0], cuts])
    stops = np.concatenate([cuts, [len(index)]])
    return [(int(a), int(z), int(index[a])) for a, z in zip(starts, stops, strict=True)]


def band_z(test: np.ndarray, refs: np.ndarray, settings: DieToDie,
           mask: np.ndarray | None = None, separate: bool = False) -> np.ndarray:
    """The z-score of a test region against its aligned references: the intensity z
    (:func:`difference_z`) and the texture z (:func:`texture_z`) scaled by
    ``z_threshold / texture_z_threshold``, the larger of the two; with ``separate`` both
    unscaled, stacked ``(2, h, w)`` (for calibration)."""
    test, refs, level_t = matched(test, refs, mask)  # once for both
    return _matched_band_z(test, refs, level_t, settings, mask, separate)


def _matched_band_z(test: np.ndarray, refs: np.ndarray, level_t: float, settings: DieToDie,
                    mask: np.ndarray | None = None, separate: bool = False,
                    arbitrate: bool = False) -> np.ndarray:
    """:func:`band_z` of a test and references already :func:`matched` (``arbitrate``: see
    :func:`scanner.inspection.dietodie_maths._difference_z`)."""
    z = _difference_z(test, refs, level_t, settings.scales_px, settings.tolerance_px, mask,
                      arbitrate)
    zt = _texture_z(test, refs, level_t, mask)
    if separate:
        return np.stack([z, zt])
    return np.maximum(z, zt * np.float32(settings.z_threshold / settings.texture_z_threshold))


def _band_z_in_context(test: np.ndarray, refs: np.ndarray, mask: np.ndarray | None,
                       keep: tuple[slice, slice], own: tuple[slice, slice], settings: DieToDie,
                       separate: bool = False) -> np.ndarray:
    """:func:`band_z` of the pixels ``keep`` of a band read with context around it.

    Scored on the die's own pixels (``own``; the smoothing and the envelope mirror the die at
    its border) and, along the die's borders, again with context: the references with their
    neighbours' pixels, the test with the references' median in place of its neighbours'
    (elsewhere than ``own`` the test is masked out, see :func:`difference_z`); the smaller of
    the two z-scores there. Mirrored, the references' envelope at a border sees one side
    only, and a pixel of misalignment scored a line one map pixel wide along the die's edge
    (one false "scratch" 150-200 um long on each of four die grids made from photographs).
    In context, a test misaligned against its references by a pixel or two is stretched or
    squeezed where its pixels meet the references' (z 7 at the coarsest scale along a die's
    edge beside a dark street). The test's own neighbours as context would differ from the
    references' wherever a die's neighbours do (the last die of a row beside the wafer's
    edge or the mosaic's border). A defect differs both ways.
    """
    inside = np.zeros(test.shape, dtype=bool)
    inside[own] = True
    if mask is not None:
        inside &= mask
    # levels matched once, over the die and the context read around it (the test's own
    # neighbours there), and then the test's context replaced by the references' median. On
    # its own pixels only, a small die's gain took in a stain that covers the die: a 13 %
    # stain 39 px wide on a 48 px die of an array was scaled away (map 1.14, threshold 1.62)
    level_mask = np.ones(test.shape, dtype=bool) if mask is None else mask
    test = np.asarray(test, dtype=np.float32)
    level_t, refs = match_levels(test, refs, level_mask)
    test = np.where(inside, test, median_of(refs))

    def z_of(region: tuple[slice, slice], arbitrate: bool = False) -> np.ndarray:
        return _matched_band_z(test[region], refs[(slice(None), *region)], level_t, settings,
                               inside[region], separate, arbitrate)

    # a reference odd at a pixel is outvoted inside the die and, in context, along its
    # borders: there, left in, a spot on one neighbour held the same spot of the test inside
    # the envelope (two neighbouring dies with one defect each were both missed up to 10 px
    # inside their border). Not in a die cut by the usable area: its references' context
    # holds what the test's lacks (false "stains" along a staggered layout's mosaic border)
    z = z_of(own, settings.arbitrate)
    # the kept pixels in the own pixels' coordinates
    z = z[(..., *(slice(k.start - o.start, k.stop - o.start) for k, o in zip(keep, own,
                                                                               strict=True)))]
    c = _context_px(settings)
    size = test.shape
    arbitrate_context = settings.arbitrate and (mask is None or bool(mask.all()))
    for axis, at_start in ((0, True), (0, False), (1, True), (1, False)):
        o, k = own[axis], keep[axis]
        if (o.start == 0) if at_start else (o.stop == size[axis]):
            continue  # nothing read beyond this side: not the die's border
        # the strip along this border: c pixels of context and 3c of the die (the reach of
        # the smoothing, the envelope and the noise's window at the coarsest scale), its
        # start on the coarse scales' 4 x 4 blocks of the whole band; and the kept pixels
        # within c of the border
        lo, hi = (o.start - c, o.start + 3 * c) if at_start else (o.stop - 3 * c, o.stop + c)
        lo, hi = max(lo - lo % 4, 0), min(hi, size[axis])
        b0, b1 = (o.start, o.start + c) if at_start else (o.stop - c, o.stop)
        b0, b1 = max(b0, k.start), min(b1, k.stop)
        if b1 <= b0:
            continue
        strip, src, dst = [slice(None)] * 2, list(keep), [slice(None)] * 2
        strip[axis], src[axis], dst[axis] = (slice(lo, hi), slice(b0 - lo, b1 - lo),
                                             slice(b0 - k.start, b1 - k.start))
        view = z[(..., *dst)]
        np.minimum(view, z_of(tuple(strip), arbitrate_context)[(..., *src)], out=view)
    return z


def _scored(jobs: Iterator[_Band], settings: DieToDie, separate: bool = False
            ) -> Iterator[tuple[Cell, int, int, np.ndarray]]:
    """The z-score maps of the bands (:func:`band_z`), in order, scored by two worker
    threads."""

    def score(job: _Band) -> tuple[Cell, int, int, np.ndarray]:
        cell, r0, c0, keep, own, test, aligned, mask = job
        return cell, r0, c0, _band_z_in_context(test, aligned, mask, keep, own, settings,
                                                separate)

    # two worker threads score bands while the next is read and aligned (numpy and scipy
    # release the GIL for much of the scoring: demo wafer, 49 dies, 9.9 s with one worker,
    # 7.0 s with two on 2 cores); at most three bands wait, so memory stays that of a few bands
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=2) as pool:
        pending = []
        for job in jobs:
            pending.append(pool.submit(score, job))
            if len(pending) > 2:
                yield pending.pop(0).result()
        for f in pending:
            yield f.result()


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
    partial = [(c, r) for c, r, _ in grid.cells_in(polygon) if (c, r) not in set(cells)]
    if len(cells) < 3 and not partial:
        return patches, stats, None
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
    # the full dies; with fewer than three, those compared with the partial dies
    stats.dies = len(cells) if len(cells) >= 3 else len(compared.difference(partial))
    stats.seconds = time.perf_counter() - t0
    return patches, stats, plans[0] if plans else None




def largest_z(level0: Any, mosaic: MosaicGrid, grid: DieGrid, polygon: Any,
              settings: DieToDie = DieToDie(), pyramid: list[Any] | None = None
              ) -> tuple[float, float, int] | None:
    """The largest intensity and texture z-scores (after the pair opening the map applies)
    over every die compared, and how many dies were (None: none was). With fewer than three
    full dies, those of the partial dies compared with each other (:func:`compare_dies`), as
    the inspection compares them. On a good scan, what the comparison's noise reaches on this
    product: see :func:`calibrated_z_threshold`."""
    cells = full_dies(grid, polygon, mosaic, margin_px=_margin(settings))
    partial = [(c, r) for c, r, _ in grid.cells_in(polygon) if (c, r) not in set(cells)]
    if (len(cells) < 3 and not partial) \
            or min(grid.pitch_um) / mosaic.pixel_size_um < MIN_DIE_PX:
        return None
    best, compared = [0.0, 0.0], set()
    for cell, _, _, z in compare_dies(level0, mosaic, grid, cells, settings, partial, polygon,
                                      pyramid, separate=True):
        compared.add(cell)
        for k in range(2):
            best[k] = max(best[k], float(pair_opening(z[k]).max()) if z[k].size else 0.0)
    return (best[0], best[1], len(compared)) if compared else None


#: the z threshold calibrated on a good scan: this many times the largest z it reaches ...
GOOD_Z_MARGIN = 1.5
#: ... never under this (a product whose dies agree to the noise still has rare outliers)
MIN_Z_THRESHOLD = 7.0


def calibrated_z_threshold(good_max_z: float, default: float = DieToDie().z_threshold
                           ) -> float:
    """The die-to-die z threshold for a product whose good scan reached ``good_max_z``.

    The default (13) was set on simulated wafers, whose tile seams and busy circuitry make
    the comparison noisy; a product whose dies agree better hides real differences under it
    (a mirrored brick texture, 2 x 2 dies: the good scan's largest z 5.7, while missing
    texture and 15-23 % stains on the defective copy scored z 8-12). Like the network's
    threshold, this one is set on the user's own good data: :data:`GOOD_Z_MARGIN` times what
    the good scan reached, at least :data:`MIN_Z_THRESHOLD`, and never above the default
    (a good scan noisier than that says more about that scan than about the product).
    """
    return float(min(default, max(MIN_Z_THRESHOLD, GOOD_Z_MARGIN * good_max_z)))
