"""Small defects on plain surface, found at the mosaic's own resolution.

The anomaly maps are one value per map pixel (4 x 4 mosaic pixels at the default output
stride), and the network judges each from a window of limited reach. On polished silicon
between and around a wafer's dies, that loses what is small and sharp: a particle of 8
mosaic pixels at 72 % contrast, a pit of 5 at 90 % and scratches one or two pixels wide at
18-40 % all scored under the threshold (simulated wafer, 5 µm pixels). On a plain surface
nothing normal changes the reflectance over a few pixels, so a sharp local change, ringed by
quiet surface, is a defect whatever the network says: the particle channel of unpatterned-
wafer inspection, as :mod:`scanner.inspection.plainsurface` is its stain and haze channel.

Tile by tile of the mosaic (memory stays flat whatever the wafer's size), where the map says
the surface is plain (:func:`scanner.inspection.plainsurface.plain_surface_area`):

1. **Change**: the image smoothed by a Gaussian of :attr:`PlainSpots.sigma_px`, minus the
   local surface level (median of 4 x 4 block means over :attr:`PlainSpots.background_blocks`
   blocks: a particle, a pit or a line through the window does not move it), over the scan's
   brightness level.
2. **Candidates**: pixels whose smoothed change, or whose own change (a line one pixel wide
   loses half its contrast to any smoothing when diagonal), reaches
   :attr:`PlainSpots.min_contrast` and :attr:`PlainSpots.noise_factor` times the tile's
   robust noise, in connected groups of at least :attr:`PlainSpots.min_px` pixels of which
   two stand out on their own (a lone hot pixel, smoothed into its neighbours, is noise).
3. **Ringed by quiet surface**: the band :attr:`PlainSpots.ring_px` around a group lies on
   plain surface and is quiet there (an edge of a structure reaching into a plain block is
   not ringed by quiet surface; the whole of a scratch, or a particle, is).
4. **Not design**: on a die grid, a group seen again at the same place of a neighbouring die
   (normalised correlation >= :attr:`PlainSpots.repeat_correlation`) is a mark or test
   structure of the design in a street, not a defect.

What is accepted is put on the anomaly map's scale at and above the decision threshold
(:func:`scanner.inspection.plainsurface.deviation_to_score`), per map pixel the strongest
change inside it, so it joins the other evidence in one defect list. Tile seams (exposure
steps of 2-5 %) and flat-field residuals stay under :attr:`PlainSpots.min_contrast`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from scanner.inspection.dietodie_geometry import MosaicGrid
from scanner.inspection.dietodie_maps import Patch, map_samples, max_at


@dataclass(frozen=True)
class PlainSpots:
    """Settings of the small-defect channel on plain surface.

    Attributes
    ----------
    min_contrast : float
        Smallest reflectance change (fraction of the surface level) of a defect; over the
        steps a tile seam leaves (2-5 %) with room to spare.
    noise_factor : float
        The change must also reach this many robust standard deviations of the change over
        the tile's plain surface (a hazy or rough surface is noisier).
    min_px : int
        Smallest group of mosaic pixels.
    sigma_px : float
        Gaussian smoothing before the change is measured (mosaic pixels): less noise, and a
        line one pixel wide keeps most of its contrast.
    background_blocks : int
        Side, in 4 x 4 blocks, of the median that gives the surface level.
    ring_px : tuple of int
        Inner and outer distance (mosaic pixels) of the band around a group that must be
        plain and quiet.
    ring_quiet : float
        Share of that band (on plain surface) whose change stays under half the group's
        decision level; also the share of the band that must lie on plain surface.
    repeat_correlation : float
        Correlation with the same place of a neighbouring die above which a group is design.
    repeat_search_px : int
        Misalignment of the die grid searched (mosaic pixels).
    tile_px : int
        Mosaic pixels per tile side.
    """

    min_contrast: float = 0.08
    noise_factor: float = 8.0
    min_px: int = 3
    sigma_px: float = 0.7
    background_blocks: int = 7
    ring_px: tuple[int, int] = (2, 6)
    ring_quiet: float = 0.8
    repeat_correlation: float = 0.6
    repeat_search_px: int = 4
    tile_px: int = 1024


def _halo(settings: PlainSpots) -> int:
    """Mosaic pixels read around a tile: room for the background's median and the ring."""
    return max(4 * (settings.background_blocks // 2 + 1), settings.ring_px[1] + 2)


def surface_level(image: np.ndarray, blocks: int) -> np.ndarray:
    """The local surface level: the median of 4 x 4 block means over ``blocks`` x ``blocks``
    blocks, back at the image's pixels (nearest block)."""
    h, w = image.shape
    hb, wb = -(-h // 4), -(-w // 4)
    padded = np.pad(image, ((0, hb * 4 - h), (0, wb * 4 - w)), mode="edge")
    means = padded.reshape(hb, 4, wb, 4).mean(axis=(1, 3))
    level = _median_filter(means, blocks)
    return np.repeat(np.repeat(level, 4, axis=0), 4, axis=1)[:h, :w]


def _median_filter(a: np.ndarray, size: int) -> np.ndarray:
    """``scipy.ndimage.median_filter(a, size, mode="nearest")`` for an odd ``size``: the
    same values (the middle one of each window's), three times faster on a tile's block
    means, as one partition of every window's values."""
    if size % 2 == 0 or a.ndim != 2 or not np.isfinite(a).all():
        return ndimage.median_filter(a, size=size, mode="nearest")
    half = size // 2
    windows = np.lib.stride_tricks.sliding_window_view(np.pad(a, half, mode="edge"),
                                                       (size, size))
    values = windows.reshape(*a.shape, size * size)
    middle = size * size // 2
    return np.partition(values, middle, axis=-1)[..., middle]


def spot_change(image: np.ndarray, plain: np.ndarray, level: float,
                settings: PlainSpots = PlainSpots(),
                open_sides: tuple[bool, bool, bool, bool] = (False, False, False, False),
                ) -> np.ndarray:
    """The accepted changes of one tile (steps 1-3 of the module): ``|change|`` (fraction of
    ``level``) on the pixels of accepted groups, 0 elsewhere.

    Parameters
    ----------
    image : ndarray (h, w)
        Mosaic pixels (0 where no tile landed: never compared).
    plain : ndarray of bool (h, w)
        The pixels on plain surface.
    level : float
        The scan's brightness level (the surface's grey value).
    settings : PlainSpots
        Channel settings.
    open_sides : (top, bottom, left, right) of bool
        Sides of ``image`` that are the mosaic's edge with plain surface beyond it (a band
        across a wafer): a group within the reach of its ring and background (:func:`_halo`)
        of such a side is not ringed by surface anyone saw, so it is not accepted (the edge
        of a design structure cut by the band's edge looked like a scratch, ringed by quiet
        surface on its three other sides).
    """
    image = np.asarray(image, dtype=np.float32)
    out = np.zeros(image.shape, dtype=np.float32)
    # pixels no tile covered, and their neighbours (the mosaic's edge blends into 0)
    unscanned = image <= 0
    if unscanned.any():  # (most tiles were scanned whole: nothing to dilate)
        plain = plain & ~ndimage.binary_dilation(unscanned, iterations=3)
    if plain.sum() < 64:
        return out
    raw = (image - surface_level(image, settings.background_blocks)) / np.float32(level)
    change = ndimage.gaussian_filter(raw, settings.sigma_px)
    strong, strong_raw = (max(settings.min_contrast, settings.noise_factor * _noise(v[plain]))
                          for v in (change, raw))
    # smoothed, a particle stands out of the noise; raw, a line one pixel wide keeps its
    # contrast (a diagonal one loses half of it to the smoothing)
    sharp = np.abs(raw) >= strong_raw
    candidates = plain & ((np.abs(change) >= strong) | sharp)
    if not candidates.any():
        return out
    labels, n = ndimage.label(candidates, structure=np.ones((3, 3), dtype=bool))
    if n == 0:
        return out
    # at least two sharp pixels: a lone hot pixel (smoothed into its neighbours) is noise
    sharp_count = np.bincount(labels[sharp & candidates], minlength=n + 1)
    sizes = np.bincount(labels.ravel())
    ring_in, ring_out = settings.ring_px
    h, w = image.shape
    reach = _halo(settings)
    for k, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None or sizes[k] < settings.min_px or sharp_count[k] < 2:
            continue
        top, bottom, left, right = open_sides
        if ((top and sl[0].start < reach) or (bottom and sl[0].stop > h - reach)
                or (left and sl[1].start < reach) or (right and sl[1].stop > w - reach)):
            continue  # its ring or background reach past the mosaic, onto unseen surface
        r0, r1 = max(sl[0].start - ring_out - 1, 0), min(sl[0].stop + ring_out + 1, h)
        c0, c1 = max(sl[1].start - ring_out - 1, 0), min(sl[1].stop + ring_out + 1, w)
        box = (slice(r0, r1), slice(c0, c1))
        group = labels[box] == k
        dist = ndimage.distance_transform_edt(~group)
        band = (dist > ring_in) & (dist <= ring_out)
        on_plain = band & plain[box]
        if band.sum() == 0 or on_plain.sum() < settings.ring_quiet * band.sum():
            continue  # the group reaches off the plain surface: structure, not a spot
        quiet = np.abs(change[box][on_plain]) < strong / 2.0
        if quiet.mean() < settings.ring_quiet:
            continue
        peak = np.maximum(np.abs(change[box]), np.where(sharp[box], np.abs(raw[box]), 0.0))
        out[box] = np.where(group, peak, out[box])
    return out


def _noise(values: np.ndarray) -> float:
    """Robust standard deviation (scaled median absolute deviation)."""
    return 1.4826 * float(np.median(np.abs(values - np.median(values))))


def plain_spot_patches(
    level0: Any,
    mosaic: MosaicGrid,
    level: float,
    surface: np.ndarray,
    map_origin_um: tuple[float, float],
    map_pixel_um: float,
    threshold: float,
    die_pitch_px: tuple[float, float] | None = None,
    settings: PlainSpots = PlainSpots(),
) -> tuple[list[Patch], int]:
    """Small defects on plain surface as blocks of anomaly-map scores.

    Parameters
    ----------
    level0 : array-like
        Level 0 of the mosaic (read tile by tile).
    mosaic : MosaicGrid
        The mosaic's geometry.
    level : float
        The scan's brightness level.
    surface : ndarray of bool
        Plain surface at map resolution (the map's pixels).
    map_origin_um, map_pixel_um
        Stage ``(x, y)`` of the centre of map pixel ``(0, 0)`` and the map pixel size.
    threshold : float
        The decision threshold the changes are put on (:func:`deviation_to_score`).
    die_pitch_px : (rows, cols), optional
        The die pitch in mosaic pixels, on a patterned wafer (groups repeated from die to die
        are design).
    settings : PlainSpots
        Channel settings.

    Returns
    -------
    patches, pixels
        The blocks for :func:`scanner.inspection.dietodie_maps.apply_patches`, and the number of
        mosaic pixels accepted.
    """
    from scanner.inspection.plainsurface import deviation_to_score

    rows, cols = (int(n) for n in level0.shape[:2])
    p = mosaic.pixel_size_um
    # the map pixel nearest each mosaic row and column (-1: off the map)
    mi = np.rint((mosaic.origin_um[1] + np.arange(rows) * p - map_origin_um[1]) / map_pixel_um
                 ).astype(int)
    mj = np.rint((mosaic.origin_um[0] + np.arange(cols) * p - map_origin_um[0]) / map_pixel_um
                 ).astype(int)
    mi[(mi < 0) | (mi >= surface.shape[0])] = -1
    mj[(mj < 0) | (mj >= surface.shape[1])] = -1
    halo, t = _halo(settings), int(settings.tile_px)
    patches: list[Patch] = []
    accepted = 0
    def tile(r0: int, c0: int) -> np.ndarray | None:
        """The accepted changes of the tile at mosaic pixel ``(r0, c0)`` (None: none)."""
        ra, rb = max(r0 - halo, 0), min(r0 + t + halo, rows)
        ca, cb = max(c0 - halo, 0), min(c0 + t + halo, cols)
        ii, jj = mi[ra:rb], mj[ca:cb]
        plain = surface[np.ix_(np.maximum(ii, 0), np.maximum(jj, 0))]
        plain &= (ii >= 0)[:, None] & (jj >= 0)[None, :]
        core = (slice(r0 - ra, min(r0 + t, rows) - ra), slice(c0 - ca, min(c0 + t, cols) - ca))
        if not plain[core].any():
            return None
        # a side at the mosaic's edge is open where the plain surface reaches it (the usable
        # area goes on past a band's edge; a sample's own edge is not plain)
        sides = (ra == 0 and bool(plain[0].any()), rb == rows and bool(plain[-1].any()),
                 ca == 0 and bool(plain[:, 0].any()), cb == cols and bool(plain[:, -1].any()))
        found = spot_change(np.asarray(level0[ra:rb, ca:cb]), plain, level, settings,
                            sides)[core]
        if die_pitch_px is not None and found.any():
            found = _without_design(found, level0, r0, c0, die_pitch_px, settings)
        return found if found.any() else None

    # two threads: scipy's filters and the labelling release the GIL
    from concurrent.futures import ThreadPoolExecutor

    def done() -> Iterator[tuple[int, int, np.ndarray | None]]:
        """The tiles' results in order, at most three computed ahead (memory stays flat)."""
        with ThreadPoolExecutor(max_workers=2) as pool:
            pending: list[tuple[int, int, Any]] = []
            for r0 in range(0, rows, t):
                for c0 in range(0, cols, t):
                    pending.append((r0, c0, pool.submit(tile, r0, c0)))
                    if len(pending) > 2:
                        a, b, f = pending.pop(0)
                        yield a, b, f.result()
            for a, b, f in pending:
                yield a, b, f.result()

    for r0, c0, found in done():
        if found is None:
            continue
        accepted += int(np.count_nonzero(found))
        at = map_samples(found.shape, r0, c0, mosaic, map_origin_um, map_pixel_um)
        if at is None:
            continue
        i0, j0, ri, cj, size = at
        peak = max_at(found, ri, cj, size)
        score = np.where(peak > 0, deviation_to_score(peak, settings.min_contrast,
                                                        threshold), 0.0)
        patches.append((i0, j0, score.astype(np.float32)))
    return patches, accepted


def _without_design(found: np.ndarray, level0: Any, r0: int, c0: int,
                    pitch_px: tuple[float, float], settings: PlainSpots) -> np.ndarray:
    """``found`` (a tile's accepted changes at mosaic pixel ``(r0, c0)``) without the groups
    seen again one die away (design). A group too near the mosaic's edge, or whose
    neighbouring dies were not scanned, is kept: nothing says it is design."""
    from skimage.feature import match_template

    # groups a few pixels apart are one (a scratch broken by the noise, a stain's speckle):
    # one comparison each
    merged = ndimage.binary_dilation(found > 0, iterations=4)
    labels, n = ndimage.label(merged, structure=np.ones((3, 3), dtype=bool))
    rows, cols = (int(v) for v in level0.shape[:2])
    m, pad = settings.repeat_search_px, settings.ring_px[1]
    boxes = [(r0 + sl[0].start - pad, c0 + sl[1].start - pad,
              sl[0].stop - sl[0].start + 2 * pad, sl[1].stop - sl[1].start + 2 * pad)
             for sl in ndimage.find_objects(labels)]
    # one read per neighbouring die for all the tile's groups (a read decodes whole chunks)
    top = min(b[0] for b in boxes) - m
    left = min(b[1] for b in boxes) - m
    bottom = max(b[0] + b[2] for b in boxes) + m
    right = max(b[1] + b[3] for b in boxes) + m
    own = _window(level0, top, left, bottom, right)
    out, design = found.copy(), set()
    for dr, dc in ((pitch_px[0], 0.0), (-pitch_px[0], 0.0), (0.0, pitch_px[1]),
                   (0.0, -pitch_px[1])):
        dr, dc = int(round(dr)), int(round(dc))
        other = _window(level0, top + dr, left + dc, bottom + dr, right + dc)
        for k, (t, lft, h, w) in enumerate(boxes, start=1):
            if k in design or t < 0 or lft < 0 or t + h > rows or lft + w > cols:
                continue
            near = other[t - top:t - top + h + 2 * m, lft - left:lft - left + w + 2 * m]
            if np.isnan(near).any() or (near <= 0).any():
                continue  # off the mosaic, or not scanned there
            patch = own[t - top + m:t - top + m + h, lft - left + m:lft - left + m + w]
            if float(match_template(near, patch).max()) >= settings.repeat_correlation:
                design.add(k)
    if design:
        out[np.isin(labels, list(design))] = 0.0
    return out


def _window(level0: Any, top: int, left: int, bottom: int, right: int) -> np.ndarray:
    """Mosaic pixels ``[top:bottom, left:right]`` as float64, NaN off the mosaic."""
    rows, cols = (int(v) for v in level0.shape[:2])
    out = np.full((bottom - top, right - left), np.nan)
    r0, r1, c0, c1 = max(top, 0), min(bottom, rows), max(left, 0), min(right, cols)
    if r1 > r0 and c1 > c0:
        out[r0 - top:r1 - top, c0 - left:c1 - left] = np.asarray(level0[r0:r1, c0:c1])
    return out
