"""What the emulated stage controllers share: the command log, command errors, the axes
over :class:`simulators.stage.StageAxes` with their origins, limits and busy flags, and fault
injection around each command.

The two controllers' command sets are in :mod:`simulators.stage_controllers`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np

from .serial_faults import Fault, FaultInjector
from .stage import StageAxes

AXES = ("X", "Y", "Z")


@dataclass
class CommandRecord:
    """One command as the emulator received it (its log is what tests check).

    Attributes
    ----------
    command : str
        The command line, without terminator.
    reply : bytes or None
        What was sent back (None: the reply was lost).
    fault : str or None
        Injected fault kind, if any.
    targets_um : dict
        For a move: the target of each axis it commanded, in controller µm (relative moves
        resolved against the position before the move). Empty otherwise.
    clock_s : float
        Simulated time when the command arrived.
    """

    command: str
    reply: bytes | None
    fault: str | None
    targets_um: dict[str, float] = field(default_factory=dict)
    clock_s: float = 0.0


class CommandError(Exception):
    """A command the controller refuses; ``code`` is its error number."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def _busy_until_s(axes: StageAxes) -> float:
    # StageAxes keeps the end of its last started move private; a controller's busy flag
    # is exactly "the clock has not reached it yet"
    return float(getattr(axes, "_busy_until_s", 0.0))


class ControllerEmulator:
    """Shared state of an emulated controller: axes, origins, flags and the command log.

    Parameters
    ----------
    xy : StageAxes
        The XY mechanics (two axes).
    z : StageAxes or None
        Focus mechanics (one axis) when the controller drives one.
    faults : FaultInjector or None
        Fault source (default: none).
    """

    name = "controller"
    reply_terminator = b"\r"
    default_error = 1
    no_axis_error = 1

    def __init__(
        self, xy: StageAxes, z: StageAxes | None = None, faults: FaultInjector | None = None
    ) -> None:
        self.xy = xy
        self.z = z
        self.faults = faults or FaultInjector()
        self.log: list[CommandRecord] = []
        self._lock = threading.Lock()
        # controller coordinate = stage coordinate - origin (set by "set position" commands)
        self._origin = {a: 0.0 for a in AXES}
        self._stuck: set[str] = set()
        self._limits_hit: set[str] = set()

    # -- protocol hooks -----------------------------------------------------------------

    def is_move(self, command: str) -> bool:
        """Whether ``command`` starts a move (move faults apply only to those)."""
        raise NotImplementedError

    def execute(self, command: str, fault: Fault | None, targets: dict[str, float]) -> str:
        """Run ``command``; the reply text. Raises :class:`CommandError`."""
        raise NotImplementedError

    def format_error(self, code: int) -> str:
        """The reply text of error ``code``."""
        raise NotImplementedError

    # -- the byte interface -------------------------------------------------------------

    def handle(self, command: str) -> bytes | None:
        """Reply bytes (terminated) to one command line, or None when the reply is lost."""
        with self._lock:
            command = command.strip()
            clock_s = self.xy.clock.elapsed_s
            fault = self.faults.draw(self.is_move(command))
            targets: dict[str, float] = {}
            if fault is not None and fault.kind == "error":
                text = self.format_error(fault.code or self.default_error)
            else:
                try:
                    text = self.execute(command, fault, targets)
                except CommandError as exc:
                    text = self.format_error(exc.code)
            reply: bytes | None = text.encode("ascii") + self.reply_terminator
            if fault is not None and fault.kind == "garbled":
                reply = self.faults.garble(reply, self.reply_terminator)
            elif fault is not None and fault.kind == "lost":
                reply = None
            self.log.append(CommandRecord(command, reply, fault.kind if fault else None,
                                          targets, clock_s))
            return reply

    # -- axes ---------------------------------------------------------------------------

    def _axis(self, axis: str) -> tuple[StageAxes, int]:
        if axis == "Z":
            if self.z is None:
                raise CommandError(self.no_axis_error)
            return self.z, 0
        return self.xy, "XY".index(axis)

    def has_axis(self, axis: str) -> bool:
        """Whether the controller drives ``axis``."""
        return axis != "Z" or self.z is not None

    def position_um(self, axis: str) -> float:
        """Controller coordinate of ``axis`` in µm (the encoder reading)."""
        axes, i = self._axis(axis)
        return float(axes.reported()[i]) - self._origin[axis]

    def set_position_um(self, axis: str, value_um: float) -> None:
        """Make the current position of ``axis`` read ``value_um`` (moves nothing)."""
        axes, i = self._axis(axis)
        self._origin[axis] = float(axes.reported()[i]) - value_um

    def moving(self, axis: str) -> bool:
        """Whether ``axis`` reports busy (moving, or a stuck flag)."""
        if axis in self._stuck:
            return True
        axes, _ = self._axis(axis)
        return _busy_until_s(axes) > axes.clock.elapsed_s + 1e-12

    def poll_busy(self, axes: tuple[str, ...]) -> set[str]:
        """The busy axes among ``axes``; then the clock runs to the end of their moves."""
        busy = {a for a in axes if self.has_axis(a) and self.moving(a)}
        for a in busy:  # a stuck flag outlives the motion itself
            self._axis(a)[0].wait()
        return busy

    def stop(self) -> None:
        """Stop: clears stuck busy flags (a running move still ends where it was going)."""
        self._stuck.clear()

    def start_move(self, targets: dict[str, float], fault: Fault | None,
                   log: dict[str, float]) -> None:
        """Start a move to controller coordinates ``targets`` (µm per axis)."""
        log.update(targets)
        groups: dict[int, tuple[StageAxes, dict[int, str]]] = {}
        for axis in targets:
            axes, i = self._axis(axis)
            groups.setdefault(id(axes), (axes, {}))[1][i] = axis
        self._limits_hit -= {s + a for a in targets for s in "+-"}
        first = True
        for axes, index in groups.values():
            target = np.array(axes.commanded, dtype=float)
            for i, axis in index.items():
                target[i] = targets[axis] + self._origin[axis]
            target = self._clamp(axes, index, target)
            if fault is not None and fault.kind == "limit" and first:
                target = self._trip_limit(axes, index, target)
            axes.start_move_to(*target)
            if fault is not None and fault.kind == "stuck":
                self._stuck |= set(index.values())
            first = False

    def _clamp(self, axes: StageAxes, index: dict[int, str], target: np.ndarray) -> np.ndarray:
        """Stop at the travel's ends, with that limit switch hit (as a real stage does)."""
        for i, axis in index.items():
            lo, hi = axes.limits_um[i]
            if target[i] > hi:
                target[i] = hi
                self._limits_hit.add("+" + axis)
            elif target[i] < lo:
                target[i] = lo
                self._limits_hit.add("-" + axis)
        return target

    def _trip_limit(self, axes: StageAxes, index: dict[int, str], target: np.ndarray
                    ) -> np.ndarray:
        """Injected fault: a switch trips part way along the longest axis of the move."""
        start = np.asarray(axes.commanded, dtype=float)
        delta = target - start
        i = max(index, key=lambda k: abs(delta[k]))
        self._limits_hit.add(("-" if delta[i] < 0 else "+") + index[i])
        fraction = float(self.faults.rng.uniform(0.2, 0.8))
        return start + fraction * delta

    def limits_hit(self) -> set[str]:
        """Limit switches that stopped the last moves (``"+X"``, ``"-Y"``...)."""
        return set(self._limits_hit)

    def home(self, axes: tuple[str, ...], zero: bool, log: dict[str, float]) -> None:
        """Move ``axes`` to their lower travel limits; with ``zero`` call that position 0."""
        targets = {}
        for axis in axes:
            stage, i = self._axis(axis)
            targets[axis] = stage.limits_um[i][0] - self._origin[axis]
        self.start_move(targets, None, log)
        if zero:
            for axis in axes:
                stage, i = self._axis(axis)
                self._origin[axis] = stage.limits_um[i][0]


def _number(text: str) -> float:
    """A command's numeric argument; a non-number or a non-finite one is ``CommandError(-1)``."""
    try:
        value = float(text)
    except ValueError:
        raise CommandError(-1) from None
    if not np.isfinite(value):
        raise CommandError(-1)
    return value
