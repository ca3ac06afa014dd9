"""Serial ports shared by the devices of one controller, and the bytes of one exchange.

A controller (a Prior ProScan or an ASI MS-2000) answers one command at a time on one port,
and its XY stage and focus drive are separate Micro-Manager devices. So each port is opened
once, kept in a module-level registry by URL, and every exchange (reset the input, write a
command, read its reply) holds the port's lock: a poll from one device can never read the
reply meant for another.

Ports are opened with ``serial.serial_for_url``: ``/dev/ttyUSB0``, ``COM3``,
``socket://host:port`` and the emulator's ``waferscope-emu://prior`` take the same path. A
device port is opened exclusively: one process drives a controller at a time.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import weakref
from typing import Any

import serial

from .errors import HardwareError, HardwareTimeout

log = logging.getLogger("waferscope.serial")

EMULATOR_SCHEME = "waferscope-emu"


#: what flock() answers when another process holds the port's exclusive lock
_LOCKED = {errno.EAGAIN, errno.EWOULDBLOCK}


def _open(url: str, baudrate: int, timeout_s: float) -> serial.SerialBase:
    """Open ``url`` for this process alone (see :func:`_why`).

    ``exclusive=True`` makes pyserial take an exclusive ``flock`` on a POSIX device, so a
    second program (another waferscope: ``calibrate`` during a ``run``) cannot open the port
    and move the stage under a scan; Windows opens ports exclusively anyway, and the URL
    handlers (``loop://``, ``socket://``, the emulator) accept the setting and ignore it.
    """
    if url.lower().startswith(EMULATOR_SCHEME + "://"):
        # importing the emulator registers its URL scheme with pyserial
        import simulators.serial_emu  # noqa: F401
    try:
        return serial.serial_for_url(url, baudrate=baudrate, timeout=timeout_s,
                                     write_timeout=max(timeout_s, 1.0), exclusive=True)
    except (serial.SerialException, ValueError, OSError) as exc:
        raise HardwareError(f"cannot open serial port {url!r}: {_why(exc)}") from None


def _why(exc: BaseException) -> str:
    """Why a port did not open, said once.

    pyserial repeats the port and the errno ("[Errno 2] could not open port X: [Errno 2]
    No such file or directory: 'X'"): the system's words for the errno say it once. A port
    that another process holds is named as such ("Resource temporarily unavailable" said
    nothing a user could act on).
    """
    code = getattr(exc, "errno", None)
    if not isinstance(code, int) or code <= 0:
        return str(exc)
    if code in _LOCKED and "lock" in str(exc).lower():
        return "port busy: in use by another program (a waferscope run or calibrate still going?)"
    return os.strerror(code)


#: most bytes of a reply that never ended that an error quotes
PARTIAL_BYTES = 32


def _partial(raw: bytes) -> str:
    """What came of a reply that never ended, short enough for one line.

    A controller at another baud rate sends noise with no terminator: the whole of it was
    quoted, some 45,000 characters in one "line" for half a second of it.
    """
    if len(raw) <= PARTIAL_BYTES:
        return repr(raw)
    noise = sum(b > 0x7E or (b < 0x20 and b not in b"\r\n\t") for b in raw) > len(raw) // 4
    return (f"{raw[:PARTIAL_BYTES]!r}... {len(raw)} bytes"
            + ("; is the port's baud rate the controller's?" if noise else ""))


class SharedPort:
    """One open serial port and the lock that makes each exchange atomic.

    Parameters
    ----------
    url : str
        Port name or pyserial URL.
    baudrate : int
        Baud rate.
    timeout_s : float
        How long to wait for a reply before giving up.
    """

    def __init__(self, url: str, baudrate: int, timeout_s: float) -> None:
        self.url = url
        self.baudrate = baudrate
        # re-entrant: a controller may hold the port across a read-then-move sequence
        self.lock = threading.RLock()
        self.serial = _open(url, baudrate, timeout_s)
        self.users = 0
        self.controller: Any = None
        # devices dropped without shutdown() still let the port go
        weakref.finalize(self, self.serial.close)

    @property
    def timeout_s(self) -> float:
        """Reply timeout in seconds."""
        return float(self.serial.timeout)

    @timeout_s.setter
    def timeout_s(self, value: float) -> None:
        """Set the reply timeout in seconds (under the port's lock)."""
        with self.lock:
            self.serial.timeout = float(value)

    def exchange(self, command: str, terminator: bytes, send_terminator: bytes = b"\r") -> bytes:
        """Send ``command`` and return its reply line (without ``terminator``).

        Raises
        ------
        HardwareTimeout
            No complete reply within the timeout (a partial one is in the message).
        HardwareError
            The port failed (unplugged, closed).
        """
        try:
            with self.lock:
                # a late reply to an earlier, timed-out command must not pass for this one's
                self.serial.reset_input_buffer()
                self.serial.write(command.encode("ascii") + send_terminator)
                raw = self.serial.read_until(terminator)
        except (serial.SerialException, OSError) as exc:
            raise HardwareError(f"serial port {self.url}: {exc}") from None
        if not raw.endswith(terminator):
            partial = f" (got only {_partial(raw)})" if raw else ""
            raise HardwareTimeout(
                f"no reply to {command!r} on {self.url} within {self.timeout_s:g} s{partial}"
            )
        return raw[: -len(terminator)]

    def close(self) -> None:
        """Close the port."""
        with self.lock:
            self.serial.close()


# weak: the devices hold their port; the registry only finds it for the next device
_PORTS: weakref.WeakValueDictionary[str, SharedPort] = weakref.WeakValueDictionary()
# re-entrant: a garbage-collected core shuts its devices down (releasing their ports) at
# whatever point the collector runs, also while this thread is opening a port
_PORTS_LOCK = threading.RLock()


def acquire_port(url: str, baudrate: int, timeout_s: float) -> SharedPort:
    """The shared port for ``url``, opened on first use (count one more user).

    A port already open keeps its first baud rate; asking for another is an error, since
    both devices talk to the same controller.
    """
    with _PORTS_LOCK:
        port = _PORTS.get(url)
        if port is None:
            port = SharedPort(url, baudrate, timeout_s)
            _PORTS[url] = port
        elif port.baudrate != baudrate:
            raise HardwareError(
                f"serial port {url} is already open at {port.baudrate} baud, not {baudrate}"
            )
        port.users += 1
        return port


def release_port(port: SharedPort) -> None:
    """One user less; the last one closes the port."""
    with _PORTS_LOCK:
        port.users -= 1
        if port.users <= 0:
            _PORTS.pop(port.url, None)
            port.close()
            log.debug("closed %s", port.url)
