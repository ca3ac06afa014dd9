"""Micro-Manager Python devices (UniMMCore) backed by the simulated microscope.

Each device is a thin adapter: the physics live in ``simulators``. Ground truth that a real
device could never know (where the stage really is, the simulated clock) is exposed as
read-only properties whose names start with ``Sim``; acquisition records them when present.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from pymmcore_plus.experimental.unicore import (
    GenericDevice,
    SimpleCameraDevice,
    StageDevice,
    XYStageDevice,
    pymm_property,
)

from simulators.microscope import SimulatedMicroscope


class SimCamera(SimpleCameraDevice):
    """Camera that renders the virtual sample at the stage's true position."""

    def __init__(self, scope: SimulatedMicroscope) -> None:
        super().__init__()
        self._scope = scope

    def get_exposure(self) -> float:
        return self._scope.exposure_ms

    def set_exposure(self, exposure: float) -> None:
        self._scope.exposure_ms = float(exposure)

    def sensor_shape(self) -> tuple[int, int]:
        return (self._scope.camera.height, self._scope.camera.width)

    def dtype(self) -> np.dtype:
        return np.dtype(self._scope.camera.dtype)

    def snap(self, buffer: np.ndarray) -> Mapping:
        # the exposure starts once every axis has arrived (as after the core's waitForSystem)
        self._scope.xy.wait()
        self._scope.z.wait()
        buffer[:] = self._scope.snap()
        last = self._scope.last
        return {"SimClock_s": f"{last.clock_s:.6f}"} if last else {}

    @pymm_property(is_read_only=True, name="BitDepth")
    def bit_depth(self) -> int:
        return int(self._scope.camera.bit_depth)

    @pymm_property(is_read_only=True, name="SimTruePixelSize_um")
    def true_pixel_size_um(self) -> float:
        return float(self._scope.camera.true_pixel_size_um)

    @pymm_property(is_read_only=True, name="SimRotation_deg")
    def rotation_deg(self) -> float:
        return float(self._scope.camera.rotation_deg)

    @pymm_property(is_read_only=True, name="SimVignetting")
    def vignetting(self) -> float:
        return float(self._scope.camera.vignetting)


class SimXYStage(XYStageDevice):
    """XY stage with travel limits, motion time, settling and repeatability error."""

    def __init__(self, scope: SimulatedMicroscope) -> None:
        super().__init__()
        self._scope = scope

    def set_position_um(self, x: float, y: float) -> None:
        # starts the move (raises TravelLimitError before moving); waitForDevice charges it,
        # so a focus move commanded meanwhile runs at the same time, as on real controllers
        self._scope.xy.start_move_to(x, y)
        self.core.events.XYStagePositionChanged.emit(self.get_label(), x, y)

    def busy(self) -> bool:
        """Polled by waitForDevice: in simulated time, waiting means the move completes."""
        self._scope.xy.wait()
        return False

    def get_position_um(self) -> tuple[float, float]:
        x, y = self._scope.xy.reported()
        return float(x), float(y)

    def set_origin_x(self) -> None:
        raise NotImplementedError("the simulated stage has a fixed origin")

    def set_origin_y(self) -> None:
        raise NotImplementedError("the simulated stage has a fixed origin")

    def home(self) -> None:
        self._scope.xy.move_to(0.0, 0.0)

    def stop(self) -> None:
        """Moves complete instantly in simulated time; nothing to stop."""

    @pymm_property(is_read_only=True, name="SimTrueX_um")
    def true_x_um(self) -> float:
        return float(self._scope.xy.true[0])

    @pymm_property(is_read_only=True, name="SimTrueY_um")
    def true_y_um(self) -> float:
        return float(self._scope.xy.true[1])


class SimFocus(StageDevice):
    """Focus drive (Z) with a safe range."""

    def __init__(self, scope: SimulatedMicroscope) -> None:
        super().__init__()
        self._scope = scope

    def set_position_um(self, val: float) -> None:
        self._scope.z.start_move_to(val)
        self.core.events.stagePositionChanged.emit(self.get_label(), val)

    def busy(self) -> bool:
        """Polled by waitForDevice: in simulated time, waiting means the move completes."""
        self._scope.z.wait()
        return False

    def get_position_um(self) -> float:
        return float(self._scope.z.reported()[0])

    def home(self) -> None:
        self._scope.z.move_to(0.0)

    def stop(self) -> None:
        """Moves complete instantly in simulated time; nothing to stop."""

    def set_origin(self) -> None:
        raise NotImplementedError("the simulated focus drive has a fixed origin")

    @pymm_property(is_read_only=True, name="SimTrueZ_um")
    def true_z_um(self) -> float:
        return float(self._scope.z.true[0])

    @pymm_property(is_read_only=True, name="SimFocalZ_um")
    def focal_z_um(self) -> float:
        x, y = self._scope.xy.true
        return self._scope.focal_z_um(float(x), float(y))


class SimClock(GenericDevice):
    """Exposes the simulated hardware clock, so timings can be reported in hardware time."""

    def __init__(self, scope: SimulatedMicroscope) -> None:
        super().__init__()
        self._scope = scope

    @pymm_property(is_read_only=True, name="Elapsed_s")
    def elapsed_s(self) -> float:
        return float(self._scope.clock.elapsed_s)
