"""The focal surface of a simulated sample: tilt on the chuck, bow from stress, local waviness."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class FocalSurface:
    """Height (µm, along the focus axis) of the sample surface at each stage position.

    ``z(x, y) = z0 + tx * dx + ty * dy + bow * (r / R)**2 + waviness(x, y) + bumps(x, y)`` with
    ``dx, dy`` in mm from the sample centre and ``r`` the distance from it: a tilted plane plus
    a paraboloid bow reaching ``bow_um`` at the sample's edge (radius ``R``), plus a few
    low-frequency sinusoids of total amplitude about ``waviness_um``, plus local bumps (a
    particle under the wafer on the chuck, a warped corner of a cell): each a raised-cosine
    dome ``h * (1 + cos(pi * d / rho)) / 2`` for ``d < rho`` from its centre, 0 beyond, so
    it is invisible to a focus map whose points all lie off it.

    Parameters
    ----------
    tilt_um_per_mm : (float, float)
        Slope along x and y (1 µm/mm = 1 mrad).
    bow_um : float
        Height of the bow at the edge relative to the centre (positive: edges higher).
    waviness_um : float
        Amplitude of the local waviness.
    waviness_period_mm : float
        Typical wavelength of the waviness.
    center_um : (float, float)
        Sample centre on the stage.
    radius_um : float
        Distance from the centre to the edge (bow reference).
    z0_um : float
        Height at the centre.
    seed : int
        Phases and directions of the waviness.
    bumps : tuple of (x_um, y_um, height_um, radius_um)
        Local bumps: stage position of the top, height (negative: a dent) and radius.
    """

    tilt_um_per_mm: tuple[float, float] = (0.0, 0.0)
    bow_um: float = 0.0
    waviness_um: float = 0.0
    waviness_period_mm: float = 10.0
    center_um: tuple[float, float] = (0.0, 0.0)
    radius_um: float = 50_000.0
    z0_um: float = 0.0
    seed: int = 0
    bumps: tuple[tuple[float, float, float, float], ...] = ()
    _waves: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        rng = np.random.default_rng(self.seed)
        n = 4
        angles = rng.uniform(0, np.pi, n)
        periods = self.waviness_period_mm * 1000 * rng.uniform(0.6, 1.6, n)
        phases = rng.uniform(0, 2 * np.pi, n)
        kx = 2 * np.pi * np.cos(angles) / periods
        ky = 2 * np.pi * np.sin(angles) / periods
        # amplitudes such that the sum's peak is about waviness_um
        amps = np.full(n, self.waviness_um / 2.0)
        object.__setattr__(self, "_waves", np.stack([kx, ky, phases, amps], axis=1))

    def __call__(self, x_um: np.ndarray | float, y_um: np.ndarray | float) -> np.ndarray:
        """Surface height at stage positions (broadcasts)."""
        dx = (np.asarray(x_um, dtype=float) - self.center_um[0])
        dy = (np.asarray(y_um, dtype=float) - self.center_um[1])
        z = self.z0_um + self.tilt_um_per_mm[0] * dx / 1000 + self.tilt_um_per_mm[1] * dy / 1000
        z = z + self.bow_um * (dx**2 + dy**2) / self.radius_um**2
        for kx, ky, phase, amp in self._waves:
            z = z + amp * np.sin(kx * dx + ky * dy + phase)
        for bx, by, height, radius in self.bumps:
            d = np.hypot(np.asarray(x_um, dtype=float) - bx, np.asarray(y_um, dtype=float) - by)
            z = z + np.where(d < radius, height * 0.5 * (1 + np.cos(np.pi * np.minimum(
                d / radius, 1.0))), 0.0)
        return z
