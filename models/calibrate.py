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

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
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


def count_components(maps: list[np.ndarray], threshold: float) -> int:
    """Connected components (8-connectivity) of ``map > threshold`` summed over maps."""
    total = 0
    for m in maps:
        above = m > threshold
        if above.any():
            total += int(label(above, connectivity=2).max())
    return total


def _logit(p: np.ndarray | float) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=float), 1e-7, 1 - 1e-7)
    return np.log(p / (1 - p))


def _sigmoid(z: float) -> float:
    return float(1.0 / (1.0 + np.exp(-z)))


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
) -> Calibration:
    """Lowest anomaly threshold with at most ``target_per_cm2`` false components per cm².

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

    Returns
    -------
    Calibration
    """
    if area_cm2 <= 0 or not maps:
        raise ValueError("calibration needs held-out maps with a positive area")
    allowed = target_per_cm2 * area_cm2
    values = np.concatenate([m.ravel() for m in maps])
    base = float(np.quantile(values, 0.9))
    peaks = component_peaks(maps, base)
    # empirical: leave the floor(allowed) highest peaks above the threshold; a component of
    # the base level may split into several as the threshold rises, so check with an exact
    # count and move up a peak at a time (peaks are in descending order) while too many
    k = int(np.floor(allowed))
    empirical = float(values.max())
    if len(peaks) <= k:  # one peak per component of the base level: few enough already
        empirical = base
    else:
        for j in range(min(k, len(peaks) - 1), -1, -1):
            t = float(peaks[j])
            if count_components(maps, t) <= allowed:
                empirical = t
                break
    threshold, extrapolated = empirical, False
    n_tail = int(min(len(peaks), tail))
    # peaks-over-threshold tail: log(rank) is close to linear in logit(peak)
    if allowed < 20 and n_tail >= 5:
        z = _logit(peaks[:n_tail])
        logn = np.log(np.arange(1, n_tail + 1))
        if np.ptp(z) > 1e-9:
            slope, icept = np.polyfit(z, logn, 1)
            if slope < 0:
                z_target = (np.log(max(allowed, 1e-6)) - icept) / slope
                candidate = min(_sigmoid(float(z_target)), 1 - 1e-6)
                if candidate > threshold:
                    threshold, extrapolated = candidate, True
    final_count = count_components(maps, threshold)
    return Calibration(
        threshold=float(threshold),
        target_per_cm2=float(target_per_cm2),
        area_cm2=float(area_cm2),
        empirical_threshold=float(empirical),
        components_at_threshold=int(final_count),
        rate_at_threshold_per_cm2=float(final_count / area_cm2),
        extrapolated=bool(extrapolated),
        tail_points=n_tail,
    )


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
    h, w = a.shape
    ph, pw = -h % block, -w % block
    padded = np.pad(a, ((0, ph), (0, pw)))
    blocks = padded.reshape((h + ph) // block, block, (w + pw) // block, block)
    inside = (blocks > 0).sum(axis=(1, 3))
    means = np.where(inside > 0, blocks.sum(axis=(1, 3)) / np.maximum(inside, 1), 1.0)
    local = ndimage.percentile_filter(means, percentile, size=span, mode="nearest")
    quiet = np.repeat(np.repeat(local < level, block, axis=0), block, axis=1)
    return quiet[:h, :w]


def calibrate_quiet(maps: list[np.ndarray], area_cm2: float, target_per_cm2: float = 1.0,
                    min_area_cm2: float = 0.5) -> Calibration | None:
    """:func:`calibrate_threshold` on the quiet parts of held-out maps (:func:`quiet_mask`).

    ``area_cm2`` is the area of all ``maps``; the quiet share of it is what the rate is per.
    ``None`` when the quiet area is under ``min_area_cm2`` (too little to count on).
    """
    quiet = [quiet_mask(m) for m in maps]
    share = sum(int(q.sum()) for q in quiet) / max(sum(q.size for q in quiet), 1)
    area = area_cm2 * share
    if area < min_area_cm2:
        return None
    return calibrate_threshold([np.where(q, m, 0.0) for m, q in zip(maps, quiet, strict=True)],
                               area, target_per_cm2)
