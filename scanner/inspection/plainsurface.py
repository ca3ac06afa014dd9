"""Large faint defects on plain surfaces, found in the image at map resolution.

The network judges each pixel from a window of limited reach. A uniform stain much wider than
that reach is seen only at its edge, as a ring that scores no higher than normal structure
(the simulated 600 µm stain of the benchmark's wafer: 0.785, under the quiet threshold), and
its inside looks like plain surface. On a plain surface (polished bare silicon, a blank
coupon, glass) nothing normal changes the reflectance over a large area, so a region that
does, ringed by plain surface, is a defect whatever the network says: the stain and haze
channel of unpatterned-wafer inspection.

Steps, on the relative reflectance at map resolution (1 = the surface level):

1. **Background**: the median of 8 x 8 block medians over 9 x 9 blocks (about 72 map pixels),
   interpolated: the surface's level around each pixel, illumination falloff included.
2. **Candidates**: where the image smoothed by a Gaussian of 1.5 map pixels differs from the
   background by at least :attr:`PlainSurface.min_contrast`, in connected regions of at least
   :attr:`PlainSurface.min_area_px` map pixels inside the usable area.
3. **Ringed by plain surface**: the band 8 to 16 map pixels around the region lies in plain
   blocks (median absolute deviation, and the steps to neighbouring block medians / 3, under
   :data:`models.thresholds.PLAIN_LEVEL`), the region's change is at least
   :attr:`PlainSurface.ring_contrast` times the band's own spread, and its core is uniform
   (median block MAD under the plain level, also counted with the region's own smoothed
   change taken out: :func:`_uniform`): a uniform region on a plain surface, not
   texture, grains, circuitry or a field of fine lines.
4. **Not design**: on a die grid, a region seen again at the same place of a neighbouring
   die (normalised correlation >= :attr:`PlainSurface.repeat_correlation` within
   +-``repeat_search_px``) is a structure of the design (a large pad, an alignment mark),
   not a defect.

An accepted region is put on the anomaly map's scale at and above the decision threshold
(:func:`deviation_to_score`), so it joins the network's and the die-to-die comparison's
evidence in one defect list.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

#: block side (map pixels) of the plainness statistics and of the background
BLOCK = 8


@dataclass(frozen=True)
class PlainSurface:
    """Settings of the plain-surface detector.

    Attributes
    ----------
    min_contrast : float
        Smallest reflectance change (fraction of the surface level) of a defect. Flat-field
        residuals and exposure steps between tiles stay under 2 %.
    noise_factor : float
        A region's largest change must also reach this many times the robust standard
        deviation of the change over the plain surface (a rough or hazy surface undulates by
        a few per cent).
    min_area_px : int
        Smallest region (map pixels); smaller defects are the network's.
    max_area_share : float
        Largest region, as a share of the usable area: a region larger than that is the
        surface itself (dies imaged at a pixel size that averages their circuitry out).
    ring_px : tuple of int
        Inner and outer distance (map pixels) of the band around a region that must be plain.
    ring_plain : float
        Share of that band in plain blocks.
    ring_contrast : float
        A region's largest change over the band's own structure (median of its blocks' spread,
        :data:`models.thresholds.PLAIN_LEVEL`'s statistic) must reach this: polished silicon
        around a stain spreads by 0.2-0.3 %, a field of fine lines that passes as plain by
        1-2 %, and a seam through it shifts its level by 3-5 %.
    repeat_correlation : float
        Correlation with the same place of a neighbouring die above which a region is design.
    repeat_search_px : int
        Misalignment of the die grid searched (map pixels).
    """

    min_contrast: float = 0.03
    noise_factor: float = 6.0
    min_area_px: int = 16
    max_area_share: float = 0.1
    ring_px: tuple[int, int] = (8, 16)
    ring_plain: float = 0.9
    ring_contrast: float = 8.0
    repeat_correlation: float = 0.6
    repeat_search_px: int = 3


def _blocks_all(mask: np.ndarray) -> np.ndarray:
    """Per 8 x 8 block: whether all its pixels are set (pixels past the edge count as set)."""
    from models.thresholds import _blocks

    b = _blocks(mask.astype(np.uint8), BLOCK, "edge")
    return b.min(axis=(1, 3)).astype(bool)


def _per_pixel(per_block: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    from models.thresholds import _per_pixel as expand

    return expand(per_block, BLOCK, shape)


def _per_pixel_box(per_block: np.ndarray, box: tuple[slice, slice]) -> np.ndarray:
    """``_per_pixel(per_block, shape)[box]`` without the map-sized array."""
    rows = np.arange(box[0].start, box[0].stop) // BLOCK
    cols = np.arange(box[1].start, box[1].stop) // BLOCK
    return per_block[np.ix_(rows, cols)]


def background(block_median: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The surface level around each pixel: block medians' median over 9 x 9 blocks,
    interpolated bilinearly to ``shape``."""
    level = ndimage.median_filter(block_median, size=9, mode="nearest").astype(np.float32)
    # bilinear at the pixel centres, one axis after the other: the same values as
    # ndimage.map_coordinates(order=1) at a twentieth of its time (0.02 against 0.4 s, 3.5 MP)
    rows = np.clip((np.arange(shape[0]) + 0.5) / BLOCK - 0.5, 0, level.shape[0] - 1)
    cols = np.clip((np.arange(shape[1]) + 0.5) / BLOCK - 0.5, 0, level.shape[1] - 1)
    r0 = np.floor(rows).astype(int)
    c0 = np.floor(cols).astype(int)
    r1 = np.minimum(r0 + 1, level.shape[0] - 1)
    c1 = np.minimum(c0 + 1, level.shape[1] - 1)
    fr = (rows - r0).astype(np.float32)[:, None]
    fc = (cols - c0).astype(np.float32)[None, :]
    by_row = level[r0] * (1 - fr) + level[r1] * fr
    return (by_row[:, c0] * (1 - fc) + by_row[:, c1] * fc).astype(np.float32)


def deviation_to_score(deviation: np.ndarray, min_contrast: float, threshold: float
                       ) -> np.ndarray:
    """Reflectance changes on the anomaly map's scale: ``threshold + (top - threshold)(1 -
    min_contrast / (2 |d|))``, halfway between the threshold and ``top``
    (:func:`scanner.inspection.defects.score_ceiling`) at the smallest change reported, approaching
    ``top`` for strong ones."""
    from scanner.inspection.defects import score_ceiling

    d = np.maximum(np.abs(np.asarray(deviation, dtype=np.float32)), min_contrast)
    top = score_ceiling(threshold)
    return (threshold + (top - threshold) * (1.0 - min_contrast / (2.0 * d))).astype(np.float32)


@dataclass(frozen=True)
class PlainArea:
    """Where a map's surface is plain (see :func:`plain_surface_area`).

    Attributes
    ----------
    reflectance : ndarray
        The relative reflectance, the sample's median off the usable area.
    block_median, block_mad : ndarray
        Per 8 x 8 block: median and median absolute deviation.
    block_spread : ndarray
        Per 8 x 8 block: its spread (MAD, or a third of the step to a neighbouring block's
        median when larger); per block, not per pixel: a mosaic's map is tens of Mpx.
    inner : ndarray of bool
        The usable area less half a background neighbourhood from its edge.
    surface : ndarray of bool
        Plain blocks inside ``inner``.
    plain : ndarray of bool
        Plain blocks inside the usable area (up to its edge: for what needs only a small
        neighbourhood, :mod:`scanner.inspection.plainspots`).
    """

    reflectance: np.ndarray
    block_median: np.ndarray
    block_mad: np.ndarray
    block_spread: np.ndarray
    inner: np.ndarray
    surface: np.ndarray
    plain: np.ndarray


def plain_surface_area(reflectance: np.ndarray, usable: np.ndarray) -> PlainArea:
    """The plain surface of a map: blocks whose spread is under
    :data:`models.thresholds.PLAIN_LEVEL`, inside the usable area (``usable``: bool, at map
    resolution)."""
    from models.thresholds import PLAIN_LEVEL, block_statistics

    r = np.asarray(reflectance, dtype=np.float32)
    # off the sample (the chuck, beyond a wafer's edge) is neither background nor a change
    level = np.median(r[usable], overwrite_input=True) if usable.any() else 1.0  # (a copy)
    r = np.where(usable, r, np.float32(level))
    med, mad, step = block_statistics(r, BLOCK)
    spread = np.maximum(mad, step / 3.0)
    # the background needs a whole neighbourhood of surface: within half of one from the
    # usable area's edge (roll-off and edge bead of a wafer, a coupon's bevel) only spots are judged
    inner = _per_pixel(ndimage.binary_erosion(_blocks_all(usable), iterations=5,
                                              border_value=0), r.shape) & usable
    plain = _per_pixel(spread < PLAIN_LEVEL, r.shape) & usable
    return PlainArea(r, med, mad, spread, inner, plain & inner, plain)


def plain_surface_defects(
    reflectance: np.ndarray,
    usable: np.ndarray | None = None,
    die_pitch_px: tuple[float, float] | None = None,
    settings: PlainSurface = PlainSurface(),
    area: PlainArea | None = None,
) -> list[tuple[tuple[slice, slice], np.ndarray, np.ndarray]]:
    """Large faint defects on plain surface (see the module's description).

    Parameters
    ----------
    reflectance : ndarray (H, W)
        Relative reflectance at map resolution (1 = the surface level).
    usable : ndarray of bool (H, W), optional
        The inspected area (default: everywhere).
    die_pitch_px : (rows, cols), optional
        The die pitch in map pixels, on a patterned wafer (regions repeated from die to die
        are design).
    settings : PlainSurface
        Detector settings.
    area : PlainArea, optional
        :func:`plain_surface_area` of ``reflectance`` and ``usable``, when the caller has it.

    Returns
    -------
    list of (slices, mask, deviation)
        Per defect: the map region (row and column slices), the defect's pixels in it and
        the smoothed reflectance change there (signed, fraction of the surface level).
    """
    from models.thresholds import PLAIN_LEVEL

    if usable is None:
        usable = np.ones(np.shape(reflectance), dtype=bool)
    if not usable.any():
        return []
    if area is None:
        area = plain_surface_area(reflectance, usable)
    r, med, inner = area.reflectance, area.block_median, area.inner
    plain, surface = _per_pixel(area.block_spread < PLAIN_LEVEL, r.shape), area.surface
    # (the map-sized arrays are made in place: a 533-tile wafer's maps are 33 Mpx, and each
    # copy of one 134 MB)
    dev = ndimage.gaussian_filter(r, 1.5)
    dev -= background(med, r.shape)
    if surface.sum() < settings.min_area_px:
        return []
    spread = dev[surface]
    centre = np.median(spread, overwrite_input=True)
    np.abs(np.subtract(spread, centre, out=spread), out=spread)
    noise = 1.4826 * float(np.median(spread, overwrite_input=True))
    del spread
    strong = max(settings.min_contrast, settings.noise_factor * noise)
    labels, n = ndimage.label((np.abs(dev) >= settings.min_contrast) & usable)
    if n == 0:
        return []
    sizes = np.bincount(labels.ravel())
    largest = settings.max_area_share * float(usable.sum())
    found = []
    for k, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None or not settings.min_area_px <= sizes[k] <= largest:
            continue
        own = labels[sl] == k
        peak = float(np.abs(dev[sl][own]).max())
        # near the usable area's edge the background lacks a whole neighbourhood: only a
        # spot, judged by its own inside against its ring, is said there
        edge = not inner[sl][own].all()
        if peak < strong or (edge and not _fits_spot(own)):
            continue
        ringed = _ringed_region(labels, k, sl, peak, usable, plain, area.block_spread,
                                settings)
        if ringed is None:
            continue
        box, region, ring = ringed
        if not (_spot_uniform(r[box], region, ring, strong)
                or (not edge and _uniform(r[box], dev[box], region,
                                          _per_pixel_box(area.block_mad, box)))):
            continue
        if die_pitch_px is not None and _repeats(r, box, region, die_pitch_px, usable,
                                                 settings) is not False:
            continue  # design, or no neighbouring die in the scan to tell
        found.append((box, region, np.where(region, dev[box], 0.0).astype(np.float32)))
    return found


def _uniform(r: np.ndarray, dev: np.ndarray, region: np.ndarray, mad_px: np.ndarray) -> bool:
    """Whether a candidate region is uniform inside: the median spread (8 x 8 block MAD) over
    its core is under :data:`models.thresholds.PLAIN_LEVEL`, measured on the reflectance as
    it is, or with the region's own smoothed change (``dev``) taken out (a spot a few blocks
    wide may pass on its own pixels instead: :func:`_spot_uniform`).

    The blocks lie on a fixed grid: a small stain that covers about half of each block it
    touches gives those blocks a MAD of half its contrast whatever its inside looks like (the
    demo wafer's 205 µm stain of -6 %: 0.029, missed; with its change taken out 0.004). Sharp
    small defects need the first form (taking out a change smoothed over 1.5 px leaves their
    edges: 0.03-0.05); texture, grains or circuitry are busy in both.
    """
    from models.thresholds import PLAIN_LEVEL, block_statistics

    core = ndimage.binary_erosion(region, iterations=4)
    if core.sum() < 8:
        core = region
    if float(np.median(mad_px[core])) < PLAIN_LEVEL:
        return True
    _, mad, _ = block_statistics(r - np.where(region, dev, 0.0).astype(np.float32), BLOCK)
    return float(np.median(_per_pixel(mad, r.shape)[core])) < PLAIN_LEVEL


#: pixels of a spot's edge left out of its inner spread (map pixels): the 1.5 px smoothing
#: that outlines a region, and the pixels a sharp edge only partly covers
SPOT_EDGE_PX = 3


def _fits_spot(region: np.ndarray) -> bool:
    """Whether a region's pixels fit in two blocks a side (a spot, see :func:`_spot_uniform`)."""
    rows, cols = np.nonzero(region)
    return bool(rows.size) and np.ptp(rows) < 2 * BLOCK and np.ptp(cols) < 2 * BLOCK


def _spot_uniform(r: np.ndarray, region: np.ndarray, ring: np.ndarray, strong: float) -> bool:
    """Whether a region of at most two blocks a side is a uniform spot: the robust spread of
    the reflectance over its pixels :data:`SPOT_EDGE_PX` or more inside its edge is under
    :data:`models.thresholds.PLAIN_LEVEL`, and their median differs from the ``ring``'s (the
    plain band around it) by ``strong`` or more.

    A sharp particle of 5-15 map pixels (20-60 mosaic pixels) spans a few blocks, each of
    which it only partly covers: their MAD is its contrast whatever its inside, and taking
    out the smoothed change leaves its edge (a 150 µm particle 58 % brighter than polished
    silicon, 5 µm pixels: missed by both forms of :func:`_uniform`, by the network at 1.25
    against the wafer's 1.30, and by :mod:`scanner.inspection.plainspots`, whose background
    window is its size). Its inside, measured on its own pixels, is as flat as the surface
    around it; a patch of fine lines is not. Measured against its own ring, the change does
    not depend on the background, which near the usable area's edge lacks a neighbourhood.
    """
    from models.thresholds import PLAIN_LEVEL

    if not _fits_spot(region):
        return False
    inside = ndimage.binary_erosion(region, iterations=SPOT_EDGE_PX)
    if inside.sum() < 4:
        return False
    # the interquartile range, not the MAD: a patch of lines holds two levels, and the MAD of
    # two levels is 0 when either has the majority
    q1, level, q3 = np.percentile(r[inside], (25, 50, 75))
    return (float(q3 - q1) / 1.349 < PLAIN_LEVEL
            and abs(float(level) - float(np.median(r[ring]))) >= strong)


def _ringed_region(labels: np.ndarray, k: int, sl: tuple[slice, slice], peak: float,
                   usable: np.ndarray, plain: np.ndarray, block_spread: np.ndarray,
                   settings: PlainSurface
                   ) -> tuple[tuple[slice, slice], np.ndarray, np.ndarray] | None:
    """Candidate ``k`` (``peak``: its largest change) in a box with room for the ring around
    it, its pixels there and the ring's (on the usable area); None when the ring is not plain
    enough or the change does not stand out of the ring's spread."""
    ring_in, ring_out = settings.ring_px
    shape = labels.shape
    r0, r1 = max(sl[0].start - ring_out - 1, 0), min(sl[0].stop + ring_out + 1, shape[0])
    c0, c1 = max(sl[1].start - ring_out - 1, 0), min(sl[1].stop + ring_out + 1, shape[1])
    box = (slice(r0, r1), slice(c0, c1))
    region = labels[box] == k
    dist = ndimage.distance_transform_edt(~region)
    ring = (dist > ring_in) & (dist <= ring_out) & usable[box]
    if ring.sum() < 8 or plain[box][ring].mean() < settings.ring_plain:
        return None
    if peak < settings.ring_contrast * float(np.median(_per_pixel_box(block_spread, box)[ring])):
        return None
    return box, region, ring


def _repeats(image: np.ndarray, box: tuple[slice, slice], region: np.ndarray,
             pitch_px: tuple[float, float], usable: np.ndarray, settings: PlainSurface
             ) -> bool | None:
    """Whether the region's patch is seen again one die away (a design structure); None when
    no neighbouring die lies in the image and on the sample there."""
    from skimage.feature import match_template

    patch = image[box].astype(np.float64)
    checked = False
    m = settings.repeat_search_px
    h, w = patch.shape
    for dr, dc in ((pitch_px[0], 0.0), (-pitch_px[0], 0.0), (0.0, pitch_px[1]),
                   (0.0, -pitch_px[1])):
        top = box[0].start + int(round(dr)) - m
        left = box[1].start + int(round(dc)) - m
        if top < 0 or left < 0 or top + h + 2 * m > image.shape[0] \
                or left + w + 2 * m > image.shape[1]:
            continue
        if not usable[top + m:top + m + h, left + m:left + m + w][region].all():
            continue  # the neighbour is off the sample there: it cannot say
        checked = True
        other = image[top:top + h + 2 * m, left:left + w + 2 * m].astype(np.float64)
        # normalised correlation at every shift within +-m (zero-mean, unit-norm both)
        best = float(match_template(other, patch).max())
        if best >= settings.repeat_correlation:
            return True
    return False if checked else None


def apply_plain_surface(anomaly: Any, found: list, threshold: float,
                        settings: PlainSurface = PlainSurface()) -> int:
    """Raise ``anomaly`` (numpy or Zarr, writable) over each found region to its score.

    Returns the number of map pixels raised.
    """
    raised = 0
    for box, region, dev in found:
        current = np.asarray(anomaly[box], dtype=np.float32)
        score = deviation_to_score(dev, settings.min_contrast, threshold)
        new = np.where(region, np.maximum(current, score), current)
        raised += int(np.count_nonzero(new > current))
        anomaly[box] = new
    return raised


def die_pitch_in_map_px(sample: Any, map_pixel_um: float) -> tuple[float, float] | None:
    """A wafer recipe's die pitch as (rows, cols) of map pixels (None: no die grid)."""
    pitch = getattr(sample, "die_pitch_mm", None)
    if getattr(sample, "kind", None) != "wafer" or not pitch:
        return None
    px, py = (float(v) * 1000.0 / map_pixel_um for v in pitch)
    if not (math.isfinite(px) and math.isfinite(py)) or min(px, py) < 4:
        return None
    return py, px
