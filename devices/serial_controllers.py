"""The commands and replies of two stage controllers: Prior ProScan III and ASI MS-2000.

A controller object does the bytes for every device on its port (XY stage and focus drive
share it). It converts µm to the controller's units, parses replies and turns them into
typed errors:

* an error reply (``E,n`` / ``:N-n``) -> :class:`HardwareError` naming the controller's
  meaning of the code;
* no reply in time -> :class:`HardwareTimeout`;
* a reply that does not parse (line noise) -> :class:`HardwareError`.

Read-only queries (positions, busy, limit switches) are retried a few times, since asking
again changes nothing; a move is sent once (a relative move sent twice would move twice,
and only the caller knows whether to try again).

Every move is checked against the travel limits *here*, before any byte is sent, whoever
calls: a target outside them raises :class:`TravelLimitRefused` and nothing is sent.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from typing import TypeVar

from .errors import HardwareError, TravelLimitRefused
from .errors import LimitSwitchHit as LimitSwitchHit  # defined with the other device errors
from .serial_port import SharedPort

log = logging.getLogger("waferscope.serial")

T = TypeVar("T")


class GarbledReply(HardwareError):
    """A reply that does not parse: line noise, or a reply to another command."""


class StageController:
    """What both protocols share: units, travel limits, queries with retries.

    Parameters
    ----------
    port : SharedPort
        The controller's port.
    query_retries : int
        Extra attempts of a read-only query after a failed one.
    """

    name = "controller"
    reply_terminator = b"\r"
    ERRORS: dict[int, str] = {}

    def __init__(self, port: SharedPort, query_retries: int = 3) -> None:
        self.port = port
        self.query_retries = query_retries
        self.limits_um: dict[str, tuple[float, float]] = {}
        self.connected = False

    # -- protocol hooks -----------------------------------------------------------------

    def unit_um(self, axis: str) -> float:
        """Size of one controller unit of ``axis`` in µm."""
        raise NotImplementedError

    def error_code(self, reply: str) -> int | None:
        """The error number of an error reply, or None for any other reply."""
        raise NotImplementedError

    # -- exchanges ----------------------------------------------------------------------

    def send(self, command: str) -> str:
        """One exchange: the reply text; error replies raise :class:`HardwareError`."""
        raw = self.port.exchange(command, self.reply_terminator)
        try:
            text = raw.decode("ascii")
        except UnicodeDecodeError:
            raise GarbledReply(f"{self.name}: garbled reply {raw!r} to {command!r}") from None
        text = text.strip("\r\n")
        code = self.error_code(text)
        if code is not None:
            meaning = self.ERRORS.get(code, "unknown error")
            raise HardwareError(f"{self.name}: {command!r} refused with {text} ({meaning})")
        return text

    def command(self, command: str, expect: str) -> None:
        """Send a command once; its acknowledgement must be ``expect``."""
        reply = self.send(command)
        if reply.strip() != expect:
            raise GarbledReply(f"{self.name}: unexpected reply {reply!r} to {command!r}")

    def query(self, command: str, parse: Callable[[str], T]) -> T:
        """A read-only query, retried ``query_retries`` times on any hardware error."""
        for attempt in range(self.query_retries + 1):
            try:
                reply = self.send(command)
                try:
                    return parse(reply)
                except (ValueError, IndexError, KeyError):
                    raise GarbledReply(
                        f"{self.name}: unexpected reply {reply!r} to {command!r}"
                    ) from None
            except HardwareError as exc:
                if attempt == self.query_retries:
                    raise
                log.warning("%s; asking again (%d/%d)", exc, attempt + 1, self.query_retries)
        raise AssertionError("unreachable")

    # -- units and limits ---------------------------------------------------------------

    def to_units(self, axis: str, um: float) -> int:
        """``um`` in controller units, refused unless it is inside the travel limits.

        Rounding to a unit never leaves the limits: a target within half a unit of a limit
        rounds inwards.
        """
        lo, hi = self.limits_um.get(axis, (-math.inf, math.inf))
        if not (math.isfinite(um) and lo <= um <= hi):
            raise TravelLimitRefused(
                f"{self.name}: {axis} target {um:.3f} µm is outside the travel limits "
                f"[{lo:.3f}, {hi:.3f}] µm; nothing was sent"
            )
        unit = self.unit_um(axis)
        n = round(um / unit)
        if n * unit > hi:
            n = math.floor(hi / unit)
        if n * unit < lo:
            n = math.ceil(lo / unit)
        if not lo <= n * unit <= hi:
            raise TravelLimitRefused(
                f"{self.name}: the travel limits [{lo}, {hi}] µm of {axis} hold no position "
                f"in steps of {unit} µm; nothing was sent"
            )
        return n

    def targets(self, targets: dict[str, float]) -> dict[str, int]:
        """Every axis' target in units; all checked before any is sent."""
        return {axis: self.to_units(axis, um) for axis, um in targets.items()}

    def shift_limits(self, axis: str, by_um: float) -> None:
        """Move ``axis``' limits by ``by_um`` (the coordinate frame changed by -by_um)."""
        if axis in self.limits_um:
            lo, hi = self.limits_um[axis]
            self.limits_um[axis] = (lo + by_um, hi + by_um)

    # -- the operations every protocol has ----------------------------------------------

    def connect(self, focus: bool = False) -> None:
        """Check that the controller answers and read its settings (``focus``: also Z)."""

    def move(self, targets: dict[str, float]) -> None:
        """Start an absolute move of the given axes (µm)."""
        raise NotImplementedError

    def positions(self, axes: Iterable[str]) -> dict[str, float]:
        """Positions of ``axes`` in µm."""
        raise NotImplementedError

    def busy_axes(self, axes: Iterable[str]) -> set[str]:
        """Which of ``axes`` are moving (as the controller reports)."""
        raise NotImplementedError

    def limit_switches(self) -> set[str]:
        """Limit switches that are hit, as ``"+X"``, ``"-Y"``..."""
        raise NotImplementedError

    def stop(self) -> None:
        """Stop every axis."""
        raise NotImplementedError

    def set_origin(self, axis: str) -> None:
        """Call the current position of ``axis`` zero (the travel limits follow)."""
        raise NotImplementedError

    def home(self, axes: Iterable[str]) -> None:
        """Start the controller's homing move of ``axes``."""
        raise NotImplementedError


class ProScan(StageController):
    """Prior ProScan III in standard mode (CR-terminated; positions in ``RES`` units).

    ``home`` is ``SIS``: the stage drives to its lower limit switches and calls that 0,0, so
    the travel limits move with it (their lower ends become 0).
    """

    name = "ProScan III"
    reply_terminator = b"\r"
    ERRORS = {
        1: "no stage", 2: "not idle", 3: "no drive", 4: "string parse error",
        5: "command not found", 6: "invalid shutter", 7: "no focus", 8: "value out of range",
        9: "invalid wheel", 10: "argument 1 out of range", 11: "argument 2 out of range",
        12: "argument 3 out of range", 13: "argument 4 out of range",
        14: "argument 5 out of range", 15: "argument 6 out of range", 16: "incorrect state",
        17: "wheel not fitted", 18: "queue full", 19: "compatibility mode set",
        20: "shutter not fitted", 21: "invalid checksum", 60: "encoder error",
        61: "encoder run off",
    }
    LIMIT_BITS = {"+X": 1, "-X": 2, "+Y": 4, "-Y": 8, "+Z": 16, "-Z": 32}

    def __init__(self, port: SharedPort, query_retries: int = 3) -> None:
        super().__init__(port, query_retries)
        self.resolution_um = {"S": 1.0, "Z": 1.0}

    def unit_um(self, axis: str) -> float:
        """One unit of ``axis`` in µm: the resolution ``connect`` read (``RES,z`` for Z, ``RES,s``
        for X and Y)."""
        return self.resolution_um["Z" if axis == "Z" else "S"]

    def error_code(self, reply: str) -> int | None:
        """The number ``n`` of an ``E,n`` reply, or None for any other reply.

        An ``E,`` reply whose number does not parse raises :class:`GarbledReply`.
        """
        if not reply.startswith("E,"):
            return None
        try:
            return int(reply[2:])
        except ValueError:
            raise GarbledReply(f"{self.name}: garbled error reply {reply!r}") from None

    def connect(self, focus: bool = False) -> None:
        """Standard mode (the replies parsed here), then the resolution of each axis."""
        # setting the mode twice is harmless, so it may be retried like a query
        self.query("COMP,0", _ack("0"))
        self.resolution_um["S"] = self.query("RES,s", float)
        if focus:
            self.resolution_um["Z"] = self.query("RES,z", float)
        self.connected = True

    def move(self, targets: dict[str, float]) -> None:
        """Start an absolute move (µm): ``G,x,y`` for X and Y, ``G,x,y,z`` for all, ``V,z`` for Z.

        Any other set of axes raises ValueError; a target outside the travel limits raises
        :class:`TravelLimitRefused`. Nothing is sent then. The controller acknowledges ``R``.
        """
        units = self.targets(targets)
        if set(units) == {"Z"}:
            command = f"V,{units['Z']}"
        elif set(units) == {"X", "Y"}:
            command = f"G,{units['X']},{units['Y']}"
        elif set(units) == {"X", "Y", "Z"}:
            command = f"G,{units['X']},{units['Y']},{units['Z']}"
        else:
            raise ValueError(f"{self.name}: cannot move axes {sorted(units)} alone")
        self.command(command, "R")

    def positions(self, axes: Iterable[str]) -> dict[str, float]:
        """Positions of ``axes`` in µm: from ``PZ`` for Z alone, else from ``P`` (all three)."""
        axes = tuple(axes)
        if axes == ("Z",):
            return {"Z": self.query("PZ", int) * self.unit_um("Z")}

        def parse(reply: str) -> dict[str, float]:
            values = [int(v) for v in reply.split(",")]
            if len(values) != 3:
                raise ValueError(reply)
            return {a: v * self.unit_um(a) for a, v in zip("XYZ", values, strict=True)
                    if a in axes}

        return self.query("P", parse)

    def busy_axes(self, axes: Iterable[str]) -> set[str]:
        """Which of ``axes`` are moving, from the busy bits of ``$`` (1 X, 2 Y, 4 Z)."""
        mask = self.query("$", _decimal)
        return {a for a in axes if mask & (1 << "XYZ".index(a))}

    def limit_switches(self) -> set[str]:
        """Limit switches that are hit, from the hexadecimal mask of ``LMT`` (``LIMIT_BITS``)."""
        mask = self.query("LMT", _hex)
        return {name for name, bit in self.LIMIT_BITS.items() if mask & bit}

    def stop(self) -> None:
        """Stop every axis (``K``, acknowledged ``R``)."""
        # stopping twice is harmless, so a stop may be retried like a query
        self.query("K", _ack("R"))

    def set_origin(self, axis: str) -> None:
        """Call the current position of ``axis`` zero (``PX,0``, ``PY,0`` or ``PZ,0``); its travel
        limits follow.
        """
        where = self.positions([axis])[axis]
        self.command(f"P{axis},0", "0")
        self.shift_limits(axis, -where)

    def home(self, axes: Iterable[str]) -> None:
        """Home the XY stage (``SIS``): it drives to its lower limit switches and calls that 0,0.

        ``axes`` must be X and Y (NotImplementedError otherwise: the focus has no homing
        command); their travel limits move so that their lower ends become 0.
        """
        axes = tuple(axes)
        if set(axes) != {"X", "Y"}:
            raise NotImplementedError(f"{self.name}: only the XY stage has a homing command")
        self.command("SIS", "R")
        for axis in axes:
            lo, _ = self.limits_um.get(axis, (0.0, 0.0))
            self.shift_limits(axis, -lo)


class MS2000(StageController):
    """ASI MS-2000 (commands end with CR, replies with CR LF; positions in 0.1 µm).

    Busy is the controller's ``/`` (STATUS): it covers every axis of the controller. Limit
    switches come from ``RS X- Y-`` (one character per axis: ``U`` upper, ``L`` lower).
    """

    name = "MS-2000"
    reply_terminator = b"\r\n"
    UNIT_UM = 0.1
    ERRORS = {
        1: "unknown command", 2: "unrecognized axis parameter", 3: "missing parameters",
        4: "parameter out of range", 5: "operation failed", 6: "undefined error",
        7: "invalid card address", 21: "serial command halted by the HALT command",
    }

    def unit_um(self, axis: str) -> float:
        """One unit in µm: 0.1 on every axis (``UNIT_UM``)."""
        return self.UNIT_UM

    def error_code(self, reply: str) -> int | None:
        """The number ``n`` of a ``:N-n`` reply, or None for any other reply.

        A ``:N`` reply whose number does not parse raises :class:`GarbledReply`.
        """
        if not reply.startswith(":N"):
            return None
        try:
            return abs(int(reply[2:]))
        except ValueError:
            raise GarbledReply(f"{self.name}: garbled error reply {reply!r}") from None

    def connect(self, focus: bool = False) -> None:
        """Read the position of every axis (the controller answers, the axes exist)."""
        self.positions(("X", "Y", "Z") if focus else ("X", "Y"))
        self.connected = True

    def move(self, targets: dict[str, float]) -> None:
        """Start an absolute move (µm) of the given axes: ``M X=x Y=y [Z=z]``, acknowledged ``:A``.

        A target outside the travel limits raises :class:`TravelLimitRefused`; nothing is sent
        then.
        """
        units = self.targets(targets)
        self.command("M " + " ".join(f"{a}={n}" for a, n in units.items()), ":A")

    def positions(self, axes: Iterable[str]) -> dict[str, float]:
        """Positions of ``axes`` in µm, from ``W`` (WHERE) naming them in the order given."""
        axes = tuple(axes)

        def parse(reply: str) -> dict[str, float]:
            words = reply.split()
            if words[0] != ":A" or len(words) != len(axes) + 1:
                raise ValueError(reply)
            return {a: float(w) * self.UNIT_UM for a, w in zip(axes, words[1:], strict=True)}

        return self.query("W " + " ".join(axes), parse)

    def busy_axes(self, axes: Iterable[str]) -> set[str]:
        """All of ``axes`` while ``/`` (STATUS) reports busy, else none: the status covers every
        axis of the controller.
        """
        busy = self.query("/", _one_of({"B": True, "N": False}))
        return set(axes) if busy else set()

    def limit_switches(self) -> set[str]:
        """Limit switches of X and Y that are hit, from ``RS X- Y-`` (``U`` upper, ``L`` lower)."""
        def parse(reply: str) -> set[str]:
            if not reply.startswith(":A"):
                raise ValueError(reply)
            flags = reply[3:]  # one character per axis, a space between: "U L", "  L"
            hit = set()
            for axis, flag in zip("XY", (flags[0:1], flags[2:3]), strict=True):
                if flag in ("U", "L"):
                    hit.add(("+" if flag == "U" else "-") + axis)
                elif flag.strip():
                    raise ValueError(reply)
            return hit

        return self.query("RS X- Y-", parse)

    def stop(self) -> None:
        """Stop every axis (``\\``, HALT; acknowledged ``:A``)."""
        # stopping twice is harmless, so a stop may be retried like a query
        self.query("\\", _ack(":A"))

    def set_origin(self, axis: str) -> None:
        """Call the current position of ``axis`` zero (``H axis=0``); its travel limits follow."""
        where = self.positions([axis])[axis]
        self.command(f"H {axis}=0", ":A")
        self.shift_limits(axis, -where)

    def home(self, axes: Iterable[str]) -> None:
        """Start the controller's homing move of ``axes`` (``! X Y``, HOME; acknowledged ``:A``).

        The coordinates are not reset, so the travel limits stay as they are.
        """
        self.command("! " + " ".join(axes), ":A")


def _decimal(reply: str) -> int:
    if not reply.strip().isdigit():
        raise ValueError(reply)
    return int(reply)


def _hex(reply: str) -> int:
    return int(reply.strip(), 16)


def _ack(expect: str) -> Callable[[str], None]:
    def parse(reply: str) -> None:
        if reply.strip() != expect:
            raise ValueError(reply)

    return parse


def _one_of(choices: dict[str, T]) -> Callable[[str], T]:
    def parse(reply: str) -> T:
        return choices[reply.strip()]

    return parse


PROTOCOLS: dict[str, type[StageController]] = {"prior": ProScan, "asi": MS2000}
