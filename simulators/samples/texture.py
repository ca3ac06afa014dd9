"""Coordinate-deterministic textures: hashed lattice noise and the chuck background.

Every function here is a pure function of stage coordinates (and a seed): a pixel gets the same
value in every tile that sees it, so overlapping tiles agree exactly. Lattice values come from
an integer hash instead of a random generator for that reason.
"""

from __future__ import annotations

import numpy as np

_M1 = np.uint64(0x9E3779B97F4A7C15)
_M2 = np.uint64(0xC2B2AE3D27D4EB4F)
_M3 = np.uint64(0x165667B19E3779F9)
_F1 = np.uint64(0xBF58476D1CE4E5B9)
_F2 = np.uint64(0x94D049BB133111EB)

#: reflectance of the chuck (or whatever lies around the sample)
CHUCK_REFLECTANCE = 0.05


def _as_u64(a: np.ndarray) -> np.ndarray:
    """Reinterpret integers as uint64 (negative lattice indices wrap, which is what we want)."""
    return np.ascontiguousarray(a, dtype=np.int64).view(np.uint64)


def hash_uniform(ix: np.ndarray, iy: np.ndarray, seed: int) -> np.ndarray:
    """Uniform floats in [0, 1) from integer lattice coordinates (broadcast), splitmix64-style.

    Parameters
    ----------
    ix, iy : ndarray of int
        Lattice indices; they broadcast against each other.
    seed : int
        Stream selector; different seeds give independent values.

    Returns
    -------
    ndarray of float32
        One value per broadcast element.
    """
    ix, iy = np.broadcast_arrays(np.asarray(ix), np.asarray(iy))
    mask = 0xFFFFFFFFFFFFFFFF
    s = np.uint64((int(seed) * int(_M3) + 0x2545F4914F6CDD1D) & mask)  # Python ints: no overflow
    h = _as_u64(ix) * _M1 ^ _as_u64(iy) * _M2 ^ s
    h ^= h >> np.uint64(30)
    h *= _F1
    h ^= h >> np.uint64(27)
    h *= _F2
    h ^= h >> np.uint64(31)
    return ((h >> np.uint64(40)).astype(np.float32) * np.float32(1.0 / (1 << 24))).astype(
        np.float32
    )


def _lattice_weights(coords: np.ndarray, cell_um: float) -> tuple[np.ndarray, np.ndarray]:
    """Lower lattice index and smoothstep weight of each coordinate."""
    g = coords / cell_um
    i0 = np.floor(g)
    f = (g - i0).astype(np.float32)
    w = f * f * (np.float32(3.0) - np.float32(2.0) * f)  # smoothstep: no creases at lattice lines
    return i0.astype(np.int64), w


def value_noise(xs: np.ndarray, ys: np.ndarray, cell_um: float, seed: int) -> np.ndarray:
    """Smooth value noise in [0, 1] on the pixel grid ``ys x xs``.

    Hashed values on a square lattice of pitch ``cell_um`` are interpolated with smoothstep
    weights, first along x (on the few lattice rows the tile needs), then along y, so a
    1024 x 1024 tile costs two row gathers and a few multiply-adds.

    Parameters
    ----------
    xs, ys : ndarray
        1-D stage coordinates (µm) of the pixel columns and rows.
    cell_um : float
        Lattice pitch: the correlation length of the noise.
    seed : int
        Stream selector.

    Returns
    -------
    ndarray of float32, shape (len(ys), len(xs))
    """
    ix0, wx = _lattice_weights(xs, cell_um)
    iy0, wy = _lattice_weights(ys, cell_um)
    xmin, ymin = int(ix0.min()), int(iy0.min())
    lattice = (int(ix0.max()) - xmin + 2) * (int(iy0.max()) - ymin + 2)
    if lattice > 4 * (len(xs) + 1) * (len(ys) + 1):
        # a lattice finer than the pixels (a cell far below the pixel size) ran out of memory:
        # hash only the four corners each pixel uses, which gives the very same values
        def along(iy: np.ndarray) -> np.ndarray:
            return (hash_uniform(ix0[None, :], iy[:, None], seed) * (np.float32(1.0) - wx)
                    + hash_uniform(ix0[None, :] + 1, iy[:, None], seed) * wx)

        wy2 = wy[:, None]
        return along(iy0) * (np.float32(1.0) - wy2) + along(iy0 + 1) * wy2
    gx = np.arange(xmin, int(ix0.max()) + 2)
    gy = np.arange(ymin, int(iy0.max()) + 2)
    grid = hash_uniform(gx[None, :], gy[:, None], seed)
    cx = ix0 - xmin
    along_x = grid[:, cx] * (np.float32(1.0) - wx) + grid[:, cx + 1] * wx
    ry = iy0 - ymin
    wy2 = wy[:, None]
    return along_x[ry] * (np.float32(1.0) - wy2) + along_x[ry + 1] * wy2


def fractal_noise(
    xs: np.ndarray,
    ys: np.ndarray,
    pixel_size_um: float,
    octaves: list[tuple[float, float]],
    seed: int,
) -> np.ndarray:
    """Sum of zero-mean value-noise octaves, each faded out when the pixels are too coarse.

    Parameters
    ----------
    xs, ys : ndarray
        1-D pixel coordinates (µm).
    pixel_size_um : float
        Pixel size; an octave whose lattice is finer than about two pixels would only alias
        into white noise, so its amplitude fades to zero between 0.5 and 1 lattice cell per
        pixel.
    octaves : list of (cell_um, amplitude)
        Lattice pitch and peak-to-peak amplitude of each octave.
    seed : int
        Stream selector (each octave gets its own stream).

    Returns
    -------
    ndarray of float32, shape (len(ys), len(xs))
    """
    out = np.zeros((len(ys), len(xs)), dtype=np.float32)
    for k, (cell, amp) in enumerate(octaves):
        fade = float(np.clip(2.0 - 2.0 * pixel_size_um / cell, 0.0, 1.0))
        if fade <= 0.0 or amp == 0.0:
            continue
        noise = value_noise(xs, ys, cell, seed * 7919 + k)
        out += np.float32(amp * fade) * (noise - np.float32(0.5))
    return out


def chuck_background(xs: np.ndarray, ys: np.ndarray, pixel_size_um: float) -> np.ndarray:
    """Dark, faintly textured chuck seen around a sample (~0.05 reflectance).

    Parameters
    ----------
    xs, ys : ndarray
        1-D pixel coordinates (µm).
    pixel_size_um : float
        Pixel size (fine texture fades out at coarse pixels).

    Returns
    -------
    ndarray of float32, shape (len(ys), len(xs))
    """
    tex = fractal_noise(xs, ys, pixel_size_um, [(300.0, 0.025)], seed=9_000_001)
    return tex + np.float32(CHUCK_REFLECTANCE)


def over_chuck(
    img: np.ndarray, cov: np.ndarray, xs: np.ndarray, ys: np.ndarray, pixel_size_um: float
) -> np.ndarray:
    """Composite a sample image over the chuck with an anti-aliased coverage (1 = sample).

    Pixels with full coverage keep their exact values (blending them would change the last
    bit, and a tile wholly inside the sample, which skips blending, must agree with a tile
    that straddles the edge).
    """
    bg = chuck_background(xs, ys, pixel_size_um)
    return np.where(cov < 1.0, bg + (img - bg) * cov, img).astype(np.float32, copy=False)
