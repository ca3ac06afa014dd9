"""Micro-Manager Python devices for Prior ProScan III and ASI MS-2000 stages (pyserial).

``PriorXYStage``/``ASIXYStage`` (XY) and ``PriorZStage``/``ASIZStage`` (focus) are
``pymmcore_plus`` unicore devices. Devices on the same ``Port`` share one open port and one
controller object (see :mod:`devices.serial_port`), so an XY poll and a focus poll never
mix their replies.

How failures reach the scan: UniMMCore calls the device methods directly and lets their
exceptions through unchanged, so a :class:`HardwareError` raised here arrives as itself at
``core.setXYPosition`` / ``core.waitForDevice``. A move whose command fails (error reply,
garbled or lost reply) is *latched* rather than raised at once, and the next :meth:`busy`
raises it: every move is followed by a wait for the device (the acquisition's
``waitForDevice``, the MDA engine's ``waitForSystem``), and that is where a caller expects
to learn how the move went. A move that ends on a limit switch raises
:class:`LimitSwitchHit` from ``busy()``; a busy flag that never clears raises
:class:`HardwareTimeout` after the move timeout (and the stage is told to stop).

A target outside the travel limits raises :class:`TravelLimitRefused` straight from
``set_position_um`` and sends nothing (the check is in the controller object, whoever
calls it).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any, ClassVar

from pymmcore_plus.experimental.unicore import StageDevice, XYStageDevice, pymm_property

from .errors import HardwareError, HardwareTimeout, LimitSwitchHit
from .serial_controllers import MS2000, PROTOCOLS, ProScan, StageController
from .serial_port import SharedPort, acquire_port, release_port

__all__ = [
    "MS2000", "ASIXYStage", "ASIZStage", "LimitSwitchHit", "PriorXYStage", "PriorZStage",
    "ProScan", "emulator_url",
]

log = logging.getLogger("waferscope.serial")

Limits = tuple[float, float]


def emulator_url(driver: str, stage: str | None = None, **options: object) -> str:
    """The pyserial URL of the emulated ``driver`` ("prior" or "asi").

    Parameters
    ----------
    driver : str
        Controller to emulate.
    stage : str or None
        Name given to :func:`simulators.serial_emu.register_stage`.
    **options
        More URL options (``fault_rate``, ``seed``, ``faults``, ``fail_next``).
    """
    from urllib.parse import urlencode

    query = {**({"stage": stage} if stage else {}), **options}
    return f"waferscope-emu://{driver}" + (f"?{urlencode(query)}" if query else "")


@dataclass
class _Move:
    started: float  # time.monotonic() when the command was sent
    timeout_s: float
    targets: dict[str, float]


class _SerialStage:
    """Port, controller, travel limits and move supervision of one stage device.

    Parameters
    ----------
    port : str
        Serial port or pyserial URL (``/dev/ttyUSB0``, ``COM3``, ``socket://host:port``,
        ``waferscope-emu://prior?stage=...``).
    baudrate : int
        Baud rate (the controllers' factory default is 9600).
    limits_um : dict
        Travel limits (min, max) in µm of each axis, in the controller's coordinates.
    answer_timeout_s : float
        How long to wait for a reply.
    move_timeout_s : float
        A move still busy after this many seconds is a fault; 0 computes it from the
        distance, ``speed_um_s`` and ``move_margin_s``.
    speed_um_s : float
        Slowest speed the stage is expected to move at (for the computed move timeout).
    move_margin_s : float
        Time added to the computed move timeout (acceleration, settling, polling).
    query_retries : int
        Extra attempts of a failed read-only query.
    """

    protocol: ClassVar[str] = ""
    axes: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        port: str,
        baudrate: int,
        limits_um: dict[str, Limits],
        *,
        answer_timeout_s: float = 0.5,
        move_timeout_s: float = 0.0,
        speed_um_s: float = 5_000.0,
        move_margin_s: float = 2.0,
        query_retries: int = 3,
    ) -> None:
        super().__init__()
        self._url = port
        self._baudrate = int(baudrate)
        self._limits = {a: _ordered(limits_um[a]) for a in self.axes}
        self._answer_timeout_s = float(answer_timeout_s)
        self._move_timeout_s = float(move_timeout_s)
        self._speed_um_s = float(speed_um_s)
        self._move_margin_s = float(move_margin_s)
        self._query_retries = int(query_retries)
        self._port: SharedPort | None = None
        self._ctrl: StageController | None = None
        self._move: _Move | None = None
        self._latched: HardwareError | None = None
        self._last_targets: dict[str, float] | None = None

    # -- life cycle ---------------------------------------------------------------------

    def initialize(self) -> None:
        """Open (or share) the port and check that the controller answers."""
        if not self._url:
            raise HardwareError(f"{type(self).__name__}: set the Port property first")
        port = acquire_port(self._url, self._baudrate, self._answer_timeout_s)
        try:
            kind = PROTOCOLS[self.protocol]
            with port.lock:
                if port.controller is None:
                    port.controller = kind(port, self._query_retries)
                elif not isinstance(port.controller, kind):
                    raise HardwareError(
                        f"{self._url} is already used by a {port.controller.name} device"
                    )
                ctrl: StageController = port.controller
                ctrl.limits_um.update(self._limits)
                ctrl.connect(focus="Z" in self.axes)
        except BaseException:
            release_port(port)
            raise
        self._port, self._ctrl = port, ctrl

    def shutdown(self) -> None:
        """Release the port (closed when its last device lets go)."""
        if self._port is not None:
            release_port(self._port)
        self._port = self._ctrl = None
        self._move = None

    @property
    def controller(self) -> StageController:
        """The controller object (after initialization)."""
        if self._ctrl is None:
            raise HardwareError(f"{type(self).__name__} on {self._url!r} is not initialized")
        return self._ctrl

    # -- moves --------------------------------------------------------------------------

    def _start(self, targets: dict[str, float]) -> None:
        """Send a move; refusals raise, command failures are latched for :meth:`busy`."""
        ctrl = self.controller
        timeout_s = self._timeout_for(targets)
        try:
            ctrl.move(targets)
        except HardwareError as exc:
            # whether the stage moved is unknown: report it where the move is waited for
            if self._latched is None:
                self._latched = exc
        self._move = _Move(time.monotonic(), timeout_s, dict(targets))
        self._last_targets = dict(targets)

    def _timeout_for(self, targets: dict[str, float]) -> float:
        if self._move_timeout_s > 0:
            return self._move_timeout_s
        if self._last_targets is not None:
            distance = max(abs(targets[a] - self._last_targets.get(a, targets[a]))
                           for a in targets)
        else:  # unknown start: allow for the whole travel
            distance = max(hi - lo for lo, hi in self._limits.values())
        return self._move_margin_s + 2.0 * distance / self._speed_um_s

    def busy(self) -> bool:
        """Whether the last move is still running; raises its faults.

        Raises
        ------
        HardwareError
            The move's command failed (latched), or the controller cannot be asked.
        LimitSwitchHit
            The move ended on a limit switch.
        HardwareTimeout
            Still busy after the move timeout (a stop is sent).
        """
        if self._latched is not None:
            exc, self._latched, self._move = self._latched, None, None
            raise exc
        move = self._move
        if move is None or self._ctrl is None:
            return False  # nothing commanded since the last report: no need to ask
        if self._ctrl.busy_axes(self.axes):
            waited = time.monotonic() - move.started
            if waited > move.timeout_s:
                self._move = None
                self._stop_quietly()
                raise HardwareTimeout(
                    f"{self._ctrl.name}: move to {_fmt(move.targets)} still busy after "
                    f"{waited:.2f} s (move timeout {move.timeout_s:.2f} s); stop sent"
                )
            return True
        self._move = None
        hit = {s for s in self._ctrl.limit_switches() if s[1:] in self.axes}
        if hit:
            self._last_targets = None  # where it stopped is not where it was sent
            # not retried (devices.errors.is_transient): the same move meets the same switch
            raise LimitSwitchHit(
                f"{self._ctrl.name}: limit switch {', '.join(sorted(hit))} hit; the move to "
                f"{_fmt(move.targets)} stopped short (the stage's physical travel ends inside "
                "its travel limits; not retried)"
            )
        return False

    def _stop_quietly(self) -> None:
        try:
            self.controller.stop()
        except HardwareError as exc:
            log.warning("%s: stop after a move timeout failed: %s", self.controller.name, exc)

    def stop(self) -> None:
        """Stop every axis of the controller."""
        self._move = None
        self.controller.stop()

    def _home(self) -> None:
        self.controller.home(self.axes)
        self._last_targets = None
        lo_hi = self.controller.limits_um
        self._limits.update({a: lo_hi[a] for a in self.axes if a in lo_hi})
        # a homing run may cross the whole travel
        self._move = _Move(time.monotonic(), self._timeout_for(
            {a: lo for a, (lo, _) in self._limits.items()}), {})

    def _set_origin(self, axis: str) -> None:
        ctrl = self.controller
        ctrl.set_origin(axis)
        self._limits[axis] = ctrl.limits_um[axis]
        self._last_targets = None

    # -- properties shared by XY and Z -------------------------------------------------

    @pymm_property(name="Port", is_pre_init=True)
    def port_name(self) -> str:
        """Serial port or pyserial URL."""
        return self._url

    @port_name.setter
    def port_name(self, value: str) -> None:
        if self._port is not None and str(value) != self._url:
            raise ValueError("Port cannot change after initialization")
        self._url = str(value)

    @pymm_property(name="BaudRate", is_pre_init=True)
    def baud_rate(self) -> int:
        """Baud rate."""
        return self._baudrate

    @baud_rate.setter
    def baud_rate(self, value: int) -> None:
        if self._port is not None and int(value) != self._baudrate:
            raise ValueError("BaudRate cannot change after initialization")
        self._baudrate = int(value)

    @pymm_property(name="AnswerTimeout_s", limits=(0.001, 60.0))
    def answer_timeout(self) -> float:
        """Reply timeout (shared by the devices of the port)."""
        return self._answer_timeout_s

    @answer_timeout.setter
    def answer_timeout(self, value: float) -> None:
        self._answer_timeout_s = float(value)
        if self._port is not None:
            self._port.timeout_s = self._answer_timeout_s

    @pymm_property(name="MoveTimeout_s", limits=(0.0, 3600.0))
    def move_timeout(self) -> float:
        """Fixed move timeout; 0 = from distance and Speed_um_s."""
        return self._move_timeout_s

    @move_timeout.setter
    def move_timeout(self, value: float) -> None:
        self._move_timeout_s = float(value)

    @pymm_property(name="Speed_um_s", limits=(1.0, 1e6))
    def speed(self) -> float:
        """Slowest expected speed, for the computed move timeout."""
        return self._speed_um_s

    @speed.setter
    def speed(self, value: float) -> None:
        self._speed_um_s = float(value)

    @pymm_property(name="Controller", is_read_only=True)
    def controller_name(self) -> str:
        """The controller's protocol."""
        return PROTOCOLS[self.protocol].name

    def _set_limit(self, axis: str, end: int, value: float) -> None:
        limits = list(self._limits[axis])
        limits[end] = float(value)
        self._limits[axis] = _ordered(limits)
        if self._ctrl is not None:
            self._ctrl.limits_um[axis] = self._limits[axis]


def _ordered(limits: tuple[float, float] | list[float]) -> Limits:
    lo, hi = (float(v) for v in limits)
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"travel limits must be finite (min, max) with min < max, got {limits}")
    return lo, hi


def _fmt(targets: dict[str, float]) -> str:
    return "(" + ", ".join(f"{a}={v:.2f}" for a, v in targets.items()) + ") µm"


def _travel_limit(name: str, axis: str, end: int, doc: str) -> Any:
    """A Micro-Manager property for one end (0: lower, 1: upper) of an axis' travel, in µm:
    read from the stage's limits, and set through ``_set_limit`` (which checks it)."""

    def get(self: _SerialStage) -> float:
        return self._limits[axis][end]

    get.__doc__ = doc
    prop = pymm_property(name=name)(get)

    @prop.setter
    def _set(self: _SerialStage, value: float) -> None:
        self._set_limit(axis, end, value)

    return prop


class _SerialXYStage(_SerialStage, XYStageDevice):
    """XY stage on a serial controller; see :class:`_SerialStage` for the parameters."""

    axes = ("X", "Y")

    def __init__(
        self,
        port: str = "",
        baudrate: int = 9600,
        travel_x_um: Limits = (-100_000.0, 100_000.0),
        travel_y_um: Limits = (-100_000.0, 100_000.0),
        **options: float,
    ) -> None:
        super().__init__(port, baudrate, {"X": travel_x_um, "Y": travel_y_um}, **options)

    def set_position_um(self, x: float, y: float) -> None:
        """Start an absolute move (refused before sending if outside the travel limits)."""
        self._start({"X": float(x), "Y": float(y)})
        self.core.events.XYStagePositionChanged.emit(self.get_label(), x, y)

    def get_position_um(self) -> tuple[float, float]:
        """Position read from the controller (µm)."""
        where = self.controller.positions(("X", "Y"))
        return where["X"], where["Y"]

    # set_relative_position_um: the base class reads the position and moves absolutely, so
    # the limit check and the command refer to the same target, and a retried relative
    # move cannot move twice

    def set_origin_x(self) -> None:
        """Call the current X position zero (the travel limits follow)."""
        self._set_origin("X")

    def set_origin_y(self) -> None:
        """Call the current Y position zero (the travel limits follow)."""
        self._set_origin("Y")

    def home(self) -> None:
        """The controller's homing move (Prior: SIS re-zeroes at the lower limits)."""
        self._home()

    travel_x_min = _travel_limit("TravelXMin_um", "X", 0, "Lower X travel limit (µm).")
    travel_x_max = _travel_limit("TravelXMax_um", "X", 1, "Upper X travel limit (µm).")
    travel_y_min = _travel_limit("TravelYMin_um", "Y", 0, "Lower Y travel limit (µm).")
    travel_y_max = _travel_limit("TravelYMax_um", "Y", 1, "Upper Y travel limit (µm).")


class _SerialZStage(_SerialStage, StageDevice):
    """Focus drive on a serial controller; see :class:`_SerialStage` for the parameters."""

    axes = ("Z",)

    def __init__(
        self,
        port: str = "",
        baudrate: int = 9600,
        travel_um: Limits = (-5_000.0, 5_000.0),
        **options: float,
    ) -> None:
        options.setdefault("speed_um_s", 500.0)
        super().__init__(port, baudrate, {"Z": travel_um}, **options)

    def set_position_um(self, val: float) -> None:
        """Start an absolute focus move (refused before sending if outside the travel)."""
        self._start({"Z": float(val)})
        self.core.events.stagePositionChanged.emit(self.get_label(), val)

    def get_position_um(self) -> float:
        """Focus position read from the controller (µm)."""
        return self.controller.positions(("Z",))["Z"]

    def set_origin(self) -> None:
        """Call the current focus position zero (the travel limits follow)."""
        self._set_origin("Z")

    def home(self) -> None:
        """The controller's focus homing move, where it has one."""
        self._home()

    travel_min = _travel_limit("TravelMin_um", "Z", 0, "Lower focus travel limit (µm).")
    travel_max = _travel_limit("TravelMax_um", "Z", 1, "Upper focus travel limit (µm).")


class PriorXYStage(_SerialXYStage):
    """XY stage of a Prior ProScan III controller."""

    protocol = "prior"


class ASIXYStage(_SerialXYStage):
    """XY stage of an ASI MS-2000 controller."""

    protocol = "asi"


class PriorZStage(_SerialZStage):
    """Focus drive of a Prior ProScan III controller."""

    protocol = "prior"


class ASIZStage(_SerialZStage):
    """Focus drive (Z axis) of an ASI MS-2000 controller."""

    protocol = "asi"
