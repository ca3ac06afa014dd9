"""Typed errors of the device layer.

The acquisition retries only :class:`HardwareError` (and its subclasses): a controller that
answered with an error, a garbled or missing reply, a camera that timed out. Anything else
(a programming error, a travel-limit refusal) is not a transient fault and is never retried.
"""

from __future__ import annotations


class HardwareError(RuntimeError):
    """A device failed in a way that may succeed when tried again."""


class HardwareTimeout(HardwareError):
    """A device did not answer, or a move or snap did not finish, in time."""


class TravelLimitRefused(RuntimeError):
    """A move outside the travel range was refused before any command was sent (not retried)."""
