"""The simulated microscope: a virtual sample under an XY stage, a focus drive and a camera.

This is plain Python with no Micro-Manager in it; ``devices.simulated`` wraps it as
Micro-Manager Python devices so that acquisition drives it through the same API as real
hardware.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .camera import CameraModel, Optics
from .clock import HardwareClock
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
    rng : numpy.random.Generator
        Noise source of the camera.
    """

    sample: object
    camera: CameraModel
    xy: StageAxes
    z: StageAxes
    clock: HardwareClock
    optics: Optics = field(default_factory=Optics)
    surface: FocalSurface = field(default_factory=FocalSurface)
    rng: np.random.Generator = field(default_factory=lambda: np.random.default_rng(0))
    exposure_ms: float = 10.0
    last: Snapshot | None = None

    def focal_z_um(self, x_um: float, y_um: float) -> float:
        """Height of the sample surface (the in-focus Z) at a stage position."""
        return float(self.surface(x_um, y_um))

    def snap(self) -> np.ndarray:
        """Expose one frame at the stage's true position and return camera counts."""
        cam = self.camera
        x, y = (float(v) for v in self.xy.true)
        z = float(self.z.true[0])
        p = cam.pixel_size_um
        # pixel (r, c) images stage (x0 + c p, y0 + r p); the optical axis hits the sensor centre
        x0 = x - (cam.width - 1) / 2 * p
        y0 = y - (cam.height - 1) / 2 * p
        reflectance = self.sample.render(x0, y0, (cam.height, cam.width), p)
        focal = self.focal_z_um(x, y)
        reflectance = self.optics.apply(reflectance, z - focal, p)
        image = cam.digitise(reflectance, self.exposure_ms, self.rng)
        self.clock.advance((self.exposure_ms + cam.readout_ms) / 1000.0)
        self.last = Snapshot(x, y, z, focal, self.clock.elapsed_s)
        return image
