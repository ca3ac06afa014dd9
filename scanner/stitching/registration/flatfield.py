"""Flat-field (vignetting) estimated from the tiles of a scan, BaSiC-like but simple.

Over many tiles the sample's content lands at random places of the sensor while the
illumination falloff stays put, so a robust per-pixel statistic over tiles (the median of
tiles each divided by its own median) shows the falloff; a smooth low-order polynomial fitted
to it keeps the falloff and drops what is left of the sample. BaSiC (a low-rank + sparse
decomposition) does this more generally; it is not a maintained PyPI package for our Python
and numpy, and a radial-ish falloff needs no more than this.

Streaming: at most ``max_tiles`` tiles, spread evenly over the scan, are read, one at a time,
each reduced to a small block-mean thumbnail.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["MEDIAN_MODEL", "choose_flatfield", "estimate_flatfield", "fit_median_gain",
           "fit_overlap_gain", "flatfield_tiles", "median_thumbnail", "overlap_blocks",
           "overlap_mismatch", "polynomial_surface", "thumbnail"]

#: Thumbnail edge (pixels) tiles are reduced to before the statistics.
_THUMB = 64


def _block_mean(tile: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Mean of ``tile`` over a ``shape`` grid of blocks (edges trimmed to whole blocks)."""
    h, w = tile.shape
    by, bx = max(1, h // shape[0]), max(1, w // shape[1])
    t = tile[: by * shape[0], : bx * shape[1]].astype(np.float64)
    return t.reshape(shape[0], by, shape[1], bx).mean(axis=(1, 3))


def thumbnail(tile: np.ndarray) -> np.ndarray:
    """The block-mean thumbnail :func:`estimate_flatfield` reduces a tile to (float64)."""
    h, w = tile.shape
    return _block_mean(tile, (min(_THUMB, h), min(_THUMB, w)))


def _design(yy: np.ndarray, xx: np.ndarray, order: int) -> np.ndarray:
    """Monomials ``x**i y**j`` (i + j <= order) of normalised coordinates, one column each."""
    cols = [xx**i * yy**j for i in range(order + 1) for j in range(order + 1 - i)]
    return np.stack([c.ravel() for c in cols], axis=1)


def polynomial_surface(
    coeffs: np.ndarray, shape: tuple[int, int], order: int
) -> np.ndarray:
    """Evaluate a fitted surface on a full-resolution ``shape`` grid (float32)."""
    h, w = shape
    yy = (np.arange(h) - (h - 1) / 2) / (h / 2)
    xx = (np.arange(w) - (w - 1) / 2) / (w / 2)
    out = np.zeros(shape, dtype=np.float64)
    k = 0
    for i in range(order + 1):
        for j in range(order + 1 - i):
            out += coeffs[k] * np.outer(yy**j, xx**i)
            k += 1
    return out.astype(np.float32)


def flatfield_tiles(indices: Sequence[int], max_tiles: int = 200) -> list[int]:
    """The tiles :func:`estimate_flatfield` reads: at most ``max_tiles``, evenly spread."""
    chosen = list(indices)
    if len(chosen) > max_tiles:
        pick = np.linspace(0, len(chosen) - 1, max_tiles).round().astype(int)
        chosen = [chosen[i] for i in np.unique(pick)]
    return chosen


def estimate_flatfield(
    tiles: Any,
    indices: Sequence[int],
    *,
    max_tiles: int = 200,
    order: int = 4,
    min_tiles: int = 8,
    thumbnails: Mapping[int, np.ndarray] | None = None,
) -> np.ndarray | None:
    """Estimate the relative illumination of the sensor from scan tiles.

    Parameters
    ----------
    tiles : array-like
        ``(N, H, W)`` tiles; ``tiles[i]`` is read for the chosen ``indices`` only.
    indices : sequence of int
        Tiles that may be used (the acquired ones).
    max_tiles : int
        Most tiles read (evenly spread over ``indices``).
    order : int
        Order of the fitted 2-D polynomial (4 holds a cos**4 falloff and an off-centre one).
    min_tiles : int
        With fewer usable tiles nothing is estimated (None): a median over a handful of tiles
        still shows the sample.
    thumbnails : mapping of int to ndarray, optional
        :func:`thumbnail` of tiles already computed (during acquisition, from the very data
        the store holds): a chosen tile found there is not read.

    Returns
    -------
    ndarray or None
        ``(H, W)`` float32 gain, mean 1 over the sensor: divide a tile by it to flatten it.
    """
    med = median_thumbnail(tiles, indices, max_tiles=max_tiles, min_tiles=min_tiles,
                           thumbnails=thumbnails)
    return None if med is None else fit_median_gain(med, tuple(tiles.shape[1:]), order)


#: the name scan.json gives the gain of :func:`fit_median_gain` at its default order
MEDIAN_MODEL = "tile median, polynomial order 4"


def fit_median_gain(med: np.ndarray, shape: tuple[int, int], order: int = 4) -> np.ndarray:
    """The gain (mean 1, full resolution ``shape``) of a polynomial of ``order`` fitted to
    a :func:`median_thumbnail`: what :func:`estimate_flatfield` returns."""
    return _fit_gain(med, shape, order)


def median_thumbnail(tiles: Any, indices: Sequence[int], *, max_tiles: int = 200,
                     min_tiles: int = 8, thumbnails: Mapping[int, np.ndarray] | None = None
                     ) -> np.ndarray | None:
    """The statistic :func:`estimate_flatfield` fits: per thumbnail pixel, the median of the
    tiles each over its own median (None: too few tiles)."""
    h, w = (int(s) for s in tiles.shape[1:])
    chosen = flatfield_tiles(indices, max_tiles)
    return _median_thumbnail(tiles, chosen, (min(_THUMB, h), min(_THUMB, w)), min_tiles,
                             thumbnails or {})


#: side (pixels) of the blocks overlapping tiles are compared in
OVERLAP_BLOCK = 8
#: order of the log-polynomial gain fitted to the overlaps (a cos**4 falloff of 40 % at the
#: corners is held to 0.4 % RMS; higher orders are barely constrained by edge strips)
OVERLAP_ORDER = 2
#: overlapping pairs of each direction (side by side, one above the other) a fit needs
MIN_PAIRS_PER_DIRECTION = 3


def choose_flatfield(med: np.ndarray | None, shape: tuple[int, int],
                     samples: list[tuple[np.ndarray, ...]]
                     ) -> tuple[np.ndarray | None, str, dict[str, float]]:
    """The flat-field under which overlapping tiles agree best, among: the gain fitted to the
    overlaps themselves (:func:`fit_overlap_gain`), the polynomial fitted to the tiles'
    median (:func:`estimate_flatfield`'s) and none at all.

    The median over tiles shows the illumination only where the sample's content lands at
    random sensor positions. A product that repeats (a die grid) puts the same content at
    the same few positions of every tile, and its content leaks into that fit: 0.80-1.55 on
    a photograph die grid whose true vignetting spans 0.93-1.03 (RMS error 15 %); its dies
    then differed by up to 24 % and die-to-die missed faint stains. Where two tiles overlap
    they image the same sample points at two sensor positions, whatever the content: the
    overlap fit was within 0.02-0.23 % RMS of the true vignetting on 14 simulated scans
    (die grids, textures, wafers, PV cells), the median fit 0.1-15 %. The comparison keeps
    a safety net: a fit that made the overlaps agree less than no correction would not be
    taken. Returns the gain (None: none), the name of the one chosen and the mismatch
    (:func:`overlap_mismatch`) of each candidate.
    """
    candidates: dict[str, np.ndarray | None] = {}
    fitted = fit_overlap_gain(samples, shape)
    if fitted is not None:
        candidates[f"overlaps, log-polynomial order {OVERLAP_ORDER}"] = fitted
    if med is not None:
        candidates[MEDIAN_MODEL] = fit_median_gain(med, shape)
    candidates["none"] = None
    scores = {name: round(overlap_mismatch(g, samples), 5) for name, g in candidates.items()}
    best = min(scores, key=lambda k: scores[k])
    return candidates[best], best, scores


def fit_overlap_gain(samples: list[tuple[np.ndarray, ...]], shape: tuple[int, int],
                     order: int = OVERLAP_ORDER, passes: int = 3) -> np.ndarray | None:
    """The gain (mean 1) whose log, a polynomial of ``order`` over the sensor, best explains
    the log ratios of overlapping blocks (:func:`overlap_blocks`), each pair with its own
    offset (exposure); robust: blocks off by more than 3 MADs (a misregistered edge, dust
    that moved) are dropped and the fit repeated. None where the pairs do not constrain it:
    fewer than :data:`MIN_PAIRS_PER_DIRECTION` side by side or one above the other.

    Written here: flat-field from overlaps is a few lines of least squares on our own
    registration's pairs (BaSiC, the maintained alternative, estimates from the median-like
    statistics this replaces and is not packaged for our Python).
    """
    side = sum(1 for ya, xa, yb, xb, *_ in samples if abs(xa[0] - xb[0]) > abs(ya[0] - yb[0]))
    if min(side, len(samples) - side) < MIN_PAIRS_PER_DIRECTION:
        return None
    h, w = shape

    def terms(y: np.ndarray, x: np.ndarray) -> np.ndarray:  # no constant: the mean is 1
        return _design((y - (h - 1) / 2) / (h / 2), (x - (w - 1) / 2) / (w / 2), order)[:, 1:]

    a_rows = [terms(ya, xa) - terms(yb, xb) for ya, xa, yb, xb, _, _ in samples]
    b_rows = [np.log(va) - np.log(vb) for *_, va, vb in samples]
    keep = [np.ones(len(b), bool) for b in b_rows]
    coef = None
    for _ in range(passes):
        # each pair's offset taken out by centring its kept rows (the same least squares)
        a = np.concatenate([r[k] - r[k].mean(0) for r, k in zip(a_rows, keep, strict=True)
                            if k.any()])
        b = np.concatenate([v[k] - v[k].mean() for v, k in zip(b_rows, keep, strict=True)
                            if k.any()])
        coef, *_ = np.linalg.lstsq(a, b, rcond=None)
        resid = [v - r @ coef for r, v in zip(a_rows, b_rows, strict=True)]
        resid = [e - np.median(e) for e in resid]
        mad = 1.4826 * float(np.median(np.abs(np.concatenate(resid)))) + 1e-9
        keep = [np.abs(e) < 3 * mad for e in resid]
    yy, xx = np.mgrid[0:h, 0:w]
    gain = np.exp(terms(yy.ravel().astype(float), xx.ravel().astype(float)) @ coef)
    gain = gain.reshape(h, w)
    return (gain / gain.mean()).astype(np.float32)


def overlap_blocks(tiles: Any, origins_px: Mapping[int, tuple[float, float]],
                   max_pairs: int = 64, block: int = OVERLAP_BLOCK, min_px: int = 16,
                   ) -> list[tuple[np.ndarray, ...]]:
    """Block means of the overlaps of neighbouring tiles, each block in both tiles.

    ``origins_px``: mosaic pixel ``(row, col)`` of each usable tile's pixel (0, 0) (registered
    positions, camera unrotated). Returns, per pair (at most ``max_pairs``, spread over the
    scan), ``(ya, xa, yb, xb, va, vb)``: the block centres in tile a and in tile b (sensor
    pixels) and the two tiles' block means there; blocks that either tile sees dark (off the
    sample) are left out.
    """
    h, w = (int(s) for s in tiles.shape[1:])
    from scipy.spatial import cKDTree

    keys = sorted(origins_px)
    pos = np.array([origins_px[k] for k in keys], dtype=float).reshape(-1, 2)
    pairs = []
    for i, j in sorted(cKDTree(pos).query_pairs(float(np.hypot(h, w)))):
        dy, dx = (int(v) for v in np.round(pos[j] - pos[i]))
        rows, cols = h - abs(dy), w - abs(dx)
        if rows >= min_px and cols >= min_px and (rows < h or cols < w):
            pairs.append((keys[i], keys[j], dy, dx))
    step = max(1, len(pairs) // max_pairs)
    out = []
    for a, b, dy, dx in pairs[::step][:max_pairs]:
        # the overlap in tile a's pixels; tile b's pixel (r, c) is tile a's (r + dy, c + dx)
        r0, r1, c0, c1 = max(0, dy), min(h, h + dy), max(0, dx), min(w, w + dx)
        nr, nc = (r1 - r0) // block, (c1 - c0) // block
        if nr < 1 or nc < 1:
            continue
        r1, c1 = r0 + nr * block, c0 + nc * block
        va = _block_mean(np.asarray(tiles[a][r0:r1, c0:c1], dtype=np.float64), (nr, nc))
        vb = _block_mean(np.asarray(tiles[b][r0 - dy:r1 - dy, c0 - dx:c1 - dx],
                                    dtype=np.float64), (nr, nc))
        yy, xx = np.meshgrid(r0 + block * np.arange(nr) + block // 2,
                             c0 + block * np.arange(nc) + block // 2, indexing="ij")
        level = max(float(np.median(va)), float(np.median(vb)))
        ok = (va > 0.25 * level) & (vb > 0.25 * level)
        if ok.sum() >= 4:
            out.append((yy[ok], xx[ok], yy[ok] - dy, xx[ok] - dx, va[ok], vb[ok]))
    return out


def overlap_mismatch(gain: np.ndarray | None, samples: list[tuple[np.ndarray, ...]]) -> float:
    """How far overlapping tiles disagree once divided by ``gain`` (None: undivided): the
    median absolute log ratio of their blocks, each pair's median ratio taken out (a tile's
    exposure may differ a little from its neighbour's; the gain's shape is what is judged)."""
    residuals = []
    for ya, xa, yb, xb, va, vb in samples:
        r = np.log(va) - np.log(vb)
        if gain is not None:
            r = r - np.log(gain[ya, xa]) + np.log(gain[yb, xb])
        residuals.append(r - np.median(r))
    return float(np.median(np.abs(np.concatenate(residuals)))) if residuals else float("nan")


def _median_thumbnail(tiles: Any, chosen: Sequence[int], thumb: tuple[int, int],
                      min_tiles: int, thumbnails: Mapping[int, np.ndarray]
                      ) -> np.ndarray | None:
    """Per thumbnail pixel, the median over bright tiles of each tile over its own median,
    NaN where fewer than ``min_tiles`` see the sample (None: too few tiles to tell)."""
    thumbs, levels = [], []
    for i in chosen:
        t = thumbnails.get(i)
        if t is None or t.shape != thumb:
            t = _block_mean(np.asarray(tiles[i]), thumb)
        level = float(np.median(t))
        if level > 0:
            thumbs.append(t / level)
            levels.append(level)
    if len(thumbs) < min_tiles:
        return None
    levels_a = np.array(levels)
    # dark tiles (off the sample, on the chuck) carry little signal and much noise: leave out
    # those far below the typical tile
    bright = levels_a >= 0.25 * np.median(levels_a)
    stack = np.stack([t for t, b in zip(thumbs, bright, strict=True) if b])
    if stack.shape[0] < min_tiles:
        return None
    # a tile partly off the sample has dark (chuck) thumbnail pixels: they say nothing about
    # the illumination there and, on a small scan where most tiles touch the edge, turned the
    # median into a picture of the sample's outline; the statistic uses sample pixels only
    stack[stack < 0.5] = np.nan
    counts = np.isfinite(stack).sum(axis=0)
    if (counts >= min_tiles).mean() < 0.5:
        return None  # too few tiles see the sample at most sensor positions
    # thumbnail pixels too few tiles see are NaN on purpose (left out of the fit below);
    # nanmedian warns about each through the warnings module, which errstate does not cover
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        med = np.nanmedian(np.where(counts >= min_tiles, stack, np.nan), axis=0)
    return med


def _fit_gain(med: np.ndarray, shape: tuple[int, int], order: int) -> np.ndarray:
    """The gain: a robust polynomial fit to the median thumbnail at full resolution, mean 1."""
    h, w = shape
    ty, tx = med.shape
    # thumbnail pixel centres in full-resolution normalised coordinates
    by, bx = h // ty, w // tx
    yy = ((np.arange(ty) + 0.5) * by - 0.5 - (h - 1) / 2) / (h / 2)
    xx = ((np.arange(tx) + 0.5) * bx - 0.5 - (w - 1) / 2) / (w / 2)
    yy, xx = np.meshgrid(yy, xx, indexing="ij")
    design = _design(yy, xx, order)
    valid = np.isfinite(med.ravel())
    design, target = design[valid], med.ravel()[valid]
    coeffs, *_ = np.linalg.lstsq(design, target, rcond=None)
    # one robust pass: refit without the thumbnail pixels the sample still dominates
    resid = target - design @ coeffs
    mad = 1.4826 * np.median(np.abs(resid - np.median(resid))) + 1e-9
    good = np.abs(resid) < 3 * mad
    coeffs, *_ = np.linalg.lstsq(design[good], target[good], rcond=None)
    gain = polynomial_surface(coeffs, (h, w), order)
    gain = np.clip(gain, 0.05, None)
    return (gain / gain.mean()).astype(np.float32)
