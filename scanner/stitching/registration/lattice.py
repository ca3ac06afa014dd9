"""Tiles whose overlaps match at several periods of a repeating pattern: placed on its lattice.

A pattern finer than the stage's error (a memory array, a via field, a grating) matches an
overlap at every period inside the search window, and registration refuses such a pair
(:func:`scanner.stitching.registration.pairwise.register_pair`): no measurement tells which
period the stage landed on. Left where the stage landed, neighbouring tiles lie a *fraction*
of a period apart, and where they overlap the fused mosaic shows the pattern twice, out of
phase (a 12 um via array, tiles placed 3-6 um apart: ghost vias along every seam, and
cell-to-cell comparison across a seam reads the cells at another phase).

Every such pair does measure its offset exactly up to a whole lattice translation. So the
tiles are placed from one another along the best-matching of those pairs (a maximum spanning
tree, strongest match first), each on the lattice translation that puts it nearest where the
stage landed: every seam then joins the pattern in phase, and a tile may lie a whole period
off (as the stage alone could put it), never a fraction. Tiles the global solve placed keep
their places and anchor the rest: the largest group that its kept pairs join does; another
group (a grating's edge pairs measure one way only, and each group of them floats where its
stages landed) is moved as a whole onto the lattice, as a single tile is. The lattice is
found in a tile
(:func:`scanner.diegrid.estimate_grid`); a placement further from where the stage landed than
the search window is left.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from scanner.stitching.registration.pairwise import PairResult

#: a refused pair matched at least this well (NCC) at its best period to place tiles from:
#: a clean match, as :data:`scanner.stitching.registration.pairwise._PRIOR_NCC`
MIN_LATTICE_NCC = 0.8
#: tiles the lattice is looked for in, at most
LATTICE_TRIES = 6


def lattice_vectors(tile: np.ndarray, max_shift_px: float
                    ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The repeat vectors ``(x, y)`` (camera pixels) of the pattern in a tile that are short
    enough to make an overlap ambiguous (within twice the search window), and the unit
    vectors of the axes it does not change along at all (a grating's lines: any offset along
    them matches); none when the tile shows no repeat."""
    from scanner.diegrid import estimate_grid

    grid = estimate_grid(np.asarray(tile, dtype=np.float32), 1.0, (0.0, 0.0))
    if grid is None:
        return [], []
    t = math.radians(grid.rotation_deg)
    px, py = grid.pitch_um
    units = [np.array([math.cos(t), math.sin(t)]), np.array([-math.sin(t), math.cos(t)])]
    vectors = [u * p for u, p, flat in zip(units, (px, py), grid.uniform_axes, strict=True)
               if not flat and p <= 2.0 * max_shift_px]
    return vectors, [u for u, flat in zip(units, grid.uniform_axes, strict=True) if flat]


def _nearest_translation(d: np.ndarray, target: np.ndarray, vectors: list[np.ndarray],
                         along: list[np.ndarray], reach: float) -> np.ndarray:
    """Of ``d`` moved by whole lattice translations, the one nearest ``target``; along the
    axes the pattern does not change along (``along``), the target's own offset."""
    spans = [range(-int(math.ceil(reach / np.hypot(*v))) - 1,
                   int(math.ceil(reach / np.hypot(*v))) + 2) for v in vectors]
    best, gap = d, math.inf
    for i in spans[0] if vectors else (0,):
        for j in spans[1] if len(vectors) > 1 else (0,):
            moved = d + (i * vectors[0] if vectors else 0.0) + \
                (j * vectors[1] if len(vectors) > 1 else 0.0)
            for u in along:
                moved = moved + float((target - moved) @ u) * u
            g = float(np.hypot(*(moved - target)))
            if g < gap:
                best, gap = moved, g
    return best


def place_on_lattice(positions: np.ndarray, placed: np.ndarray, prior: np.ndarray,
                     pairs: Sequence[PairResult], tile_of: Any, max_shift_px: float,
                     used: Sequence[PairResult] | None = None) -> np.ndarray:
    """Place the tiles left to the stage from their periodic overlaps (see the module).

    Parameters
    ----------
    positions : ndarray
        ``(N, 2)`` positions ``(x, y)`` after the global solve (camera pixels); updated in
        place for the tiles placed here.
    placed : ndarray of bool
        ``(N,)`` tiles the solve placed from matched overlaps (they anchor the rest).
    prior : ndarray
        ``(N, 2)`` where the stage landed.
    pairs : sequence of PairResult
        Every measured pair.
    tile_of : callable
        ``tile_of(k)``: the image of tile ``k`` (to find the pattern's lattice in).
    max_shift_px : float
        The search window: no tile is placed further than this from where the stage landed.
    used : sequence of PairResult, optional
        The pairs the solve kept (default: those of ``pairs`` that are ``ok``). The tiles
        they join form groups placed from one another; groups that no kept pair joins each
        float where their stages landed, a fraction of a period apart (a grating's overlaps:
        a few pairs match one way only, the rest at several periods). The largest group
        anchors; each other group is moved as a whole onto the lattice from the refused
        pairs, as a single tile is.

    Returns
    -------
    ndarray of bool
        The tiles placed here.
    """
    group = _groups(placed, [p for p in pairs if p.ok] if used is None else used)
    links = [p for p in pairs if not p.ok and math.isfinite(p.dx) and math.isfinite(p.dy)
             and p.ncc >= MIN_LATTICE_NCC
             and not (placed[p.a] and placed[p.b] and group[p.a] == group[p.b])]
    done = np.zeros(len(positions), dtype=bool)
    if not links:
        return done
    # the lattice of the first of a few of these tiles that shows one whole (a tile at the
    # part's edge holds the surround too)
    vectors, along = [], []
    for k in list(dict.fromkeys(t for p in links for t in (p.b, p.a)))[:LATTICE_TRIES]:
        vectors, along = lattice_vectors(tile_of(k), max_shift_px)
        if vectors:
            break
    if not vectors:
        return done
    anchor = None
    if placed.any():  # the largest group the solve placed anchors (the first of equals)
        sizes = np.bincount(group[placed])
        here = group == int(np.argmax(sizes))
    else:  # nothing anchors the tiles: the first one keeps where it landed
        here = placed.copy()
        anchor = links[0].a
        here[anchor] = True
    links.sort(key=lambda p: -p.ncc)
    grew = True
    while grew:
        grew = False
        for p in links:
            if here[p.a] == here[p.b]:
                continue
            d = np.array([p.dx, p.dy])
            new = p.b if here[p.a] else p.a
            # a tile alone: nearest where the stage landed; a group: where the solve put it
            target = positions[new] if placed[new] else prior[new]
            if here[p.a]:
                at = positions[p.a] + _nearest_translation(d, target - positions[p.a],
                                                           vectors, along, max_shift_px)
            else:
                at = positions[p.b] - _nearest_translation(d, positions[p.b] - target,
                                                           vectors, along, max_shift_px)
            members = group == group[new] if placed[new] else np.arange(len(here)) == new
            moved = positions[members] + (at - positions[new])
            if float(np.abs(moved - prior[members]).max()) > max_shift_px:
                continue
            positions[members] = moved
            here[members] = done[members] = True
            grew = True
            break  # the strongest link of the grown tree first, again
    if anchor is not None and done.any():
        done[anchor] = True  # the others' reference: on the same lattice
    return done


def _groups(placed: np.ndarray, used: Sequence[PairResult]) -> np.ndarray:
    """Per tile, the group of placed tiles that kept pairs join (scipy's connected
    components); -1 for tiles the solve did not place."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(placed)
    a = np.array([p.a for p in used], dtype=int)
    b = np.array([p.b for p in used], dtype=int)
    graph = coo_matrix((np.ones(len(a)), (a, b)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    # numbered 0.. over the placed tiles only, so that np.bincount counts groups
    _, ids = np.unique(labels[placed], return_inverse=True)
    out = np.full(n, -1, dtype=int)
    out[placed] = ids
    return out
