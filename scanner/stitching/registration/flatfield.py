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

__all__ = ["estimate_flatfield", "flatfield_tiles", "polynomial_surface", "thumbnail"]

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
    h, w = (int(s) for s in tiles.shape[1:])
    chosen = flatfield_tiles(indices, max_tiles)
    med = _median_thumbnail(tiles, chosen, (min(_THUMB, h), min(_THUMB, w)), min_tiles,
                            thumbnails or {})
    if med is None:
        return None
    return _fit_gain(med, (h, w), order)


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
