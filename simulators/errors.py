"""Errors a user can act on, shared by every package (this is the lowest layer).

:class:`InputError` is bad input to any part of waferscope; :class:`UserError` is the
scanner's bad input (a malformed recipe, a missing file, a plan outside the stage travel).
The CLI prints either as one line on stderr and exits with code 2; everything else is a bug or
a hardware fault and exits with 1. ``devices.errors`` and ``scanner.errors`` re-export
:class:`UserError`, so ``except UserError`` catches it whichever module named it.
"""

from __future__ import annotations


class InputError(Exception):
    """Bad input: the message names the file or option at fault and says why, in one line."""


class UserError(InputError):
    """Bad input: a malformed recipe, a missing file, a plan outside the stage travel.

    The message must name the field or file at fault and say why, in one line.
    """


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none): a
    library's error often runs on over several lines of hints, and a user's error is one."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
