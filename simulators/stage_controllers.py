"""Command interpreters of two stage controllers, Prior ProScan III and ASI MS-2000.

Each emulator takes one command line (without its terminator) and returns the reply bytes
(with the terminator), or None when the reply is lost (what both share:
:mod:`simulators.controller_emulator`). The mechanics are a
:class:`simulators.stage.StageAxes` (XY, and optionally a focus axis), so moves take
simulated time on the microscope's clock:

* a move command starts :meth:`StageAxes.start_move_to` and returns at once;
* the axis is busy until the simulated clock has passed the move's end;
* a status poll that finds an axis busy reports it busy and then charges the clock to the
  move's end (``StageAxes.wait``), as :class:`devices.simulated.SimXYStage` does: polling
  is all a driver does while it waits, so the next poll finds the move done.

Positions read back are the commanded ones (``StageAxes.reported``), also during a move; a
stop (``K``/``I``/``HALT``) clears a stuck busy flag but cannot cut a move short, as
``StageAxes`` has no intermediate positions. A move beyond the physical travel stops at the
travel's end with that limit switch reported, as real stages do.

Prior ProScan III (standard mode; commands and replies end with CR; positions in units of
``RES``, default 1 µm)::

    G,x,y[,z]      absolute move                        -> R
    GR,dx,dy[,dz]  relative move                        -> R
    M              move to 0,0                          -> R
    SIS            home: to the lower limits, zero there -> R
    V,z            absolute focus move                  -> R
    U,dz / D,dz    focus up / down                      -> R
    P              position                             -> x,y,z
    PX PY PZ       one axis' position                   -> x
    PX,x PY,y PZ,z set an axis' position                -> 0
    PS,x,y         set the XY position                  -> 0
    Z              set every axis to zero               -> 0
    $              busy bits: 1 X, 2 Y, 4 Z             -> decimal
    LMT            limit switches hit (hex): 1 +X, 2 -X, 4 +Y, 8 -Y, 16 +Z, 32 -Z
    K / I          stop (abrupt / smooth)               -> R
    RES,s / RES,s,?       resolution of the stage (s) or focus (z) in µm
    RES,s,r        set it (0.001 .. 10 µm)               -> 0
    SMS / SMS,n    stage speed in % of maximum (1 .. 100) -> n / 0
    COMP / COMP,n  compatibility mode (0: standard)     -> n / 0
    VERSION, DATE  identification
    errors         E,n: 4 unparseable or unknown command, 7 no focus axis,
                   8 value out of range, 10/11 first/second argument out of range

ASI MS-2000 (commands end with CR, replies with CR LF; positions in 0.1 µm)::

    M X=x Y=y [Z=z]    (MOVE) absolute move           -> :A
    R X=dx Y=dy        (MOVREL) relative move         -> :A
    W X Y [Z]          (WHERE) position               -> :A x y
    /                  (STATUS) busy                  -> B or N
    \\ or HALT         stop                           -> :A
    H X=x Y=y          (HERE) set the position        -> :A
    Z                  (ZERO) every axis to zero      -> :A
    ! X Y              (HOME) to the lower limits     -> :A
    S X=v Y=v / S X?   (SPEED) mm/s                   -> :A / :A X=v
    RS X- Y-           (RDSTAT) limit per axis: U upper, L lower, space none -> :A U L
    V                  (VERSION)
    errors             :N-1 unknown command, :N-2 unrecognized axis, :N-3 missing
                       parameters, :N-4 parameter out of range, :N-21 halted
"""

from __future__ import annotations

from collections.abc import Callable

from .controller_emulator import AXES, CommandError, ControllerEmulator, _number
from .serial_faults import Fault, FaultInjector
from .stage import StageAxes


class ProScanEmulator(ControllerEmulator):
    """Prior ProScan III in standard mode (see the module docstring for the commands)."""

    name = "prior"
    reply_terminator = b"\r"
    default_error = 4
    no_axis_error = 7
    ERRORS = {
        1: "no stage", 2: "not idle", 3: "no drive", 4: "string parse error",
        5: "command not found", 6: "invalid shutter", 7: "no focus", 8: "value out of range",
        9: "invalid wheel", 10: "argument 1 out of range", 11: "argument 2 out of range",
        12: "argument 3 out of range", 16: "incorrect state", 18: "queue full",
        19: "compatibility mode set", 21: "invalid checksum", 60: "encoder error",
        61: "encoder run off",
    }
    MOVES = frozenset({"G", "GR", "M", "SIS", "V", "U", "D"})

    def __init__(self, xy: StageAxes, z: StageAxes | None = None,
                 faults: FaultInjector | None = None) -> None:
        super().__init__(xy, z, faults)
        self.resolution_um = {"S": 1.0, "Z": 1.0}
        self.max_speed_percent = 100
        self.compatibility = 0
        self._base_speed = xy.speed_um_s
        self._handlers: dict[str, Callable[[list[str], Fault | None, dict], str]] = {
            "G": self._go, "GR": self._go_relative, "M": self._go_zero, "SIS": self._home,
            "V": self._focus, "U": self._focus_step(1.0), "D": self._focus_step(-1.0),
            "P": self._position, "PX": self._axis_position, "PY": self._axis_position,
            "PZ": self._axis_position, "PS": self._set_xy, "Z": self._zero, "$": self._busy,
            "LMT": self._limits, "K": self._stop, "I": self._stop, "RES": self._resolution,
            "SMS": self._speed, "COMP": self._compatibility, "VERSION": self._version,
            "DATE": self._date,
        }

    def is_move(self, command: str) -> bool:
        """Whether ``command`` starts a move: ``G``, ``GR``, ``M``, ``SIS``, ``V``, ``U``, ``D``."""
        return command.split(",")[0].strip().upper() in self.MOVES

    def format_error(self, code: int) -> str:
        """The ProScan's error reply ``E,n`` for error ``code``."""
        return f"E,{code}"

    def execute(self, command: str, fault: Fault | None, targets: dict[str, float]) -> str:
        """Run one command line ``HEAD[,arg,...]``; the reply text (without its terminator).

        Parameters
        ----------
        command : str
            The command line; its head is case-insensitive.
        fault : Fault or None
            The fault drawn for this command (a move passes it to the axes).
        targets : dict
            Filled with a move's targets (µm per axis) for the command log.

        Raises
        ------
        CommandError
            Code 4 for an unknown command or an argument that does not parse; others as the
            ProScan numbers them (7 no focus axis, 8 value out of range, ...).
        """
        parts = [p.strip() for p in command.split(",")]
        head = parts[0].upper()
        handler = self._handlers.get(head)
        if handler is None:
            raise CommandError(4)
        self._head = head  # PX/PY/PZ share a handler
        try:
            return handler(parts[1:], fault, targets)
        except CommandError as exc:
            if exc.code == -1:  # a number that does not parse
                raise CommandError(4) from None
            raise

    # -- units ------------------------------------------------------------------------

    def _res(self, axis: str) -> float:
        return self.resolution_um["Z" if axis == "Z" else "S"]

    def _units(self, axis: str) -> int:
        return round(self.position_um(axis) / self._res(axis))

    def _args(self, args: list[str], n: tuple[int, ...]) -> list[float]:
        if len(args) not in n:
            raise CommandError(4)
        return [_number(a) for a in args]

    # -- moves ------------------------------------------------------------------------

    def _go(self, args: list[str], fault: Fault | None, log: dict) -> str:
        values = self._args(args, (2, 3))
        targets = {a: v * self._res(a) for a, v in zip(AXES, values, strict=False)}
        self.start_move(targets, fault, log)
        return "R"

    def _go_relative(self, args: list[str], fault: Fault | None, log: dict) -> str:
        values = self._args(args, (2, 3))
        targets = {a: self.position_um(a) + v * self._res(a)
                   for a, v in zip(AXES, values, strict=False)}
        self.start_move(targets, fault, log)
        return "R"

    def _go_zero(self, args: list[str], fault: Fault | None, log: dict) -> str:
        self._args(args, (0,))
        self.start_move({"X": 0.0, "Y": 0.0}, fault, log)
        return "R"

    def _home(self, args: list[str], fault: Fault | None, log: dict) -> str:
        self._args(args, (0,))
        self.home(("X", "Y"), zero=True, log=log)
        return "R"

    def _focus(self, args: list[str], fault: Fault | None, log: dict) -> str:
        (z,) = self._args(args, (1,))
        self.start_move({"Z": z * self._res("Z")}, fault, log)
        return "R"

    def _focus_step(self, sign: float) -> Callable[[list[str], Fault | None, dict], str]:
        def step(args: list[str], fault: Fault | None, log: dict) -> str:
            (dz,) = self._args(args, (1,))
            self.start_move({"Z": self.position_um("Z") + sign * dz * self._res("Z")},
                            fault, log)
            return "R"

        return step

    def _stop(self, args: list[str], fault: Fault | None, log: dict) -> str:
        self.stop()
        return "R"

    # -- positions --------------------------------------------------------------------

    def _position(self, args: list[str], fault: Fault | None, log: dict) -> str:
        self._args(args, (0,))
        z = self._units("Z") if self.has_axis("Z") else 0
        return f"{self._units('X')},{self._units('Y')},{z}"

    def _axis_position(self, args: list[str], fault: Fault | None, log: dict) -> str:
        axis = self._head[1]
        if not args:
            return str(self._units(axis))
        (value,) = self._args(args, (1,))
        self.set_position_um(axis, value * self._res(axis))
        return "0"

    def _set_xy(self, args: list[str], fault: Fault | None, log: dict) -> str:
        x, y = self._args(args, (2,))
        self.set_position_um("X", x * self._res("X"))
        self.set_position_um("Y", y * self._res("Y"))
        return "0"

    def _zero(self, args: list[str], fault: Fault | None, log: dict) -> str:
        for axis in AXES:
            if self.has_axis(axis):
                self.set_position_um(axis, 0.0)
        return "0"

    # -- status -----------------------------------------------------------------------

    def _busy(self, args: list[str], fault: Fault | None, log: dict) -> str:
        busy = self.poll_busy(AXES)
        return str(sum(1 << AXES.index(a) for a in busy))

    def _limits(self, args: list[str], fault: Fault | None, log: dict) -> str:
        bits = {"+X": 1, "-X": 2, "+Y": 4, "-Y": 8, "+Z": 16, "-Z": 32}
        return f"{sum(bits[s] for s in self.limits_hit()):02X}"

    # -- settings ---------------------------------------------------------------------

    def _resolution(self, args: list[str], fault: Fault | None, log: dict) -> str:
        if not args or args[0].upper() not in ("S", "Z"):
            raise CommandError(10)
        key = args[0].upper()
        if key == "Z" and self.z is None:
            raise CommandError(7)
        if len(args) == 1 or (len(args) == 2 and args[1] == "?"):
            return f"{self.resolution_um[key]:g}"
        (value,) = self._args(args[1:], (1,))
        if not 0.001 <= value <= 10.0:
            raise CommandError(8)
        self.resolution_um[key] = value
        return "0"

    def _speed(self, args: list[str], fault: Fault | None, log: dict) -> str:
        if not args:
            return str(self.max_speed_percent)
        (value,) = self._args(args, (1,))
        if not 1 <= value <= 100 or value != int(value):
            raise CommandError(8)
        self.max_speed_percent = int(value)
        # the controller's speed setting is the stage's real speed
        self.xy.speed_um_s = self._base_speed * self.max_speed_percent / 100
        return "0"

    def _compatibility(self, args: list[str], fault: Fault | None, log: dict) -> str:
        if not args:
            return str(self.compatibility)
        (value,) = self._args(args, (1,))
        if value not in (0, 1):
            raise CommandError(8)
        self.compatibility = int(value)
        return "0"

    def _version(self, args: list[str], fault: Fault | None, log: dict) -> str:
        return "100"

    def _date(self, args: list[str], fault: Fault | None, log: dict) -> str:
        return "Prior Scientific Instruments ProScan III (waferscope emulator)"


class MS2000Emulator(ControllerEmulator):
    """ASI MS-2000 (see the module docstring for the commands)."""

    name = "asi"
    reply_terminator = b"\r\n"
    default_error = 1
    no_axis_error = 2
    UNIT_UM = 0.1
    ERRORS = {
        1: "unknown command", 2: "unrecognized axis parameter", 3: "missing parameters",
        4: "parameter out of range", 5: "operation failed", 6: "undefined error",
        7: "invalid card address", 21: "serial command halted by the HALT command",
    }
    ALIASES = {
        "MOVE": "M", "MOVREL": "R", "WHERE": "W", "STATUS": "/", "HALT": "\\",
        "HERE": "H", "ZERO": "Z", "HOME": "!", "SPEED": "S", "RDSTAT": "RS", "VERSION": "V",
    }
    MOVES = frozenset({"M", "R", "!"})

    def __init__(self, xy: StageAxes, z: StageAxes | None = None,
                 faults: FaultInjector | None = None) -> None:
        super().__init__(xy, z, faults)
        self.speed_mm_s = {a: xy.speed_um_s / 1000 for a in AXES}
        self._handlers: dict[str, Callable[[list[str], Fault | None, dict], str]] = {
            "M": self._move, "R": self._move_relative, "W": self._where, "/": self._status,
            "\\": self._halt, "H": self._here, "Z": self._zero, "!": self._home,
            "S": self._speed, "RS": self._rdstat, "V": self._version,
        }

    def _head(self, command: str) -> str:
        head = command.split(" ", 1)[0].upper() if command else ""
        return self.ALIASES.get(head, head)

    def is_move(self, command: str) -> bool:
        """Whether ``command`` starts a move: ``M``, ``R`` or ``!`` (MOVE, MOVREL, HOME)."""
        return self._head(command) in self.MOVES

    def format_error(self, code: int) -> str:
        """The MS-2000's error reply ``:N-n`` for error ``code``."""
        return f":N-{code}"

    def execute(self, command: str, fault: Fault | None, targets: dict[str, float]) -> str:
        """Run one command line ``HEAD [AXIS=value ...]``; the reply text (without its terminator).

        Parameters
        ----------
        command : str
            The command line; its head (short or long name, ``M`` or ``MOVE``) is
            case-insensitive.
        fault : Fault or None
            The fault drawn for this command (a move passes it to the axes).
        targets : dict
            Filled with a move's targets (µm per axis) for the command log.

        Raises
        ------
        CommandError
            Code 1 for an unknown command; others as the MS-2000 numbers them (2 unrecognised
            axis, 3 missing parameters, 4 parameter out of range).
        """
        handler = self._handlers.get(self._head(command))
        if handler is None:
            raise CommandError(1)
        return handler(command.split()[1:], fault, targets)

    def _params(self, args: list[str], need_value: bool) -> dict[str, str]:
        """``X=12 Y=3`` or ``X Y`` -> {axis: value text ('' when none)}."""
        params = {}
        for arg in args:
            axis, _, value = arg.partition("=")
            axis = axis.upper()
            suffix = axis[1:] if len(axis) > 1 else ""
            axis = axis[:1]
            if axis not in AXES or suffix not in ("", "?", "-", "+") or not self.has_axis(axis):
                raise CommandError(2)
            if need_value and not value:
                raise CommandError(3)
            params[axis] = value or suffix
        return params

    def _values(self, args: list[str]) -> dict[str, float]:
        params = self._params(args, need_value=True)
        if not params:
            raise CommandError(3)
        values = {}
        for axis, text in params.items():
            try:
                values[axis] = _number(text) * self.UNIT_UM
            except CommandError:
                raise CommandError(4) from None
        return values

    def _units(self, axis: str) -> int:
        return round(self.position_um(axis) / self.UNIT_UM)

    def _move(self, args: list[str], fault: Fault | None, log: dict) -> str:
        self.start_move(self._values(args), fault, log)
        return ":A"

    def _move_relative(self, args: list[str], fault: Fault | None, log: dict) -> str:
        deltas = self._values(args)
        self.start_move({a: self.position_um(a) + d for a, d in deltas.items()}, fault, log)
        return ":A"

    def _where(self, args: list[str], fault: Fault | None, log: dict) -> str:
        params = self._params(args, need_value=False)
        if not params:
            raise CommandError(3)
        return ":A " + " ".join(str(self._units(a)) for a in params)

    def _status(self, args: list[str], fault: Fault | None, log: dict) -> str:
        return "B" if self.poll_busy(AXES) else "N"

    def _halt(self, args: list[str], fault: Fault | None, log: dict) -> str:
        self.stop()
        return ":A"

    def _here(self, args: list[str], fault: Fault | None, log: dict) -> str:
        for axis, value in self._values(args).items():
            self.set_position_um(axis, value)
        return ":A"

    def _zero(self, args: list[str], fault: Fault | None, log: dict) -> str:
        for axis in AXES:
            if self.has_axis(axis):
                self.set_position_um(axis, 0.0)
        return ":A"

    def _home(self, args: list[str], fault: Fault | None, log: dict) -> str:
        axes = tuple(self._params(args, need_value=False)) or ("X", "Y")
        self.home(axes, zero=False, log=log)
        return ":A"

    def _speed(self, args: list[str], fault: Fault | None, log: dict) -> str:
        params = self._params(args, need_value=False)
        if not params:
            raise CommandError(3)
        if all(v == "?" for v in params.values()):
            return ":A " + " ".join(f"{a}={self.speed_mm_s[a]:.6f}" for a in params)
        for axis, text in params.items():
            try:
                value = _number(text)
            except CommandError:
                raise CommandError(4) from None
            if not 0 < value <= 100:
                raise CommandError(4)
            self.speed_mm_s[axis] = value
        # the controller's speed setting is the stage's real speed (one profile for XY)
        self.xy.speed_um_s = 1000 * max(self.speed_mm_s["X"], self.speed_mm_s["Y"])
        return ":A"

    def _rdstat(self, args: list[str], fault: Fault | None, log: dict) -> str:
        params = self._params(args, need_value=False)
        if not params:
            raise CommandError(3)
        hit = self.limits_hit()
        out = []
        for axis, suffix in params.items():
            if suffix == "?":
                out.append("B" if self.moving(axis) else "N")
            elif suffix == "-":
                out.append("U" if "+" + axis in hit else "L" if "-" + axis in hit else " ")
            else:
                raise CommandError(3)  # the status byte form is not emulated
        return ":A " + " ".join(out)

    def _version(self, args: list[str], fault: Fault | None, log: dict) -> str:
        return ":A Version: USB-9.2n (waferscope emulator)"


PROTOCOLS: dict[str, type[ControllerEmulator]] = {
    "prior": ProScanEmulator,
    "asi": MS2000Emulator,
}
