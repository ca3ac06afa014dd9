"""Focus measures: how sharp an image is, as one number (higher = sharper).

All measures take a 2-D image of any real dtype (uint8/uint16 camera frames are converted to
float32) and are divided by the squared mean intensity, so that they do not change with
exposure or illumination drift between the images of a Z sweep, and are comparable between
fields. They use 'valid' finite differences (no border padding), which avoids the edge
artefacts of padded filters and is several times faster than ``scipy.ndimage`` filters.

``texture_strength`` says whether a field has anything to focus on at all: the gradient
energy of the field relative to what noise alone would give (about 1 for a featureless field).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

__all__ = [
    "DEFAULT_MEASURE",
    "MEASURES",
    "NOISE_GAIN",
    "brenner",
    "estimate_noise_sigma",
    "noise_floor",
    "normalized_variance",
    "tenengrad",
    "texture_strength",
    "variance_of_laplacian",
]

# Below this mean intensity (counts) a frame is taken as dark; avoids dividing by ~0.
_DARK = 1e-6


def _as_float(image: np.ndarray) -> np.ndarray:
    img = np.asarray(image)
    if img.ndim != 2:
        raise ValueError(f"expected a 2-D image, got shape {img.shape}")
    if img.shape[0] < 5 or img.shape[1] < 5:
        raise ValueError(f"image too small for a focus measure: {img.shape}")
    # float32 halves the memory traffic of float64 and holds 16-bit values exactly
    return img.astype(np.float32, copy=False)


def _mean(a: np.ndarray) -> float:
    # float64 accumulation: a float32 running sum over 1e6 squared 16-bit values loses digits.
    return float(np.mean(a, dtype=np.float64))


def _sumsq(a: np.ndarray) -> float:
    # BLAS dot of a contiguous float32 array: ~10x faster than np.sum(a * a) and no temporary;
    # its blocked partial sums keep the relative error ~1e-6 on megapixel frames.
    flat = np.ascontiguousarray(a).ravel()
    return float(np.dot(flat, flat))


def _norm(img: np.ndarray) -> float:
    m = _mean(img)
    return max(m * m, _DARK)


# Implementation note: the measures compute one direction, reduce it and drop it before the
# next, keeping at most two frame-sized temporaries alive. With more, each call maps fresh
# memory from the OS and page faults cost 3-5x the arithmetic on 1024 x 1024 frames.


def normalized_variance(image: np.ndarray) -> float:
    """Intensity variance divided by the squared mean.

    Uses no derivative, so it weights all spatial frequencies by their power: the broadest,
    most noise-tolerant peak, but the least sharp one.

    Parameters
    ----------
    image : ndarray
        2-D image.

    Returns
    -------
    float
        ``var(I) / mean(I)**2``.
    """
    img = _as_float(image)
    m = _mean(img)
    # centred first: E[x^2] - m^2 in float32 cancels badly on low-contrast frames
    return _sumsq(img - np.float32(m)) / img.size / max(m * m, _DARK)


def _sobel_x(img: np.ndarray) -> np.ndarray:
    # separable Sobel on the valid region: smooth [1, 2, 1] down the rows, then [-1, 0, 1]
    sm = img[:-2] + img[2:]
    sm += img[1:-1]
    sm += img[1:-1]
    return sm[:, 2:] - sm[:, :-2]


def _sobel_y(img: np.ndarray) -> np.ndarray:
    sm = img[:, :-2] + img[:, 2:]
    sm += img[:, 1:-1]
    sm += img[:, 1:-1]
    return sm[2:] - sm[:-2]


def tenengrad(image: np.ndarray, threshold: float = 0.0) -> float:
    """Mean Sobel gradient energy ``gx**2 + gy**2`` divided by the squared mean.

    Parameters
    ----------
    image : ndarray
        2-D image.
    threshold : float
        Only gradient energies above ``threshold`` (in the same normalised units as the
        result, i.e. relative to ``mean(I)**2``) are summed; 0 sums all. A threshold above the
        noise energy suppresses the noise floor of the measure.

    Returns
    -------
    float
        Normalised mean gradient energy.
    """
    img = _as_float(image)
    norm = _norm(img)
    if threshold > 0:
        energy = np.square(_sobel_x(img))
        energy += np.square(_sobel_y(img))
        return _mean(np.where(energy > threshold * norm, energy, 0.0)) / norm
    gx = _sobel_x(img)
    total = _sumsq(gx)
    n = gx.size
    del gx
    total += _sumsq(_sobel_y(img))
    return total / n / norm


def brenner(image: np.ndarray) -> float:
    """Brenner gradient: mean squared difference of pixels two apart, both directions.

    The classical Brenner measure is horizontal only; summing the vertical term makes it
    independent of the orientation of the sample's lines.

    Parameters
    ----------
    image : ndarray
        2-D image.

    Returns
    -------
    float
        ``mean((I[:, x+2] - I[:, x])**2) + mean((I[y+2] - I[y])**2)`` over ``mean(I)**2``.
    """
    img = _as_float(image)
    dx = img[:, 2:] - img[:, :-2]
    total = _sumsq(dx) / dx.size
    del dx
    dy = img[2:] - img[:-2]
    total += _sumsq(dy) / dy.size
    return total / _norm(img)


def variance_of_laplacian(image: np.ndarray) -> float:
    """Variance of the 4-neighbour Laplacian divided by the squared mean.

    The most high-pass of the measures: the sharpest peak, but the most sensitive to noise.

    Parameters
    ----------
    image : ndarray
        2-D image.

    Returns
    -------
    float
        ``var(laplacian(I)) / mean(I)**2``.
    """
    img = _as_float(image)
    lap = img[:-2, 1:-1] + img[2:, 1:-1]
    lap += img[1:-1, :-2]
    lap += img[1:-1, 2:]
    lap -= 4.0 * img[1:-1, 1:-1]
    m = _mean(lap)
    var = max(_sumsq(lap) / lap.size - m * m, 0.0)
    return var / _norm(img)


MEASURES: dict[str, Callable[[np.ndarray], float]] = {
    "normalized_variance": normalized_variance,
    "tenengrad": tenengrad,
    "brenner": brenner,
    "variance_of_laplacian": variance_of_laplacian,
}

#: Chosen by ``bench/bench_focus_measures.py`` (docs/focus.md): the highest peak over its
#: noise floor on textured and sparse fields (2x Brenner's), a peak 0.6-0.75x as wide as the
#: normalised variance's, robust on low contrast where the Laplacian fails; ~3 ms on a full
#: 1024 x 1024 frame. Full frame: 2x binning widened the peak by 15-70 %, and a central crop
#: can miss the only feature of a sparse field.
DEFAULT_MEASURE = "tenengrad"

#: Value of each measure on white noise of unit sigma and unit mean: the sum of the squared
#: filter taps (Sobel pair 2 x 12, Brenner 2 x 2, Laplacian 16 + 4, variance 1). A measure's
#: noise floor on a frame is ``NOISE_GAIN[name] * sigma**2 / mean**2``.
NOISE_GAIN: dict[str, float] = {
    "normalized_variance": 1.0,
    "tenengrad": 24.0,
    "brenner": 4.0,
    "variance_of_laplacian": 20.0,
}


def noise_floor(measure: str, noise_sigma: float, mean: float) -> float:
    """The value a measure takes on a featureless frame with white noise ``noise_sigma``.

    Parameters
    ----------
    measure : str
        Name in ``MEASURES``.
    noise_sigma : float
        Pixel noise (counts).
    mean : float
        Mean intensity of the frame (counts).

    Returns
    -------
    float
        The additive noise floor of the measure (0 for unknown measures).
    """
    return NOISE_GAIN.get(measure, 0.0) * noise_sigma**2 / max(mean * mean, _DARK)


def estimate_noise_sigma(image: np.ndarray) -> float:
    """Standard deviation of the pixel noise, robust to edges and texture.

    The image is filtered with Immerkaer's kernel ``[[1,-2,1],[-2,4,-2],[1,-2,1]]`` (the
    difference of two Laplacians: zero on any quadratic intensity ramp, norm 6) and the noise
    is the median absolute response scaled to a Gaussian sigma. The median ignores sparse
    edges; dense texture at the pixel scale does inflate the estimate (it cannot be told from
    noise in one frame), which makes ``texture_strength`` err towards "featureless". With
    shot noise, whose sigma varies with intensity, this is close to the sigma at the median
    intensity. The median is taken over every 4th row (256k values on a 1024 x 1024 frame,
    a relative standard error of ~0.3 %) to keep the call at a few ms.

    Parameters
    ----------
    image : ndarray
        2-D image.

    Returns
    -------
    float
        Noise sigma in the image's units (counts).
    """
    img = _as_float(image)
    step = 4 if img.shape[0] >= 256 else 1
    rows = np.arange(1, img.shape[0] - 1, step)
    up, mid, down = img[rows - 1], img[rows], img[rows + 1]
    # separable: [1, -2, 1] down the columns, then [1, -2, 1] along the rows
    v = up + down
    v -= 2.0 * mid
    r = v[:, :-2] + v[:, 2:]
    r -= 2.0 * v[:, 1:-1]
    a = np.abs(r).ravel()
    k = a.size // 2
    # median |N(0, s)| = 0.6745 s; the kernel multiplies white noise sigma by its norm, 6
    return float(np.partition(a, k)[k]) / (0.6745 * 6.0)


def texture_strength(image: np.ndarray, noise_sigma: float | None = None) -> float:
    """How much resolvable texture a field has, relative to its noise (~1: only noise).

    The image is binned 2x2 (which keeps texture but halves the noise) and split into blocks;
    for each block the mean squared first difference (horizontal + vertical) is divided by
    what white noise of ``noise_sigma`` gives after binning. The result is the mean of the
    top 10 % of blocks, so that a field with a few features on a bare background (one
    scribe line, a finger of a solar cell) still counts as textured, while over pure noise
    the top blocks stay within ~25 % of 1 (1.15-1.25 measured on 256-1024 px frames).

    Parameters
    ----------
    image : ndarray
        2-D image.
    noise_sigma : float, optional
        Known pixel noise sigma (counts), e.g. from the camera model; estimated with
        ``estimate_noise_sigma`` when not given.

    Returns
    -------
    float
        Texture-to-noise energy ratio; ~1 for a featureless field, >> 1 for a textured one.
    """
    img = _as_float(image)
    sigma = estimate_noise_sigma(img) if noise_sigma is None else float(noise_sigma)
    h, w = (img.shape[0] // 2) * 2, (img.shape[1] // 2) * 2
    b = img[0:h:2, :w] + img[1:h:2, :w]
    b = (b[:, 0::2] + b[:, 1::2]) * np.float32(0.25)
    energy = np.square(b[:-1, :-1] - b[:-1, 1:])
    energy += np.square(b[:-1, :-1] - b[1:, :-1])
    # white noise of sigma -> sigma/2 after 2x2 binning -> each difference has variance
    # sigma**2 / 2 -> dx**2 + dy**2 expects sigma**2
    expected = max(sigma * sigma, 1e-12)
    # Blocks of 16x16 binned pixels; at least 4x4 blocks on small frames.
    bs = max(4, min(16, min(energy.shape) // 4))
    nby, nbx = energy.shape[0] // bs, energy.shape[1] // bs
    blocks = energy[: nby * bs, : nbx * bs].reshape(nby, bs, nbx, bs).sum(axis=(1, 3))
    ratios = np.sort(blocks.ravel())[::-1] / (expected * bs * bs)
    top = max(1, int(round(0.1 * ratios.size)))
    return float(np.mean(ratios[:top], dtype=np.float64))
