"""Calibration of the anomaly threshold to a false-alarm rate per cm² of good sample.

A false alarm is a connected component of the thresholded anomaly map on a good image (what
inspection would report as a defect). For a threshold ``t`` the rate is ``C(t) / A``: the number
of components above ``t`` on held-out good images over their area in cm². The threshold is the
lowest ``t`` whose rate, and the rate at every higher threshold, is at most the target.

Held-out area is small compared with 1 / target (a 512 x 512 image at 1 µm is 0.0026 cm²), so
the empirical rate alone would put the threshold at the single highest peak and say nothing about
rarer peaks. The tail is therefore extrapolated: ``log C(t)`` is close to linear in
``logit(t)`` over the top components (an exponential tail of peak scores, the usual
peaks-over-threshold model), and the threshold is where the fitted line meets the target count,
never below the empirical answer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage
from skimage import morphology
from skimage.measure import label


@dataclass
class Calibration:
    """Result of :func:`calibrate_threshold` (stored in the model card)."""

    threshold: float
    target_per_cm2: float
    area_cm2: float
    empirical_threshold: float
    components_at_threshold: int
    rate_at_threshold_per_cm2: float
    extrapolated: bool
    tail_points: int
    #: the tail's own answer where ``max_over_empirical`` lowered it (None: not lowered)
    tail_threshold: float | None = None

    def to_dict(self) -> dict:
        """JSON-serialisable dict."""
        return asdict(self)


def review_level(false_uncertainty: Sequence[float], true_uncertainty: Sequence[float],
                 ) -> float | None:
    """Uncertainty at and above which a defect is flagged for human review.

    The level that best separates false defects from true ones on held-out data: it maximises
    Youden's J, the share of false defects flagged minus the share of true defects flagged
    (ties: the highest such level, which flags least). ``None`` when either list is empty.
    """
    f = np.asarray(false_uncertainty, dtype=float)
    t = np.asarray(true_uncertainty, dtype=float)
    if f.size == 0 or t.size == 0:
        return None
    levels = np.unique(np.concatenate([f, t]))
    j = np.array([(f >= u).mean() - (t >= u).mean() for u in levels])
    best = np.flatnonzero(j >= j.max() - 1e-12)[-1]
    return float(levels[best])


#: map pixels within which inspection reports neighbouring regions as one defect
#: (``scanner.inspection.defects.extract_defects``: ``merge_px`` 24 model pixels at output stride 4)
DEFECT_MERGE_MAP_PX = 6.0


#: bands of pixel sizes (equal in log) a threshold is also calibrated in, when the held-out
#: windows span pixel sizes (the detector's, models.build, and the network's,
#: models.train_calibration)
PIXEL_BANDS = 3
#: a kind gets bands only when every band holds at least this much held-out area: at 1 um a
#: 1024 px wafer window is 0.01 cm², too little to count false alarms on
MIN_BAND_AREA_CM2 = 20.0


def pixel_bands(sizes: np.ndarray, n: int = PIXEL_BANDS) -> tuple[np.ndarray, np.ndarray]:
    """Edges of ``n`` bands of pixel sizes, equal in log from the smallest to the largest of
    ``sizes``, and each size's band (the largest falls on the last edge, into the last band)."""
    sizes = np.asarray(sizes, dtype=float)
    edges = np.geomspace(sizes.min(), sizes.max(), n + 1)
    return edges, np.minimum(np.searchsorted(edges, sizes, side="right") - 1, n - 1)


def label_defects(
    low: np.ndarray, high: np.ndarray, merge_map_px: float
) -> np.ndarray:
    """Label the defects: low-threshold regions holding a high pixel, grouped across gaps.

    Regions of ``low`` that touch no pixel of ``high`` are dropped; regions closer than
    ``merge_map_px`` are given one label. Returns int32 labels (0: background).
    """
    lab, n = ndimage.label(low, structure=np.ones((3, 3)))
    if n == 0:
        return lab.astype(np.int32)
    keep = np.zeros(n + 1, dtype=bool)
    keep[np.unique(lab[high])] = True
    keep[0] = False
    kept = keep[lab]
    del lab  # (map-sized arrays freed as soon as done with: a mosaic's map is tens of Mpx)
    radius = int(math.ceil(merge_map_px / 2))
    if radius >= 1:
        grown = ndimage.binary_dilation(kept, structure=morphology.disk(radius))
        out, _ = ndimage.label(grown, structure=np.ones((3, 3)))
        del grown
        out[~kept] = 0
    else:
        out, _ = ndimage.label(kept, structure=np.ones((3, 3)))
    return out.astype(np.int32, copy=False)



def _groups(above: np.ndarray, merge_map_px: float) -> np.ndarray:
    """Labels of ``above``: 8-connected regions, grouped as inspection groups a defect's
    fragments when ``merge_map_px`` > 0 (:func:`label_defects`)."""
    if merge_map_px > 0:
        return label_defects(above, above, merge_map_px)
    return label(above, connectivity=2)


def count_components(maps: list[np.ndarray], threshold: float,
                     merge_map_px: float = 0.0) -> int:
    """Connected components (8-connectivity) of ``map > threshold`` summed over maps.

    With ``merge_map_px`` > 0, components closer than that count as one, as inspection
    reports them (one defect per group of fragments).
    """
    total = 0
    for m in maps:
        above = m > threshold
        if above.any():
            total += int(_groups(above, merge_map_px).max())
    return total


def _logit(p: np.ndarray | float) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=float), 1e-7, 1 - 1e-7)
    return np.log(p / (1 - p))


def _sigmoid(z: float) -> float:
    return float(1.0 / (1.0 + np.exp(-z)))


#: the scale on which the tail of component peaks is close to linear in log(rank), and back
_TAIL_SCALES = {
    "probability": (_logit, lambda z: min(_sigmoid(z), 1 - 1e-6)),
    "distance": (lambda d: np.asarray(d, dtype=float), float),
}


def component_peaks(maps: list[np.ndarray], base: float) -> np.ndarray:
    """Peak score of every connected component of ``map > base``, all maps together."""
    from scipy import ndimage

    peaks = []
    for m in maps:
        lab = label(m > base, connectivity=2)
        n = int(lab.max())
        if n:
            peaks.append(np.asarray(ndimage.maximum(m, lab, np.arange(1, n + 1)), dtype=float))
    return np.sort(np.concatenate(peaks))[::-1] if peaks else np.zeros(0)


def calibrate_threshold(
    maps: list[np.ndarray],
    area_cm2: float,
    target_per_cm2: float = 1.0,
    tail: int = 40,
    merge_map_px: float = DEFECT_MERGE_MAP_PX,
    scores: str = "probability",
    max_over_empirical: float | None = None,
) -> Calibration:
    """Lowest anomaly threshold with at most ``target_per_cm2`` false defects per cm².

    A false defect is what inspection would report on a good image: a connected component of
    ``map > threshold``, with components closer than ``merge_map_px`` map pixels counted once
    (inspection reports them as one defect). Counting every fragment (0) asks for less than
    the user asked for: the model shipped until 2026-11-26 had 1.5 components per cm² on 24
    good PV-cell windows at 30 µm and 0.8-0.97 reported false defects per cm² on the
    benchmark's PV cells at that pixel size.

    Parameters
    ----------
    maps : list of ndarray
        Anomaly maps (probabilities in [0, 1]) of held-out good images.
    area_cm2 : float
        Sample area the maps cover (cm²): pixels x (pixel size)² of the input images.
    target_per_cm2 : float
        Allowed false alarms per cm².
    tail : int
        Number of highest component peaks the tail model is fitted to.
    merge_map_px : float
        Components closer than this (map pixels) count as one false defect.
    scores : {"probability", "distance"}
        What the maps hold: probabilities in (0, 1) (the tail is linear in their logit) or
        positive distances with no upper bound (the detector's: an exponential tail, linear
        in the distance itself; a power law, linear in its log, put the threshold of a model
        built from one good image four times above every score of a defective copy).
    max_over_empirical : float, optional
        The extrapolated threshold is never more than this many times the empirical one
        (the tail's own answer is kept as ``tail_threshold``).

    Returns
    -------
    Calibration
    """
    if area_cm2 <= 0 or not maps:
        raise ValueError("calibration needs held-out maps with a positive area")
    allowed = target_per_cm2 * area_cm2
    values = np.concatenate([m.ravel() for m in maps])
    base = float(np.quantile(values, 0.9))
    # candidate thresholds and the tail model come from the components' own peaks: grouped
    # at this low base level, most of a map joins a few groups (a user's brushed-metal model
    # got 0.92 from the tail fitted to group peaks, 0.77 from component peaks), so the tail
    # counts fragments, as many as or more than the defects reported
    peaks = component_peaks(maps, base)
    empirical = _empirical_threshold(maps, float(values.max()), base, peaks, allowed,
                                     merge_map_px)
    threshold, extrapolated = empirical, False
    n_tail = int(min(len(peaks), tail))
    # peaks-over-threshold tail: log(rank) is close to linear in logit(peak)
    if allowed < 20 and n_tail >= 5:
        candidate = _tail_threshold(peaks[:n_tail], allowed, scores)
        if candidate is not None and candidate > threshold:
            threshold, extrapolated = candidate, True
    tail = None
    if extrapolated and max_over_empirical is not None \
            and threshold > max_over_empirical * empirical:
        tail, threshold = threshold, max_over_empirical * empirical
    final_count = count_components(maps, threshold, merge_map_px)
    return Calibration(
        threshold=float(threshold),
        target_per_cm2=float(target_per_cm2),
        area_cm2=float(area_cm2),
        empirical_threshold=float(empirical),
        components_at_threshold=int(final_count),
        rate_at_threshold_per_cm2=float(final_count / area_cm2),
        extrapolated=bool(extrapolated),
        tail_points=n_tail,
        tail_threshold=None if tail is None else float(tail),
    )


def _empirical_threshold(maps: list[np.ndarray], top: float, base: float, peaks: np.ndarray,
                         allowed: float, merge_map_px: float) -> float:
    """The lowest component peak at which the exact count (grouped as reported) is within
    the allowance (``base`` when the base level already is, ``top``: the highest value, when
    no peak is); a component of the base level may split as the threshold rises."""
    empirical = top
    if count_components(maps, base, merge_map_px) <= allowed:  # few enough already
        empirical = base
    elif len(peaks):
        # the lowest component peak whose threshold leaves few enough; the count grows as
        # the threshold falls (a split can break that locally), so bisect rather than step
        # down a peak at a time: thousands of recounts over hundreds of maps otherwise
        def fits(j: int) -> bool:
            return count_components(maps, float(peaks[j]), merge_map_px) <= allowed

        lo, hi = -1, len(peaks) - 1  # fits(lo) (lo = -1: none), not fits(hi)
        if fits(hi):
            lo = hi
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        if lo >= 0:
            empirical = float(peaks[lo])
    return empirical


def _tail_threshold(peaks: np.ndarray, allowed: float, scores: str) -> float | None:
    """The threshold at which the tail fitted to the highest component ``peaks`` (log rank
    linear in the scale of ``scores``) leaves ``allowed`` components; None where the peaks
    are all equal or the fit does not fall."""
    forward, inverse = _TAIL_SCALES[scores]
    z = forward(peaks)
    logn = np.log(np.arange(1, len(peaks) + 1))
    if np.ptp(z) > 1e-9:
        slope, icept = np.polyfit(z, logn, 1)
        if slope < 0:
            z_target = (np.log(max(allowed, 1e-6)) - icept) / slope
            return inverse(float(z_target))
    return None


#: a neighbourhood is *quiet* where the network's local anomaly level is below this: the
#: network finds the surface around normal (bare silicon, a plain coupon). On the simulated
#: wafers the bare areas sit near 0.006 and patterned dies at 0.03-0.2
QUIET_LEVEL = 0.02
#: the neighbourhood: ``QUIET_SPAN`` x ``QUIET_SPAN`` blocks of ``QUIET_BLOCK`` x
#: ``QUIET_BLOCK`` map pixels (72 map pixels across), and the percentile of the block means
#: that must be below the level
QUIET_BLOCK = 8
QUIET_SPAN = 9
QUIET_PERCENTILE = 75.0


def quiet_mask(anomaly: np.ndarray, level: float = QUIET_LEVEL, block: int = QUIET_BLOCK,
               span: int = QUIET_SPAN, percentile: float = QUIET_PERCENTILE) -> np.ndarray:
    """Where an anomaly map's neighbourhood is quiet (the local anomaly level below ``level``).

    False alarms of a patterned surface come from its busy structure, so one threshold for a
    whole kind of sample is set by its busiest areas and is needlessly high on the plain ones
    (a wafer's bare silicon between and around the dies). With a second threshold calibrated
    on quiet areas alone, a faint stain on bare silicon is found at the same false-alarm rate.

    The local level is the ``percentile`` of block means over the neighbourhood: a defect may
    cover up to a quarter of it (at the default 75) before its own anomaly makes its
    surroundings look busy, while a pixel beside a die's structure is not quiet unless that
    structure is a small part of its neighbourhood (the median let die edges count as quiet
    and put the quiet wafer threshold at 0.86 instead of 0.75 on held-out images).

    Map pixels of 0 (outside the inspected area) do not count; a block with none inspected
    counts as busy, so the border of the usable area does not make its neighbours quiet.

    Returns
    -------
    ndarray of bool, the shape of ``anomaly``.
    """
    from scipy import ndimage

    a = np.asarray(anomaly, dtype=np.float32)
    blocks = _blocks(a, block, "constant")  # padding of 0: not inspected
    inside = (blocks > 0).sum(axis=(1, 3))
    means = np.where(inside > 0, blocks.sum(axis=(1, 3)) / np.maximum(inside, 1), 1.0)
    local = ndimage.percentile_filter(means, percentile, size=span, mode="nearest")
    return _per_pixel(local < level, block, a.shape)


def _blocks(a: np.ndarray, block: int, mode: str) -> np.ndarray:
    """``a`` padded (``np.pad`` mode) to whole blocks, as ``(rows, block, cols, block)``."""
    h, w = a.shape
    ph, pw = -h % block, -w % block
    padded = np.pad(a, ((0, ph), (0, pw)), mode=mode)
    return padded.reshape((h + ph) // block, block, (w + pw) // block, block)


def _per_pixel(per_block: np.ndarray, block: int, shape: tuple[int, ...]) -> np.ndarray:
    """A per-block array repeated over each block's pixels, cropped to ``shape``."""
    out = np.repeat(np.repeat(per_block, block, axis=0), block, axis=1)
    return out[: shape[0], : shape[1]]


#: a neighbourhood is *plain* where the image itself shows no structure: every block's
#: median absolute deviation (relative to the surface level, at map resolution) and every step
#: between neighbouring block medians (/ 3) below this. Polished bare silicon sits near 0.003,
#: rough silicon and multicrystalline cells at 0.03-0.1
PLAIN_LEVEL = 0.02


def plain_mask(image: np.ndarray, level: float = PLAIN_LEVEL, block: int = QUIET_BLOCK,
               span: int = QUIET_SPAN) -> np.ndarray:
    """Where the image's neighbourhood has no structure of its own (a plain surface).

    A refinement of :func:`quiet_mask` by the image: a neighbourhood the network finds quiet
    can still hold normal structure that it scores moderately (the corner of a large pad in
    a plain die area), which sets the quiet threshold; where the image itself is plain, a
    faint defect (a thin scratch on polished silicon) has nothing normal to be confused with,
    so a third, lower threshold can hold the same false-alarm rate. One threshold per kind
    of background is what segmented automatic thresholds of wafer inspection tools do.

    The block statistic is robust (median absolute deviation): a defect thinner than half a
    block (a scratch) leaves its own neighbourhood plain, while any block of structure in
    reach (``span`` x ``span`` blocks, their maximum) makes it not plain. Level steps
    between neighbouring block medians count too (an edge along a block boundary leaves both
    blocks uniform).

    Parameters
    ----------
    image : ndarray (H, W)
        Relative reflectance (1 = the surface level) at map resolution: the mean of each map
        pixel's input pixels (:func:`map_resolution`).
    level, block, span
        See :data:`PLAIN_LEVEL`, :data:`QUIET_BLOCK` and :data:`QUIET_SPAN`.

    Returns
    -------
    ndarray of bool, the shape of ``image``.
    """
    from scipy import ndimage

    a = np.asarray(image, dtype=np.float32)
    _, mad, step = block_statistics(a, block)
    spread = np.maximum(mad, step / 3.0)
    local = ndimage.maximum_filter(spread, size=span, mode="nearest")
    return _per_pixel(local < level, block, a.shape)


def block_statistics(image: np.ndarray, block: int = QUIET_BLOCK
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per ``block`` x ``block`` block of an image (edges replicated to whole blocks): the
    median, the median absolute deviation, and the larger step of its median to the next
    block down or right."""
    blocks = _blocks(np.asarray(image), block, "edge")
    nb_r, nb_c = blocks.shape[0], blocks.shape[2]
    blocks = blocks.transpose(0, 2, 1, 3).reshape(nb_r, nb_c, block * block)
    med = np.median(blocks, axis=2)
    mad = np.median(np.abs(blocks - med[..., None]), axis=2)
    step = np.maximum(np.abs(np.diff(med, axis=0, append=med[-1:])),
                      np.abs(np.diff(med, axis=1, append=med[:, -1:])))
    return med, mad, step


def map_resolution(image: np.ndarray, stride: int, shape: tuple[int, int]) -> np.ndarray:
    """An image mean-pooled to map pixels (``stride`` x ``stride``), padded or cropped to
    ``shape`` (the map's: windows are padded to a multiple of the stride)."""
    a = np.asarray(image, dtype=np.float32)
    h, w = a.shape
    a = np.pad(a, ((0, -h % stride), (0, -w % stride)), mode="edge")
    pooled = a.reshape(a.shape[0] // stride, stride, a.shape[1] // stride, stride).mean(
        axis=(1, 3))
    pooled = pooled[: shape[0], : shape[1]]
    return np.pad(pooled, ((0, shape[0] - pooled.shape[0]), (0, shape[1] - pooled.shape[1])),
                  mode="edge")


def calibrate_within(maps: list[np.ndarray], masks: list[np.ndarray],
                     areas_cm2: Sequence[float], target_per_cm2: float = 1.0,
                     min_area_cm2: float = 0.5) -> Calibration | None:
    """:func:`calibrate_threshold` on the masked parts of held-out maps.

    ``areas_cm2`` is each map's whole area; the rate is per cm² of masked area (each map's
    masked share of its own area: held-out images differ in pixel size). ``None`` when the
    masked area is under ``min_area_cm2`` (too little to count on).
    """
    area = sum(float(a) * float(k.mean()) for a, k in zip(areas_cm2, masks, strict=True)
               if k.size)
    if area < min_area_cm2:
        return None
    return calibrate_threshold([np.where(k, m, 0.0) for m, k in zip(maps, masks, strict=True)],
                               area, target_per_cm2)


#: plain surface *near structure* (:func:`context_masks`): the image plain within one block
#: of ``NEAR_BLOCK`` x ``NEAR_BLOCK`` map pixels (``NEAR_SPAN`` blocks across), and the
#: network's neighbourhood quiet at its ``NEAR_PERCENTILE`` (structure may fill up to half
#: of it). A scribe lane or the bare part of an edge die beside its pads is plain silicon,
#: but never *plain* in the wide sense (72 map pixels of nothing), so it had the busy
#: threshold of the dies beside it
NEAR_BLOCK = 4
NEAR_SPAN = 3
NEAR_PERCENTILE = 50.0
#: the recipe sample kinds that get it: surfaces that can be plain silicon beside structure.
#: On PV cells it was calibrated to 0.15 over 367 cm² of held-out cells (smooth grains
#: between fingers), lower than their plain threshold, and added false defects to every PV
#: scan measured (defect-free cell at 20 µm: 0.73 -> 1.06 per cm²) while finding nothing new:
#: each context holds the target on its own area, so their rates add up
NEAR_STRUCTURE_KINDS = ("wafer", "rectangle")

#: neighbourhood contexts with their own per-kind threshold, and the card entry of each
CONTEXT_CARD_KEYS = {"quiet": "thresholds_quiet_by_sample_kind",
                     "plain": "thresholds_plain_by_sample_kind",
                     "plain_near_structure": "thresholds_plain_near_structure_by_sample_kind"}
#: the contexts that read the image (the others the anomaly map only)
IMAGE_CONTEXTS = ("plain", "plain_near_structure")


def kind_contexts(kind: str) -> tuple[str, ...]:
    """The contexts a recipe sample kind gets thresholds for (plain near structure only for
    :data:`NEAR_STRUCTURE_KINDS`)."""
    return tuple(c for c in CONTEXT_CARD_KEYS
                 if c != "plain_near_structure" or kind in NEAR_STRUCTURE_KINDS)


def context_masks(anomaly: np.ndarray, image: np.ndarray | None = None
                  ) -> dict[str, np.ndarray]:
    """The map pixels of each context: ``quiet`` (:func:`quiet_mask`) and, given the image at
    map resolution (:func:`map_resolution`, relative reflectance), ``plain``
    (:func:`plain_mask`, within the quiet pixels: the network must agree) and
    ``plain_near_structure`` (the same at a finer scale: :data:`NEAR_BLOCK`).

    Each context's threshold is calibrated on its own pixels, so the finer one pays for the
    network's higher scores next to structure with a threshold of its own, between the
    plain one and the busy one: on 192 held-out wafer windows (38 cm²) it covered 6.6 cm²
    at 0.41 where *plain* covered 2.2 cm² at 0.16 and the rest had 0.90.
    """
    quiet = quiet_mask(anomaly)
    out = {"quiet": quiet}
    if image is not None:
        out["plain"] = plain_mask(image) & quiet
        out["plain_near_structure"] = (
            plain_mask(image, block=NEAR_BLOCK, span=NEAR_SPAN)
            & quiet_mask(anomaly, percentile=NEAR_PERCENTILE))
    return out


def calibrate_contexts_on(maps: list[np.ndarray], images: list[np.ndarray] | None,
                          areas_cm2: Sequence[float], target_per_cm2: float = 1.0,
                          min_area_cm2: float = 0.5, contexts: Sequence[str] | None = None
                          ) -> dict[str, Calibration | None]:
    """:func:`calibrate_within` each context of held-out maps (:func:`context_masks`).

    ``images``: the held-out images at map resolution (relative reflectance); without them
    only ``quiet`` is calibrated. ``contexts``: only these (default all). None for a context
    with too little area to count on.
    """
    masks = [context_masks(m, None if images is None else images[k])
             for k, m in enumerate(maps)]
    return {context: calibrate_within(maps, [m[context] for m in masks], areas_cm2,
                                      target_per_cm2, min_area_cm2)
            for context in masks[0]
            if contexts is None or context in contexts} if masks else {}
