"""Surface roughness with a known areal roughness Sa, rendered into reflectance.

A rough surface is a height field ``h(x, y)`` (nm) whose local areal roughness
``Sa = mean |h - mean h|`` is known everywhere: a unit-Sa fractal field (hashed value noise, so
it is a pure function of stage coordinates, like every texture of the simulator) scaled by a
smooth Sa map that can vary across the sample.

How a microscope sees nanometre roughness (brightfield, reflected light):

- **specular loss** (Debye-Waller / total integrated scatter): light scattered out of the
  aperture darkens the surface by ``exp(-(4 pi Sq / lambda)**2)`` with ``Sq = sqrt(pi/2) Sa``
  for a Gaussian height distribution;
- **phase and slope contrast**: the height modulates the phase of the reflected wave by
  ``4 pi h / lambda``; a slightly defocused, partially coherent microscope turns phase and
  local slope into intensity, giving a speckle-like texture whose contrast grows linearly with
  Sa. The transfer factors are chosen so that Sa = 10 nm gives about 10 % texture contrast at
  1 µm pixels, and the texture fades when the pixels are coarser than its correlation length
  (a pixel averages the surface).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from .samples.base import VirtualSample
from .samples.texture import fractal_noise, value_noise

#: octaves of the unit height field as (lattice pitch / correlation length, amplitude)
_OCTAVES = ((4.0, 1.0), (2.0, 0.6), (1.0, 0.35))
#: phase-to-intensity and slope-to-intensity transfer (partially coherent, slightly defocused)
PHASE_TRANSFER = 0.35
SLOPE_TRANSFER = 0.35


@lru_cache(maxsize=8)
def _unit_sa(correlation_um: float) -> float:
    """Mean absolute deviation of the raw octave sum, measured on a finely sampled patch.

    The value-noise octaves are not Gaussian, so Sa of their sum is measured once (on a
    2048 x 2048 patch sampled at 1/8 of the correlation length, 64 correlation lengths a side)
    and used to scale the field to unit Sa.
    """
    p = correlation_um / 8.0
    axis = np.arange(2048) * p + 12_345.0
    h = _raw_height(axis, axis, p, correlation_um, seed=987_654)
    return float(np.mean(np.abs(h - h.mean())))


def _raw_height(xs: np.ndarray, ys: np.ndarray, p: float, corr: float, seed: int) -> np.ndarray:
    octaves = [(corr * k, amp) for k, amp in _OCTAVES]
    return fractal_noise(xs, ys, p, octaves, seed)


@dataclass(frozen=True)
class RoughnessField:
    """A rough surface with a known Sa map, and how it changes reflectance.

    Parameters
    ----------
    sa_nm : float
        Mean areal roughness Sa (nm).
    variation : float
        Relative variation of Sa across the sample: Sa ranges over about
        ``sa_nm * (1 +- variation)`` (0 = uniform, at most 0.95).
    variation_period_mm : float
        Lateral scale over which Sa changes.
    correlation_um : float
        Lateral correlation length of the finest octave of the height field.
    wavelength_um : float
        Illumination wavelength.
    seed : int
        Seed of the height field and the Sa map.
    """

    sa_nm: float = 5.0
    variation: float = 0.0
    variation_period_mm: float = 20.0
    correlation_um: float = 2.0
    wavelength_um: float = 0.55
    seed: int = 0

    def __post_init__(self) -> None:
        if self.sa_nm < 0:
            raise ValueError("roughness.sa_nm: must be >= 0")
        if not 0.0 <= self.variation <= 0.95:
            raise ValueError("roughness.variation: must be in [0, 0.95]")
        if self.variation_period_mm <= 0 or self.correlation_um <= 0 or self.wavelength_um <= 0:
            raise ValueError("roughness: periods, correlation and wavelength must be > 0")

    def to_dict(self) -> dict[str, Any]:
        """Parameters as a JSON-serialisable dict (the truth record)."""
        return asdict(self)

    def sa_map(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        """True Sa (nm) on the pixel grid ``ys x xs`` (stage µm)."""
        xs, ys = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
        if self.variation == 0.0:
            return np.full((len(ys), len(xs)), self.sa_nm, dtype=np.float32)
        n = value_noise(xs, ys, self.variation_period_mm * 1000.0, self.seed * 7 + 3)
        # smoothstep value noise spends little time near 0 and 1: stretch it to about +-1
        t = np.clip((n - np.float32(0.5)) * np.float32(2.6), -1.0, 1.0)
        return np.float32(self.sa_nm) * (np.float32(1.0) + np.float32(self.variation) * t)

    def height_nm(self, xs: np.ndarray, ys: np.ndarray, pixel_size_um: float) -> np.ndarray:
        """Surface height (nm) seen by pixels of ``pixel_size_um`` on the grid ``ys x xs``.

        Octaves finer than the pixels fade out (what a pixel averages away), so the Sa of this
        array is the true Sa only when the pixels are well below ``correlation_um``.
        """
        unit = _raw_height(xs, ys, pixel_size_um, self.correlation_um, self.seed * 131 + 7)
        unit *= np.float32(1.0 / _unit_sa(self.correlation_um))
        return unit * self.sa_map(xs, ys)

    def apply(
        self, reflectance: np.ndarray, xs: np.ndarray, ys: np.ndarray, pixel_size_um: float
    ) -> np.ndarray:
        """Reflectance of the rough surface (in place on ``reflectance``, also returned)."""
        if self.sa_nm == 0.0:
            return reflectance
        p = float(pixel_size_um)
        sa = self.sa_map(xs, ys)
        h = self.height_nm(xs, ys, p)
        k = np.float32(4.0 * math.pi / (self.wavelength_um * 1000.0))  # rad per nm
        sq = sa * np.float32(math.sqrt(math.pi / 2.0))
        loss = np.exp(-((k * sq) ** 2))
        # slope along x (nm per correlation length): oblique component of the illumination
        slope = np.gradient(h, axis=1) * np.float32(self.correlation_um / p)
        texture = np.float32(PHASE_TRANSFER) * k * h + np.float32(SLOPE_TRANSFER) * k * slope
        reflectance *= loss * (np.float32(1.0) + texture)
        np.clip(reflectance, 0.0, 1.0, out=reflectance)
        return reflectance


class RoughSample(VirtualSample):
    """Any virtual sample with a rough surface: renders the sample, then the roughness.

    Everything else (geometry, defects, parameters) is the wrapped sample's; the truth record
    gains a ``roughness`` entry with the field's parameters (from which the true Sa at any
    stage position follows: :meth:`RoughnessField.sa_map`).
    """

    def __init__(self, base: VirtualSample, roughness: RoughnessField) -> None:
        self.base = base
        self.roughness = roughness
        self.kind = base.kind
        self._field = base._field

    def __getattr__(self, name: str) -> Any:  # geometry helpers of the wrapped sample
        if name == "base":
            raise AttributeError(name)
        return getattr(self.base, name)

    def render(
        self, x0_um: float, y0_um: float, shape: tuple[int, int], pixel_size_um: float
    ) -> np.ndarray:
        """The wrapped sample's reflectance, roughened (see ``VirtualSample.render``)."""
        from .samples.shapes import pixel_axes

        img = self.base.render(x0_um, y0_um, shape, pixel_size_um)
        xs, ys = pixel_axes(x0_um, y0_um, shape, float(pixel_size_um))
        return self.roughness.apply(img, xs, ys, pixel_size_um)

    def bounds_um(self) -> tuple[float, float, float, float]:
        """The wrapped sample's bounds."""
        return self.base.bounds_um()

    def usable_polygon_um(self) -> np.ndarray:
        """The wrapped sample's usable area."""
        return self.base.usable_polygon_um()

    def parameters(self) -> dict[str, Any]:
        """The wrapped sample's parameters plus ``roughness``."""
        return {**self.base.parameters(), "roughness": self.roughness.to_dict()}

    def truth(self) -> dict:
        """The wrapped sample's truth plus ``roughness`` (the field's parameters)."""
        out = self.base.truth()
        out["sample"]["roughness"] = self.roughness.to_dict()
        out["roughness"] = self.roughness.to_dict()
        return out
