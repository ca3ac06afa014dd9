"""Build a Micro-Manager core for a recipe's ``microscope:`` section.

Everything above this module talks to the returned core through Micro-Manager's API only; it
does not know whether the devices are simulated or real.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from pymmcore_plus.experimental.unicore import UniMMCore

from scanner.errors import UserError

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator

    from scanner.recipe import MicroManagerMicroscope, Recipe, SimulatedMicroscope

PIXEL_CONFIG = "waferscope"
SIM_LABELS = {"camera": "Camera", "xy": "XYStage", "z": "Focus", "clock": "SimClock"}


@dataclass
class MicroscopeHandle:
    """A ready core plus what the scan needs to know about it.

    Attributes
    ----------
    core : UniMMCore
        Loaded and initialised core (camera, XY stage and focus drive set as current).
    kind : str
        ``"simulated"`` or ``"micromanager"``.
    truth : dict or None
        Ground truth of the sample (simulation only), written to ``truth.json``.
    clock_device : str or None
        Device whose ``Elapsed_s`` property is the hardware clock (simulation only).
    """

    core: UniMMCore
    kind: str
    truth: dict[str, Any] | None = None
    clock_device: str | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def hardware_time_s(self) -> float | None:
        """Simulated hardware seconds so far, or None on real hardware (use wall time)."""
        if self.clock_device is None:
            return None
        return float(self.core.getProperty(self.clock_device, "Elapsed_s"))

    @property
    def depth_of_field_um(self) -> float:
        """Depth of field of the objective (from the recipe)."""
        return float(self.info.get("depth_of_field_um", 5.0))

    def fov_um(self) -> tuple[float, float]:
        """Field of view (width, height) in µm at the sample."""
        p = self.core.getPixelSizeUm()
        return self.core.getImageWidth() * p, self.core.getImageHeight() * p


@contextmanager
def _quiet_discovery() -> Iterator[None]:
    """pymmcore-plus logs an error when no C++ adapters are installed; the simulator needs none."""
    log = logging.getLogger("pymmcore-plus")
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        log.setLevel(level)


def _set_pixel_size(core: UniMMCore, pixel_size_um: float) -> None:
    core.definePixelSizeConfig(PIXEL_CONFIG)
    core.setPixelSizeUm(PIXEL_CONFIG, pixel_size_um)
    core.setPixelSizeConfig(PIXEL_CONFIG)


def _require_initialized(core: UniMMCore, labels: Iterable[str]) -> None:
    """UniMMCore logs a Python device's failed initialization and carries on; stop here."""
    from pymmcore_plus import DeviceInitializationState

    from .errors import HardwareError

    for label in labels:
        if core.getDeviceInitializationState(label) != (
            DeviceInitializationState.InitializedSuccessfully
        ):
            raise HardwareError(f"device {label} failed to initialize (see the log)")


def build_simulated(recipe: Recipe) -> MicroscopeHandle:
    """A UniMMCore with the simulated camera, XY stage, focus drive and clock loaded."""
    from simulators.camera import CameraModel, Optics
    from simulators.clock import HardwareClock
    from simulators.microscope import SimulatedMicroscope as SimScope
    from simulators.stage import StageAxes

    from .sample_factory import focal_surface_for_recipe, sample_for_recipe
    from .simulated import SimCamera, SimClock, SimFocus, sim_xy_stage

    spec: SimulatedMicroscope = recipe.microscope  # type: ignore[assignment]
    sample = sample_for_recipe(recipe.sample)
    rng = np.random.default_rng(spec.seed)
    clock = HardwareClock(realtime=spec.realtime)
    cam = spec.camera
    camera = CameraModel(
        width=cam.width,
        height=cam.height,
        pixel_size_um=cam.pixel_size_um,
        bit_depth=cam.bit_depth,
        exposure_ref_ms=cam.exposure_ms,
        readout_ms=cam.readout_ms,
        full_well_e=cam.full_well_e,
        read_noise_e=cam.read_noise_e,
        noise=cam.noise,
        vignetting=cam.vignetting,
        rotation_deg=cam.rotation_deg,
        pixel_size_error=cam.pixel_size_error,
    )
    st, fo = spec.stage, spec.focus
    xy = StageAxes(
        [st.travel_x_um, st.travel_y_um],
        st.speed_um_s,
        st.acceleration_um_s2,
        st.settle_ms / 1000,
        st.repeatability_um,
        clock,
        np.random.default_rng([spec.seed, 1]),
    )
    z = StageAxes(
        [fo.range_um],
        fo.speed_um_s,
        fo.speed_um_s * 50,
        fo.settle_ms / 1000,
        0.0,
        clock,
        np.random.default_rng([spec.seed, 2]),
        start_um=[fo.z_um],
    )
    optics = Optics(spec.objective.numerical_aperture, spec.objective.wavelength_um)
    scope = SimScope(sample, camera, xy, z, clock, optics=optics,
                     surface=focal_surface_for_recipe(recipe.sample), rng=rng,
                     exposure_ms=cam.exposure_ms)

    with _quiet_discovery():
        core = UniMMCore()
    labels = SIM_LABELS
    core.loadPyDevice(labels["camera"], SimCamera(
        scope, timeout_rate=spec.faults.camera_timeout_rate, seed=spec.faults.seed))
    # driver direct | prior | asi (prior/asi: the serial driver on the emulated controller)
    core.loadPyDevice(labels["xy"], sim_xy_stage(spec, scope))
    core.loadPyDevice(labels["z"], SimFocus(scope))
    core.loadPyDevice(labels["clock"], SimClock(scope))
    core.initializeAllDevices()
    _require_initialized(core, labels.values())
    core.setCameraDevice(labels["camera"])
    core.setXYStageDevice(labels["xy"])
    core.setFocusDevice(labels["z"])
    core.setAutoShutter(False)  # no shutter device in the simulator
    _set_pixel_size(core, cam.pixel_size_um)
    core.setExposure(cam.exposure_ms)
    truth = sample.truth()
    truth["camera"] = {
        "pixel_size_um": camera.true_pixel_size_um,
        "nominal_pixel_size_um": camera.pixel_size_um,
        "rotation_deg": camera.rotation_deg,
        "vignetting": camera.vignetting,
    }
    return MicroscopeHandle(
        core=core,
        kind="simulated",
        truth=truth,
        clock_device=labels["clock"],
        info={"labels": labels, "depth_of_field_um": spec.objective.depth_of_field_um,
              "effective_depth_of_field_um": round(
                  spec.objective.effective_depth_of_field_um(cam.pixel_size_um), 3)},
    )


def build_micromanager(recipe: Recipe) -> MicroscopeHandle:
    """A core loaded from a Micro-Manager ``.cfg`` (the C++ adapters must be installed)."""
    spec: MicroManagerMicroscope = recipe.microscope  # type: ignore[assignment]
    adapters = [str(spec.adapter_path)] if spec.adapter_path else ()
    with _quiet_discovery():
        core = UniMMCore(adapter_paths=adapters)
    try:
        core.loadSystemConfiguration(str(spec.config))
    except Exception as exc:  # the C++ core raises plain RuntimeErrors with multi-line text
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"microscope.config: cannot load {spec.config.name}: {first} "
            "(are the Micro-Manager device adapters installed? run `mmcore install`)"
        ) from None
    missing = [
        what
        for what, label in (
            ("camera", core.getCameraDevice()),
            ("XY stage", core.getXYStageDevice()),
            ("focus drive", core.getFocusDevice()),
        )
        if not label
    ]
    if missing:
        raise UserError(f"microscope.config: {spec.config.name} defines no {', '.join(missing)}")
    if spec.pixel_size_um is not None:
        _set_pixel_size(core, spec.pixel_size_um)
    elif core.getPixelSizeUm() <= 0:
        raise UserError(
            f"microscope.pixel_size_um: {spec.config.name} has no pixel size calibration; "
            "give pixel_size_um in the recipe"
        )
    if not core.getShutterDevice():
        core.setAutoShutter(False)
    return MicroscopeHandle(
        core=core,
        kind="micromanager",
        info={"config": str(spec.config), "depth_of_field_um": spec.objective.depth_of_field_um,
              "effective_depth_of_field_um": round(
                  spec.objective.effective_depth_of_field_um(core.getPixelSizeUm()), 3)},
    )


def build_microscope(recipe: Recipe) -> MicroscopeHandle:
    """Build the core that a recipe asks for (with its camera calibration applied, if any)."""
    if recipe.microscope.kind == "simulated":
        handle = build_simulated(recipe)
    else:
        handle = build_micromanager(recipe)
    calibration = getattr(recipe.microscope, "calibration", None)
    if calibration is not None:
        apply_calibration(handle.core, calibration)
    return handle


def apply_calibration(core: UniMMCore, path: Any) -> None:
    """Set the core's pixel size and pixel→stage affine from a ``waferscope calibrate`` file.

    The plan's field of view then uses the measured pixel size, and Micro-Manager clients see
    the measured rotation (``getPixelSizeAffine``: stage = A @ (col, row) + t).
    """
    import math

    from scanner.stitch import load_calibration

    cam = load_calibration(path)
    _set_pixel_size(core, cam.pixel_size_um)
    th = math.radians(cam.rotation_deg)
    p = cam.pixel_size_um
    core.setPixelSizeAffine(PIXEL_CONFIG, [p * math.cos(th), -p * math.sin(th), 0.0,
                                           p * math.sin(th), p * math.cos(th), 0.0])
