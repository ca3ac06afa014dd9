"""The distribution of anomaly scores on good surface, and whether recent scans drifted from it.

A model card records the scores of the held-out good surface it was calibrated on
(``good_scores``); every inspected scan records the scores of its own surface that was not
flagged (``scan.json`` -> ``inspection.good_scores``). A process that drifts (a new resist, a
worn polishing pad, another camera gain) shows up as good surface scoring higher than the
calibration's before defects are missed or invented.

The detector reads a window relative to the surface's brightness, so an image that lost light
or focus can score as the calibration did while defects go missing (the small wafer with 16 x
less light: 7 -> 3 defects found, good scores x1.0-1.07; 150 um out of focus: 7 -> 1, x1.0-1.15).
Each scan therefore also records its surface's image (:func:`image_quality`: level, noise and
sharpness), compared with the oldest scan's.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Annotated, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictInt, model_validator
from scipy import ndimage as ndi

#: quantiles recorded of the good-surface scores
QUANTILES = (0.5, 0.9, 0.99, 0.999)
#: a scan drifted when the median of its good-surface score quantiles, relative to the
#: calibration's, moved by more than this factor (the 99th percentile of good scores moves by
#: a few per cent between good scans of one product; see docs/model.md)
DRIFT_FACTOR = 1.25
#: a scan's image drifted when its level, relative noise or sharpness is beyond this factor
#: of the reference scan's. The small wafer (20 mm) scanned again (another camera and stage
#: seed): within 1.3 %; with 4 x less light the noise x1.93 (2 of its 7 defects go), 16 x
#: x3.9 (4 go); 30 um out of focus: sharpness x0.92 (1 goes), 150 um x0.28 (6 go)
IMAGE_FACTOR = 1.5
#: the quantile of the windows' sharpness recorded
SHARPNESS_QUANTILE = 0.9
#: the structure (gradient energy over the noise's share of it, at that quantile) a
#: reference scan must show for sharpness to be compared with it: a textured coupon at 4 um
#: shows 4-6 (21 with a few defects), a photograph under 1.8 % camera noise 62, a rough
#: coupon 120, die grids, PV cells and photographed products at 1-2 um 1,000 and more
MIN_STRUCTURE = 50.0
#: what :func:`image_quality` records
IMAGE_KEYS = ("level", "noise", "sharpness")
#: the verdict rests on the newest scans (a median over them: one odd scan is no drift)
RECENT = 3
#: Immerkaer's noise operator: the difference of two Laplacians, blind to a locally planar
#: (or gently curved) surface, so what it sees of a textured image is mostly its noise
_NOISE_OPERATOR = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], dtype=np.float64)
#: pixels of a window's border left out of its gradients (the filters' reach)
_MARGIN = 4


def score_summary(values: np.ndarray) -> dict[str, Any]:
    """Quantiles, mean and count of good-surface anomaly scores (finite values only)."""
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    if not v.size:
        return {"n": 0}
    q = np.quantile(v, QUANTILES)
    return {"n": int(v.size), "mean": float(v.mean()),
            **{f"q{100 * k:g}": float(x) for k, x in zip(QUANTILES, q, strict=True)}}


#: an anomaly score's statistic: a finite number >= 0, not a bool or a string (a hand-edited
#: record); the maps' scores are distances, levels or probabilities, none negative
_Score = Annotated[float, Field(ge=0, allow_inf_nan=False, strict=True)]


class GoodScores(BaseModel):
    """The record :func:`score_summary` writes (in a card and in ``scan.json``): what is read
    back is checked against it, so a damaged record is refused, never compared."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    n: Annotated[StrictInt, Field(ge=0)]
    mean: _Score | None = None
    q50: _Score | None = None
    q90: _Score | None = None
    q99: _Score | None = None
    q99_9: _Score | None = Field(None, alias="q99.9")

    @model_validator(mode="after")
    def _whole(self) -> GoodScores:
        """What :func:`score_summary` writes for scores it saw: every quantile, in order, not
        all 0 (a record edited to 0, negative or missing quantiles was compared as "x0.00"
        or "xnan", and the verdict was "no drift")."""
        if self.n == 0:
            return self
        q = [self.q50, self.q90, self.q99, self.q99_9]
        if self.mean is None or any(v is None for v in q):
            raise ValueError(f"n is {self.n} but mean, q50, q90, q99 and q99.9 are not all "
                             "given")
        if any(a > b for a, b in zip(q, q[1:], strict=False)):
            raise ValueError(f"the quantiles {q} do not rise from q50 to q99.9")
        if q[-1] <= 0:
            raise ValueError("every quantile is 0: no score to compare with")
        return self


#: a positive finite number, not a bool or a string, in a range no image reaches the ends of
#: (a level of 1e-320 made every ratio infinite)
_Positive = Annotated[float, Field(ge=1e-12, le=1e12, allow_inf_nan=False, strict=True)]


class ImageQuality(BaseModel):
    """The record :func:`image_quality` writes (``scan.json`` ``inspection.surface_image``)."""

    model_config = ConfigDict(extra="allow")

    n: Annotated[StrictInt, Field(ge=0)]
    level: _Positive | None = None
    noise: _Positive | None = None
    sharpness: _Positive | None = None
    structure: Annotated[float, Field(ge=0, allow_inf_nan=False, strict=True)] | None = None


def image_quality(windows: Sequence[np.ndarray]) -> dict[str, Any]:
    """Brightness level, relative noise and sharpness of a surface, from windows of its image.

    Parameters
    ----------
    windows : sequence of ndarray
        2-D windows (raw counts) spread over the surface. Windows darker than half the
        median window's level (a chuck, a dark surround) or holding more than 1 % of exact zeros
        (not scanned) are left out.

    Returns
    -------
    dict
        ``n`` (windows used), ``level`` (median brightness), ``noise`` (the noise's standard
        deviation over the level, estimated with Immerkaer's operator and a median absolute
        deviation: robust to edges and texture), the medians over the windows, and
        ``sharpness`` (the mean squared gradient of the image smoothed by a 1 px Gaussian, less
        what the noise contributes to it, over the level squared), the
        :data:`SHARPNESS_QUANTILE` quantile over the windows, and ``structure`` (at that
        quantile, the gradient energy above the noise's share over that share: how much
        the surface shows to measure sharpness on). ``{"n": 0}`` when no window
        shows the surface.

    Notes
    -----
    scikit-image's ``estimate_sigma`` needs PyWavelets, not a dependency here; Immerkaer's
    estimator is three lines.
    """
    kept = []
    levels = [float(np.median(w)) for w in windows if w.size]
    if not levels:
        return {"n": 0}
    typical = float(np.median(levels))
    for w in windows:
        w = np.asarray(w, dtype=np.float64)
        if min(w.shape) <= 2 * _MARGIN + 2 or np.mean(w == 0) > 0.01:  # not scanned
            continue
        level = float(np.median(w))
        if level <= 0.5 * typical:
            continue
        residual = ndi.convolve(w, _NOISE_OPERATOR)[1:-1, 1:-1]
        sigma = 1.4826 * float(np.median(np.abs(residual))) / 6.0
        smooth = ndi.gaussian_filter(w, 1.0)
        inner = (slice(_MARGIN, -_MARGIN),) * 2
        energy = float(np.mean(ndi.sobel(smooth, 0)[inner] ** 2
                               + ndi.sobel(smooth, 1)[inner] ** 2))
        noise_part = _gradient_noise_gain() * sigma ** 2
        kept.append((level, sigma / level, max(energy - noise_part, 0.0) / level ** 2,
                     max(energy - noise_part, 0.0) / max(noise_part, 1e-12)))
    if not kept:
        return {"n": 0}
    kept = np.asarray(kept)
    # sharpness where the surface shows structure: a plain window measures only its noise
    # (a 10 mm wafer of 2 mm dies at 10 um: median 0.0005, as good as zero, 90th percentile
    # 0.28, and 0.10 at 150 um out of focus)
    sharpness = float(np.quantile(kept[:, 2], SHARPNESS_QUANTILE))
    return {"n": len(kept), "level": float(np.median(kept[:, 0])),
            "noise": float(np.median(kept[:, 1])),
            "sharpness": sharpness if sharpness > 0 else None,
            "structure": float(np.quantile(kept[:, 3], SHARPNESS_QUANTILE))}


@functools.cache
def _gradient_noise_gain() -> float:
    """The mean squared gradient :func:`image_quality` measures on white noise of unit
    standard deviation (the sum of the squared impulse responses)."""
    impulse = np.zeros((17, 17))
    impulse[8, 8] = 1.0
    smooth = ndi.gaussian_filter(impulse, 1.0)
    return float((ndi.sobel(smooth, 0) ** 2).sum() + (ndi.sobel(smooth, 1) ** 2).sum())


def image_ratios(reference: dict[str, Any], scan: dict[str, Any]) -> dict[str, float]:
    """Each :data:`IMAGE_KEYS` quantity of a scan divided by the reference's.

    Sharpness is compared only when the reference shows :data:`MIN_STRUCTURE`: a ratio to
    the sharpness of a surface with little to measure it on flags any scan that shows a
    defect or another grain (a textured coupon at 4 um: its sharpness 1-8 x between good
    scans; die grids, PV cells and photographs: within 5 %). A scan whose sharpness was
    recorded as none (nothing sharp left) reads 0.
    """
    out = {k: float(scan[k]) / float(reference[k]) for k in IMAGE_KEYS
           if isinstance(scan.get(k), int | float) and isinstance(reference.get(k), int | float)
           and reference[k] > 0}
    if not sharpness_comparable(reference):
        out.pop("sharpness", None)
    elif "sharpness" not in out and "sharpness" in scan:  # recorded as none: nothing sharp
        out["sharpness"] = 0.0
    return out


def sharpness_comparable(reference: dict[str, Any]) -> bool:
    """Whether a reference's sharpness can be compared with (see :func:`image_ratios`)."""
    return isinstance(reference.get("sharpness"), int | float) and \
        float(reference.get("structure") or 0.0) >= MIN_STRUCTURE


def image_drifted(ratios: dict[str, float], factor: float = IMAGE_FACTOR) -> list[str]:
    """The quantities of :func:`image_ratios` beyond ``factor`` either way."""
    return [k for k, v in ratios.items() if not 1.0 / factor <= v <= factor]


def drift_ratios(reference: dict[str, Any], scan: dict[str, Any]) -> dict[str, float]:
    """Each recorded quantile of a scan divided by the reference's (missing ones left out)."""
    out = {}
    for key in (f"q{100 * k:g}" for k in QUANTILES):  # what score_summary records
        ref, value = reference.get(key), scan.get(key)
        if isinstance(ref, int | float) and isinstance(value, int | float) and ref > 0:
            out[key] = float(value) / float(ref)
    return out


def steady_median(values: Sequence[float]) -> float:
    """The median of ratios; of an even count, the middle one nearer 1 (no change): when
    half the scans moved and half did not, the process has not yet been seen to drift."""
    v = sorted(float(x) for x in values)
    if len(v) % 2:
        return v[len(v) // 2]
    a, b = v[len(v) // 2 - 1], v[len(v) // 2]
    return a if abs(np.log(max(a, 1e-12))) <= abs(np.log(max(b, 1e-12))) else b


def drift_verdict(reference: dict[str, Any], scans: Sequence[dict[str, Any]],
                  factor: float = DRIFT_FACTOR) -> tuple[bool, float]:
    """Whether the scans' good-surface scores moved beyond the reference's, and by what.

    The move is the :func:`steady_median` over scans of the median over quantiles of the
    ratio scan / reference (1: no change); drift when it is above ``factor`` or below
    ``1 / factor``.
    """
    moves = [float(np.median(list(r.values()))) for r in
             (drift_ratios(reference, s) for s in scans) if r]
    if not moves:
        return False, float("nan")
    move = steady_median(moves)
    return bool(move > factor or move < 1.0 / factor), move
