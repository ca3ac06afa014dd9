"""Errors a user can act on.

Anything raised as :class:`UserError` is printed by the CLI as one line on stderr and exits
with code 2 (bad input); everything else is a bug or a hardware fault and exits with 1.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

# the very class that devices and simulators raise (defined in the lowest layer)
from devices.errors import UserError as UserError


class RecipeError(UserError):
    """A recipe that cannot be read or does not validate.

    ``kinds`` holds the pydantic error types of the validation's problems (empty when the
    recipe could not be read at all), so that callers need not match the message's text.
    """

    def __init__(self, message: str, kinds: frozenset[str] = frozenset()) -> None:
        super().__init__(message)
        self.kinds = kinds


class PlanError(UserError):
    """A plan that the hardware cannot execute safely (e.g. outside the travel range)."""


def undecodable(exc: BaseException | None) -> bool:
    """Whether an error is a compressed chunk (Zarr codecs, TIFF tiles) that fails to decode:
    the codecs raise ``zlib.error`` or RuntimeError / ValueError saying "decompress", and a
    chunk that decodes to another size than its array's metadata says cannot be reshaped."""
    import zlib

    while exc is not None:
        text = str(exc).lower()
        # numpy's words for a chunk whose bytes are not the array's dtype and size (a codec
        # dropped from the metadata): "When changing to a larger dtype, its size must be a
        # divisor of the total size in bytes of the last axis of the array"
        if isinstance(exc, zlib.error) or (isinstance(exc, (RuntimeError, ValueError))
                                           and ("decompress" in text
                                                or "cannot reshape array" in text
                                                or "changing to a larger dtype" in text)):
            return True
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return False


def damaged_message(exc: BaseException, where: str | None = None) -> str:
    """The one line a user reads for an :func:`undecodable` chunk, and what to do about it;
    ``where``: the scan folder (or folders) being read, when known."""
    from simulators.errors import first_line

    scan = where if where and "," not in where else "SCAN"
    return (f"{where + ': ' if where else ''}stored data is damaged: a compressed chunk "
            f"cannot be decoded ({first_line(exc)}); re-run `waferscope stitch {scan}` for a "
            f"mosaic, or `waferscope resume {scan}` to take damaged raw tiles again")


def is_number(value: Any) -> bool:
    """Whether a value read from a record (JSON, a defect list) is a number: a bool is an int
    to Python, and ``true`` in a coordinate is damage, not 1."""
    return isinstance(value, int | float | np.integer | np.floating) and \
        not isinstance(value, bool)


def is_finite_number(value: Any) -> bool:
    """:func:`is_number`, and finite (NaN and infinities are damage in a record)."""
    return is_number(value) and math.isfinite(value)
