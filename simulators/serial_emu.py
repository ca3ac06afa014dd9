"""Emulated Prior ProScan III and ASI MS-2000 stage controllers behind a serial port.

Two ways in:

* **pyserial URL** ``waferscope-emu://prior`` or ``waferscope-emu://asi``, opened with
  ``serial.serial_for_url`` once this module is imported (importing it registers the scheme).
  Options: ``stage=NAME`` binds the controller to mechanics registered with
  :func:`register_stage` (the simulated microscope's own :class:`StageAxes` and clock);
  without it a default stage with a private clock is made. ``fault_rate=0.05`` and
  ``seed=3`` inject faults at random, ``faults=garbled,lost`` restricts their kinds,
  ``fail_next=lost,stuck`` queues deterministic ones (see :mod:`simulators.serial_faults`).
  Example: ``waferscope-emu://prior?stage=scope1&fault_rate=0.05&seed=3``.
* **pty**, for tools that need a device file: ``python -m simulators.serial_emu prior``
  prints the slave's path (e.g. ``/dev/pts/5``) and serves the emulator until killed.

pyserial looks a scheme up as the module ``<package>.protocol_<scheme>`` in each package of
``serial.protocol_handler_packages``. A hyphen cannot be in a module's file name that
``import`` finds, so this module registers itself in ``sys.modules`` under
``simulators.protocol_waferscope-emu`` and adds ``simulators`` to that list.
"""

from __future__ import annotations

import argparse
import os
import select
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass

import numpy as np
import serial
from serial.serialutil import PortNotOpenError, SerialBase, SerialException, to_bytes

from .clock import HardwareClock
from .serial_faults import FAULT_KINDS, FaultInjector
from .stage import StageAxes
from .stage_controllers import PROTOCOLS, ControllerEmulator

SCHEME = "waferscope-emu"


@dataclass
class _Binding:
    xy: StageAxes
    z: StageAxes | None


_STAGES: dict[str, _Binding] = {}
_STAGES_LOCK = threading.Lock()


def register_stage(name: str, xy: StageAxes, z: StageAxes | None = None) -> None:
    """Make ``...://<protocol>?stage=NAME`` drive these mechanics.

    Parameters
    ----------
    name : str
        Name used in the URL (letters, digits, ``-_.``).
    xy : StageAxes
        Two-axis XY mechanics; moves are charged to its clock.
    z : StageAxes or None
        One-axis focus mechanics on the same controller, if any.
    """
    if not name or urllib.parse.quote(name, safe="-_.") != name:
        raise ValueError(f"stage name {name!r}: use letters, digits, '-', '_' or '.'")
    with _STAGES_LOCK:
        _STAGES[name] = _Binding(xy, z)


def unregister_stage(name: str) -> None:
    """Forget a registered stage (ports already open keep working)."""
    with _STAGES_LOCK:
        _STAGES.pop(name, None)


def default_axes(seed: int | None = 0) -> tuple[StageAxes, StageAxes]:
    """A ±100 mm XY stage and a ±5 mm focus axis with their own simulated clock."""
    clock = HardwareClock()
    rng = np.random.default_rng(seed)
    xy = StageAxes([(-100_000.0, 100_000.0)] * 2, 20_000.0, 200_000.0, 0.03, 0.0, clock, rng)
    z = StageAxes([(-5_000.0, 5_000.0)], 1_000.0, 50_000.0, 0.01, 0.0, clock, rng)
    return xy, z


def emulator_from_url(url: str) -> ControllerEmulator:
    """The controller emulator that a ``waferscope-emu://`` URL describes.

    Raises
    ------
    ValueError
        For another scheme, an unknown controller, stage name or option.
    """
    parts = urllib.parse.urlsplit(url)
    if parts.scheme.lower() != SCHEME:
        raise ValueError(f"expected {SCHEME}://prior or {SCHEME}://asi, got {url!r}")
    protocol = (parts.netloc or parts.path.strip("/")).lower()
    if protocol not in PROTOCOLS:
        raise ValueError(f"{url}: unknown controller {protocol!r} (prior or asi)")
    options = {k: v[-1] for k, v in urllib.parse.parse_qs(parts.query, True).items()}
    unknown = set(options) - {"stage", "fault_rate", "seed", "faults", "fail_next"}
    if unknown:
        raise ValueError(f"{url}: unknown option(s) {sorted(unknown)}")
    seed = int(options["seed"]) if options.get("seed") else None
    kinds = options["faults"].split(",") if options.get("faults") else FAULT_KINDS
    faults = FaultInjector(float(options.get("fault_rate") or 0.0), kinds, seed)
    for kind in filter(None, options.get("fail_next", "").split(",")):
        faults.fail_next(kind)
    name = options.get("stage")
    if name:
        with _STAGES_LOCK:
            binding = _STAGES.get(name)
        if binding is None:
            raise ValueError(f"{url}: no stage registered as {name!r}")
        xy, z = binding.xy, binding.z
    else:
        xy, z = default_axes(seed)
    return PROTOCOLS[protocol](xy, z, faults)


class LineSplitter:
    """Cuts the bytes a host writes into command lines (CR or LF ends one)."""

    def __init__(self) -> None:
        self._pending = bytearray()

    def feed(self, data: bytes) -> list[str]:
        """Complete command lines in ``data`` (and what came before); empty ones dropped."""
        self._pending += data
        lines = []
        while True:
            ends = [i for i in (self._pending.find(b"\r"), self._pending.find(b"\n")) if i >= 0]
            if not ends:
                return lines
            end = min(ends)
            line = bytes(self._pending[:end])
            del self._pending[:end + 1]
            if line.strip():
                lines.append(line.decode("ascii", errors="replace"))


class Serial(SerialBase):
    """A pyserial port whose other end is an emulated stage controller.

    Commands are answered as they are written (the emulator works in simulated time); a
    read with a timeout waits, in wall time, at most that long for bytes that will never
    come when a reply was lost. ``emulator`` gives tests the controller (its ``log`` and
    ``faults``).
    """

    def __init__(self, *args: object, **kwargs: object) -> None:
        self.emulator: ControllerEmulator | None = None
        self._replies = bytearray()
        self._lines = LineSplitter()
        self._ready = threading.Condition()
        super().__init__(*args, **kwargs)

    def open(self) -> None:
        """Parse the URL and connect to its emulator."""
        if self.is_open:
            raise SerialException("Port is already open.")
        if self._port is None:
            raise SerialException("Port must be configured before it can be used.")
        try:
            self.emulator = emulator_from_url(self._port)
        except ValueError as exc:
            raise SerialException(str(exc)) from None
        self._replies.clear()
        self._lines = LineSplitter()
        self.is_open = True

    def close(self) -> None:
        """Close the port (waiting reads return)."""
        with self._ready:
            self.is_open = False
            self._ready.notify_all()

    def _reconfigure_port(self, *args: object) -> None:
        """Baud rate, parity... mean nothing to an emulator."""

    def _update_rts_state(self) -> None:
        """No modem lines."""

    def _update_dtr_state(self) -> None:
        """No modem lines."""

    def _update_break_state(self) -> None:
        """No modem lines."""

    @property
    def in_waiting(self) -> int:
        """Reply bytes waiting to be read."""
        if not self.is_open:
            raise PortNotOpenError()
        return len(self._replies)

    @property
    def out_waiting(self) -> int:
        """Commands are taken at once: nothing waits to go out."""
        return 0

    def read(self, size: int = 1) -> bytes:
        """Up to ``size`` bytes; waits at most ``timeout`` seconds (forever when None)."""
        if not self.is_open:
            raise PortNotOpenError()
        deadline = None if self._timeout is None else time.monotonic() + self._timeout
        with self._ready:
            while len(self._replies) < size and self.is_open:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                self._ready.wait(left)
            data = bytes(self._replies[:size])
            del self._replies[:size]
        return data

    def write(self, data: bytes) -> int:
        """Send bytes to the controller; each complete command is answered at once."""
        if not self.is_open:
            raise PortNotOpenError()
        data = to_bytes(data)
        assert self.emulator is not None
        for line in self._lines.feed(data):
            reply = self.emulator.handle(line)
            if reply is not None:
                with self._ready:
                    self._replies += reply
                    self._ready.notify_all()
        return len(data)

    def reset_input_buffer(self) -> None:
        """Drop replies not read yet."""
        if not self.is_open:
            raise PortNotOpenError()
        with self._ready:
            self._replies.clear()

    def reset_output_buffer(self) -> None:
        """Drop a partly written command."""
        if not self.is_open:
            raise PortNotOpenError()
        self._lines = LineSplitter()

    @property
    def cts(self) -> bool:
        """Always clear to send."""
        return True

    @property
    def dsr(self) -> bool:
        """Always ready."""
        return True

    @property
    def ri(self) -> bool:
        """No ring indicator."""
        return False

    @property
    def cd(self) -> bool:
        """Always carrier."""
        return True


def install() -> None:
    """Let ``serial.serial_for_url`` open ``waferscope-emu://`` URLs (done at import)."""
    package = __spec__.parent if __spec__ is not None else "simulators"
    # pyserial imports ".protocol_<scheme>" relative to each handler package; importlib
    # finds a module already in sys.modules whatever characters its name has
    sys.modules.setdefault(f"{package}.protocol_{SCHEME}", sys.modules[__name__])
    if package not in serial.protocol_handler_packages:
        serial.protocol_handler_packages.append(package)


install()


# --------------------------------------------------------------------------- pty


def serve(emulator: ControllerEmulator, fd: int, stop: threading.Event | None = None) -> None:
    """Answer commands read from file descriptor ``fd`` (a pty master) until ``stop``."""
    lines = LineSplitter()
    while stop is None or not stop.is_set():
        ready, _, _ = select.select([fd], [], [], 0.2)
        if not ready:
            continue
        try:
            data = os.read(fd, 4096)
        except OSError:  # no client has the slave open right now
            time.sleep(0.05)
            continue
        for line in lines.feed(data):
            reply = emulator.handle(line)
            if reply is not None:
                os.write(fd, reply)


def open_pty() -> tuple[int, int, str]:
    """A raw pty pair: (master fd, slave fd, slave path)."""
    import tty

    master, slave = os.openpty()
    tty.setraw(slave)  # no echo, no CR->NL translation: the controllers' bytes pass as they are
    return master, slave, os.ttyname(slave)


def main(argv: list[str] | None = None) -> int:
    """``python -m simulators.serial_emu {prior,asi}``: serve an emulator on a pty."""
    parser = argparse.ArgumentParser(
        prog="python -m simulators.serial_emu",
        description="Serve an emulated stage controller on a pty; prints the device path.")
    parser.add_argument("controller", choices=sorted(PROTOCOLS))
    parser.add_argument("--fault-rate", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--faults", default=",".join(FAULT_KINDS),
                        help="comma-separated fault kinds drawn at --fault-rate")
    args = parser.parse_args(argv)
    query = urllib.parse.urlencode({"fault_rate": args.fault_rate, "faults": args.faults,
                                    **({"seed": args.seed} if args.seed is not None else {})})
    emulator = emulator_from_url(f"{SCHEME}://{args.controller}?{query}")
    master, _slave, path = open_pty()  # the slave stays open here, so reads never see EIO
    print(path, flush=True)
    try:
        serve(emulator, master)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
