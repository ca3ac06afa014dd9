"""The simulated microscope: a virtual sample under an XY stage, a focus drive and a camera.

This is plain Python with no Micro-Manager in it; ``devices.simulated`` wraps it as
Micro-Manager Python devices so that acquisition drives it through the same API as real
hardware.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from .camera import CameraModel, Optics
from .clock import HardwareClock
from .randomness import KeyedRandom
from .stage import StageAxes
from .surface import FocalSurface


@dataclass
class Snapshot:
    """Ground truth of one simulated exposure."""

    x_true_um: float
    y_true_um: float
    z_true_um: float
    focal_z_um: float
    clock_s: float


@dataclass
class SimulatedMicroscope:
    """Sample + stage + focus + camera + clock.

    Parameters
    ----------
    sample : VirtualSample
        What lies on the stage (``simulators.samples``).
    camera : CameraModel
        Sensor.
    xy : StageAxes
        XY stage mechanics.
    z : StageAxes
        Focus drive mechanics.
    clock : HardwareClock
        Simulated hardware time.
    optics : Optics
        Objective (defocus blur).
    surface : FocalSurface
        Height of the sample surface (where the image is in focus).
    rng : numpy.random.Generator or KeyedRandom
        Noise source of the camera; a :class:`KeyedRandom` draws each frame's noise from the
        commanded XY, Z and exposure and the visit, so a resumed scan sees the same frames.
    """

    sample: object
    camera: CameraModel
    xy: StageAxes
    z: StageAxes
    clock: HardwareClock
    optics: Optics = field(default_factory=Optics)
    surface: FocalSurface = field(default_factory=FocalSurface)
    rng: np.random.Generator | KeyedRandom = field(
        default_factory=lambda: np.random.default_rng(0))
    exposure_ms: float = 10.0
    last: Snapshot | None = None

    def focal_z_um(self, x_um: float, y_um: float) -> float:
        """Height of the sample surface (the in-focus Z) at a stage position."""
        return float(self.surface(x_um, y_um))

    def snap(self) -> np.ndarray:
        """Expose one frame at the stage's true position and return camera counts."""
        began = time.perf_counter()  # rendering happens during the exposure, not after it
        cam = self.camera
        x, y = (float(v) for v in self.xy.true)
        z = float(self.z.true[0])
        p = cam.true_pixel_size_um
        if cam.rotation_deg == 0:
            # pixel (r, c) images stage (x0 + c p, y0 + r p); the optical axis hits the centre
            x0 = x - (cam.width - 1) / 2 * p
            y0 = y - (cam.height - 1) / 2 * p
            reflectance = self.sample.render(x0, y0, (cam.height, cam.width), p)
        else:
            reflectance = self._render_rotated(x, y)
        focal = self.focal_z_um(x, y)
        reflectance = self.optics.apply(reflectance, z - focal, p)
        rng = (self.rng.rng(*self.xy.commanded, *self.z.commanded, self.exposure_ms)
               if isinstance(self.rng, KeyedRandom) else self.rng)
        image = cam.digitise(reflectance, self.exposure_ms, rng)
        self.clock.advance((self.exposure_ms + cam.readout_ms) / 1000.0, since=began)
        self.last = Snapshot(x, y, z, focal, self.clock.elapsed_s)
        return image

    def _render_rotated(self, x: float, y: float) -> np.ndarray:
        """Reflectance seen by a sensor rotated by ``rotation_deg`` against the stage axes.

        Pixel ``(r, c)`` images stage ``(x, y) + R(theta) @ ((c - cx) p, (r - cy) p)``. The
        sample renders on axis-aligned grids only, so an axis-aligned patch that covers the
        rotated footprint is rendered at the true pixel pitch and resampled (cubic spline).
        """
        cam = self.camera
        p = cam.true_pixel_size_um
        h, w = cam.height, cam.width
        th = np.deg2rad(cam.rotation_deg)
        cos, sin = np.cos(th), np.sin(th)
        cy, cx = (h - 1) / 2, (w - 1) / 2
        pad = int(np.ceil(abs(sin) * max(h, w))) + 4
        ph, pw = h + 2 * pad, w + 2 * pad
        px0 = x - (pw - 1) / 2 * p
        py0 = y - (ph - 1) / 2 * p
        patch = self.sample.render(px0, py0, (ph, pw), p)
        rr, cc = np.mgrid[0:h, 0:w].astype(np.float64)
        u, v = cc - cx, rr - cy
        col = cos * u - sin * v + (pw - 1) / 2
        row = sin * u + cos * v + (ph - 1) / 2
        out = ndimage.map_coordinates(patch.astype(np.float32), [row, col], order=3,
                                      mode="nearest")
        return np.clip(out, 0.0, 1.0).astype(np.float32)
