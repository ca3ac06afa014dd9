"""Versions of a good image as the microscope could show it: what a memory bank must have seen.

A clean image file (a golden image, a design rendering) lacks the microscope's blur, noise and
leftover shading; a scan of a good part shows one stage landing, one phase of the features'
stride-8 grid. Each good image enters the bank (:mod:`models.build`) as it is and as the
versions here, so that a scan of the same good part is not a defect.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .data import GoodImage

#: what a microscope does to a clean image file: the Gaussian blur (sigma, px) of its optics
#: at about Nyquist sampling (the simulated microscope's is about 2 px), and camera noise
#: (relative to the surface level). An image file enters the bank as it is and as each of
#: these; a good scan (a camera image already) as it is. Built from a clean image file alone,
#: the bank had seen neither: a scan of the same product (25 % less gradient, 1 % noise)
#: scored 4-400 times its threshold everywhere
CAMERA_VARIANTS = ((1.0, 0.01), (2.0, 0.015), (3.0, 0.02))
#: and the shading a scan keeps after its flat-field correction: a smooth gain field of this
#: relative standard deviation. A die grid scanned with 20 % vignetting kept 6 % of it (its
#: repeat confuses the flat-field estimate; p1-p99 of the gain 0.89-1.13). Built from the file
#: without it, 1,300 false defects per cm² on the scan; with 5 %, still 52 on a good scan of
#: that grid (70 on a coin grid with 2 % left): the bank must have seen more than a scan leaves
CAMERA_GAIN_STD = 0.08


def noise_sigma(image: np.ndarray) -> float:
    """Robust standard deviation of an image's pixel noise (Immerkaer, 1996: the median
    absolute response to a kernel that cancels smooth structure, on a central crop of at
    most 1024 px). Written here because skimage's ``estimate_sigma`` needs PyWavelets."""

    h, w = image.shape
    crop = np.asarray(image[max(0, h // 2 - 512) : h // 2 + 512,
                            max(0, w // 2 - 512) : w // 2 + 512], dtype=np.float32)
    if min(crop.shape) < 3:
        return 0.0
    kernel = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], dtype=np.float32)
    response = ndimage.convolve(crop, kernel, mode="reflect")[1:-1, 1:-1]
    return float(np.sqrt(np.pi / 2) * np.median(np.abs(response)) / 6.0)


def camera_variants(image: np.ndarray, rng: np.random.Generator, n: int = 3,
                    gain_std: float = CAMERA_GAIN_STD) -> list[np.ndarray]:
    """``n`` copies of an image file as a microscope would see it, cycling through
    :data:`CAMERA_VARIANTS`: blurred by the optics, shaded by a smooth random gain field of
    relative standard deviation ``gain_std`` (0: none) and with shot-like noise (proportional
    to the square root of the signal) added up to the level (less what the blurred copy
    already has)."""

    out = []
    for i in range(n):
        sigma_px, level = CAMERA_VARIANTS[i % len(CAMERA_VARIANTS)]
        blurred = ndimage.gaussian_filter(image, sigma_px, mode="reflect")
        if gain_std:
            blurred = blurred * gain_field(image.shape, gain_std, rng)
        add = float(np.sqrt(max(level**2 - noise_sigma(blurred) ** 2, 0.0)))
        root = np.sqrt(np.clip(blurred, 0.0, None))
        out.append((blurred + root * rng.normal(0.0, add, image.shape)).astype(np.float32))
    return out


#: what differs between two scans of one part, beyond what one scan shows: another exposure's
#: noise, a flat-field estimated anew from other tiles (a smooth gain error of this relative
#: standard deviation over about ``SCAN_GAIN_SCALE_PX``) and a slightly different focus (blur
#: sigma, px). A good scan enters the bank as it is and as each of these. Built from the scan
#: as it is, a die grid's bank covered its own repeats down to the noise of one exposure: a
#: second scan of the same good part (another seed: noise, landing, flat-field) scored at the
#: held-out 99th percentile on its median cell and was flagged whole
SCAN_VARIANTS = ((0.0, 0.02), (0.7, 0.02), (1.2, 0.03))
SCAN_GAIN_SCALE_PX = 256


def gain_field(shape: tuple[int, int], std: float, rng: np.random.Generator) -> np.ndarray:
    """A smooth random gain field ``1 + e`` (``e`` of about ``std``, varying over about
    :data:`SCAN_GAIN_SCALE_PX`): a flat-field error or left-over shading."""

    h, w = shape
    coarse = rng.normal(0.0, std, (h // SCAN_GAIN_SCALE_PX + 2, w // SCAN_GAIN_SCALE_PX + 2))
    zoomed = ndimage.zoom(coarse, (h / coarse.shape[0], w / coarse.shape[1]), order=3,
                          grid_mode=True, mode="nearest")
    return (1.0 + zoomed[:h, :w]).astype(np.float32)


def scan_variants(image: np.ndarray, rng: np.random.Generator, n: int = 3, first: int = 0
                  ) -> list[np.ndarray]:
    """``n`` copies of an acquired image as another scan could show it, cycling through
    :data:`SCAN_VARIANTS` from its ``first`` entry: blurred by ``sigma`` px, multiplied by a
    smooth random gain field and given another exposure's noise (the image's own noise
    level, measured by :func:`noise_sigma`, added independently)."""

    out = []
    sigma_n = noise_sigma(image)
    for i in range(first, first + n):
        sigma_px, gain_std = SCAN_VARIANTS[i % len(SCAN_VARIANTS)]
        blurred = ndimage.gaussian_filter(image, sigma_px, mode="reflect") if sigma_px else image
        noisy = blurred * gain_field(image.shape, gain_std, rng) + rng.normal(
            0.0, sigma_n, image.shape)
        out.append(noisy.astype(np.float32))
    return out



@dataclass
class Variant:
    """One version of a good image: the bank learns from it, the calibration scores it, or both."""

    image: np.ndarray
    usable: np.ndarray | None
    bank: bool
    held: bool


#: sub-stride shifts (rows, columns; px) of the versions of a golden image. Features at stride
#: 8 depend on where a structure falls in its cell: a die grid whose pitch is a multiple of
#: 8 px shows one phase only, and a second scan landing 2 px further (another stage landing,
#: another stitch) scored at the held-out 99th percentile on its median cell, the whole part
#: flagged. The bank learns the phases on a 4 px grid; the calibration scores versions half
#: way between them (the worst case a scan can bring)
BANK_SHIFTS = ((4, 0), (0, 4), (4, 4))
HELD_SHIFTS = ((2, 2), (6, 6), (2, 6))


def _shifted(image: GoodImage, version: np.ndarray, dy: int, dx: int, bank: bool) -> Variant:
    usable = None if image.usable is None else np.asarray(image.usable)[dy:, dx:]
    return Variant(np.ascontiguousarray(version[dy:, dx:]), usable, bank, not bank)


def variants_of(image: GoodImage, augment: bool, rng: np.random.Generator, index: int = 0,
              held_out: bool = False) -> list[Variant]:
    """The versions of one good image the bank and the calibration see.

    A golden image (``augment``): the image as it is and :data:`BANK_SHIFTS` versions for the
    bank, :data:`HELD_SHIFTS` versions for the calibration, each shifted version perturbed as
    a scan would differ (:func:`scan_variants` for an acquired image, :func:`camera_variants`
    for a file). Many crops of one scan (acquired, not augmented): one version each, the
    ``index``-th image at the next phase in turn (the bank's for a bank image, half way
    between them for a ``held_out`` one), so that the phases cost no more than the crops.
    Otherwise the image as it is, for both.
    """
    if not augment:
        if not image.meta.get("acquired", False):
            return [Variant(image.image, image.usable, True, True)]
        shifts = HELD_SHIFTS if held_out else ((0, 0), *BANK_SHIFTS)
        dy, dx = shifts[index % len(shifts)]
        if (dy, dx) == (0, 0):
            return [Variant(image.image, image.usable, True, True)]
        version = scan_variants(image.image, rng, 1, first=index)[0]
        v = _shifted(image, version, dy, dx, bank=True)
        v.held = True  # the whole image is one role or the other: bank or held out
        return [v]
    perturb = scan_variants if image.meta.get("acquired", False) else camera_variants
    out = [Variant(image.image, image.usable, True, False)]
    shifts = [(s, True) for s in BANK_SHIFTS] + [(s, False) for s in HELD_SHIFTS]
    versions = perturb(image.image, rng, len(shifts))
    for ((dy, dx), bank), version in zip(shifts, versions, strict=True):
        out.append(_shifted(image, version, dy, dx, bank))
    return out
