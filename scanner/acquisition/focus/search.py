"""Image-based autofocus: find the Z of best focus from as few camera frames as possible.

The focus measure of a field, as a function of Z, is a symmetric peak on a noise floor (for a
band-limited texture and a Gaussian defocus blur it is close to a power of a Lorentzian in Z).
The search

1. **brackets** the peak on a coarse grid of step ``h`` (half the search span) around the start:
   three frames at ``z_start - h, z_start, z_start + h`` and then one more frame at a time
   uphill until the highest frame has a lower one on each side;
2. **interpolates** the peak from the top three frames (a parabola in the log of the measure,
   exact for a Gaussian peak) and takes its width from the curvature;
3. **refines** with a symmetric pair of frames at ``+-d`` around that estimate, ``d`` scaled to
   the measured width (a bracket frame already there stands in for one of them), and fits a
   weighted log-parabola to the frames near the peak; one more frame is taken at the fitted
   peak when the fit moved by more than ``d / 2``;
4. **judges** the peak: ``confidence`` combines the texture strength of the sharpest frame,
   the prominence of the peak over the frames on its flanks and the quality of the fit. When
   only the texture score is short (a faint fine texture fades within a fraction of the DOF,
   so the nearest frame may miss it) one frame at the fitted peak decides.

The measure's noise floor (``measures.noise_floor``, from the noise estimated on the blurriest
frame) is subtracted before any fit: it flattens the tails and biases a log fit.

Typically 6 frames from a start within +-5 depths of field. A field with nothing to focus on
(bare wafer, busbar) is recognised from its texture strength and the flatness of the measure
and refused after three frames, leaving ``z_um`` at the start.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from scanner.acquisition.focus.measures import (
    DEFAULT_MEASURE,
    MEASURES,
    estimate_noise_sigma,
    noise_floor,
    texture_strength,
)

__all__ = ["FocusResult", "autofocus"]

#: A field whose sharpest frame has a texture strength below this is featureless.
MIN_TEXTURE = 1.6
#: Relative spread of the measure (max / min - 1) below which the sampled curve counts as
#: flat, times sqrt(pixels): noise alone moves the measures by ~2 / sqrt(pixels) (one sigma),
#: so this is ~4 sigma (0.8 % on a 1024 x 1024 frame).
FLAT_CONTRAST_SQRT_N = 8.0
#: why a field with no texture above noise is refused
_FEATURELESS = "featureless field: no texture above noise"


@dataclass
class FocusResult:
    """Outcome of one autofocus.

    Attributes
    ----------
    z_um : float
        Best-focus Z when ``ok``; ``z_start`` otherwise (the caller should fall back to a
        focus map or to its neighbours rather than trust the search).
    confidence : float
        In [0, 1]: product of the texture, peak-prominence and fit-quality scores.
    n_images : int
        Frames taken (calls to ``snap_at``).
    samples : list of (float, float)
        ``(z, measure)`` of every frame, in the order taken.
    ok : bool
        Whether ``z_um`` is a trustworthy best focus.
    reason : str
        Why the search failed, or ``"ok"``.
    z_peak_um : float
        The fitted peak even when not ``ok`` (NaN when there was none), for diagnostics.
    texture : float
        ``texture_strength`` of the sharpest frame.
    """

    z_um: float
    confidence: float
    n_images: int
    samples: list[tuple[float, float]] = field(default_factory=list)
    ok: bool = False
    reason: str = ""
    z_peak_um: float = math.nan
    texture: float = math.nan


class _Sampler:
    """Takes frames through ``snap_at``, clipped to the Z range, never twice at the same Z."""

    def __init__(
        self,
        snap_at: Callable[[float], np.ndarray],
        measure: Callable[[np.ndarray], float],
        z_range: tuple[float, float],
        max_images: int,
        tol: float,
    ) -> None:
        self.snap_at = snap_at
        self.measure = measure
        self.lo, self.hi = float(z_range[0]), float(z_range[1])
        self.max_images = max_images
        self.tol = tol
        self.samples: list[tuple[float, float]] = []
        self.means: list[float] = []
        self.best_image: np.ndarray | None = None
        self.best_value = -math.inf
        self.worst_image: np.ndarray | None = None
        self.worst_value = math.inf
        self.floor_gain = 0.0  # measure floor = floor_gain / mean**2 (see noise_floor)

    @property
    def left(self) -> int:
        return self.max_images - len(self.samples)

    def clip(self, z: float) -> float:
        return min(max(z, self.lo), self.hi)

    def has(self, z: float) -> bool:
        return any(abs(z - s) <= self.tol for s, _ in self.samples)

    def take(self, z: float) -> bool:
        """Take a frame at ``clip(z)``; False when it was already sampled or out of budget."""
        z = self.clip(z)
        if self.has(z) or self.left <= 0:
            return False
        image = self.snap_at(z)
        value = float(self.measure(image))
        self.samples.append((z, value))
        self.means.append(float(np.mean(image, dtype=np.float64)))
        if value > self.best_value:
            self.best_value, self.best_image = value, image
        if value < self.worst_value:
            self.worst_value, self.worst_image = value, image
        return True

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """Z (sorted) and the measure above its noise floor (at least 1e-3 of the top)."""
        order = np.argsort([p[0] for p in self.samples])
        z = np.array([self.samples[k][0] for k in order])
        v = np.array([self.samples[k][1] for k in order])
        m = np.maximum(np.array([self.means[k] for k in order]), 1e-12)
        e = v - self.floor_gain / (m * m)
        return z, np.maximum(e, 1e-3 * max(float(e.max()), 1e-300))

    def raw_contrast(self) -> float:
        """max / min - 1 of the measure as measured (noise floor included)."""
        v = np.array([p[1] for p in self.samples])
        return float(v.max() / max(v.min(), 1e-300) - 1.0)


def _log_parabola_3(z: np.ndarray, v: np.ndarray) -> tuple[float, float]:
    """Peak and Gaussian width through three points (any spacing); (nan, nan) if not a peak."""
    y = np.log(np.maximum(v, 1e-300))
    c2, c1, _ = np.polyfit(z - z[1], y, 2)
    if not c2 < 0:
        return math.nan, math.nan
    return float(z[1] - c1 / (2 * c2)), float(math.sqrt(-1.0 / (2 * c2)))


def _fit_peak(
    z: np.ndarray, v: np.ndarray, center: float, window: float
) -> tuple[float, float, float]:
    """Weighted log-parabola fit of the frames within ``window`` of ``center``.

    Returns the peak Z, the Gaussian width and the weighted R^2 of the fit (NaNs when fewer
    than three frames or no maximum). Frames are weighted by their measure squared: the top of
    the peak is close to Gaussian, the tails are not.
    """
    sel = np.abs(z - center) <= window
    if sel.sum() < 3:
        idx = np.argsort(np.abs(z - center))[:3]
        sel = np.zeros_like(sel)
        sel[idx] = True
    if sel.sum() < 3:
        return math.nan, math.nan, math.nan
    zs, vs = z[sel], v[sel]
    y = np.log(np.maximum(vs, 1e-300))
    w = (vs / vs.max()) ** 2
    x = zs - center
    c2, c1, c0 = np.polyfit(x, y, 2, w=np.sqrt(w))
    if not c2 < 0:
        return math.nan, math.nan, math.nan
    pred = c0 + c1 * x + c2 * x * x
    ybar = np.average(y, weights=w)
    ss_tot = float(np.sum(w * (y - ybar) ** 2))
    ss_res = float(np.sum(w * (y - pred) ** 2))
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 0.0
    return float(center - c1 / (2 * c2)), float(math.sqrt(-1.0 / (2 * c2))), r2


def _bracket(s: _Sampler, h: float, max_steps: int, featureless: Callable[[], bool]) -> str:
    """Walk uphill on the grid of step ``h`` until the highest frame is an interior one.

    Returns "" when bracketed, else a reason ("range" when the peak is against a Z limit,
    "budget" when out of frames, "featureless" when ``featureless()`` says so after a step).
    """
    for step in range(max_steps):
        if step and featureless():
            return "featureless"
        z, v = s.arrays()
        i = int(np.argmax(v))
        if 0 < i < len(z) - 1:
            return ""
        target = z[-1] + h if i == len(z) - 1 else z[0] - h
        if s.clip(target) != target and s.has(s.clip(target)):
            return "range"
        if not s.take(target):
            return "budget" if s.left <= 0 else "range"
    return "budget"


def _score(x: float, lo: float, hi: float) -> float:
    """0 below ``lo``, 1 above ``hi``, linear in between."""
    return float(min(max((x - lo) / (hi - lo), 0.0), 1.0))


def autofocus(
    snap_at: Callable[[float], np.ndarray],
    z_start: float,
    depth_of_field_um: float,
    z_range: tuple[float, float],
    *,
    measure: str | Callable[[np.ndarray], float] = DEFAULT_MEASURE,
    search_span_um: float | None = None,
    max_images: int = 12,
    noise_sigma: float | None = None,
) -> FocusResult:
    """Find the Z of best focus of the field under the objective.

    Parameters
    ----------
    snap_at : callable
        ``snap_at(z)`` moves the focus drive to ``z`` (µm) and returns a 2-D frame. Called with
        Z inside ``z_range`` only, at most ``max_images`` times, in an order that mostly moves
        one way (kind to drives with backlash). The drive is left at the last frame's Z: move
        it to ``result.z_um`` afterwards.
    z_start : float
        Current (expected) focus, e.g. from a focus map or the previous tile.
    depth_of_field_um : float
        Depth of field of the objective; sets the search steps and the tolerance scale. Where
        the camera pixel (in sample space) is coarser than the optical resolution, pass the
        detector-limited depth of field ``lambda / NA**2 + pixel / NA``.
    z_range : (float, float)
        Allowed focus positions (µm).
    measure : str or callable
        A name in ``MEASURES`` or a function of an image.
    search_span_um : float, optional
        Half-width of the first bracket around ``z_start`` (default 4 depths of field). The
        search expands beyond it, one coarse step at a time, when the peak lies outside.
    max_images : int
        Hard limit on the number of frames (>= 3).
    noise_sigma : float, optional
        Known pixel noise for ``texture_strength`` (estimated from the frame otherwise).

    Returns
    -------
    FocusResult
        ``ok=False`` (and ``z_um == z_start``, ``confidence < 0.3``) for a featureless field,
        a peak against a Z limit, or a peak the frames could not bracket.
    """
    lo, hi, fn, dof, h = _checked_args(depth_of_field_um, z_range, max_images, measure,
                                       search_span_um)
    z0 = min(max(float(z_start), lo), hi)
    s = _Sampler(snap_at, fn, (lo, hi), max_images, tol=1e-3 * dof)

    # 1. bracket. Frames in increasing Z (one direction of travel).
    sigma, flat = _first_frames(s, z0, h, measure, noise_sigma)
    tex = texture_strength(s.best_image, sigma)
    if s.raw_contrast() < flat:
        if tex < MIN_TEXTURE:
            return _result(s, z_start, False, _FEATURELESS, tex=tex)
        # Textured but flat: the peak is much wider than the grid (pixel-limited depth of
        # field, or the caller's DOF too small). Widen the grid.
        h *= 3.0
        for z in (z0 - h, z0 + h):
            s.take(z)
    why = _bracket(s, h, max_images, lambda: _walk_is_noise(s, flat, sigma))
    z, v = s.arrays()
    tex = texture_strength(s.best_image, sigma)
    if why:
        return _unbracketed(s, z_start, why, z, v, tex, max_images)

    # 2. interpolate the peak from the top three frames; 3. refine around it
    zf, r2 = _refine(s, z, v, h, dof, (lo, hi))
    tex = texture_strength(s.best_image, sigma)
    if not math.isfinite(zf):
        return _result(s, z_start, False, "measure has no peak", tex=tex)
    return _judge(s, z_start, zf, r2, flat, sigma, tex)


def _checked_args(depth_of_field_um: float, z_range: tuple[float, float], max_images: int,
                  measure: str | Callable[[np.ndarray], float], search_span_um: float | None
                  ) -> tuple[float, float, Callable[[np.ndarray], float], float, float]:
    """:func:`autofocus`'s arguments checked: ``(lo, hi, measure function, dof, coarse step)``."""
    if not depth_of_field_um > 0:
        raise ValueError(f"depth_of_field_um must be > 0, got {depth_of_field_um}")
    lo, hi = float(z_range[0]), float(z_range[1])
    if not lo < hi:
        raise ValueError(f"z_range must be (min, max) with min < max, got {z_range}")
    if max_images < 3:
        raise ValueError(f"max_images must be >= 3, got {max_images}")
    if isinstance(measure, str) and measure not in MEASURES:
        raise ValueError(f"unknown measure {measure!r}; one of {sorted(MEASURES)}")
    fn = MEASURES[measure] if isinstance(measure, str) else measure
    dof = float(depth_of_field_um)
    span = 4.0 * dof if search_span_um is None else float(search_span_um)
    if not span > 0:
        raise ValueError(f"search_span_um must be > 0, got {search_span_um}")
    return lo, hi, fn, dof, span / 2.0


def _result(s: _Sampler, z_start: float, ok: bool, reason: str, z_fit: float = math.nan,
            conf: float = 0.0, tex: float = math.nan) -> FocusResult:
    """The search's outcome; a refused one keeps ``z_start`` and a confidence below 0.3."""
    z_out = z_fit if ok else float(z_start)
    conf = conf if ok else min(conf, 0.29)
    return FocusResult(z_um=z_out, confidence=float(conf), n_images=len(s.samples),
                       samples=list(s.samples), ok=ok, reason=reason, z_peak_um=z_fit,
                       texture=tex)


def _first_frames(s: _Sampler, z0: float, h: float,
                  measure: str | Callable[[np.ndarray], float], noise_sigma: float | None
                  ) -> tuple[float, float]:
    """Three frames at ``z0 - h, z0, z0 + h``; the pixel noise and the contrast below which
    the sampled measure counts as flat (the sampler's noise floor set from the noise)."""
    for z in (z0 - h, z0, z0 + h):
        s.take(z)
    # The measure's noise floor flattens the tails of the peak and biases a log fit; remove
    # it. Noise is the same in every frame of the field: estimate it on the blurriest one,
    # where texture least inflates the estimate.
    sigma = estimate_noise_sigma(s.worst_image) if noise_sigma is None else float(noise_sigma)
    if isinstance(measure, str):
        s.floor_gain = noise_floor(measure, sigma, 1.0)
    flat = max(FLAT_CONTRAST_SQRT_N / math.sqrt(s.best_image.size), 0.005)
    return sigma, flat


def _walk_is_noise(s: _Sampler, flat: float, sigma: float) -> bool:
    """Whether the bracketing walk follows noise: it finds neither texture nor a clear slope."""
    return s.raw_contrast() < 2 * flat and texture_strength(s.best_image, sigma) < MIN_TEXTURE


def _unbracketed(s: _Sampler, z_start: float, why: str, z: np.ndarray, v: np.ndarray,
                 tex: float, max_images: int) -> FocusResult:
    """The refusal when :func:`_bracket` gave up (``why``: its reason)."""
    if why == "featureless":
        return _result(s, z_start, False, _FEATURELESS, tex=tex)
    i = int(np.argmax(v))
    reason = ("focus peak at the Z range limit" if why == "range"
              else f"peak not bracketed within {max_images} images")
    return _result(s, z_start, False, reason, z_fit=float(z[i]), tex=tex)


def _refine(s: _Sampler, z: np.ndarray, v: np.ndarray, h: float, dof: float,
            z_range: tuple[float, float]) -> tuple[float, float]:
    """Peak from the bracket's top three frames, refined with a pair of frames around it
    (and one at the refit when it moved): ``(peak Z, fit R^2)``; NaN peak when none."""
    i = int(np.argmax(v))
    z1, w1 = _log_parabola_3(z[i - 1 : i + 2], v[i - 1 : i + 2])
    if not math.isfinite(z1):
        z1, w1 = float(z[i]), h
    # a symmetric pair at +-d, d ~ the peak width but inside the bracket
    d = min(max(0.6 * w1, 0.3 * dof), 0.75 * h)
    for zz in (z1 - d, z1 + d):
        if not any(abs(zz - zs) < 0.25 * d for zs, _ in s.samples):  # a bracket frame will do
            s.take(zz)
    z, v = s.arrays()
    zf, wf, r2 = _fit_peak(z, v, z1, window=max(2.0 * d, 1.01 * h))
    if math.isfinite(zf) and abs(zf - z1) > 0.5 * d and s.left > 0:
        # the first estimate was off: one frame at the new estimate, refit around it
        s.take(zf)
        z, v = s.arrays()
        zf, wf, r2 = _fit_peak(z, v, zf, window=max(2.0 * d, 1.01 * h))
    if not math.isfinite(zf):
        return zf, r2
    # the fit may not extrapolate beyond the frames around the peak
    i = int(np.argmax(v))
    zf = min(max(zf, z[max(i - 1, 0)]), z[min(i + 1, len(z) - 1)])
    return min(max(zf, z_range[0]), z_range[1]), r2


def _judge(s: _Sampler, z_start: float, zf: float, r2: float, flat: float, sigma: float,
           tex: float) -> FocusResult:
    """Confidence in the peak at ``zf`` (texture above noise, prominence over the flanks,
    fit quality) and the verdict; a frame at the peak decides a clear peak short of texture."""
    contrast = s.raw_contrast()
    c_prom = _score(contrast, flat, 0.3)
    c_fit = _score(r2, 0.5, 0.95)
    c_tex = _score(tex, MIN_TEXTURE, 2.0 * MIN_TEXTURE)
    conf = float((c_tex * c_prom * c_fit) ** (1.0 / 3.0))
    if conf < 0.3 and c_prom * c_fit > 0.25 and s.left > 0 and not s.has(zf):
        # A clear peak, but the sharpest frame is off it and shows little texture (a faint,
        # fine texture fades within a fraction of the DOF): judge the frame at the peak.
        s.take(zf)
        tex = texture_strength(s.best_image, sigma)
        c_tex = _score(tex, MIN_TEXTURE, 2.0 * MIN_TEXTURE)
        conf = float((c_tex * c_prom * c_fit) ** (1.0 / 3.0))
    if tex < MIN_TEXTURE:
        return _result(s, z_start, False, _FEATURELESS, z_fit=zf, conf=conf, tex=tex)
    if contrast < flat:
        return _result(s, z_start, False, "measure flat over the searched range", z_fit=zf,
                       conf=conf, tex=tex)
    if conf < 0.3:
        return _result(s, z_start, False, "low confidence peak", z_fit=zf, conf=conf, tex=tex)
    return _result(s, z_start, True, "ok", z_fit=zf, conf=conf, tex=tex)
