"""Typed errors of the device layer.

The acquisition retries only :class:`HardwareError` (and its subclasses): a controller that
answered with an error, a garbled or missing reply, a camera that timed out. A limit switch
that stopped a move (:class:`LimitSwitchHit`) is a hardware error too but is never retried:
the same move would drive into the same switch. Anything else (a programming error, a
travel-limit refusal) is not a transient fault and is never retried either.
:class:`UserError` is bad input (a recipe's sample, a calibration file); ``scanner.errors``
re-exports it.
"""

from __future__ import annotations

# bad input (exit code 2); defined in the lowest layer, which raises it too (sample geometry)
from simulators.errors import UserError as UserError


class HardwareError(RuntimeError):
    """A device failed in a way that may succeed when tried again."""


class HardwareTimeout(HardwareError):
    """A device did not answer, or a move or snap did not finish, in time."""


class TravelLimitRefused(RuntimeError):
    """A move outside the travel range was refused before any command was sent (not retried)."""


class LimitSwitchHit(HardwareError):
    """A limit switch stopped a move short of its target (the controller reported it).

    Not transient: the stage's physical travel ends before the target, so trying the move
    again only drives into the hard stop again (see :func:`is_transient`).
    """


def is_transient(exc: BaseException) -> bool:
    """Whether a device error may go away when the action is tried again.

    True for the device layer's :class:`HardwareError`, for timeouts and I/O errors (a serial
    port that hiccupped), and for the plain ``RuntimeError`` that pymmcore raises for every
    C++ adapter error. Subclasses of ``RuntimeError`` that mean a refusal (a travel limit),
    a move stopped by a limit switch, and programming errors (``TypeError``,
    ``AttributeError``...) are not transient.
    """
    if isinstance(exc, (TravelLimitRefused, LimitSwitchHit)):
        return False
    if isinstance(exc, (HardwareError, TimeoutError, OSError)):
        return True
    return type(exc) is RuntimeError


class ConfigError(ValueError):
    """A Micro-Manager configuration that cannot be used here (bad input: exit code 2)."""
