"""Image formation in the simulated camera: optics blur, photon and read noise, digitisation."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage, special


@dataclass(frozen=True)
class CameraModel:
    """Sensor parameters of the simulated camera.

    A reflectance of 1.0 fills 80 % of the full well at the reference exposure; other
    exposures scale the signal linearly.

    The physical imperfections are truths of the simulator that a real system only knows by
    calibration: ``vignetting`` (fractional illumination loss at the sensor corners),
    ``rotation_deg`` (sensor columns against the stage x axis, counter-clockwise in image
    coordinates) and ``pixel_size_error`` (true pixel pitch = nominal * (1 + error)). The nominal
    ``pixel_size_um`` is what Micro-Manager reports.
    """

    width: int = 1024
    height: int = 1024
    pixel_size_um: float = 1.0
    bit_depth: int = 12
    exposure_ref_ms: float = 10.0
    readout_ms: float = 20.0
    full_well_e: float = 10000.0
    read_noise_e: float = 5.0
    noise: bool = True
    vignetting: float = 0.0
    rotation_deg: float = 0.0
    pixel_size_error: float = 0.0

    @property
    def true_pixel_size_um(self) -> float:
        """Pixel pitch really imaged at the sample (the nominal one is ``pixel_size_um``)."""
        return self.pixel_size_um * (1.0 + self.pixel_size_error)

    def vignetting_gain(self) -> np.ndarray:
        """Relative illumination of each pixel: 1 on the optical axis, ``1 - vignetting`` at the
        sensor corners.

        The falloff is the ``cos**4`` law of a lens, ``1 / (1 + a rho**2)**2`` with ``rho`` the
        distance from the centre in half-diagonals and ``a`` chosen for the corner value.
        """
        if self.vignetting <= 0:
            return np.ones((self.height, self.width), dtype=np.float32)
        a = (1.0 - self.vignetting) ** -0.5 - 1.0
        cy, cx = (self.height - 1) / 2, (self.width - 1) / 2
        half_diag2 = cy * cy + cx * cx or 1.0
        yy = ((np.arange(self.height) - cy) ** 2)[:, None]
        xx = ((np.arange(self.width) - cx) ** 2)[None, :]
        rho2 = (yy + xx) / half_diag2
        return (1.0 / (1.0 + a * rho2) ** 2).astype(np.float32)

    @property
    def dtype(self) -> type[np.unsignedinteger]:
        """uint8 for 8-bit sensors, uint16 otherwise."""
        return np.uint8 if self.bit_depth <= 8 else np.uint16

    def digitise(
        self, reflectance: np.ndarray, exposure_ms: float, rng: np.random.Generator
    ) -> np.ndarray:
        """Turn a reflectance image into camera counts with shot and read noise.

        Parameters
        ----------
        reflectance : ndarray
            Float image in [0, 1].
        exposure_ms : float
            Exposure time.
        rng : numpy.random.Generator
            Noise source.
        """
        electrons = reflectance.astype(np.float32) * np.float32(
            0.8 * self.full_well_e * exposure_ms / self.exposure_ref_ms
        )
        if self.vignetting > 0 and electrons.shape == (self.height, self.width):
            electrons *= self.vignetting_gain()
        if self.noise:
            # Gaussian approximation of Poisson shot noise (exact enough above ~20 e-, and
            # several times faster than rng.poisson on megapixel frames).
            sigma = np.sqrt(np.maximum(electrons, 0) + np.float32(self.read_noise_e**2))
            electrons += sigma * rng.standard_normal(electrons.shape, dtype=np.float32)
        max_count = 2**self.bit_depth - 1
        counts = electrons * np.float32(max_count / self.full_well_e)
        return np.clip(np.rint(counts), 0, max_count).astype(self.dtype)


@dataclass(frozen=True)
class Optics:
    """Objective of the simulated microscope: numerical aperture and wavelength.

    Defocus blurs the image with a point-spread function whose width grows with the distance
    from focus (geometric blur disk of radius ``dz * tan(asin(NA))``) added in quadrature to
    the in-focus diffraction spot.
    """

    numerical_aperture: float = 0.3
    wavelength_um: float = 0.55

    @property
    def depth_of_field_um(self) -> float:
        """Classical depth of field ``lambda / NA**2`` (wave-optics term)."""
        return self.wavelength_um / self.numerical_aperture**2

    def effective_depth_of_field_um(self, pixel_size_um: float) -> float:
        """Depth of field seen by a camera: ``lambda / NA**2 + pixel / NA``.

        The second (detector) term dominates when the pixel, in sample space, is coarser than
        the optical resolution: the image then changes little until the blur spans a pixel.
        E.g. NA 0.3: 6.1 µm optical, 9.4 µm at 1 µm pixels, 22.8 µm at 5 µm pixels.
        """
        na = self.numerical_aperture
        return self.wavelength_um / na**2 + pixel_size_um / na

    def blur_sigma_um(self, defocus_um: float) -> float:
        """Gaussian-equivalent PSF width at a given defocus."""
        na = self.numerical_aperture
        airy_sigma = 0.21 * self.wavelength_um / na  # Gaussian fit to the Airy disk
        radius = abs(defocus_um) * math.tan(math.asin(min(na, 0.99)))
        return math.hypot(airy_sigma, radius / 2.0)

    def apply(self, image: np.ndarray, defocus_um: float, pixel_size_um: float) -> np.ndarray:
        """Blur ``image`` for a defocus (the blur beyond the in-focus spot, in pixels).

        The kernel is the discrete analogue of the Gaussian (``exp(-t) I_n(t)``, ``t = sigma**2``),
        whose variance is exactly ``sigma**2`` even below one pixel, so the blur -- and any focus
        measure computed from the image -- changes smoothly with defocus instead of jumping at a
        threshold (a "no blur below half a pixel" rule made the image identical over +-0.5 depth
        of field at 1 um pixels, a dead zone wider than the autofocus tolerance). Blur under
        0.02 px (a change of ~2e-4 of the Laplacian, far below shot noise) is skipped.
        """
        extra = self.blur_sigma_um(defocus_um) ** 2 - self.blur_sigma_um(0.0) ** 2
        sigma_px = math.sqrt(max(extra, 0.0)) / pixel_size_um
        if sigma_px < 0.02:
            return image
        # a blur wider than half the frame leaves it an even grey (under 1 % contrast at the
        # frame's own scale): a wider kernel only costs memory, and a surface kilometres out
        # of focus asked for terabytes of it
        sigma_px = min(sigma_px, max(0.5 * max(image.shape), 1.0))
        kernel = _discrete_gaussian(sigma_px)
        src = image if image.dtype.kind == "f" else image.astype(np.float32)
        out = ndimage.correlate1d(src, kernel, axis=0, mode="nearest")
        out = ndimage.correlate1d(out, kernel, axis=1, mode="nearest")
        if image.dtype.kind != "f":
            out = np.rint(out).astype(image.dtype)
        return out


def _discrete_gaussian(sigma_px: float) -> np.ndarray:
    """Lindeberg's discrete Gaussian kernel, truncated at 4 sigma (at least 3 taps)."""
    t = sigma_px * sigma_px
    radius = max(1, math.ceil(4.0 * sigma_px))
    kernel = special.ive(np.arange(-radius, radius + 1), t)
    return kernel / kernel.sum()
