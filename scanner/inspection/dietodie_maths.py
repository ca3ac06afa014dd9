"""The image maths of the die-to-die comparison (:mod:`scanner.inspection.dietodie`).

Phase correlation of a block or a whole (coarsened) die, the brightness levels matched
between dies, the z-score of a test die's difference from its references at a few
scales (:func:`difference_z`) and of its loss or gain of fine texture (:func:`texture_z`).
"""

from __future__ import annotations

import functools
import math

import numpy as np
from scipy import ndimage


@functools.lru_cache(maxsize=8)
def _hann(shape: tuple[int, int]) -> np.ndarray:
    from skimage.filters import window

    return window("hann", shape)


def block_shift(fixed: np.ndarray, moving: np.ndarray, max_shift_px: float) -> np.ndarray | None:
    """Shift ``(dy, dx)`` that aligns ``moving`` onto ``fixed`` (None: no reliable estimate).

    Phase correlation with 1/10 pixel precision (``skimage.registration``) of the two blocks
    smoothed (Gaussian sigma 2 pixels): a grating finer than a few pixels, common in a die,
    matches itself one period off as well as at the true shift, while the coarser structure
    around it does not. A Hann window keeps the block's borders from biasing the estimate
    (0.3 pixel without it, under 0.1 with it, on a test pattern). Featureless blocks give no
    estimate.
    """
    # at half resolution (2 x 2 means, then sigma 1: the same smoothing as sigma 2 at full
    # resolution) for a quarter of the cost; the estimate is doubled back
    f = ndimage.gaussian_filter(_mean_pool(fixed.astype(np.float32), 2), 1.0)
    m = ndimage.gaussian_filter(_mean_pool(moving.astype(np.float32), 2), 1.0)
    shift = _correlate(f, m, upsample=20)
    if shift is None:
        return None
    shift = 2.0 * shift
    if not np.all(np.isfinite(shift)) or np.max(np.abs(shift)) > max_shift_px:
        return None
    return shift


def _correlate(fixed: np.ndarray, moving: np.ndarray, upsample: int) -> np.ndarray | None:
    """Phase-correlation shift of two equal images, Hann-windowed (None: one is featureless)."""
    from skimage.registration import phase_cross_correlation

    if fixed.std() < 1e-6 * (abs(fixed.mean()) + 1) or moving.std() < 1e-6 * (
            abs(moving.mean()) + 1):
        return None
    hann = _hann(fixed.shape)
    shift, _, _ = phase_cross_correlation((fixed - fixed.mean()) * hann,
                                          (moving - moving.mean()) * hann,
                                          upsample_factor=upsample, normalization=None)
    return np.asarray(shift, dtype=np.float64)


def median_of(images: np.ndarray) -> np.ndarray:
    """The pixelwise median of ``k`` aligned images ``(k, h, w)`` (float).

    Three or four images (a die's usual references): the sum less the smallest and the
    largest, over ``k - 2``; 20 x faster than ``np.median``'s partition along the first axis
    (a band of 4 x 1044 x 1044: 57 ms -> 3 ms) and equal to it up to float rounding.
    """
    k = images.shape[0]
    if k in (3, 4):
        return (images.sum(axis=0) - images.min(axis=0) - images.max(axis=0)) \
            / np.asarray(k - 2, dtype=images.dtype)
    return np.median(images, axis=0)


def _mean_pool(a: np.ndarray, f: int) -> np.ndarray:
    """``f x f`` block means over the last two axes, ``f`` a power of two (edges replicated).

    Done as repeated 2 x 2 means of four strided views: several times faster than a
    reshaped ``mean`` over two non-adjacent axes.
    """
    while f > 1:
        h, w = a.shape[-2:]
        if h % 2 or w % 2:
            a = np.pad(a, [(0, 0)] * (a.ndim - 2) + [(0, h % 2), (0, w % 2)], mode="edge")
        a = 0.25 * (a[..., ::2, ::2] + a[..., 1::2, ::2] + a[..., ::2, 1::2] + a[..., 1::2, 1::2])
        f //= 2
    return a


def _blown_up(a: np.ndarray, f: int, shape: tuple[int, ...]) -> np.ndarray:
    """A map computed on ``f x f`` block means (:func:`_mean_pool`) back on the pixels of
    ``shape``: each value repeated over its block."""
    if f == 1:
        return a
    return np.repeat(np.repeat(a, f, axis=0), f, axis=1)[: shape[0], : shape[1]]


def extreme_filter(a: np.ndarray, size: int, op: np.ufunc) -> np.ndarray:
    """``scipy.ndimage.minimum_filter(a, size)`` (``op`` ``np.minimum``) or
    ``maximum_filter`` (``np.maximum``) of a 2-D image: the same values (a minimum or a
    maximum is exact whatever the order it is taken in), 3-4 times faster; scipy's own
    for an image with NaN (whose result depends on the order).

    scipy's filter takes 10-20 ns a pixel whatever ``size``; here the image is mirrored by
    ``size // 2`` (scipy's ``reflect``) and each axis reduced by running extremes over
    doubling windows (1, 2, 4, ... then the remainder): ``log2(size) + 1`` whole-array
    ``op`` calls per axis.
    """
    h = size // 2
    if a.ndim != 2 or size < 2 or min(a.shape) <= h or np.isnan(a).any():
        fn = ndimage.minimum_filter if op is np.minimum else ndimage.maximum_filter
        return fn(a, size)
    out = np.pad(a, h, mode="symmetric")
    for axis in (0, 1):
        n = out.shape[axis] - 2 * h

        def cut(x: np.ndarray, start: int, length: int, axis: int = axis) -> np.ndarray:
            return x[start:start + length] if axis == 0 else x[:, start:start + length]

        w = 1
        while 2 * w <= size:  # out[i] = op of the w values from i on
            m = out.shape[axis] - w
            out = op(cut(out, 0, m), cut(out, w, m))
            w *= 2
        if w < size:
            out = op(cut(out, 0, n), cut(out, size - w, n))
        else:
            out = cut(out, 0, n)
    return out


def match_levels(test: np.ndarray, refs: np.ndarray, mask: np.ndarray | None = None
                 ) -> tuple[float, np.ndarray]:
    """The test's level (median) and the references scaled to it (a float32 copy): the
    illumination drifts between dies.

    Each reference's gain is the median of the pixel ratios test / reference (every 4th
    pixel of ``mask``; all when None) over the pixels the other references show brightest
    (their median above its own median). Not the ratio of the images' medians: the median
    of a design of two levels (lines on a dark ground) jumps between them with the window
    (a window of 270 px on a circuit die: medians 5 % apart between dies whose pixels
    agreed within 0.5 %, and a particle's z fell from 13 to 4). Nor sums: a window that
    reaches where a reference shows something else (another die's edge, the wafer's rim)
    moves a sum, not a median (gains 8 % apart on one large window). The bright pixels
    are chosen by the other references, not by this one: chosen by its own noise they are
    those where it reads high, and the gain is biased low (1 % on bare silicon). The
    median is taken again without the ratios far from it (a tenth of a window on the chuck
    moved it 0.4 %). A reference or test of level <= 0 is left as it is.
    """
    sample = (slice(None, None, 4), slice(None, None, 4))
    inside = mask[sample] if mask is not None else np.ones(test[sample].shape, dtype=bool)
    refs = refs.astype(np.float32)
    if not inside.any():
        return 0.0, refs
    t = test[sample][inside]
    level_t = float(np.median(t))
    if level_t <= 0:
        return level_t, refs
    sampled = np.stack([r[sample][inside] for r in refs])
    k = len(refs)
    for i in range(k):
        r = sampled[i]
        others = np.median(np.delete(sampled, i, axis=0), axis=0) if k > 1 else t
        pick = (others > np.median(others)) & (r > 0)
        if np.count_nonzero(pick) < 8:
            pick = r > 0
        if np.count_nonzero(pick) >= 8:
            ratio = t[pick] / r[pick]
            centre = np.median(ratio)
            spread = 1.4826 * np.median(np.abs(ratio - centre))
            if spread > 0:  # again without outliers: a defect, another die's edge, the chuck
                ratio = ratio[np.abs(ratio - centre) <= 3.0 * spread]
            refs[i] *= np.float32(np.median(ratio))
    return level_t, refs


def difference_z(test: np.ndarray, refs: np.ndarray, scales_px: tuple[float, ...],
                 tolerance_px: int = 4, mask: np.ndarray | None = None) -> np.ndarray:
    """Z-score of the test image's difference from aligned references.

    Parameters
    ----------
    test : ndarray, shape (h, w)
        The die region under test.
    refs : ndarray, shape (k, h, w)
        The same region of ``k >= 2`` reference dies, aligned to ``test``.
    scales_px : tuple of float
        Gaussian sigmas of the smoothing scales (pixels of ``test``).
    tolerance_px : int
        Local misalignment tolerated (pixels): the half-width of the references' envelope.
    mask : ndarray of bool, shape (h, w), optional
        The test pixels to compare (a die cut by the wafer's edge): elsewhere the references'
        median stands in for the test, so nothing there differs, and z is 0.

    Returns
    -------
    ndarray, shape (h, w), float32
        The largest ``|excess| / noise`` over the scales, where the excess is how far the
        smoothed test lies outside the envelope of the smoothed references (0 inside).
    """
    test, refs, level_t = matched(test, refs, mask)
    return _difference_z(test, refs, level_t, scales_px, tolerance_px, mask)


def matched(test: np.ndarray, refs: np.ndarray, mask: np.ndarray | None
            ) -> tuple[np.ndarray, np.ndarray, float]:
    """The test (float32; outside ``mask`` the references' median stands in for it, so
    nothing there differs), the references scaled to its level (:func:`match_levels`) and
    that level: what :func:`difference_z` and :func:`texture_z` compare."""
    test = np.asarray(test, dtype=np.float32)
    level_t, refs = match_levels(test, refs, mask)
    if mask is not None:
        test = np.where(mask, test, median_of(refs))
    return test, refs, level_t


def _local_noise(r: np.ndarray, size: int, mean: np.ndarray | None = None) -> np.ndarray:
    """How much ``k`` aligned references ``r`` differ from one another around each pixel:
    their unbiased variance averaged over ``size`` x ``size``, as the standard deviation of
    a test minus the references' median (about ``1 + pi / (2k)`` times one die's variance).
    ``mean``: ``r.mean(axis=0)``, when already computed."""
    k = r.shape[0]
    dev = r - (r.mean(axis=0) if mean is None else mean)
    var = np.square(dev, out=dev).sum(axis=0) / (k - 1)
    # (a running mean of a variance may dip a rounding error under 0 beside bright pixels)
    var = np.maximum(ndimage.uniform_filter(var, size), 0.0)
    return np.sqrt(var * (1.0 + math.pi / (2 * k)))


#: the difference in sampling phase between dies tolerated (mosaic pixels): the camera samples
#: each die at its own sub-pixel phase, and a small bright feature centred on a pixel peaks
#: higher than one centred between pixels (a point source blurred by the optics: by up to
#: 20-30 %). The +-tolerance_px envelope covers a shift of an edge, not a brighter peak; and
#: references sampled alike agree closely there (four did within 0.2 % on a galaxy of a
#: Hubble-field die grid), so their spread says nothing of it: a test peak 2 % brighter scored
#: z 9. 0.3 px: 0.4 and 0.5 broke a faint scratch across a simulated wafer's circuitry into
#: pieces (where it crosses the design's edges), 0.3 kept it whole and cleared the galaxy.
PHASE_TOLERANCE_PX = 0.3


def _phase_noise(r: np.ndarray, size: int, f: int, mean: np.ndarray | None = None
                 ) -> np.ndarray:
    """How far the references' peaks and valleys may move with a sampling phase of
    :data:`PHASE_TOLERANCE_PX`: ``eps^2 / 2 |laplacian|`` of their mean (second order: at an
    extremum the first-order change vanishes), the largest over the envelope's ``size`` x
    ``size`` window; ``f``: the images' pixel in mosaic pixels. Zero on flat surfaces, so a
    thin scratch there keeps its z (a tolerance of 1 px of blur, tried first, broke a faint
    scratch of a simulated wafer into four pieces). ``mean``: ``r.mean(axis=0)``, when
    already computed."""
    eps = PHASE_TOLERANCE_PX / f
    curvature = np.abs(ndimage.laplace(r.mean(axis=0) if mean is None else mean))
    return np.float32(0.5 * eps * eps) * extreme_filter(curvature, size, np.maximum)


#: a reference that departs from the references' median at a pixel this many times more than
#: the others do on average, and by more than :data:`ODD_REFERENCE_LEVEL` of the level, is left
#: out there (:func:`_without_odd_reference`)
ODD_REFERENCE_RATIO = 4.0
ODD_REFERENCE_LEVEL = 0.02


def _without_odd_reference(r: np.ndarray, level: float) -> np.ndarray:
    """Smoothed references ``(k, h, w)``, each pixel where one departs from their median far
    more than the others do replaced there by that median.

    A reference die with a defect of its own where the test has one (a faint stain wider
    than a die, a particle) widens the envelope and the noise the test is judged by: the
    test's defect lies inside what that one reference shows and is not seen. With at least
    three references the odd one is outvoted, as fab tools arbitrate between neighbours.
    """
    k = r.shape[0]
    med = median_of(r)
    dev = np.abs(r - med)
    # the largest deviation by a running maximum (an argmax and a gather over the first
    # axis cost five times as much); which reference it is, only where one is odd
    top = dev.max(axis=0)
    rest = (dev.sum(axis=0) - top) / (k - 1)
    odd = top > ODD_REFERENCE_RATIO * rest + ODD_REFERENCE_LEVEL * max(abs(level), 1.0)
    if not odd.any():
        return r
    r = r.copy()
    rows, cols = np.nonzero(odd)
    r[dev[:, rows, cols].argmax(axis=0), rows, cols] = med[rows, cols]
    return r


def _difference_z(test: np.ndarray, refs: np.ndarray, level_t: float,
                  scales_px: tuple[float, ...], tolerance_px: int,
                  mask: np.ndarray | None, arbitrate: bool = False) -> np.ndarray:
    """:func:`difference_z` of a test and references already :func:`matched`; with
    ``arbitrate`` (and three references or more) a reference odd at a pixel is left out
    there (:func:`_without_odd_reference`)."""
    k = refs.shape[0]
    floor = 1e-3 * max(abs(level_t), 1.0)  # noiseless (synthetic) images
    z = np.zeros(test.shape, dtype=np.float32)
    # the block means of each factor, each made from the last (``_mean_pool`` halves in
    # steps, so the 4 x 4 means are the 2 x 2 means' 2 x 2 means either way)
    pooled = {1: (test, refs)}
    for s in scales_px:
        # coarse scales are computed on block means (2 x 2 from sigma 1.5, 4 x 4 from 3.5):
        # the same smoothing at a quarter or a sixteenth of the cost
        f = 1 if s < 1.5 else 2 if s < 3.5 else 4
        if f not in pooled:
            g = max(p for p in pooled if p < f)
            pooled[f] = tuple(_mean_pool(a, f // g) for a in pooled[g])
        tp, rp = pooled[f]
        # compared at each scale after smoothing all images alike: a faint wide stain is a
        # mean shift that shows at a coarse scale, while a fine grating that differs from
        # die to die only in its sampling (or focus) averages out there
        t = ndimage.gaussian_filter(tp, s / f, truncate=2.5)
        r = ndimage.gaussian_filter(rp, s / f, truncate=2.5, axes=(-2, -1))
        if arbitrate and k >= 3:
            r = _without_odd_reference(r, level_t)
        # the envelope of every reference's neighbourhood: a pixel differs only when it lies
        # outside what all the references show nearby (arbitration over the neighbours;
        # tolerates residual misalignment, e.g. stitching offsets where tiles overlap on
        # featureless areas and registration could not correct the stage)
        size = 2 * int(math.ceil(tolerance_px / f)) + 1
        lo = extreme_filter(r.min(axis=0), size, np.minimum)
        hi = extreme_filter(r.max(axis=0), size, np.maximum)
        excess = t - np.clip(t, lo, hi)
        # the local noise at this scale: how much the references differ from one another
        # around each pixel. Surface texture, grain and residual misalignment vary across a
        # die, so one noise level per die would flag every textured area; a defect in the
        # test die does not raise its own noise estimate, as the references lack it
        mean = r.mean(axis=0)
        noise = _local_noise(r, 2 * int(round(max(4.0, 3.0 * s) / f)) + 1, mean) + floor
        if PHASE_TOLERANCE_PX > 0:
            noise = np.hypot(noise, _phase_noise(r, size, f, mean))
        np.maximum(z, _blown_up(np.abs(excess) / noise, f, test.shape), out=z)
    if mask is not None:
        z[~mask] = 0.0
    return z


#: Gaussian sigmas (pixels) of the texture energy: detail finer than the first, averaged over
#: the second
TEXTURE_DETAIL_PX = 1.5
TEXTURE_WINDOW_PX = 4.0
#: local misalignment the texture comparison tolerates (pixels): energy is nearly shift-invariant
TEXTURE_TOLERANCE_PX = 2
#: the least spread of log-energy between dies (a noise floor for dies that agree exactly)
TEXTURE_MIN_SPREAD = 0.05


def texture_energy(image: np.ndarray, f: int = 1) -> np.ndarray:
    """Local energy of an image's fine detail: ``G_w((I - G_d(I))**2)`` (float32).

    ``f`` 2: the energy at half resolution (``f x f`` means of the squared detail, then the
    Gaussian that makes up ``G_w``): the window is 8 pixels wide, so the energy holds nothing
    finer than 2 pixels, and this costs a third as much (die-to-die's texture z on 16 bands of
    the demo wafer: 3.4 -> 1.2 s, the largest z within 0.4 of the full-resolution one).
    """
    a = np.asarray(image, dtype=np.float32)
    axes = (-2, -1)  # (several images ``(k, h, w)`` at once)
    detail = a - ndimage.gaussian_filter(a, TEXTURE_DETAIL_PX, axes=axes)
    if f == 1:
        return ndimage.gaussian_filter(detail * detail, TEXTURE_WINDOW_PX, axes=axes)
    # a block mean of f pixels has a variance of (f^2 - 1) / 12 pixels^2 along each axis
    sigma = math.sqrt(TEXTURE_WINDOW_PX ** 2 - (f * f - 1) / 12.0) / f
    return ndimage.gaussian_filter(_mean_pool(detail * detail, f), sigma, axes=axes)


def texture_z(test: np.ndarray, refs: np.ndarray, mask: np.ndarray | None = None
              ) -> np.ndarray:
    """Z-score of the test's loss of fine-texture energy against its aligned references'.

    A patch where the design or the texture is missing (filled flat, or with the surface's
    level) changes a region's mean little and lies inside the references' local
    minimum-maximum envelope, which :func:`difference_z` tolerates as misalignment: a flat
    patch in grass scored z 4-5 there against a threshold of 7, and 26-38 here. The energy of
    the detail, unlike the intensity, hardly changes when a die is off by a pixel, so the
    references are compared in log-energy (relative: illumination and gain cancel) within a
    small envelope (:data:`TEXTURE_TOLERANCE_PX`), divided by how much the references' log
    energies differ around the pixel.

    Parameters
    ----------
    test : ndarray, shape (h, w)
        The die region under test.
    refs : ndarray, shape (k, h, w)
        The same region of ``k >= 2`` reference dies, aligned to ``test``.
    mask : ndarray of bool, shape (h, w), optional
        The test pixels to compare (elsewhere z is 0), as in :func:`difference_z`.

    Returns
    -------
    ndarray, shape (h, w), float32
    """
    test, refs, level_t = matched(test, refs, mask)
    return _texture_z(test, refs, level_t, mask)


def _texture_z(test: np.ndarray, refs: np.ndarray, level_t: float, mask: np.ndarray | None
               ) -> np.ndarray:
    """:func:`texture_z` of a test and references already :func:`matched`."""
    # (1 % of the level)^2: camera noise; flat areas of every die meet at this floor
    floor = np.float32(1e-4 * max(abs(level_t), 1.0) ** 2)
    f = 2  # compared at half resolution: see texture_energy
    lt = np.log(texture_energy(test, f) + floor)
    lr = np.log(texture_energy(refs, f) + floor)
    size = 2 * (TEXTURE_TOLERANCE_PX // f) + 1
    lo = extreme_filter(lr.min(axis=0), size, np.minimum)
    # only a loss of detail: added detail (a particle, a scratch) is what the intensity z
    # sees, and sharply located there, while the energy's window spreads it by ~8 px
    loss = np.maximum(lo - lt, 0.0)
    noise = _local_noise(lr, 2 * int(round(3 * TEXTURE_WINDOW_PX / f)) + 1) \
        + TEXTURE_MIN_SPREAD
    z = _blown_up((loss / noise).astype(np.float32), f, test.shape)
    if mask is not None:
        z[~mask] = 0.0
    return z


def coarse_die(die: np.ndarray) -> tuple[np.ndarray, int]:
    """A whole die reduced to about 128-256 pixels a side for :func:`global_shift`, and the
    reduction factor.

    Each halving is preceded by a Gaussian of 1.5 pixels (a Gaussian pyramid): plain 2 x 2
    means alias a grating finer than the reduced grid into a moiré that phase correlation
    locks onto (a die of 8.5 px line gratings at 6 um pixels: whole dies 8-13 px off, every
    pad and border a false defect).
    """
    a = np.asarray(die, dtype=np.float32)
    f = 1
    while min(die.shape) // (2 * f) >= 128:
        a = _mean_pool(ndimage.gaussian_filter(a, 1.5), 2)
        f *= 2
    return a, f
