"""Build a Micro-Manager core for a recipe's ``microscope:`` section.

Everything above this module talks to the returned core through Micro-Manager's API only; it
does not know whether the devices are simulated or real.
"""

from __future__ import annotations

import gc
import logging
import math
import re
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol

from pymmcore_plus.experimental.unicore import UniMMCore

from .errors import UserError
from .simulated import providing

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator

    from .spec import MicroManagerMicroscope, SimulatedMicroscope

log = logging.getLogger(__name__)

PIXEL_CONFIG = "waferscope"
SIM_LABELS = {"camera": "Camera", "xy": "XYStage", "z": "Focus", "clock": "SimClock"}


class RecipeLike(Protocol):
    """What the device layer reads of a recipe (``scanner.recipe.Recipe``).

    ``sample`` is the validated ``sample:`` section (read by attribute, see
    :mod:`devices.sample_factory`); ``microscope`` the ``microscope:`` one (:mod:`devices.spec`).
    """

    @property
    def sample(self) -> Any:
        """The recipe's validated ``sample:`` section, read by attribute."""

    @property
    def microscope(self) -> SimulatedMicroscope | MicroManagerMicroscope:
        """The recipe's ``microscope:`` section: a simulated or a Micro-Manager microscope."""


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
    closed: bool = field(default=False, init=False)

    def close(self) -> None:
        """Release the hardware: every device is unloaded (a serial controller's port is
        closed, so the next scan or another program can open it) and the handlers connected
        to the core's signals are dropped. Safe to call more than once.

        The core object itself is freed once nothing holds it: a scan's acquisition hands the
        core back its own MDA engine when it ends (:func:`scanner.acquisition.acquire.
        acquire`), since a core that kept the scan's engine was never freed, with its four
        C++ threads, its devices and the scan's tile store.
        """
        if self.closed:
            return
        self.closed = True
        core = self.core
        try:
            if core.mda.is_running():
                core.mda.cancel()
            core.unloadAllDevices()
        except Exception:  # releasing must not hide why the scan ended; say it, go on
            log.warning("could not unload every device of the microscope", exc_info=True)
        # the handlers connected during the scan hold this handle: without them the core
        # is an ordinary cycle, which the collector frees
        for group in (core.events, core.mda.events):
            with suppress(Exception):
                group.disconnect()

    def __enter__(self) -> MicroscopeHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

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
    mm_log = logging.getLogger("pymmcore-plus")
    level = mm_log.level
    mm_log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        mm_log.setLevel(level)


def _set_pixel_size(core: UniMMCore, pixel_size_um: float,
                    affine: tuple[float, ...] | None = None) -> str:
    """Make ``pixel_size_um`` (and the pixel→stage ``affine``) what the core uses.

    The core's pixel size is that of the first pixel-size preset whose settings match the
    devices' present state (``getCurrentPixelSizeConfig``), so a preset of our own beside a
    ``.cfg``'s matching one (``Res10x`` on the objective in place) is never used, and the
    scan went on with the file's size instead of the calibration. The values therefore go
    on the preset that matches now (in this core only: the file is not changed); a preset
    without settings, which matches any state, is defined only where none matches (no
    preset, or none for the objective in place).

    Returns
    -------
    str
        The preset that now carries the pixel size.
    """
    preset = core.getCurrentPixelSizeConfig()
    if not preset:
        core.definePixelSizeConfig(PIXEL_CONFIG)
        preset = PIXEL_CONFIG
    core.setPixelSizeUm(preset, pixel_size_um)
    if affine is not None:
        core.setPixelSizeAffine(preset, list(affine))
    return preset


#: the loggers of pymmcore-plus's modules (``pymmcore_plus.experimental.unicore`` logs a Python
#: device's failed initialization there, with its traceback, and carries on)
UNICORE_LOGGER = "pymmcore_plus"


class _Collected(logging.Handler):
    """Keeps the records it is given (see :func:`_initialization_log`)."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextmanager
def _initialization_log() -> Iterator[list[logging.LogRecord]]:
    """Collect what pymmcore-plus logs while devices load and initialise, off the terminal.

    UniMMCore logs a Python device that fails to initialise (a serial port that does not
    exist) with a traceback on stderr, and the core then reports it only as "not initialized"
    at its first use; :func:`_require_initialized` says why in one line instead. Records with
    a traceback go to pymmcore-plus's own log file, where it writes one; the others reach the
    terminal as before.
    """
    mm_log = logging.getLogger(UNICORE_LOGGER)
    collected = _Collected()
    propagate = mm_log.propagate
    mm_log.addHandler(collected)
    mm_log.propagate = False
    try:
        yield collected.records
    finally:
        mm_log.removeHandler(collected)
        mm_log.propagate = propagate
        from logging.handlers import RotatingFileHandler

        files = [h for h in logging.getLogger("pymmcore-plus").handlers
                 if isinstance(h, RotatingFileHandler)]
        for record in collected.records:
            if not record.exc_info:
                logging.getLogger().handle(record)
            for handler in files:
                if record.levelno >= handler.level:
                    handler.handle(record)


def _require_initialized(core: UniMMCore, labels: Iterable[str],
                         records: list[logging.LogRecord]) -> str | None:
    """Why the first of ``labels`` that did not initialise failed (None: all did).

    The cause is the exception logged for it (:func:`_initialization_log`), in one line.
    """
    from pymmcore_plus import DeviceInitializationState

    for label in labels:
        # failed, not merely uninitialised: a .cfg may leave initialisation to its user
        if core.getDeviceInitializationState(label) == (
            DeviceInitializationState.InitializationFailed
        ):
            causes = [r.exc_info[1] for r in records
                      if r.exc_info and r.exc_info[1] is not None and repr(label) in r.getMessage()]
            why = (str(causes[0]).strip().splitlines() or [type(causes[0]).__name__])[0] \
                if causes else "see the log"
            return f"device {label} failed to initialize: {why}"
    return None


def make_scope(recipe: RecipeLike, spec: SimulatedMicroscope) -> Any:
    """The simulated microscope (``simulators``) for a recipe's sample and a simulated spec."""
    from simulators.camera import CameraModel, Optics
    from simulators.clock import HardwareClock
    from simulators.microscope import SimulatedMicroscope as SimScope
    from simulators.randomness import KeyedRandom
    from simulators.stage import StageAxes

    from .sample_factory import focal_surface_for_recipe, sample_for_recipe

    sample = sample_for_recipe(recipe.sample)
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
    # every draw keyed by position and visit: a retry or a resume sees what an
    # uninterrupted run would have seen
    xy = StageAxes(
        [st.travel_x_um, st.travel_y_um],
        st.speed_um_s,
        st.acceleration_um_s2,
        st.settle_ms / 1000,
        st.repeatability_um,
        clock,
        KeyedRandom(spec.seed, "xy"),
    )
    z = StageAxes(
        [fo.range_um],
        fo.speed_um_s,
        fo.speed_um_s * 50,
        fo.settle_ms / 1000,
        0.0,
        clock,
        KeyedRandom(spec.seed, "z"),
        start_um=[fo.z_um],
    )
    optics = Optics(spec.objective.numerical_aperture, spec.objective.wavelength_um)
    return SimScope(sample, camera, xy, z, clock, optics=optics,
                    surface=focal_surface_for_recipe(recipe.sample),
                    rng=KeyedRandom(spec.seed, "camera"), exposure_ms=cam.exposure_ms)


def build_simulated(recipe: RecipeLike) -> MicroscopeHandle:
    """A UniMMCore with the simulated camera, XY stage, focus drive and clock loaded."""
    from .simulated import SimCamera, SimClock, SimFocus, sim_xy_stage

    spec: SimulatedMicroscope = recipe.microscope  # type: ignore[assignment]
    scope = make_scope(recipe, spec)
    sample, camera, cam = scope.sample, scope.camera, spec.camera

    with _quiet_discovery():
        core = UniMMCore()
    labels = SIM_LABELS
    core.loadPyDevice(labels["camera"], SimCamera(
        scope, timeout_rate=spec.faults.camera_timeout_rate, seed=spec.faults.seed))
    # driver direct | prior | asi (prior/asi: the serial driver on the emulated controller)
    core.loadPyDevice(labels["xy"], sim_xy_stage(spec, scope))
    core.loadPyDevice(labels["z"], SimFocus(scope))
    core.loadPyDevice(labels["clock"], SimClock(scope))
    with _initialization_log() as records:
        core.initializeAllDevices()
    failed = _require_initialized(core, labels.values(), records)
    if failed:
        from .errors import HardwareError

        raise HardwareError(failed)  # the recipe's own simulator: a fault, not bad input
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


def build_micromanager(recipe: RecipeLike) -> MicroscopeHandle:
    """A core loaded from a Micro-Manager ``.cfg`` (C++ adapters and ``#py`` Python devices).

    The file is checked offline first (:func:`devices.mmconfig.check_config`): every missing
    adapter is named in one line before anything is loaded. Roles come from the recipe's
    ``microscope.roles`` or the file's Core properties; the pixel size from a calibration
    (applied by :func:`build_microscope`), else the file's pixel-size presets, else the recipe.
    """
    from .errors import ConfigError
    from .mmconfig import check_config

    spec: MicroManagerMicroscope = recipe.microscope  # type: ignore[assignment]
    roles = spec.roles.model_dump(exclude_none=True) if spec.roles is not None else {}
    try:
        summary = check_config(spec.config, spec.adapter_path, roles)
    except ConfigError as exc:
        raise UserError(str(exc)) from None
    adapters = [str(spec.adapter_path)] if spec.adapter_path else ()
    with _quiet_discovery():
        core = UniMMCore(adapter_paths=adapters)
    scope = _cfg_scope(recipe, summary)
    failure = _load_config(core, spec, summary, roles, scope)
    if failure is not None:
        # released now (the ports the devices opened are free again), and the core collected
        # here, with the failure's tracebacks that held it (the message is raised with no
        # traceback of the load): left to the interpreter's exit, they were sometimes
        # collected in one of the core's C++ threads, which aborted the process after the
        # one line was printed ("FATAL: exception not rethrown", exit 134)
        MicroscopeHandle(core=core, kind="micromanager").close()
        del core
        gc.collect()
        raise UserError(failure)
    clock = next((label for label in core.getLoadedDevices()
                  if core.getDeviceName(label) == "SimClock"), None)
    return MicroscopeHandle(
        core=core,
        kind="micromanager",
        truth=scope.sample.truth() if scope is not None else None,
        clock_device=clock,
        info={"config": str(spec.config), "depth_of_field_um": spec.objective.depth_of_field_um,
              "effective_depth_of_field_um": round(
                  spec.objective.effective_depth_of_field_um(core.getPixelSizeUm()), 3)},
    )


def _load_config(core: UniMMCore, spec: MicroManagerMicroscope, summary: Any,
                 roles: dict[str, str], scope: Any) -> str | None:
    """Load ``spec.config`` into ``core`` and set its roles, pixel size and travel.

    Returns
    -------
    str or None
        Why the microscope cannot be used, in one line (bad input: the caller releases the
        core and raises it), or None.
    """
    from pymmcore_plus import Keyword

    from .mmconfig import loadable_config

    with providing(scope), _initialization_log() as records, loadable_config(
            spec.config) as path:
        try:
            core.loadSystemConfiguration(str(path))
        except Exception as exc:  # the loader wraps each line's error in multi-line text
            return _load_failure(spec.config.name, exc)
    # a C++ device that fails raises above; a Python device (a serial stage whose port does
    # not exist) is only logged, and would fail at its first use as "not initialized"
    devices = [label for label in core.getLoadedDevices() if label != Keyword.CoreDevice]
    failed = _require_initialized(core, devices, records)
    if failed:
        return f"microscope.config: {spec.config.name}: {failed}"
    try:
        for role, label in roles.items():
            _set_role(core, role, label)
        if core.getPixelSizeUm() <= 0:
            _match_pixel_preset(core, summary.pixel_presets)
        _require_roles_and_pixel_size(core, spec, summary.pixel_presets)
        _require_drivable_orientation(core, spec.config.name, summary.pixel_presets)
        if spec.pixel_size_um is not None and (
                summary.pixel_size_um is None or core.getPixelSizeUm() <= 0):
            _set_pixel_size(core, spec.pixel_size_um)
        if not core.getShutterDevice():
            core.setAutoShutter(False)
        _limit_travel(core, spec.stage)
        if scope is not None:
            _simulate_pixel_in_use(core, scope)
    except UserError as exc:
        return str(exc)
    return None


def _simulate_pixel_in_use(core: UniMMCore, scope: Any) -> None:
    """Render a ``.cfg``'s simulated camera at the pixel size the core uses, per unbinned
    pixel (the camera bins by summing blocks): the scope is made before the devices are
    loaded, from the file's first preset, and with a binned preset listed first (Res20,
    binning 2, before Res10, binning 1) it rendered 20 um pixels that the scan recorded as
    10 um."""
    camera = core.getCameraDevice()
    size = core.getPixelSizeUm()
    if not camera or size <= 0:
        return
    binning = core.getProperty(camera, "Binning") if core.hasProperty(camera, "Binning") else 1
    unbinned = size / max(int(float(binning or 1)), 1)
    if not math.isclose(scope.camera.pixel_size_um, unbinned, rel_tol=1e-9):
        scope.camera = replace(scope.camera, pixel_size_um=unbinned)


def _match_pixel_preset(core: UniMMCore, presets: dict[str, Any]) -> str | None:
    """Apply the first of a ``.cfg``'s pixel-size presets whose settings the devices show now,
    and return its name (None: none does).

    The C++ core matches presets against its own devices only: a preset on a Python (``#py``)
    device, such as ``Camera Binning 1`` on the emulated rig's camera, never matched, and the
    file's pixel size was said to be missing. ``getProperty`` reaches both kinds.
    """
    for name, (size, affine, settings) in presets.items():
        try:
            shown = all(_same_value(core.getProperty(device, prop), value)
                        for device, prop, value in settings)
        except Exception:  # a device or property the loaded core does not have
            shown = False
        if shown:
            _set_pixel_size(core, size, affine)
            return name
    return None


def _same_value(shown: Any, value: str) -> bool:
    """A property's value as the core shows it against one a ``.cfg`` gives ("1" and "1.0")."""
    if str(shown) == value:
        return True
    try:
        return float(shown) == float(value)
    except (TypeError, ValueError):
        return False


def _require_roles_and_pixel_size(core: UniMMCore, spec: MicroManagerMicroscope,
                                  presets: dict[str, Any] | None = None) -> None:
    """Refuse a core without a camera, XY stage or focus drive, or without a pixel size."""
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
        raise UserError(f"microscope.roles: {spec.config.name} defines no {', '.join(missing)} "
                        "(set it in the .cfg's Core properties or in microscope.roles)")
    if core.getPixelSizeUm() <= 0 and spec.pixel_size_um is None and spec.calibration is None:
        if presets:
            shown = "; ".join(f"{name}: " + (", ".join(f"{d} {p} = {v}" for d, p, v in settings)
                                             or "no settings")
                              for name, (_, _, settings) in presets.items())
            raise UserError(
                f"microscope.pixel_size_um: none of {spec.config.name}'s pixel size presets "
                f"({shown}) matches the devices' present settings; correct the preset or give "
                "pixel_size_um in the recipe")
        raise UserError(
            f"microscope.pixel_size_um: {spec.config.name} has no pixel size calibration; "
            "give pixel_size_um in the recipe"
        )


def _require_drivable_orientation(core: UniMMCore, name: str,
                                  presets: dict[str, Any] | None = None) -> None:
    """Refuse a pixel-size affine that mirrors the image against the stage or turns it by more
    than :data:`devices.calibration.MAX_ROTATION_DEG`.

    The affine (``stage = A @ (column, row)``) is how a ``.cfg`` says that a camera is mounted
    upside down or mirrored, or that a stage axis runs the other way. The alignment read its
    angle (180 degrees for a camera mounted upside down) while the tiles were stitched
    unturned at their stage positions: the scan ended "complete" with every defect
    millimetres from where it is. A mirrored one was stitched mirrored (or its alignment
    said the wafer was not where the recipe puts it).
    """
    from .calibration import MAX_ROTATION_DEG

    try:
        a = [float(v) for v in core.getPixelSizeAffine()]
    except Exception:  # noqa: BLE001 - no pixel configuration: nothing turns the camera
        return
    if len(a) < 5 or not all(math.isfinite(v) for v in a[:5]) or not any(a[:2] + a[3:5]):
        return
    det = a[0] * a[4] - a[1] * a[3]
    angle = math.degrees(math.atan2(a[3], a[0]))
    if det < 0:
        what = "mirrors the image against the stage (or a stage axis runs the other way)"
    elif abs(angle) > MAX_ROTATION_DEG:
        what = f"turns the image {angle:+.0f} degrees against the stage"
    else:
        return
    # the .cfg's name of the preset (one on a Python device is applied under our own name)
    preset = next((n for n, (_, affine, _) in (presets or {}).items()
                   if affine is not None and all(math.isclose(u, v, abs_tol=1e-9)
                                                 for u, v in zip(affine, a, strict=False))),
                  core.getCurrentPixelSizeConfig() or "?")
    raise UserError(
        f"microscope.config: {name}: pixel size preset {preset}'s affine "
        f"({', '.join(f'{v:g}' for v in a[:6])}) {what}; waferscope stitches images whose "
        f"columns count along the stage's +x and rows along +y, turned at most "
        f"{MAX_ROTATION_DEG:g} degrees: set the camera's or the stage's own transpose/mirror "
        "properties so that they do, and correct the affine")


#: the core's setter of each role's current device, and the device type it takes: the setters
#: reach UniMMCore's Python devices too, where ``setProperty("Core", "Camera", label)`` goes to
#: the C++ core, which knows only its own devices ("Cannot set Core property Camera to invalid
#: value"); UniMMCore's setters do not check the type, and a wrong one failed later
ROLE_SETTERS = {"camera": ("setCameraDevice", "CameraDevice", "a camera"),
                "xy_stage": ("setXYStageDevice", "XYStageDevice", "an XY stage"),
                "focus": ("setFocusDevice", "StageDevice", "a focus drive (stage)"),
                "autofocus": ("setAutoFocusDevice", "AutoFocusDevice", "an autofocus"),
                "shutter": ("setShutterDevice", "ShutterDevice", "a shutter")}


def _set_role(core: UniMMCore, role: str, label: str) -> None:
    """Make ``label`` the core's current device of ``role`` (``microscope.roles``)."""
    from pymmcore_plus import DeviceType

    setter, kind, words = ROLE_SETTERS[role]
    actual = DeviceType(core.getDeviceType(label))
    if actual != DeviceType[kind]:
        raise UserError(f"microscope.roles.{role}: {label!r} is not {words} "
                        f"(its type: {actual.name})")
    try:
        getattr(core, setter)(label)
    except Exception as exc:  # the core's refusal, in one line
        why = " ".join(str(exc).split()) or type(exc).__name__
        raise UserError(f"microscope.roles.{role}: cannot use {label!r}: {why}") from None


#: words of a load error about a device adapter (a library) rather than the file's content
_ADAPTER_WORDS = ("device adapter", "deviceadapter", "adapter module", "mmgr_dal",
                  "failed to load device", "device interface version")
#: the loader's own wrappers around a line's error (pymmcore-plus's ``load_from_string`` and
#: its command executor)
_WRAPPERS = ("Error in configuration file", "Error executing command")
_LINE_ERROR = re.compile(r"at line (\d+): (.*)$")


def _load_failure(name: str, exc: BaseException) -> str:
    """One line for a ``.cfg`` that failed to load: its line and the real cause.

    The loader's message is ``Error in configuration file '...' at line N: 'LINE'`` and, on
    the next lines, the cause, itself wrapped once more ("Error executing command ..."); the
    first exception of the chain that is not a wrapper says what was wrong ("Device
    'XYStage' has no property ..."). Only an adapter that cannot be loaded gets the hint to
    install Micro-Manager's adapters.
    """
    text = str(exc).strip()
    where = _LINE_ERROR.search(text.splitlines()[0]) if text else None
    cause: BaseException = exc
    while cause.__cause__ is not None and str(cause).lstrip().startswith(_WRAPPERS):
        cause = cause.__cause__
    # a KeyError's str() is its repr ("\"Device 'X' has no property 'Y'.\"")
    message = cause.args[0] if isinstance(cause, KeyError) and len(cause.args) == 1 else cause
    lines = [ln.strip() for ln in str(message).strip().splitlines() if ln.strip()]
    if lines and lines[0].startswith(_WRAPPERS[0]) and where:  # no chain: the text after it
        lines = lines[1:]
    if lines and lines[0].startswith(_WRAPPERS[1]) and "]: " in lines[0]:
        lines[0] = lines[0].split("]: ", 1)[1]
    why = "; ".join(lines) or type(cause).__name__
    at = f"line {where.group(1)} {where.group(2)}: " if where else ""
    hint = (" (are the Micro-Manager device adapters installed? run `mmcore install`)"
            if any(w in why.lower() for w in _ADAPTER_WORDS) else "")
    return f"microscope.config: cannot load {name}: {at}{why}{hint}"


#: emulator stage name that a shipped or user ``.cfg`` binds its emulated controller to
CFG_EMULATOR_STAGE = "waferscope"


def _cfg_scope(recipe: RecipeLike, summary: Any) -> Any:
    """A simulated microscope for the simulated devices a ``.cfg`` loads (None if it has none).

    Python devices are built by ``pyDevice`` lines with no arguments; :func:`providing` hands
    them this scope, which renders the recipe's sample as ``kind: simulated`` would. Emulated
    controllers on ``waferscope-emu://...?stage=waferscope`` drive its XY axes.
    """
    simulated = [cls for module, cls in summary.py_devices.values()
                 if module == "devices.simulated"]
    if not simulated:
        return None
    from simulators.serial_emu import register_stage

    from .spec import CameraSpec
    from .spec import SimulatedMicroscope as SimSpec

    mm: MicroManagerMicroscope = recipe.microscope  # type: ignore[assignment]
    pixel = summary.pixel_size_um or mm.pixel_size_um or 1.0
    spec = SimSpec(camera=CameraSpec(pixel_size_um=pixel), stage=mm.stage, focus=mm.focus,
                   objective=mm.objective)
    scope = make_scope(recipe, spec)
    register_stage(CFG_EMULATOR_STAGE, scope.xy, scope.z)
    return scope


def _limit_travel(core: UniMMCore, stage: Any) -> None:
    """Narrow a driver's own travel limits (``TravelXMin_um``...) to the recipe's."""
    xy = core.getXYStageDevice()
    for axis, (lo, hi) in (("X", stage.travel_x_um), ("Y", stage.travel_y_um)):
        low, high = f"Travel{axis}Min_um", f"Travel{axis}Max_um"
        if xy and core.hasProperty(xy, low) and core.hasProperty(xy, high):
            lo = max(lo, float(core.getProperty(xy, low)))
            hi = min(hi, float(core.getProperty(xy, high)))
            if lo >= hi:
                raise UserError(f"microscope.stage.travel_{axis.lower()}_um: does not overlap "
                                f"the {xy} controller's travel")
            core.setProperty(xy, low, lo)
            core.setProperty(xy, high, hi)


def build_microscope(recipe: RecipeLike) -> MicroscopeHandle:
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

    from .calibration import read_camera_calibration

    p, rotation_deg = read_camera_calibration(path)
    th = math.radians(rotation_deg)
    _set_pixel_size(core, p, (p * math.cos(th), -p * math.sin(th), 0.0,
                              p * math.sin(th), p * math.cos(th), 0.0))
