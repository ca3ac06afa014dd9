"""Micro-Manager Python devices (UniMMCore) backed by the simulated microscope.

Each device is a thin adapter: the physics live in ``simulators``. Ground truth that a real
device could never know (where the stage really is, the simulated clock) is exposed as
read-only properties whose names start with ``Sim``; acquisition records them when present.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING

import numpy as np
from pymmcore_plus.core import Keyword
from pymmcore_plus.experimental.unicore import (
    GenericDevice,
    SimpleCameraDevice,
    StageDevice,
    XYStageDevice,
    pymm_property,
)

from simulators.microscope import SimulatedMicroscope

from .errors import HardwareError, HardwareTimeout
from .serial_stage import ASIXYStage, PriorXYStage, emulator_url

if TYPE_CHECKING:
    from .spec import SimulatedMicroscope as SimulatedSpec


_PROVIDED: list[SimulatedMicroscope] = []


@contextmanager
def providing(scope: SimulatedMicroscope | None) -> Iterator[None]:
    """Hand ``scope`` to simulated devices built without one (by a ``.cfg``'s pyDevice lines).

    A ``.cfg`` line ``#py pyDevice,Camera,devices.simulated,SimCamera`` constructs the device
    with no arguments; the core factory loads the file inside this context, so the device
    renders the recipe's sample as ``kind: simulated`` would.
    """
    if scope is None:
        yield
        return
    _PROVIDED.append(scope)
    try:
        yield
    finally:
        _PROVIDED.pop()


def _provided(scope: SimulatedMicroscope | None, who: str) -> SimulatedMicroscope:
    if scope is not None:
        return scope
    if not _PROVIDED:
        raise HardwareError(f"{who}: a simulated device needs a sample; load its .cfg through "
                            "a waferscope recipe (microscope.kind: micromanager)")
    return _PROVIDED[-1]


class SimCamera(SimpleCameraDevice):
    """Camera that renders the virtual sample at the stage's true position.

    ``Binning`` (1, 2 or 4) combines b x b pixels into one: the frame is ``(h // b, w // b)``
    and each pixel is the **sum** of its block of the full-resolution frame (rows and
    columns past the last whole block are dropped, as much from each side as can be), clipped
    to the dtype's range. A sum, not a mean, is what cameras report: a CCD bins charge on
    the chip, many sCMOS cameras add the digitised pixels, and Micro-Manager's DemoCamera
    scales its signal by b * b. A 12-bit sensor's 4 x 4 sum still fits its 16-bit frames;
    an 8-bit one saturates sooner. ``BitDepth`` stays the sensor's. The noise is the
    full-resolution frame's (read noise per pixel, as digital binning has it), so a binned
    frame is exactly the block sum of the frame binning 1 gives at the same commanded
    position and visit. Timing: exposure and readout on the simulated clock are those of a
    full frame whatever the binning (``microscope.camera.readout_ms`` per frame), so binning
    changes no hardware-time estimate; the pixel size the core reports is b times the
    calibrated one (``UniMMCore.getPixelSizeUm`` reads this property).
    """

    BINNINGS = (1, 2, 4)

    def __init__(
        self, scope: SimulatedMicroscope | None = None, timeout_rate: float = 0.0, seed: int = 0
    ) -> None:
        super().__init__()
        self._scope = _provided(scope, "SimCamera")
        self._timeout_rate = float(timeout_rate)
        # a stream of its own, apart from the emulated controllers' (seeded with ``seed``)
        self._faults = np.random.default_rng([seed, 1])
        self._binning = 1
        self.set_property_allowed_values(Keyword.Binning, self.BINNINGS)

    def set_property_value(self, prop_name: str, value: object) -> None:
        """Set a property; a ``Binning`` given as text (``"2"``: a .cfg, the core's string API)
        is taken as a number.
        """
        # a .cfg's config groups and the core's string API give "2"
        if prop_name == Keyword.Binning and isinstance(value, str) and value.strip().isdigit():
            value = int(value)
        super().set_property_value(prop_name, value)

    def get_binning(self) -> int:
        """Binning factor (1, 2 or 4)."""
        return self._binning

    def set_binning(self, value: int) -> None:
        """Set the binning factor (1, 2 or 4); a software ROI, in the old binning's pixels, is
        cleared.
        """
        # the property's allowed values have checked it already (1, 2 or 4)
        self._binning = int(value)
        # a software ROI is in the old binning's pixels: cameras drop it when binning changes
        self.clear_roi()

    def get_exposure(self) -> float:
        """Exposure in milliseconds (the simulated microscope's)."""
        return self._scope.exposure_ms

    def set_exposure(self, exposure: float) -> None:
        """Set the exposure in milliseconds."""
        self._scope.exposure_ms = float(exposure)

    def sensor_shape(self) -> tuple[int, int]:
        """Frame shape ``(height, width)`` at the current binning: the sensor's divided by it."""
        b = self._binning
        return (self._scope.camera.height // b, self._scope.camera.width // b)

    def dtype(self) -> np.dtype:
        """Pixel dtype of the simulated sensor."""
        return np.dtype(self._scope.camera.dtype)

    def snap(self, buffer: np.ndarray) -> Mapping:
        """Render one frame at the stage's true position, binned, into ``buffer``.

        The exposure starts once the XY stage and the focus drive have arrived. With a
        ``timeout_rate``, a frame may spend its exposure and raise :class:`HardwareTimeout`.

        Returns
        -------
        Mapping
            ``SimClock_s``: the simulated clock when the frame was read out.
        """
        # the exposure starts once every axis has arrived (as after the core's waitForSystem)
        self._scope.xy.wait()
        self._scope.z.wait()
        if self._timeout_rate > 0 and self._faults.random() < self._timeout_rate:
            # the exposure was spent, the frame never came; raised before rendering, so a
            # retry sees the frame an uninterrupted run would have seen
            self._scope.clock.advance(self._scope.exposure_ms / 1000.0)
            raise HardwareTimeout("camera: no frame arrived (simulated camera timeout)")
        buffer[:] = _bin(self._scope.snap(), self._binning)
        last = self._scope.last
        return {"SimClock_s": f"{last.clock_s:.6f}"} if last else {}

    @pymm_property(is_read_only=True, name="BitDepth")
    def bit_depth(self) -> int:
        """The sensor's bit depth (binning does not change it)."""
        return int(self._scope.camera.bit_depth)

    @pymm_property(is_read_only=True, name="SimTruePixelSize_um")
    def true_pixel_size_um(self) -> float:
        """Pixel pitch really imaged at the sample, in µm (ground truth)."""
        return float(self._scope.camera.true_pixel_size_um)

    @pymm_property(is_read_only=True, name="SimRotation_deg")
    def rotation_deg(self) -> float:
        """Rotation of the sensor against the stage axes, in degrees (ground truth)."""
        return float(self._scope.camera.rotation_deg)

    @pymm_property(is_read_only=True, name="SimVignetting")
    def vignetting(self) -> float:
        """Fractional illumination loss at the sensor corners (ground truth)."""
        return float(self._scope.camera.vignetting)


def _bin(frame: np.ndarray, b: int) -> np.ndarray:
    """The b x b block sums of ``frame`` (whole blocks, centred), clipped to its dtype."""
    if b == 1:
        return frame
    h, w = frame.shape[0] // b * b, frame.shape[1] // b * b
    r0, c0 = (frame.shape[0] - h) // 2, (frame.shape[1] - w) // 2
    blocks = frame[r0:r0 + h, c0:c0 + w].reshape(h // b, b, w // b, b)
    total = blocks.sum(axis=(1, 3), dtype=np.int64)
    return np.clip(total, 0, np.iinfo(frame.dtype).max).astype(frame.dtype)


class _StageTruth:
    """Where the simulated XY stage really is (a real controller could never know)."""

    _scope: SimulatedMicroscope

    @pymm_property(is_read_only=True, name="SimTrueX_um")
    def true_x_um(self) -> float:
        return float(self._scope.xy.true[0])

    @pymm_property(is_read_only=True, name="SimTrueY_um")
    def true_y_um(self) -> float:
        return float(self._scope.xy.true[1])


class SimXYStage(_StageTruth, XYStageDevice):
    """XY stage with travel limits, motion time, settling and repeatability error."""

    def __init__(self, scope: SimulatedMicroscope | None = None) -> None:
        super().__init__()
        self._scope = _provided(scope, "SimXYStage")

    def set_position_um(self, x: float, y: float) -> None:
        """Start a move to ``(x, y)`` µm and return at once; ``waitForDevice`` charges its time.

        A target outside the travel range raises :class:`TravelLimitError` before moving.
        """
        # starts the move (raises TravelLimitError before moving); waitForDevice charges it,
        # so a focus move commanded meanwhile runs at the same time, as on real controllers
        self._scope.xy.start_move_to(x, y)
        self.core.events.XYStagePositionChanged.emit(self.get_label(), x, y)

    def busy(self) -> bool:
        """Polled by waitForDevice: in simulated time, waiting means the move completes."""
        self._scope.xy.wait()
        return False

    def get_position_um(self) -> tuple[float, float]:
        """Reported position in µm: the commanded one, quantised to the encoder step."""
        x, y = self._scope.xy.reported()
        return float(x), float(y)

    def set_origin_x(self) -> None:
        """Not supported: the simulated stage has a fixed origin (raises NotImplementedError)."""
        raise NotImplementedError("the simulated stage has a fixed origin")

    def set_origin_y(self) -> None:
        """Not supported: the simulated stage has a fixed origin (raises NotImplementedError)."""
        raise NotImplementedError("the simulated stage has a fixed origin")

    def home(self) -> None:
        """Move to (0, 0) µm and return once there, the move's time charged to the clock."""
        self._scope.xy.move_to(0.0, 0.0)

    def stop(self) -> None:
        """Moves complete instantly in simulated time; nothing to stop."""


class _EmulatedXYStage(_StageTruth):
    """A serial stage driver talking to the emulator that drives the scope's own XY axes.

    The stage is registered with the emulator under a unique name only until the port is
    open (the emulator then holds the axes), so a process running many scans keeps none.
    """

    _stage_name: str

    def initialize(self) -> None:
        from simulators.serial_emu import unregister_stage

        try:
            super().initialize()  # type: ignore[misc]
        finally:
            unregister_stage(self._stage_name)


class SimPriorXYStage(_EmulatedXYStage, PriorXYStage):
    """:class:`PriorXYStage` on an emulated ProScan III bound to the simulated stage."""

    def __init__(self, scope: SimulatedMicroscope, stage_name: str, port: str,
                 **options: object) -> None:
        super().__init__(port, **options)
        self._scope, self._stage_name = scope, stage_name


class SimASIXYStage(_EmulatedXYStage, ASIXYStage):
    """:class:`ASIXYStage` on an emulated MS-2000 bound to the simulated stage."""

    def __init__(self, scope: SimulatedMicroscope, stage_name: str, port: str,
                 **options: object) -> None:
        super().__init__(port, **options)
        self._scope, self._stage_name = scope, stage_name


_STAGE_NAMES = itertools.count(1)


def sim_xy_stage(spec: SimulatedSpec, scope: SimulatedMicroscope) -> XYStageDevice:
    """The XY stage device that ``microscope.stage.driver`` asks for.

    ``direct`` is :class:`SimXYStage`; ``prior``/``asi`` load that driver on the emulated
    controller (``waferscope-emu://``) driving the scope's own XY axes and clock, with
    ``microscope.faults.serial_error_rate`` injected at random (seeded with
    ``microscope.faults.seed``). A ``stage.port`` given as an emulator URL keeps its other
    options (``faults=...``, ``fail_next=...``).
    """
    from urllib.parse import parse_qsl, urlsplit

    from simulators.serial_emu import register_stage

    st, faults = spec.stage, spec.faults
    if st.driver == "direct":
        return SimXYStage(scope)
    name = f"sim-xy-{next(_STAGE_NAMES)}"
    register_stage(name, scope.xy)
    options = dict(parse_qsl(urlsplit(st.port).query)) if st.port else {}
    options.pop("stage", None)  # the emulator drives this scope's stage, no other
    options.update(fault_rate=faults.serial_error_rate, seed=faults.seed)
    cls = SimPriorXYStage if st.driver == "prior" else SimASIXYStage
    return cls(
        scope, name, emulator_url(st.driver, name, **options),
        travel_x_um=st.travel_x_um, travel_y_um=st.travel_y_um,
        # replies come at once: a lost one is known after a short wait
        answer_timeout_s=0.05,
        # moves take no wall time unless realtime: a busy flag still set after a quarter
        # second is stuck, and waiting longer would only slow the simulation down
        move_timeout_s=0.0 if spec.realtime else 0.25,
        speed_um_s=st.speed_um_s,
    )


class SimFocus(StageDevice):
    """Focus drive (Z) with a safe range."""

    def __init__(self, scope: SimulatedMicroscope | None = None) -> None:
        super().__init__()
        self._scope = _provided(scope, "SimFocus")

    def set_position_um(self, val: float) -> None:
        """Start a move to ``val`` µm and return at once; ``waitForDevice`` charges its time.

        A target outside the safe range raises :class:`TravelLimitError` before moving.
        """
        self._scope.z.start_move_to(val)
        self.core.events.stagePositionChanged.emit(self.get_label(), val)

    def busy(self) -> bool:
        """Polled by waitForDevice: in simulated time, waiting means the move completes."""
        self._scope.z.wait()
        return False

    def get_position_um(self) -> float:
        """Reported position in µm: the commanded one, quantised to the encoder step."""
        return float(self._scope.z.reported()[0])

    def home(self) -> None:
        """Move to Z = 0 µm and return once there, the move's time charged to the clock."""
        self._scope.z.move_to(0.0)

    def stop(self) -> None:
        """Moves complete instantly in simulated time; nothing to stop."""

    def set_origin(self) -> None:
        """Not supported: the simulated focus drive has a fixed origin (NotImplementedError)."""
        raise NotImplementedError("the simulated focus drive has a fixed origin")

    @pymm_property(is_read_only=True, name="SimTrueZ_um")
    def true_z_um(self) -> float:
        """Where the focus drive really is, in µm (ground truth, repeatability error included)."""
        return float(self._scope.z.true[0])

    @pymm_property(is_read_only=True, name="SimFocalZ_um")
    def focal_z_um(self) -> float:
        """The in-focus Z at the stage's true XY position, in µm (ground truth)."""
        x, y = self._scope.xy.true
        return self._scope.focal_z_um(float(x), float(y))


class SimClock(GenericDevice):
    """Exposes the simulated hardware clock, so timings can be reported in hardware time."""

    def __init__(self, scope: SimulatedMicroscope | None = None) -> None:
        super().__init__()
        self._scope = _provided(scope, "SimClock")

    @pymm_property(is_read_only=True, name="Elapsed_s")
    def elapsed_s(self) -> float:
        """Simulated hardware time elapsed, in seconds."""
        return float(self._scope.clock.elapsed_s)
